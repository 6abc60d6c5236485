//! Quality against compute for a top-k model (`amoe eval --sweep`): the
//! perplexity of a text under the model's fixed top-1 .. top-k and under
//! each per-token expert rule (`ExpertRule`) at thresholds chosen so that
//! the mean experts per token spread evenly between 1 and k, with the mean
//! experts per token of each MoE layer and the tokens/s of the batched
//! forward and of decode.
//!
//! The thresholds come from one evaluation under the fixed top-k that also
//! keeps every scored token's k highest router scores per layer
//! (`eval::evaluate_ranked`): the expert count of a rule at a threshold is
//! then known on the host (`reference::gate::rule_count`, the gate kernel's
//! decision), and a bisection finds the threshold whose mean over the text
//! and the layers is the target. The evaluation under that threshold
//! measures the real mean, which differs a little (later layers see other
//! hidden states once earlier layers take fewer experts).

use super::eval::{evaluate, evaluate_ranked, EvalConfig, EvalReport, LayerExperts};
use super::Engine;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::{ExpertRule, GateConfig, Gating};
use crate::util::Stopwatch;
use serde::Serialize;

/// What to sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepConfig {
    /// Rules to sweep (not `Fixed`: the fixed top-1 .. top-k are always run).
    pub rules: Vec<ExpertRule>,
    /// Thresholds per rule (targets 1 + (k - 1) i / (points + 1)).
    pub points: usize,
    pub eval: EvalConfig,
    /// Decode steps timed per point (0: no decode timing).
    pub decode_tokens: usize,
}

/// One gate's measurements.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepPoint {
    /// "fixed" or the rule's name.
    pub rule: String,
    /// The rule's parameter (None for a fixed top-j).
    pub threshold: Option<f32>,
    /// The experts a token may take (j of a fixed top-j).
    pub max_experts: usize,
    /// The mean experts per token the threshold was chosen for.
    pub target_experts: Option<f64>,
    /// The mean over the MoE layers of the measured experts per token.
    pub mean_experts: f64,
    pub experts_per_layer: Vec<LayerExperts>,
    pub loss: f64,
    pub perplexity: f64,
    /// Scored tokens/s of the batched forward over windows (prefill's shape).
    pub eval_tokens_per_s: f64,
    /// Tokens/s of one-token decode steps with the KV cache.
    pub decode_tokens_per_s: Option<f64>,
}

/// The whole sweep.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepReport {
    /// The model's experts per token.
    pub k: usize,
    pub tokens: usize,
    pub scored: usize,
    /// Fixed top-1 .. top-k.
    pub fixed: Vec<SweepPoint>,
    /// Every rule's points, in `SweepConfig::rules` order, fewest experts first.
    pub rules: Vec<SweepPoint>,
}

impl SweepReport {
    /// A rule's perplexity at `experts` per token, interpolated linearly
    /// between its two points around it (None outside their range).
    pub fn perplexity_at(&self, rule: &str, experts: f64) -> Option<f64> {
        let pts: Vec<&SweepPoint> = self.rules.iter().filter(|p| p.rule == rule).collect();
        pts.windows(2).find_map(|w| {
            let (a, b) = (w[0], w[1]);
            let (lo, hi) = (
                a.mean_experts.min(b.mean_experts),
                a.mean_experts.max(b.mean_experts),
            );
            if !(lo..=hi).contains(&experts) {
                return None;
            }
            if hi - lo < 1e-12 {
                return Some(a.perplexity.min(b.perplexity));
            }
            let f = (experts - a.mean_experts) / (b.mean_experts - a.mean_experts);
            Some(a.perplexity + f * (b.perplexity - a.perplexity))
        })
    }
}

/// Mean experts per token of one layer's ranked scores `[tokens, k]`
/// under `gate` (its rule and threshold over those k).
pub fn mean_experts(ranked: &[f32], k: usize, gate: &GateConfig) -> f64 {
    super::calibration::layer_use(ranked, k, gate).0
}

/// The threshold of `gate.rule` in [0, 1] whose mean experts per token,
/// averaged over `layers`' ranked scores, is closest to `target` (a
/// bisection: the gap and mass rules take more experts as the threshold
/// grows, the ratio rule fewer).
pub fn threshold_for(layers: &[&[f32]], k: usize, gate: GateConfig, target: f64) -> f32 {
    let mean = |t: f32| {
        let g = GateConfig {
            threshold: t,
            ..gate
        };
        layers.iter().map(|l| mean_experts(l, k, &g)).sum::<f64>() / layers.len().max(1) as f64
    };
    let rising = gate.rule != ExpertRule::Ratio;
    let (mut lo, mut hi) = (0.0f32, 1.0f32);
    for _ in 0..32 {
        let mid = 0.5 * (lo + hi);
        if (mean(mid) < target) == rising {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if (mean(lo) - target).abs() <= (mean(hi) - target).abs() {
        lo
    } else {
        hi
    }
}

/// Run the sweep on `engine`'s model (its gate must be a top-k router,
/// k >= 2); `progress(message)` before each evaluation.
pub async fn sweep(
    ctx: &GpuContext,
    engine: &mut Engine,
    ids: &[u32],
    cfg: &SweepConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<SweepReport> {
    let own = engine.gates.clone();
    // A model trained with top-2 or adaptive gating (the paper's): k = 2,
    // its fixed top-1 and top-2, and the gap rule is its own adaptive gate.
    let trained = engine.cfg.gate;
    let pair = matches!(trained.gating, Gating::Top2 | Gating::Adaptive);
    let base = if pair { trained } else { engine.gate };
    if !pair && (base.gating != Gating::TopK || base.k < 2) {
        return Err(Error::invalid(
            "sweep",
            format!(
                "--sweep chooses among a top-k router's experts (k >= 2) or a two-expert model's; this model's gate is {}",
                base.describe()
            ),
        ));
    }
    if pair && cfg.rules.iter().any(|&r| r != ExpertRule::Gap) {
        return Err(Error::invalid(
            "sweep",
            format!(
                "a model trained with {} gating sweeps its own rule, the gap rule (--sweep rule=gap): ratio and mass go with top-k routers",
                trained.gating
            ),
        ));
    }
    if cfg.rules.is_empty() || cfg.rules.contains(&ExpertRule::Fixed) {
        return Err(Error::invalid(
            "sweep",
            "--sweep takes rules among gap, ratio and mass (the fixed top-1 .. top-k are always run)",
        ));
    }
    if cfg.points == 0 || cfg.points > 64 {
        return Err(Error::invalid(
            "sweep",
            format!("--points {}: must be 1..=64", cfg.points),
        ));
    }
    let k = if pair { 2 } else { base.k };
    let fixed = GateConfig {
        rule: ExpertRule::Fixed,
        ..base
    };
    // The gate of fixed top-j, and of a rule at a threshold.
    let top = |j: usize| match (pair, j) {
        (true, 1) => GateConfig {
            gating: Gating::Top1,
            ..base
        },
        (true, _) => GateConfig {
            gating: Gating::Top2,
            ..base
        },
        (false, _) => GateConfig { k: j, ..fixed },
    };
    let ruled = |rule: ExpertRule, threshold: f32| match pair {
        true => GateConfig {
            gating: Gating::Adaptive,
            threshold,
            ..base
        },
        false => GateConfig {
            rule,
            threshold,
            ..fixed
        },
    };
    progress(&format!("top-{k} (and the router's ranked scores)"));
    let (top_k, ranked) = evaluate_ranked(
        ctx,
        engine.model(),
        top(k),
        ids,
        cfg.eval,
        k,
        &mut |_, _| {},
    )
    .await?;
    let mut report = SweepReport {
        k,
        tokens: top_k.tokens,
        scored: top_k.scored,
        fixed: Vec::new(),
        rules: Vec::new(),
    };
    for j in 1..=k {
        let gate = top(j);
        let eval = if j == k {
            top_k.clone()
        } else {
            progress(&format!("top-{j}"));
            evaluate(ctx, engine.model(), gate, ids, cfg.eval, &mut |_, _| {}).await?
        };
        let decode = decode_rate(ctx, engine, gate, ids, cfg.decode_tokens).await?;
        report
            .fixed
            .push(point("fixed", None, j, None, &eval, decode));
    }
    let layers: Vec<&[f32]> = ranked.layers.iter().map(|(_, s)| s.as_slice()).collect();
    for &rule in &cfg.rules {
        for i in 1..=cfg.points {
            let target = 1.0 + (k - 1) as f64 * i as f64 / (cfg.points + 1) as f64;
            // The count of a two-expert model's adaptive gate is the gap
            // rule's over its two ranked scores.
            let counting = GateConfig {
                gating: Gating::TopK,
                k,
                rule,
                threshold: 0.0,
                ..fixed
            };
            let threshold = threshold_for(&layers, k, counting, target);
            let gate = ruled(rule, threshold);
            progress(&gate.describe());
            let eval = evaluate(ctx, engine.model(), gate, ids, cfg.eval, &mut |_, _| {}).await?;
            let decode = decode_rate(ctx, engine, gate, ids, cfg.decode_tokens).await?;
            report.rules.push(point(
                &rule.to_string(),
                Some(threshold),
                k,
                Some(target),
                &eval,
                decode,
            ));
        }
    }
    engine.set_gate(ctx, own)?;
    Ok(report)
}

fn point(
    rule: &str,
    threshold: Option<f32>,
    max_experts: usize,
    target: Option<f64>,
    eval: &EvalReport,
    decode: Option<f64>,
) -> SweepPoint {
    let layers = &eval.experts_per_token;
    SweepPoint {
        rule: rule.to_string(),
        threshold,
        max_experts,
        target_experts: target,
        mean_experts: layers.iter().map(|l| l.mean_experts).sum::<f64>()
            / layers.len().max(1) as f64,
        experts_per_layer: layers.clone(),
        loss: eval.loss,
        perplexity: eval.perplexity,
        eval_tokens_per_s: eval.tokens_per_s,
        decode_tokens_per_s: decode,
    }
}

/// Decode tokens/s under `gate`: a prefill of the text's first tokens,
/// then `n` one-token steps feeding the text's next ids (warm: the pass is
/// built and run once before the clock starts).
async fn decode_rate(
    ctx: &GpuContext,
    engine: &mut Engine,
    gate: GateConfig,
    ids: &[u32],
    n: usize,
) -> Result<Option<f64>> {
    let ctx_len = engine.cfg.context;
    let prompt = (ctx_len / 4).clamp(1, 16);
    if n == 0 || ids.len() < prompt + 1 {
        return Ok(None);
    }
    let n = n.min(ctx_len - prompt).min(ids.len() - prompt);
    if n == 0 {
        return Ok(None);
    }
    engine.set_gate(ctx, gate)?;
    engine.prefill(ctx, &ids[..prompt], false).await?;
    engine.decode(ctx, ids[prompt]).await?;
    engine.prefill(ctx, &ids[..prompt], false).await?;
    let clock = Stopwatch::start();
    for &id in &ids[prompt..prompt + n] {
        engine.decode(ctx, id).await?;
    }
    Ok(Some(n as f64 / clock.seconds().max(1e-9)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::RouterScore;

    fn ranked() -> Vec<f32> {
        // Three tokens, k = 4: confident, split in two, flat.
        vec![
            0.90, 0.05, 0.03, 0.02, //
            0.45, 0.44, 0.06, 0.05, //
            0.26, 0.25, 0.25, 0.24,
        ]
    }

    fn gate(rule: ExpertRule, threshold: f32) -> GateConfig {
        GateConfig {
            rule,
            threshold,
            ..GateConfig::top_k(4, true, RouterScore::Softmax)
        }
    }

    #[test]
    fn the_extremes_of_each_rule_are_top_1_and_top_k() {
        let r = ranked();
        for (rule, one, all) in [
            (ExpertRule::Gap, -1.0, 1.0),
            (ExpertRule::Ratio, 1.01, 0.0),
            (ExpertRule::Mass, 0.0, 1.0),
        ] {
            assert_eq!(mean_experts(&r, 4, &gate(rule, one)), 1.0, "{rule:?}");
            assert_eq!(mean_experts(&r, 4, &gate(rule, all)), 4.0, "{rule:?}");
        }
        // Ratio 0.5: the confident token 1, the split one 2, the flat one 4.
        assert!((mean_experts(&r, 4, &gate(ExpertRule::Ratio, 0.5)) - 7.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn thresholds_hit_their_target_in_both_directions() {
        let r = ranked();
        let layers = [r.as_slice(), r.as_slice()];
        for rule in [ExpertRule::Gap, ExpertRule::Ratio, ExpertRule::Mass] {
            let t = threshold_for(&layers, 4, gate(rule, 0.0), 7.0 / 3.0);
            let got = mean_experts(&r, 4, &gate(rule, t));
            assert!(
                (got - 7.0 / 3.0).abs() < 1e-9,
                "{rule:?}: threshold {t} gives {got}"
            );
        }
    }

    #[test]
    fn perplexity_is_interpolated_between_a_rule_s_points() {
        let p = |m: f64, ppl: f64| SweepPoint {
            rule: "gap".into(),
            threshold: Some(0.1),
            max_experts: 8,
            target_experts: Some(m),
            mean_experts: m,
            experts_per_layer: Vec::new(),
            loss: ppl.ln(),
            perplexity: ppl,
            eval_tokens_per_s: 1.0,
            decode_tokens_per_s: None,
        };
        let r = SweepReport {
            k: 8,
            tokens: 10,
            scored: 9,
            fixed: Vec::new(),
            rules: vec![p(2.0, 30.0), p(4.0, 20.0), p(6.0, 18.0)],
        };
        assert_eq!(r.perplexity_at("gap", 3.0), Some(25.0));
        assert_eq!(r.perplexity_at("gap", 5.0), Some(19.0));
        assert_eq!(r.perplexity_at("gap", 7.0), None);
        assert_eq!(r.perplexity_at("mass", 3.0), None);
    }
}
