//! `amoe routes`: routing analysis over a text, as tables or JSON.

use super::args::{text_ids, AdapterArgs, ModelPick};
use super::with_ctx;
use amoe::gpu::GpuContext;
use amoe::infer::routes::{analyze, RoutesReport};
use amoe::infer::Engine;
use amoe::{Error, Result};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

pub fn run(adapter: &AdapterArgs, args: &RoutesArgs) -> Result<ExitCode> {
    with_ctx(adapter, |ctx| routes(ctx, args))
}

#[derive(clap::Args, Clone, Debug)]
pub struct RoutesArgs {
    #[command(flatten)]
    pub model: ModelPick,
    /// Text to analyze: a file or directory (.txt, .md, .jsonl, .jsonl.gz).
    /// Default: the held-out part of the shipped corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Analyze at most this many tokens.
    #[arg(long, default_value_t = 16384)]
    pub max_tokens: usize,
    /// Words seen fewer times are left out of the word lists.
    #[arg(long, default_value_t = 5)]
    pub min_count: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn routes(ctx: &GpuContext, args: &RoutesArgs) -> Result<()> {
    if args.max_tokens == 0 {
        return Err(Error::invalid("routes", "--max-tokens 0: nothing to do"));
    }
    let ck = args.model.load()?;
    // Default rule: the one the model was trained with (top-1 routes
    // every token to one expert, which would show nothing).
    let gating = args.model.gating.unwrap_or(ck.cfg.gate.gating);
    let gating = if args.model.calibration.is_some() {
        args.model.gating
    } else {
        Some(gating)
    };
    let gate = args.model.gates(&ck, gating)?;
    let ids = text_ids(&ck.tokenizer, args.data.as_deref(), "both", args.max_tokens)?;
    let mut engine = Engine::with_dtype(ctx, &ck, gate, args.model.storage())?;
    let quiet = args.json || !std::io::stderr().is_terminal();
    let report = pollster::block_on(analyze(
        &mut engine,
        ctx,
        &ck.tokenizer,
        &ids,
        args.min_count,
        |done, total| {
            if !quiet {
                eprint!("\r{done}/{total} tokens");
            }
        },
    ))?;
    if !quiet {
        eprintln!();
    }
    if args.json {
        #[derive(Serialize)]
        struct J<'a> {
            adapter: String,
            checkpoint: &'a str,
            #[serde(flatten)]
            report: &'a RoutesReport,
        }
        let j = J {
            adapter: ctx.adapter_label(),
            checkpoint: &ck.source,
            report: &report,
        };
        outln!("{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        print_routes(&report, &ck.source, &ctx.adapter_label())?;
    }
    Ok(())
}

fn print_routes(r: &RoutesReport, source: &str, adapter: &str) -> Result<()> {
    outln!(
        "{} tokens of text through {source} on {adapter}, gating {}{}",
        r.tokens,
        r.gating,
        if r.gating == "adaptive" {
            format!(" (threshold {})", r.threshold)
        } else {
            String::new()
        }
    )?;
    // A top-k model (more than two experts a token): experts per token,
    // and "more than one expert" where the paper's gating says two.
    let many = r.max_experts > 2;
    if many {
        outln!(
            "experts per token over all MoE layers: {:.2} (more than one: {:.1}%)\n",
            r.mean_experts,
            100.0 * r.two_expert_fraction
        )?;
    } else {
        outln!(
            "two-expert fraction over all MoE layers: {:.1}%\n",
            100.0 * r.two_expert_fraction
        )?;
    }
    let e = r.layers.first().map_or(0, |l| l.expert_load.len());
    out!(
        "{:<6} {:>8}  load per expert (% of routed pairs)",
        "layer",
        if many { "experts" } else { "2-expert" }
    )?;
    outln!()?;
    out!("{:<6} {:>8} ", "", "")?;
    for i in 0..e {
        out!(" {:>5}", format!("e{i}"))?;
    }
    outln!()?;
    for l in &r.layers {
        if many {
            out!("{:<6} {:>8.2} ", l.layer, l.mean_experts)?;
        } else {
            out!("{:<6} {:>7.1}% ", l.layer, 100.0 * l.two_expert_fraction)?;
        }
        for x in &l.expert_load {
            out!(" {:>5.1}", 100.0 * x)?;
        }
        outln!()?;
    }
    let (take, col) = if many {
        ("more than one expert", ">1 expert")
    } else {
        ("two experts", "2-expert")
    };
    outln!(
        "\nwords that most often take {take} (seen >= {} times):",
        r.min_count
    )?;
    outln!("{:<20} {:>6} {:>9}", "word", "count", col)?;
    for w in &r.most_two_expert_words {
        outln!(
            "{:<20} {:>6} {:>8.1}%",
            w.word,
            w.count,
            100.0 * w.two_expert_fraction
        )?;
    }
    outln!("\nfrequent words that never took {take}:")?;
    outln!("{:<20} {:>6}", "word", "count")?;
    for w in &r.never_two_expert_words {
        outln!("{:<20} {:>6}", w.word, w.count)?;
    }
    Ok(())
}
