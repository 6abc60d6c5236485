//! `amoe eval`: perplexity of a checkpoint over a text (windows of the
//! context length, a configurable stride), tokens/s and the mean experts per
//! token of each MoE layer, as text or JSON.

use super::args::{text_ids, AdapterArgs, ModelPick};
use super::{with_ctx, write_file};
use amoe::gpu::GpuContext;
use amoe::infer::eval::{evaluate, EvalConfig, EvalReport};
use amoe::model::Model;
use amoe::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelPick,
    /// Text to score: a file or directory (.txt, .md, .jsonl, .jsonl.gz).
    /// Default: the held-out part of the shipped corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tokens between window starts (default: the context length, windows
    /// side by side; smaller gives each scored token more context).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Score at most this many tokens of the text.
    #[arg(long, default_value_t = 65536)]
    pub max_tokens: usize,
    /// Windows per GPU batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    checkpoint: &'a str,
    adapter: String,
    gating: String,
    threshold: f32,
    /// The gate in words (with a top-k rule: which, and its parameter).
    gate: String,
    #[serde(flatten)]
    eval: &'a EvalReport,
}

pub fn run(adapter: &AdapterArgs, args: &EvalArgs) -> Result<ExitCode> {
    with_ctx(adapter, |ctx| eval(ctx, args))
}

fn eval(ctx: &GpuContext, args: &EvalArgs) -> Result<()> {
    if args.max_tokens < 2 {
        return Err(Error::invalid(
            "eval",
            "--max-tokens must be at least 2 (one prediction)",
        ));
    }
    let ck = args.model.load()?;
    let gate = args.model.gate(&ck, args.model.gating)?;
    let ids = text_ids(&ck.tokenizer, args.data.as_deref(), args.max_tokens)?;
    let cfg = EvalConfig {
        stride: args.stride.unwrap_or(ck.cfg.context),
        batch: args.batch,
    };
    let dtype = ck.weights.resolve_dtype(args.model.dtype);
    let model = Model::with_dtype(ctx, &ck.cfg, &ck.weights, dtype)?;
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} windows {elapsed}")
                .map_err(|e| Error::invalid("eval", e.to_string()))?,
        );
        Some(bar)
    } else {
        None
    };
    let report = pollster::block_on(evaluate(
        ctx,
        &model,
        gate,
        &ids,
        cfg,
        &mut |done, total| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        },
    ))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = Report {
        checkpoint: &ck.source,
        adapter: ctx.adapter_label(),
        gating: gate.gating.to_string(),
        threshold: gate.threshold,
        gate: gate.describe(),
        eval: &report,
    };
    outln!(
        "{} on {}: {} tokens ({} windows, stride {}), gating {}",
        r.checkpoint,
        r.adapter,
        report.tokens,
        report.windows,
        report.stride,
        r.gate
    )?;
    outln!(
        "loss {:.4}, perplexity {:.2}, {:.0} tokens/s ({:.1} s)",
        report.loss,
        report.perplexity,
        report.tokens_per_s,
        report.seconds
    )?;
    if !report.experts_per_token.is_empty() {
        let per: Vec<String> = report
            .experts_per_token
            .iter()
            .map(|l| format!("{}: {:.3}", l.layer, l.mean_experts))
            .collect();
        outln!("mean experts per token by layer: {}", per.join(", "))?;
    }
    if let Some(path) = &args.json {
        write_file(path, &serde_json::to_string_pretty(&r)?)?;
    }
    Ok(())
}
