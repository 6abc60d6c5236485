//! `amoe reproduce`: the paper's comparison (Li et al. 2023, section 4) at
//! small scale. A dense model is pretrained on one domain (Shakespeare), every
//! FFN becomes an MoE layer of E experts with freshly initialized parameters
//! (attention, norms and embeddings kept), and each scheme (dense, top1,
//! top2, adaptive, adaptive without curriculum) is fine-tuned from the same
//! seed and data order on a held-out domain (the King James Bible). Top-2
//! runs a fixed budget; its final validation loss is the target every other
//! scheme trains to (or to a step cap). `--from-scratch` skips the dense start.
//!
//! Reported per scheme, as the paper's Table 3: training wall time to the
//! target (top2 = 1.00), steps to target, mean step time, training FLOPs per
//! token, two-expert token fraction, final validation perplexity with top-1
//! inference. Wall time counts training steps only (validation excluded).

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::{Gating, SingleWeight};
use crate::model::{BlockParam, HostParams, ModelConfig, ParamId};
use crate::tokenizer::Tokenizer;
use crate::train::data::{shipped_dir, Corpus, Domain};
use crate::train::metrics::read_jsonl;
use crate::train::plot::{plot_series, PlotLabels, Series};
use crate::train::trainer::{DataSource, Metric, Progress, Run, TrainConfig};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// The comparison's settings.
#[derive(Clone, Debug)]
pub struct ReproduceConfig {
    /// Model and optimizer of every run (its gating is set per scheme).
    pub base: TrainConfig,
    /// Steps of dense pretraining on the source domain.
    pub pretrain_steps: u64,
    /// Top-2's fine-tuning budget (its final validation loss is the target).
    pub budget: u64,
    /// Step cap of every other scheme.
    pub cap: u64,
    /// Skip the dense start: every scheme from a fresh initialization.
    pub from_scratch: bool,
    /// Reuse this pretrained dense run directory instead of pretraining.
    pub pretrained: Option<PathBuf>,
    pub out: PathBuf,
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scheme: String,
    pub time_to_target_s: Option<f64>,
    pub normalized_time: Option<f64>,
    pub steps_to_target: Option<u64>,
    pub mean_step_s: f64,
    pub flops_per_token: f64,
    pub two_expert_fraction: f64,
    pub val_ppl: Option<f64>,
    pub reached_target: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    /// (adaptive mean step / top2 mean step) / (adaptive FLOPs / top2 FLOPs).
    pub step_time_over_flops: Option<f64>,
    pub target_loss: f64,
    pub adapter: String,
    pub from_scratch: bool,
}

struct Scheme {
    name: &'static str,
    dense: bool,
    gating: Gating,
    curriculum: bool,
}

const SCHEMES: [Scheme; 5] = [
    Scheme {
        name: "top2",
        dense: false,
        gating: Gating::Top2,
        curriculum: false,
    },
    Scheme {
        name: "dense",
        dense: true,
        gating: Gating::Top1,
        curriculum: false,
    },
    Scheme {
        name: "top1",
        dense: false,
        gating: Gating::Top1,
        curriculum: false,
    },
    Scheme {
        name: "adaptive",
        dense: false,
        gating: Gating::Adaptive,
        curriculum: true,
    },
    Scheme {
        name: "adaptive_no_curriculum",
        dense: false,
        gating: Gating::Adaptive,
        curriculum: false,
    },
];

fn scheme_config(rc: &ReproduceConfig, s: &Scheme, vocab: usize) -> TrainConfig {
    let mut c = rc.base.clone();
    c.model.vocab = vocab;
    c.model.dense = s.dense;
    c.model.gate.gating = s.gating;
    // Top-2 renormalizes its weights; so must a one-expert token of it.
    if s.gating == Gating::Top2 {
        c.model.gate.single_weight = SingleWeight::One;
    }
    c.curriculum = s.curriculum;
    // One learning-rate schedule for every scheme: top2's budget.
    c.schedule_steps = Some(rc.budget);
    c.data = DataSource::Shipped(Domain::Kjv);
    c.eval_gating = Gating::Top1;
    c
}

/// Base parameters converted to `cfg`: every tensor of the same name and
/// shape is copied; the MoE layers' FFN parameters come from a fresh
/// initialization (the paper's conversion).
fn convert(base: &HostParams, base_cfg: &ModelConfig, cfg: &ModelConfig, seed: u64) -> HostParams {
    let fresh = HostParams::init(cfg, seed);
    fresh.into_map(|id, t| {
        let is_moe_ffn = match id {
            ParamId::Block(l, p) => {
                !matches!(
                    p,
                    BlockParam::Norm1 | BlockParam::Wqkv | BlockParam::Wo | BlockParam::Norm2
                ) && cfg.kind(l) == crate::model::FfnKind::Moe
            }
            _ => false,
        };
        let keep = !is_moe_ffn || base_cfg.dense == cfg.dense;
        match base.get(id) {
            Some(b) if keep && b.shape == t.shape => b.clone(),
            _ => t,
        }
    })
}

/// Run the comparison; `progress` is made per run by `make_progress(name)`.
pub async fn reproduce(
    ctx: &GpuContext,
    rc: &ReproduceConfig,
    make_progress: &mut dyn FnMut(&str) -> Box<dyn Progress>,
    stop: &AtomicBool,
) -> Result<Report> {
    std::fs::create_dir_all(&rc.out).map_err(|e| Error::Io {
        path: rc.out.display().to_string(),
        source: e,
    })?;
    // One tokenizer for every run: trained on both domains' training text.
    let corpus = Corpus::shipped(shipped_dir(), Domain::Both)?;
    let split = corpus.split()?;
    let tokenizer = Tokenizer::train(
        split.train.iter().map(|d| d.text.as_str()),
        rc.base.vocab_size,
    )?;
    let vocab = tokenizer.vocab_size();

    // The dense start.
    let mut base_cfg = rc.base.clone();
    base_cfg.model.vocab = vocab;
    base_cfg.model.dense = true;
    base_cfg.data = DataSource::Shipped(Domain::Shakespeare);
    base_cfg.steps = rc.pretrain_steps;
    let base_params = if rc.from_scratch {
        None
    } else if let Some(dir) = &rc.pretrained {
        let run = Run::resume(ctx, dir, None)?;
        if run.model.cfg.vocab != vocab || run.model.cfg.d != base_cfg.model.d {
            return Err(Error::invalid(
                "reproduce",
                "the pretrained run's model or tokenizer differs from this comparison's",
            ));
        }
        Some((run.model.download(ctx).await?, run.model.cfg.clone()))
    } else {
        let host = HostParams::init(&base_cfg.model, base_cfg.seed);
        let mut run = Run::from_parts(
            ctx,
            base_cfg.clone(),
            tokenizer.clone(),
            host,
            &rc.out.join("pretrain_dense"),
        )?;
        let mut p = make_progress("pretrain dense (shakespeare)");
        run.train(ctx, p.as_mut(), stop).await?;
        Some((run.model.download(ctx).await?, run.model.cfg.clone()))
    };

    let mut rows = Vec::new();
    let mut curves = Vec::new();
    let mut target: Option<f64> = None;
    for s in &SCHEMES {
        let mut cfg = scheme_config(rc, s, vocab);
        let host = match &base_params {
            Some((p, bcfg)) => convert(p, bcfg, &cfg.model, cfg.seed + 1),
            None => HostParams::init(&cfg.model, cfg.seed),
        };
        if s.name == "top2" {
            cfg.steps = rc.budget;
            cfg.target_loss = None;
        } else {
            cfg.steps = rc.cap;
            cfg.target_loss = target.map(|t| t as f32);
        }
        let dir = rc.out.join(s.name);
        let mut run = Run::from_parts(ctx, cfg.clone(), tokenizer.clone(), host, &dir)?;
        let mut p = make_progress(s.name);
        let summary = run.train(ctx, p.as_mut(), stop).await?;
        let metrics: Vec<Metric> = read_jsonl(dir.join("metrics.jsonl"))?;
        let vals: Vec<&Metric> = metrics.iter().filter(|m| m.kind == "val").collect();
        if s.name == "top2" {
            let last = vals
                .last()
                .ok_or_else(|| Error::invalid("reproduce", "top2 run has no validation"))?;
            target = Some(last.loss as f64);
        }
        let t = target.unwrap_or(f64::INFINITY);
        let hit = vals.iter().find(|m| (m.loss as f64) <= t);
        let train_rows: Vec<&Metric> = metrics.iter().filter(|m| m.kind == "train").collect();
        let mean_step = train_rows.iter().filter_map(|m| m.step_s).sum::<f64>()
            / train_rows.len().max(1) as f64;
        let two = train_rows
            .iter()
            .filter_map(|m| m.two_expert_fraction)
            .map(f64::from)
            .sum::<f64>()
            / train_rows.len().max(1) as f64;
        let slots = match s.gating {
            Gating::Top1 => 1.0,
            Gating::Top2 => 2.0,
            Gating::Adaptive => 1.0 + two,
            // The schemes above are the paper's; none is a fixed top-k.
            Gating::TopK => cfg.model.gate.k as f64,
        };
        rows.push(Row {
            scheme: s.name.into(),
            time_to_target_s: hit.map(|m| m.wall_s),
            normalized_time: None,
            steps_to_target: hit.map(|m| m.step),
            mean_step_s: mean_step,
            flops_per_token: 3.0 * cfg.model.forward_flops_per_token(slots),
            two_expert_fraction: if s.dense { 0.0 } else { two },
            val_ppl: summary.val_loss.map(|v| (v as f64).exp()),
            reached_target: hit.is_some(),
        });
        curves.push(Series::new(
            s.name,
            vals.iter().map(|m| (m.wall_s, m.loss as f64)).collect(),
        ));
        if summary.interrupted {
            break;
        }
    }
    let top2_time = rows
        .iter()
        .find(|r| r.scheme == "top2")
        .and_then(|r| r.time_to_target_s);
    for r in &mut rows {
        r.normalized_time = match (r.time_to_target_s, top2_time) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
    }
    let get = |n: &str| rows.iter().find(|r| r.scheme == n);
    let step_time_over_flops = match (get("adaptive"), get("top2")) {
        (Some(a), Some(t)) if t.mean_step_s > 0.0 && t.flops_per_token > 0.0 => {
            Some((a.mean_step_s / t.mean_step_s) / (a.flops_per_token / t.flops_per_token))
        }
        _ => None,
    };
    plot_series(
        rc.out.join("reproduce.svg"),
        &PlotLabels {
            title: "validation loss (top-1 inference) vs training wall time",
            x: "wall time (s)",
            y: "validation loss",
        },
        &curves,
    )?;
    Ok(Report {
        rows,
        step_time_over_flops,
        target_loss: target.unwrap_or(f64::NAN),
        adapter: ctx.adapter_label(),
        from_scratch: rc.from_scratch,
    })
}

/// The table in the layout of the paper's Table 3.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "target validation loss {:.4} (top2's after its budget){}; adapter {}\n",
        r.target_loss,
        if r.from_scratch {
            ", from scratch"
        } else {
            ", fine-tuned from a dense model"
        },
        r.adapter
    );
    s.push_str(&format!(
        "{:<24} {:>10} {:>8} {:>8} {:>10} {:>12} {:>8} {:>9}\n",
        "scheme", "time (s)", "norm.", "steps", "step (s)", "FLOPs/tok", "2-exp", "val ppl"
    ));
    let opt =
        |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "-".into());
    for row in &r.rows {
        s.push_str(&format!(
            "{:<24} {:>10} {:>8} {:>8} {:>10.3} {:>12.3e} {:>7.1}% {:>9}\n",
            row.scheme,
            opt(row.time_to_target_s, 1),
            opt(row.normalized_time, 2),
            row.steps_to_target
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            row.mean_step_s,
            row.flops_per_token,
            100.0 * row.two_expert_fraction,
            opt(row.val_ppl, 2),
        ));
    }
    if let Some(x) = r.step_time_over_flops {
        s.push_str(&format!(
            "step_time_over_flops (adaptive vs top2): {x:.3}\n"
        ));
    }
    s
}

/// Used by the CLI to check paths early.
pub fn check_out(out: &Path) -> Result<()> {
    if out.is_file() {
        return Err(Error::invalid(
            "reproduce",
            format!("{} is a file", out.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::GateConfig;

    #[test]
    fn conversion_keeps_attention_and_refreshes_moe_experts() {
        let dense = ModelConfig {
            vocab: 300,
            d: 32,
            layers: 2,
            heads: 2,
            context: 16,
            ffn: 32,
            experts: 4,
            dense: true,
            ..ModelConfig::default()
        };
        let moe = ModelConfig {
            dense: false,
            gate: GateConfig::new(Gating::Adaptive),
            ..dense.clone()
        };
        let base = HostParams::init(&dense, 5);
        let conv = convert(&base, &dense, &moe, 9);
        conv.validate(&moe).unwrap();
        assert_eq!(conv.blocks[0].wqkv, base.blocks[0].wqkv);
        assert_eq!(conv.wte, base.wte);
        assert_eq!(conv.blocks[1].ffn.w1.data.len(), 4 * 32 * 32);
        assert_ne!(conv.blocks[1].ffn.w1, base.blocks[1].ffn.w1);
        // The dense scheme keeps its pretrained FFN.
        let same = convert(&base, &dense, &dense, 9);
        assert_eq!(same, base);
    }
}
