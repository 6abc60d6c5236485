//! `amoe eval`: perplexity of a checkpoint over a text (windows of the
//! context length, a configurable stride), tokens/s and the mean experts per
//! token of each MoE layer, as text or JSON.

use super::args::{text_ids, AdapterArgs, ModelPick};
use super::{with_ctx, write_json};
use amoe::gpu::GpuContext;
use amoe::infer::eval::{evaluate, EvalConfig, EvalReport};
use amoe::infer::sweep::{SweepConfig, SweepReport};
use amoe::infer::{Engine, InferCheckpoint};
use amoe::kernels::{ExpertRule, Gates};
use amoe::model::Model;
use amoe::train::plot::{plot_series, PlotLabels, Series};
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
    /// Without --data: the held-out part of this part of the shipped corpus
    /// (shakespeare, kjv or both).
    #[arg(long, default_value = "both")]
    pub domain: String,
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
    /// Also write the report as JSON to this file ("-": only the JSON, on
    /// standard output).
    #[arg(long)]
    pub json: Option<String>,
    /// Quality against compute for a top-k model: the fixed top-1 .. top-k,
    /// then each rule (`rule=gap,ratio,mass`) at --points thresholds that
    /// spread its mean experts per token between 1 and k.
    #[arg(long, value_name = "rule=R[,R..]")]
    pub sweep: Option<String>,
    /// Thresholds per rule of --sweep (default 2k - 3, at least 5: for
    /// k = 8 mean experts 1.5, 2, .., 7.5).
    #[arg(long, value_name = "N")]
    pub points: Option<usize>,
    /// With --sweep: draw perplexity against mean experts per token (one
    /// line per rule, the fixed top-j marked) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// With --sweep: one-token decode steps timed per point (0: none).
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
}

/// `--sweep rule=gap,ratio,mass` (or `gap,ratio`): the rules, in order.
fn sweep_rules(spec: &str) -> Result<Vec<ExpertRule>> {
    let list = spec.strip_prefix("rule=").unwrap_or(spec);
    let mut rules = Vec::new();
    for name in list.split(',').map(str::trim) {
        let rule: ExpertRule = name.parse().map_err(|_| {
            Error::invalid(
                "sweep",
                format!("{name:?} is not a rule: --sweep rule=gap,ratio,mass (any of them)"),
            )
        })?;
        if rule == ExpertRule::Fixed {
            return Err(Error::invalid(
                "sweep",
                "the fixed top-1 .. top-k are always in a sweep: name gap, ratio or mass",
            ));
        }
        if !rules.contains(&rule) {
            rules.push(rule);
        }
    }
    Ok(rules)
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
    if args.sweep.is_none() && (args.points.is_some() || args.plot.is_some()) {
        return Err(Error::invalid(
            "eval",
            "--points and --plot go with --sweep rule=gap,ratio,mass",
        ));
    }
    let rules = args.sweep.as_deref().map(sweep_rules).transpose()?;
    let ck = args.model.load()?;
    let gates = args.model.gates(&ck, args.model.gating)?;
    let gate = gates.gate;
    let ids = text_ids(
        &ck.tokenizer,
        args.data.as_deref(),
        &args.domain,
        args.max_tokens,
    )?;
    let cfg = EvalConfig {
        stride: args.stride.unwrap_or(ck.cfg.context),
        batch: args.batch,
    };
    if let Some(rules) = rules {
        return sweep(ctx, args, &ck, gates, &ids, cfg, rules);
    }
    let storage = ck.weights.resolve_storage(args.model.storage());
    let model = Model::with_dtype(ctx, &ck.cfg, &ck.weights, storage)?;
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
        gates.clone(),
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
        gate: gates.describe(),
        eval: &report,
    };
    if let Some(path) = &args.json {
        write_json(path, &serde_json::to_string_pretty(&r)?)?;
        if path == "-" {
            return Ok(());
        }
    }
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
    Ok(())
}

#[derive(Serialize)]
struct SweepOut<'a> {
    checkpoint: &'a str,
    adapter: String,
    gate: String,
    #[serde(flatten)]
    sweep: &'a SweepReport,
}

fn sweep(
    ctx: &GpuContext,
    args: &EvalArgs,
    ck: &InferCheckpoint,
    gates: Gates,
    ids: &[u32],
    eval: EvalConfig,
    rules: Vec<ExpertRule>,
) -> Result<()> {
    let gate = gates.gate;
    let k = gate.k.max(2);
    let cfg = SweepConfig {
        rules,
        points: args.points.unwrap_or((2 * k - 3).max(5)),
        eval,
        decode_tokens: args.decode_tokens,
    };
    let mut engine = Engine::with_dtype(ctx, ck, gates.clone(), args.model.storage())?;
    let quiet = !std::io::stderr().is_terminal();
    let report = pollster::block_on(amoe::infer::sweep::sweep(
        ctx,
        &mut engine,
        ids,
        &cfg,
        &mut |what| {
            if !quiet {
                eprintln!("evaluating {what}");
            }
        },
    ))?;
    // "--json -": the JSON alone on standard output, no table.
    if args.json.as_deref() != Some("-") {
        outln!(
            "{} on {}: {} tokens, gate {}",
            ck.source,
            ctx.adapter_label(),
            report.scored,
            gates.describe()
        )?;
        outln!(
            "{:<6} {:>9} {:>7} {:>8}  {:<22} {:>9} {:>9} {:>9}",
            "rule",
            "threshold",
            "target",
            "experts",
            "per layer",
            "ppl",
            "eval t/s",
            "decode t/s"
        )?;
        for p in report.fixed.iter().chain(&report.rules) {
            let rule = match p.rule.as_str() {
                "fixed" => format!("top-{}", p.max_experts),
                r => r.to_string(),
            };
            let per: Vec<String> = p
                .experts_per_layer
                .iter()
                .map(|l| format!("{:.2}", l.mean_experts))
                .collect();
            outln!(
                "{:<6} {:>9} {:>7} {:>8.3}  {:<22} {:>9.3} {:>9.0} {:>9}",
                rule,
                p.threshold.map_or("-".into(), |t| format!("{t:.4}")),
                p.target_experts.map_or("-".into(), |t| format!("{t:.2}")),
                p.mean_experts,
                per.join(" "),
                p.perplexity,
                p.eval_tokens_per_s,
                p.decode_tokens_per_s
                    .map_or("-".into(), |d| format!("{d:.1}"))
            )?;
        }
        // At half the model's experts: each rule against fixed top-k and top-k/2.
        if report.k % 2 == 0 {
            let half = report.k / 2;
            let ppl_of = |j: usize| report.fixed.get(j - 1).map(|p| p.perplexity);
            if let (Some(full), Some(halved)) = (ppl_of(report.k), ppl_of(half)) {
                for rule in &cfg.rules {
                    let name = rule.to_string();
                    if let Some(ppl) = report.perplexity_at(&name, half as f64) {
                        outln!(
                            "at {half} experts per token: {name} perplexity {ppl:.3} ({:+.2}% against top-{}, {:+.2}% against top-{half})",
                            100.0 * (ppl / full - 1.0),
                            report.k,
                            100.0 * (ppl / halved - 1.0)
                        )?;
                    }
                }
            }
        }
    }
    if let Some(path) = &args.plot {
        let mut series: Vec<Series> = cfg
            .rules
            .iter()
            .map(|r| {
                let name = r.to_string();
                let pts = report
                    .rules
                    .iter()
                    .filter(|p| p.rule == name)
                    .map(|p| (p.mean_experts, p.perplexity))
                    .collect();
                Series::new(format!("{name} rule"), pts)
            })
            .collect();
        series.push(Series::markers(
            format!("fixed top-1 .. top-{}", report.k),
            report
                .fixed
                .iter()
                .map(|p| (p.mean_experts, p.perplexity))
                .collect(),
        ));
        let title = format!("{}: perplexity against experts per token", ck.source);
        plot_series(
            path,
            &PlotLabels {
                title: &title,
                x: "mean experts per token",
                y: "perplexity",
            },
            &series,
        )?;
    }
    if let Some(path) = &args.json {
        let out = SweepOut {
            checkpoint: &ck.source,
            adapter: ctx.adapter_label(),
            gate: gates.describe(),
            sweep: &report,
        };
        write_json(path, &serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
