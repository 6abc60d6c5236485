//! Per-layer thresholds of a per-token expert rule (`amoe calibrate`): for
//! a top-k model, a rule (`ExpertRule`) and a target mean of experts per
//! token X, one threshold per MoE layer such that the mean over a
//! calibration text and the layers is X.
//!
//! How the thresholds are shared out: every layer drops the same share of
//! its fixed top-k combine weight (the renormalized router scores of the
//! experts a token does not take, averaged over the text). A layer whose
//! router is confident drops little weight when it skips experts, so it
//! gets fewer experts than a layer whose scores are flat: the compute goes
//! where skipping would cost the most. One bisection over that share finds
//! the target mean; inside it, one bisection per layer finds the threshold
//! that drops that share. Both work on each scored token's k highest router
//! scores (`eval::evaluate_ranked`) with the gate kernel's decision
//! (`reference::gate::rule_count`).
//!
//! Skipping experts in one layer changes what later layers see, so the
//! statistics are gathered again under the thresholds found and the
//! thresholds chosen anew (`rounds`); a final evaluation measures the real
//! mean per layer, written into the file with the thresholds.

use super::eval::{evaluate, evaluate_ranked, EvalConfig};
use super::Engine;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::{ExpertRule, GapMode, GateConfig, Gates, Gating, MAX_TOPK};
use crate::model::ModelConfig;
use crate::reference::gate::rule_count;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `format` field of a calibration file.
pub const FORMAT: &str = "amoe-calibration";

/// The largest calibration file read (a few hundred bytes per layer).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// One MoE layer's threshold and what it gave on the calibration text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerThreshold {
    /// Transformer layer index.
    pub layer: usize,
    pub threshold: f32,
    /// Measured mean experts per token under the calibrated gate.
    pub mean_experts: f64,
    /// Share of the fixed top-k combine weight not taken (from the ranked
    /// scores of the last round).
    pub dropped_weight: f64,
}

/// A calibration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub format: String,
    pub version: u32,
    pub rule: ExpertRule,
    /// How the gap rule measures a gap (top2: divided by the top-k sum).
    pub gap: GapMode,
    /// The most experts a token takes (the k the rule chooses among).
    pub max_experts: usize,
    /// The model's experts per MoE layer (checked on load).
    pub experts: usize,
    pub target_experts: f64,
    /// Measured mean over the layers.
    pub mean_experts: f64,
    /// Scored tokens of the calibration text, and what it was.
    pub tokens: usize,
    pub data: String,
    pub layers: Vec<LayerThreshold>,
}

/// What to calibrate.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibrateConfig {
    pub rule: ExpertRule,
    pub target_experts: f64,
    pub eval: EvalConfig,
    /// Gather-and-choose rounds (>= 1).
    pub rounds: usize,
    /// What the text was, for the file.
    pub data: String,
}

/// Mean experts per token and mean dropped weight share of one layer's
/// ranked scores `[tokens, k]` under `gate`.
pub fn layer_use(ranked: &[f32], k: usize, gate: &GateConfig) -> (f64, f64) {
    let rows = ranked.len() / k.max(1);
    if rows == 0 {
        return (0.0, 0.0);
    }
    let (mut experts, mut dropped) = (0usize, 0.0f64);
    for w in ranked.chunks_exact(k) {
        let sum: f32 = w.iter().sum();
        let c = rule_count(gate, w, sum);
        experts += c;
        if sum > 0.0 {
            dropped += w[c..].iter().map(|&x| x as f64).sum::<f64>() / sum as f64;
        }
    }
    (experts as f64 / rows as f64, dropped / rows as f64)
}

/// The threshold of `gate.rule` in [0, 1] at which a layer drops the share
/// `share` of its weight (the largest number of experts that drops at most
/// that share).
fn threshold_dropping(ranked: &[f32], k: usize, gate: GateConfig, share: f64) -> f32 {
    // Gap and mass take more experts (drop less) as the threshold grows.
    let rising = gate.rule != ExpertRule::Ratio;
    let dropped = |t: f32| layer_use(ranked, k, &gate.with_threshold(t)).1;
    let (mut lo, mut hi) = (0.0f32, 1.0f32);
    for _ in 0..28 {
        let mid = 0.5 * (lo + hi);
        // Keep `hi` (rising) or `lo` (ratio) on the side that drops <= share.
        if (dropped(mid) <= share) == rising {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if rising {
        hi
    } else {
        lo
    }
}

/// Per-layer thresholds of `gate.rule` from each layer's ranked scores,
/// every layer dropping the same share of its weight, the mean experts per
/// token over the layers as close to `target` as the text allows.
pub fn choose_thresholds(layers: &[&[f32]], k: usize, gate: GateConfig, target: f64) -> Vec<f32> {
    let at = |share: f64| -> (Vec<f32>, f64) {
        let t: Vec<f32> = layers
            .iter()
            .map(|l| threshold_dropping(l, k, gate, share))
            .collect();
        let mean = layers
            .iter()
            .zip(&t)
            .map(|(l, &x)| layer_use(l, k, &gate.with_threshold(x)).0)
            .sum::<f64>()
            / layers.len().max(1) as f64;
        (t, mean)
    };
    // More dropped weight, fewer experts.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..24 {
        let mid = 0.5 * (lo + hi);
        if at(mid).1 > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (a, b) = (at(lo), at(hi));
    if (a.1 - target).abs() <= (b.1 - target).abs() {
        a.0
    } else {
        b.0
    }
}

/// Calibrate `engine`'s model (a top-k router) on `ids`.
pub async fn calibrate(
    ctx: &GpuContext,
    engine: &mut Engine,
    ids: &[u32],
    cfg: &CalibrateConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Calibration> {
    let base = engine.gate;
    let k = base.k;
    if base.gating != Gating::TopK || k < 2 {
        return Err(Error::invalid(
            "calibrate",
            format!(
                "calibration chooses thresholds for a top-k router (k >= 2); this model's gate is {}",
                base.describe()
            ),
        ));
    }
    if cfg.rule == ExpertRule::Fixed {
        return Err(Error::invalid(
            "calibrate",
            "--rule fixed has no threshold: name gap, ratio or mass",
        ));
    }
    if !(cfg.target_experts >= 1.0 && cfg.target_experts <= k as f64) {
        return Err(Error::invalid(
            "calibrate",
            format!(
                "--target-experts {}: must be in [1, {k}] (the experts a token may take)",
                cfg.target_experts
            ),
        ));
    }
    if cfg.rounds == 0 || cfg.rounds > 8 {
        return Err(Error::invalid(
            "calibrate",
            format!("--rounds {}: must be 1..=8", cfg.rounds),
        ));
    }
    let gate = GateConfig {
        rule: cfg.rule,
        ..base
    };
    let moe = engine.cfg.moe_layers();
    // Round 1 gathers under the fixed top-k; later rounds under the last
    // thresholds.
    let mut gates = Gates::from(GateConfig {
        rule: ExpertRule::Fixed,
        ..base
    });
    let mut thresholds = Vec::new();
    let mut dropped = Vec::new();
    for round in 0..cfg.rounds {
        progress(&format!(
            "round {} of {}: router scores under {}",
            round + 1,
            cfg.rounds,
            gates.describe()
        ));
        let (_, ranked) = evaluate_ranked(
            ctx,
            engine.model(),
            gates.clone(),
            ids,
            cfg.eval,
            k,
            &mut |_, _| {},
        )
        .await?;
        let layers: Vec<&[f32]> = ranked.layers.iter().map(|(_, s)| s.as_slice()).collect();
        thresholds = choose_thresholds(&layers, k, gate, cfg.target_experts);
        dropped = layers
            .iter()
            .zip(&thresholds)
            .map(|(l, &t)| layer_use(l, k, &gate.with_threshold(t)).1)
            .collect();
        gates = Gates {
            gate,
            thresholds: Some(thresholds.clone()),
        };
    }
    progress("measuring the calibrated gate");
    let report = evaluate(
        ctx,
        engine.model(),
        gates.clone(),
        ids,
        cfg.eval,
        &mut |_, _| {},
    )
    .await?;
    let per = &report.experts_per_token;
    Ok(Calibration {
        format: FORMAT.into(),
        version: 1,
        rule: cfg.rule,
        gap: base.gap,
        max_experts: k,
        experts: engine.cfg.experts,
        target_experts: cfg.target_experts,
        mean_experts: per.iter().map(|l| l.mean_experts).sum::<f64>() / per.len().max(1) as f64,
        tokens: report.scored,
        data: cfg.data.clone(),
        layers: moe
            .iter()
            .enumerate()
            .map(|(i, &layer)| LayerThreshold {
                layer,
                threshold: thresholds[i],
                mean_experts: per.get(i).map_or(0.0, |l| l.mean_experts),
                dropped_weight: dropped[i],
            })
            .collect(),
    })
}

impl Calibration {
    /// Read and check a calibration file (not yet against a model: `gates`).
    pub fn load(path: &Path) -> Result<Calibration> {
        let what = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: what.clone(),
            source,
        })?;
        if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
            return Err(Error::invalid(
                "calibration",
                format!(
                    "{what}: not a calibration file (a regular JSON file of at most {MAX_FILE_BYTES} bytes)"
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: what.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| Error::invalid("calibration", format!("{what}: {e}")))
    }

    /// Parse and check the file's own consistency.
    pub fn parse(text: &str) -> std::result::Result<Calibration, String> {
        let c: Calibration = serde_json::from_str(text).map_err(|e| {
            format!("not an amoe calibration file ({e}); `amoe calibrate` writes one")
        })?;
        if c.format != FORMAT || c.version != 1 {
            return Err(format!(
                "format {:?} version {}: this amoe reads {FORMAT:?} version 1",
                c.format, c.version
            ));
        }
        if c.rule == ExpertRule::Fixed {
            return Err("rule fixed has no thresholds".into());
        }
        if !(1..=MAX_TOPK).contains(&c.max_experts) {
            return Err(format!(
                "max_experts {}: must be 1..={MAX_TOPK}",
                c.max_experts
            ));
        }
        if c.layers.is_empty() {
            return Err("no layers".into());
        }
        for l in &c.layers {
            if !(0.0..=1.0).contains(&l.threshold) {
                return Err(format!(
                    "layer {}: threshold {} is outside [0, 1]",
                    l.layer, l.threshold
                ));
            }
        }
        if c.layers.windows(2).any(|w| w[0].layer >= w[1].layer) {
            return Err("layers are not in increasing order".into());
        }
        Ok(c)
    }

    /// The gate it sets on `cfg`'s model, whose own gate is `base`.
    pub fn gates(&self, cfg: &ModelConfig, base: GateConfig, source: &str) -> Result<Gates> {
        let bad = |msg: String| Error::invalid("calibration", msg);
        if base.gating != Gating::TopK {
            return Err(bad(format!(
                "a calibration chooses among a top-k router's experts; {source} is {}",
                base.describe()
            )));
        }
        if self.experts != cfg.experts {
            return Err(bad(format!(
                "made for a model with {} experts per layer; {source} has {}",
                self.experts, cfg.experts
            )));
        }
        let moe = cfg.moe_layers();
        let layers: Vec<usize> = self.layers.iter().map(|l| l.layer).collect();
        if layers != moe {
            return Err(bad(format!(
                "thresholds for MoE layers {layers:?}; {source} has MoE layers {moe:?}"
            )));
        }
        if self.max_experts > cfg.experts {
            return Err(bad(format!(
                "max_experts {} of a model with {} experts",
                self.max_experts, cfg.experts
            )));
        }
        let gates = Gates {
            gate: GateConfig {
                rule: self.rule,
                k: self.max_experts,
                gap: self.gap,
                threshold: self.layers[0].threshold,
                ..base
            },
            thresholds: Some(self.layers.iter().map(|l| l.threshold).collect()),
        };
        gates.validate(cfg.experts, moe.len())?;
        Ok(gates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::RouterScore;

    /// `n` tokens of k = 4 ranked scores: a confident layer (p1 ~ 0.9) or
    /// a flat one (p1 ~ 0.3), varied a little per token.
    fn layer(confident: bool, n: usize) -> Vec<f32> {
        let mut v = Vec::new();
        for i in 0..n {
            let d = (i % 7) as f32 * 0.01;
            let w = if confident {
                [0.86 + d, 0.07 - d / 2.0, 0.04 - d / 4.0, 0.03 - d / 4.0]
            } else {
                [0.30 + d, 0.27, 0.23 - d / 2.0, 0.20 - d / 2.0]
            };
            v.extend_from_slice(&w);
        }
        v
    }

    fn gate(rule: ExpertRule) -> GateConfig {
        GateConfig {
            rule,
            ..GateConfig::top_k(4, true, RouterScore::Softmax)
        }
    }

    #[test]
    fn the_confident_layer_gets_fewer_experts_and_the_mean_is_the_target() {
        let (a, b) = (layer(true, 70), layer(false, 70));
        for rule in [ExpertRule::Gap, ExpertRule::Ratio, ExpertRule::Mass] {
            let g = gate(rule);
            let t = choose_thresholds(&[&a, &b], 4, g, 2.5);
            let (ma, da) = layer_use(&a, 4, &g.with_threshold(t[0]));
            let (mb, db) = layer_use(&b, 4, &g.with_threshold(t[1]));
            assert!(ma < mb, "{rule:?}: confident {ma} vs flat {mb}");
            assert!(
                ((ma + mb) / 2.0 - 2.5).abs() < 0.1,
                "{rule:?}: mean {}",
                (ma + mb) / 2.0
            );
            // The shared-out quantity: both drop about the same weight.
            assert!((da - db).abs() < 0.1, "{rule:?}: dropped {da} vs {db}");
        }
    }

    #[test]
    fn a_bad_file_is_refused_with_what_is_wrong() {
        let good = Calibration {
            format: FORMAT.into(),
            version: 1,
            rule: ExpertRule::Ratio,
            gap: GapMode::Top2,
            max_experts: 8,
            experts: 32,
            target_experts: 4.0,
            mean_experts: 4.01,
            tokens: 1000,
            data: "held-out".into(),
            layers: vec![
                LayerThreshold {
                    layer: 0,
                    threshold: 0.3,
                    mean_experts: 3.5,
                    dropped_weight: 0.1,
                },
                LayerThreshold {
                    layer: 1,
                    threshold: 0.4,
                    mean_experts: 4.5,
                    dropped_weight: 0.1,
                },
            ],
        };
        let text = serde_json::to_string(&good).unwrap();
        assert_eq!(Calibration::parse(&text).unwrap(), good);
        let mut cases: Vec<(Calibration, &str)> = Vec::new();
        let mut c = good.clone();
        c.layers[1].threshold = 1.5;
        cases.push((c, "outside [0, 1]"));
        let mut c = good.clone();
        c.rule = ExpertRule::Fixed;
        cases.push((c, "no thresholds"));
        let mut c = good.clone();
        c.max_experts = 9;
        cases.push((c, "max_experts 9"));
        let mut c = good.clone();
        c.layers.swap(0, 1);
        cases.push((c, "increasing order"));
        let mut c = good.clone();
        c.version = 2;
        cases.push((c, "version 1"));
        for (c, want) in cases {
            let e = Calibration::parse(&serde_json::to_string(&c).unwrap()).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let e = Calibration::parse("{\"format\": 1}").unwrap_err();
        assert!(e.contains("not an amoe calibration file"), "{e}");
        // NaN is not JSON; a threshold written as null is refused by serde.
        let e = Calibration::parse(&text.replace("0.4", "null")).unwrap_err();
        assert!(e.contains("not an amoe calibration file"), "{e}");
    }
}
