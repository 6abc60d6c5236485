//! `amoe calibrate`: per-layer thresholds of a per-token expert rule for a
//! top-k model, written as a small JSON file that `--calibration` reads.

use super::args::{text_ids, AdapterArgs, ModelPick};
use super::{with_ctx, write_file};
use amoe::gpu::GpuContext;
use amoe::infer::calibration::{calibrate, CalibrateConfig};
use amoe::infer::eval::EvalConfig;
use amoe::infer::Engine;
use amoe::kernels::{ExpertRule, Gating};
use amoe::{Error, Result};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Clone, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelPick,
    /// Calibration text: a file or directory (.txt, .md, .jsonl,
    /// .jsonl.gz). Default: the held-out part of the shipped corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Without --data: the held-out part of this part of the shipped corpus
    /// (shakespeare, kjv or both).
    #[arg(long, default_value = "both")]
    pub domain: String,
    /// Use at most this many tokens of the text.
    #[arg(long, default_value_t = 16384)]
    pub max_tokens: usize,
    /// The mean experts per token to reach, in [1, k].
    #[arg(long, value_name = "X")]
    pub target_experts: f64,
    /// Gather the router's scores and choose the thresholds this many times
    /// (each round under the previous round's thresholds).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Windows per GPU batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Where to write the file (default: calibration-RULE-X.json in the
    /// checkpoint directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(adapter: &AdapterArgs, args: &CalibrateArgs) -> Result<ExitCode> {
    with_ctx(adapter, |ctx| calibrate_cmd(ctx, args))
}

fn calibrate_cmd(ctx: &GpuContext, args: &CalibrateArgs) -> Result<()> {
    let m = &args.model;
    let Some(rule) = m.rule else {
        return Err(Error::invalid(
            "calibrate",
            "name the rule to calibrate: --rule gap, ratio or mass",
        ));
    };
    if rule == ExpertRule::Fixed {
        return Err(Error::invalid(
            "calibrate",
            "--rule fixed has no threshold: name gap, ratio or mass",
        ));
    }
    if m.threshold.is_some() || m.calibration.is_some() {
        return Err(Error::invalid(
            "calibrate",
            "calibrate chooses the thresholds: leave out --threshold and --calibration",
        ));
    }
    if args.max_tokens < 2 {
        return Err(Error::invalid(
            "calibrate",
            "--max-tokens must be at least 2 (one prediction)",
        ));
    }
    let ck = m.load()?;
    if ck.cfg.gate.gating != Gating::TopK {
        return Err(Error::invalid(
            "calibrate",
            format!(
                "calibration chooses among a top-k router's experts; {} is {}",
                ck.source,
                ck.cfg.gate.describe()
            ),
        ));
    }
    // The model's own top-k (or a --max-experts cap), every expert taken
    // while the scores are gathered.
    let mut gate = ck.gate(Some(Gating::TopK), None)?;
    if let Some(k) = m.max_experts {
        let most = amoe::kernels::MAX_TOPK.min(ck.cfg.experts);
        if !(2..=most).contains(&k) {
            return Err(Error::invalid(
                "max-experts",
                format!("{k}: must be 2..={most} to leave the rule a choice"),
            ));
        }
        gate.k = k;
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let dir = std::path::Path::new(&ck.source);
        let dir = if dir.is_dir() {
            dir
        } else {
            dir.parent().unwrap_or(dir)
        };
        dir.join(format!("calibration-{rule}-{}.json", args.target_experts))
    });
    let ids = text_ids(
        &ck.tokenizer,
        args.data.as_deref(),
        &args.domain,
        args.max_tokens,
    )?;
    let data = match &args.data {
        Some(p) => p.display().to_string(),
        None => format!("the held-out part of the shipped corpus ({})", args.domain),
    };
    let mut engine = Engine::with_dtype(ctx, &ck, gate, m.storage())?;
    let quiet = !std::io::stderr().is_terminal();
    let cfg = CalibrateConfig {
        rule,
        target_experts: args.target_experts,
        eval: EvalConfig {
            stride: ck.cfg.context,
            batch: args.batch,
        },
        rounds: args.rounds,
        data,
    };
    let c = pollster::block_on(calibrate(ctx, &mut engine, &ids, &cfg, &mut |what| {
        if !quiet {
            eprintln!("{what}");
        }
    }))?;
    write_file(
        &out.display().to_string(),
        &serde_json::to_string_pretty(&c)?,
    )?;
    outln!(
        "{} on {}: {rule} rule over top-{}, target {} experts per token, measured {:.3} over {} tokens",
        ck.source,
        ctx.adapter_label(),
        c.max_experts,
        c.target_experts,
        c.mean_experts,
        c.tokens
    )?;
    for l in &c.layers {
        outln!(
            "layer {:>3}: threshold {:.5}, {:.3} experts per token, {:.2}% of the top-{} weight dropped",
            l.layer,
            l.threshold,
            l.mean_experts,
            100.0 * l.dropped_weight,
            c.max_experts
        )?;
    }
    outln!(
        "wrote {} (use it with --calibration {})",
        out.display(),
        out.display()
    )?;
    Ok(())
}
