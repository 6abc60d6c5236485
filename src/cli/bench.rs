//! `amoe bench kernels` and `amoe bench infer`: benchmarks that print JSON.

use super::args::{choice, AdapterArgs, ModelPick};
use super::{contexts, with_ctx, write_file};
use amoe::bench::BenchShape;
use amoe::gpu::GpuContext;
use amoe::infer::InferCheckpoint;
use amoe::kernels::{Gates, Gating};
use amoe::train::data::{shipped_dir, Corpus, Domain};
use amoe::{Error, Result};
use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum BenchWhat {
    /// Roofline, dense matmul, MoE layer forward, grouped/dense ratio.
    Kernels {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: BenchKernelsArgs,
    },
    /// Prefill and decode tokens/s for top1, top2 and adaptive, and GPU bytes
    /// (default checkpoint: the demo).
    Infer {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: BenchInferArgs,
    },
}

pub fn run(what: BenchWhat) -> Result<ExitCode> {
    match what {
        BenchWhat::Kernels { adapter, args } => kernels(&adapter, &args),
        BenchWhat::Infer { adapter, args } => with_ctx(&adapter, |ctx| {
            eprintln!("== bench infer on {}", ctx.adapter_label());
            let text = bench_infer(ctx, &args)?;
            outln!("{text}")?;
            if let Some(path) = &args.json {
                write_file(path, &text)?;
            }
            Ok(())
        }),
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchKernelsArgs {
    /// Write the JSON to this file as well as stdout.
    #[arg(long)]
    pub json: Option<String>,
    /// Smaller shapes, for a quick look (not comparable with full runs).
    #[arg(long)]
    pub quick: bool,
}

fn kernels(adapter: &AdapterArgs, args: &BenchKernelsArgs) -> Result<ExitCode> {
    let json = args.json.as_deref();
    let quick = args.quick;
    let ctxs = contexts(adapter)?;
    let mut out = Vec::new();
    for ctx in &ctxs {
        // Kernel throughput: the kernels of a long run (training's).
        ctx.set_long_running(true);
        eprintln!("== bench on {}", ctx.adapter_label());
        let r = pollster::block_on(amoe::bench::bench_kernels(ctx, quick, |msg| {
            eprintln!("   {msg}")
        }))?;
        out.push(r);
    }
    let text = serde_json::to_string_pretty(&if out.len() == 1 {
        serde_json::to_value(&out[0])?
    } else {
        serde_json::json!({ "adapters": out })
    })?;
    outln!("{text}")?;
    if let Some(path) = json {
        write_file(path, &text)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchInferArgs {
    #[command(flatten)]
    pub model: ModelPick,
    /// Prompt tokens of the prefill (from the held-out shipped text; at most the context).
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// Tokens of the decode loop.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Write the JSON to this file as well as stdout.
    #[arg(long)]
    pub json: Option<String>,
    /// A published model's layer shapes with random weights instead of a
    /// checkpoint (the demo's tokenizer makes the prompt).
    #[arg(long, value_parser = choice::<BenchShape>())]
    pub shape: Option<BenchShape>,
    /// Layers of --shape.
    #[arg(long, default_value_t = 2)]
    pub shape_layers: usize,
    /// Vocabulary of --shape (default: the model's own; a smaller one lets
    /// the embedding fit an adapter whose storage binding is smaller than
    /// V x D x 4 bytes, as long as tensors are not split).
    #[arg(long)]
    pub shape_vocab: Option<usize>,
    /// Choose kernels for a long run, as training does: on lavapipe its
    /// subgroup GEMM cores (faster prefills, but about 13 s more before the
    /// first token). By default kernels that compile fast are chosen.
    #[arg(long)]
    pub long_running: bool,
}

/// A model of `shape` with random weights (context: --context, else 512).
fn synthetic(shape: BenchShape, args: &BenchInferArgs) -> Result<InferCheckpoint> {
    let demo = InferCheckpoint::load(amoe::infer::checkpoint::demo_dir())?;
    let ck = shape.checkpoint(
        args.shape_layers,
        args.model.context.unwrap_or(512),
        args.shape_vocab,
        demo.tokenizer,
    )?;
    eprintln!(
        "   {shape}: {} layers of random weights, vocabulary {}, {} parameters",
        ck.cfg.layers,
        ck.cfg.vocab,
        ck.cfg.num_params()
    );
    Ok(ck)
}

fn bench_infer(ctx: &GpuContext, args: &BenchInferArgs) -> Result<String> {
    ctx.set_long_running(args.long_running);
    let ck = match args.shape {
        Some(shape) => synthetic(shape, args)?,
        None => args.model.load()?,
    };
    let n = ck.cfg.context;
    // Leave room to decode after the prompt (a context of 1 leaves none).
    let p = args
        .prompt_tokens
        .unwrap_or(n / 2)
        .clamp(1, n.saturating_sub(1).max(1));
    let val = Corpus::shipped(shipped_dir(), Domain::Both)?.split()?.val;
    let mut ids = Vec::new();
    for d in &val {
        ids.extend(ck.tokenizer.encode(&d.text)?);
        if ids.len() >= p {
            break;
        }
    }
    if ids.len() < p {
        return Err(Error::invalid(
            "bench infer",
            format!("held-out text has only {} tokens", ids.len()),
        ));
    }
    ids.truncate(p);
    let m = &args.model;
    let gates: Vec<Gates> =
        if m.calibration.is_some() || m.rule.is_some() || m.max_experts.is_some() {
            // A per-token rule: against the model's fixed top-k.
            let fixed = amoe::kernels::GateConfig {
                rule: amoe::kernels::ExpertRule::Fixed,
                ..ck.gate(Some(Gating::TopK), None)?
            };
            vec![fixed.into(), m.gates(&ck, m.gating)?]
        } else {
            let gatings = match m.gating {
                Some(g) => vec![g],
                // A pretrained model: its own top-k, and top-1 for comparison.
                None if ck.cfg.gate.gating == Gating::TopK => vec![Gating::TopK, Gating::Top1],
                None => vec![Gating::Top1, Gating::Top2, Gating::Adaptive],
            };
            gatings
                .into_iter()
                .map(|g| ck.gate(Some(g), None).map(Gates::from))
                .collect::<Result<_>>()?
        };
    let r = pollster::block_on(amoe::bench::bench_infer(
        ctx,
        &ck,
        &ids,
        args.decode_tokens,
        &gates,
        args.model.storage(),
        |m| eprintln!("   {m}"),
    ))?;
    Ok(serde_json::to_string_pretty(&r)?)
}
