//! CPU twin of `shaders/gate.wgsl` (`gate_top1_forward`, `gate_top2_forward`,
//! `gate_adaptive_forward`, `gate_topk_forward`): the same formulas in the
//! same order, so that discrete decisions agree exactly with the GPU on data
//! with clear margins.

use crate::error::{Error, Result};
use crate::kernels::{
    ExpertRule, GapMode, GateConfig, Gating, RouterScore, SingleWeight, STATUS_NONFINITE, UNUSED,
};

/// Everything the gate writes, for T tokens, E experts and K = `gating.max_k()`.
#[derive(Clone, Debug, PartialEq)]
pub struct GateOutput {
    /// probs [T, E]
    pub probs: Vec<f32>,
    /// topk_ids [T, K]
    pub topk_ids: Vec<u32>,
    /// topk_weights [T, K]
    pub topk_weights: Vec<f32>,
    /// lse [T]
    pub lse: Vec<f32>,
    /// Bits ORed into routing[STATUS] (`STATUS_NONFINITE`).
    pub status: u32,
}

/// The top two logits of a row: (e1, l1, e2, l2), ties to the lower index.
/// `e2` is `UNUSED` when E = 1.
pub fn top2_of(row: &[f32]) -> (u32, f32, u32, f32) {
    let (mut i1, mut l1, mut i2, mut l2) = (0u32, row[0], UNUSED, row[0]);
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > l1 {
            (i2, l2) = (i1, l1);
            (i1, l1) = (i as u32, v);
        } else if i2 == UNUSED || v > l2 {
            (i2, l2) = (i as u32, v);
        }
    }
    (i1, l1, i2, l2)
}

/// The adaptive rule's gap for the top two probabilities, clamped to [0, 1].
pub fn gap(mode: GapMode, p1: f32, p2: f32) -> f32 {
    let g = match mode {
        GapMode::Softmax => p1 - p2,
        GapMode::Top2 => (p1 - p2) / (p1 + p2),
    };
    g.clamp(0.0, 1.0)
}

/// p1 and p2 of a row from its softmax denominator, as the shader computes them.
pub fn top2_probs(l1: f32, l2: f32, has_second: bool, s: f32) -> (f32, f32) {
    let p1 = 1.0 / s;
    let p2 = if has_second {
        (if l2 == l1 { 1.0 } else { (l2 - l1).exp() }) / s
    } else {
        0.0
    };
    (p1, p2)
}

/// Softmax + expert selection of `router_logits [T, E]` under `config`.
pub fn gate_forward(
    config: &GateConfig,
    router_logits: &[f32],
    t: usize,
    e: usize,
) -> Result<GateOutput> {
    if t == 0 || e == 0 {
        return Err(Error::invalid(
            "gate",
            format!("T = {t}, E = {e}: both must be >= 1"),
        ));
    }
    config.validate(e)?;
    if router_logits.len() != t * e {
        return Err(Error::shape(
            "gate",
            format!("router_logits [{t}, {e}] = {} values", t * e),
            router_logits.len(),
        ));
    }
    let k = config.max_k();
    let mut out = GateOutput {
        probs: vec![0.0; t * e],
        topk_ids: vec![UNUSED; t * k],
        topk_weights: vec![0.0; t * k],
        lse: vec![0.0; t],
        status: 0,
    };
    for tok in 0..t {
        let row = &router_logits[tok * e..(tok + 1) * e];
        if row.iter().any(|v| !v.is_finite()) {
            out.status |= STATUS_NONFINITE;
            continue;
        }
        if config.gating == Gating::TopK {
            top_k_token(config, row, tok, &mut out);
            continue;
        }
        let (i1, l1, i2, l2) = top2_of(row);
        let s: f32 = row.iter().map(|&v| (v - l1).exp()).sum();
        for (p, &v) in out.probs[tok * e..(tok + 1) * e].iter_mut().zip(row) {
            *p = (v - l1).exp() / s;
        }
        out.lse[tok] = l1 + s.ln();
        let (p1, p2) = top2_probs(l1, l2, i2 != UNUSED, s);
        let single = match config.single_weight {
            SingleWeight::RawP1 => p1,
            SingleWeight::One => 1.0,
        };
        let two = match config.gating {
            Gating::Top1 => false,
            Gating::Top2 => true,
            Gating::Adaptive => gap(config.gap, p1, p2) <= config.threshold,
            Gating::TopK => unreachable!("handled by top_k_token"),
        };
        let ids = &mut out.topk_ids[tok * k..(tok + 1) * k];
        let w = &mut out.topk_weights[tok * k..(tok + 1) * k];
        ids[0] = i1;
        if two {
            let denom = p1 + p2;
            w[0] = p1 / denom;
            ids[1] = i2;
            w[1] = p2 / denom;
        } else {
            w[0] = single;
        }
    }
    Ok(out)
}

/// The k experts of a row in order: the largest logit first, ties to the
/// lower index. Each pick is the largest (value, -index) below the
/// previous one, as the shader scans.
pub fn top_k_of(row: &[f32], k: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(k);
    let (mut pv, mut pi) = (f32::INFINITY, UNUSED);
    for _ in 0..k {
        let mut best = UNUSED;
        let mut bv = 0.0f32;
        for (i, &v) in row.iter().enumerate() {
            let after = pi == UNUSED || v < pv || (v == pv && i as u32 > pi);
            if after && (best == UNUSED || v > bv) {
                best = i as u32;
                bv = v;
            }
        }
        ids.push(best);
        (pv, pi) = (bv, best);
    }
    ids
}

/// `Gating::TopK` for one token: scores (softmax or sigmoid) into probs,
/// lse of the logits, the k experts by logit, weights their scores,
/// renormalized over the k (summed in slot order) if the model says so.
fn top_k_token(config: &GateConfig, row: &[f32], tok: usize, out: &mut GateOutput) {
    let (e, k) = (row.len(), config.k);
    let l1 = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = row.iter().map(|&v| (v - l1).exp()).sum();
    for (p, &v) in out.probs[tok * e..(tok + 1) * e].iter_mut().zip(row) {
        *p = match config.score {
            RouterScore::Softmax => (v - l1).exp() / s,
            RouterScore::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        };
    }
    out.lse[tok] = l1 + s.ln();
    let ids = top_k_of(row, k);
    let mut sum = 0.0f32;
    for (j, &id) in ids.iter().enumerate() {
        let w = out.probs[tok * e + id as usize];
        out.topk_ids[tok * k + j] = id;
        out.topk_weights[tok * k + j] = w;
        sum += w;
    }
    let ids = &mut out.topk_ids[tok * k..(tok + 1) * k];
    let w = &mut out.topk_weights[tok * k..(tok + 1) * k];
    let c = rule_count(config, w, sum);
    ids[c..].fill(UNUSED);
    w[c..].fill(0.0);
    if config.renorm {
        let chosen = if c < k { w[..c].iter().sum() } else { sum };
        for w in &mut w[..c] {
            *w /= chosen;
        }
    }
}

/// How many of the ranked scores `w` (p1 >= p2 >= ..., summing to `sum`)
/// a token takes under `config.rule` with parameter `config.threshold`:
/// the first always, then p(j) while the rule holds (`ExpertRule`), in the
/// gate kernel's operations and order.
pub fn rule_count(config: &GateConfig, w: &[f32], sum: f32) -> usize {
    let k = w.len();
    if config.rule == ExpertRule::Fixed || k == 0 {
        return k;
    }
    let (p1, t) = (w[0], config.threshold);
    let mut taken = p1;
    let mut c = 1;
    for j in 1..k {
        let (prev, cur) = (w[j - 1], w[j]);
        let join = match config.rule {
            ExpertRule::Gap => {
                let mut g = prev - cur;
                if config.gap == GapMode::Top2 {
                    g /= sum;
                }
                g.clamp(0.0, 1.0) <= t
            }
            ExpertRule::Ratio => cur >= t * p1,
            ExpertRule::Mass => t >= 1.0 || taken < t,
            ExpertRule::Fixed => true,
        };
        if !join {
            break;
        }
        taken += cur;
        c += 1;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(gating: Gating) -> GateConfig {
        GateConfig::new(gating)
    }

    #[test]
    fn top_k_picks_by_logit_and_weights_raw_or_renormalized() {
        let row = [0.5f32, 2.0, -1.0, 2.0, 1.0, 0.0];
        assert_eq!(top_k_of(&row, 4), vec![1, 3, 4, 0]);
        assert_eq!(top_k_of(&[1.0, 1.0, 1.0], 3), vec![0, 1, 2]);
        let raw = gate_forward(
            &GateConfig::top_k(3, false, RouterScore::Softmax),
            &row,
            1,
            6,
        )
        .unwrap();
        let z: f32 = row.iter().map(|v| v.exp()).sum();
        assert_eq!(raw.topk_ids, vec![1, 3, 4]);
        assert!((raw.topk_weights[0] - 2f32.exp() / z).abs() < 1e-6);
        assert!((raw.topk_weights[2] - 1f32.exp() / z).abs() < 1e-6);
        let ren = gate_forward(
            &GateConfig::top_k(3, true, RouterScore::Softmax),
            &row,
            1,
            6,
        )
        .unwrap();
        let sum: f32 = ren.topk_weights.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let den = 2.0 * 2f32.exp() + 1f32.exp();
        assert!((ren.topk_weights[2] - 1f32.exp() / den).abs() < 1e-6);
        // A one-expert sigmoid gate: the weight is sigmoid(logit).
        let sig = gate_forward(
            &GateConfig::top_k(1, false, RouterScore::Sigmoid),
            &[0.3],
            1,
            1,
        )
        .unwrap();
        assert_eq!(sig.topk_ids, vec![0]);
        assert!((sig.topk_weights[0] - 1.0 / (1.0 + (-0.3f32).exp())).abs() < 1e-7);
        // k past 8 or past E is refused.
        assert!(gate_forward(
            &GateConfig::top_k(9, true, RouterScore::Softmax),
            &[0.0; 16],
            1,
            16
        )
        .is_err());
        assert!(gate_forward(
            &GateConfig::top_k(4, true, RouterScore::Softmax),
            &[0.0; 3],
            1,
            3
        )
        .is_err());
    }

    #[test]
    fn ties_break_to_the_lower_index() {
        assert_eq!(top2_of(&[5.0, 5.0, 1.0]), (0, 5.0, 1, 5.0));
        assert_eq!(top2_of(&[1.0, 5.0, 5.0]), (1, 5.0, 2, 5.0));
        assert_eq!(top2_of(&[2.0, 2.0, 2.0, 2.0]), (0, 2.0, 1, 2.0));
        assert_eq!(top2_of(&[0.0, 3.0, 1.0, 3.0, 1.0]), (1, 3.0, 3, 3.0));
        assert_eq!(top2_of(&[0.0, 3.0, 1.0, 2.0, 2.0]), (1, 3.0, 3, 2.0));
        assert_eq!(top2_of(&[7.0]), (0, 7.0, UNUSED, 7.0));
    }

    #[test]
    fn top1_top2_and_adaptive_follow_the_paper() {
        // probabilities 0.5, 0.3, 0.2 (logits = ln p)
        let row: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let top1 = gate_forward(&cfg(Gating::Top1), &row, 1, 3).unwrap();
        assert_eq!(top1.topk_ids, vec![0]);
        assert!((top1.topk_weights[0] - 0.5).abs() < 1e-6);
        assert!((top1.probs[1] - 0.3).abs() < 1e-6);
        assert!(top1.lse[0].abs() < 1e-6, "logsumexp of ln p is ln 1");

        let top2 = gate_forward(&cfg(Gating::Top2), &row, 1, 3).unwrap();
        assert_eq!(top2.topk_ids, vec![0, 1]);
        assert!((top2.topk_weights[0] - 0.625).abs() < 1e-6);
        assert!((top2.topk_weights[1] - 0.375).abs() < 1e-6);

        // gap softmax = 0.2, gap top2 = 0.25
        let mut c = GateConfig {
            gating: Gating::Adaptive,
            threshold: 0.22,
            gap: GapMode::Softmax,
            single_weight: SingleWeight::RawP1,
            ..GateConfig::default()
        };
        let a = gate_forward(&c, &row, 1, 3).unwrap();
        assert_eq!(a.topk_ids, vec![0, 1]);
        assert_eq!(a.topk_weights, top2.topk_weights);
        c.gap = GapMode::Top2;
        let a = gate_forward(&c, &row, 1, 3).unwrap();
        assert_eq!(a.topk_ids, vec![0, UNUSED]);
        assert_eq!(a.topk_weights, vec![top1.topk_weights[0], 0.0]);
        c.single_weight = SingleWeight::One;
        let a = gate_forward(&c, &row, 1, 3).unwrap();
        assert_eq!(a.topk_weights, vec![1.0, 0.0]);
    }

    #[test]
    fn exact_tie_goes_to_two_experts_even_at_threshold_zero() {
        let row = [0.0f32, 1.5, -2.0, 1.5];
        for gap in [GapMode::Softmax, GapMode::Top2] {
            let c = GateConfig {
                gating: Gating::Adaptive,
                threshold: 0.0,
                gap,
                single_weight: SingleWeight::RawP1,
                ..GateConfig::default()
            };
            let a = gate_forward(&c, &row, 1, 4).unwrap();
            assert_eq!(a.topk_ids, vec![1, 3]);
            assert_eq!(a.topk_weights, vec![0.5, 0.5]);
        }
    }

    #[test]
    fn nonfinite_tokens_get_no_expert_and_set_the_status() {
        let logits = [
            1.0f32,
            2.0,
            f32::NAN,
            0.0,
            3.0,
            1.0,
            f32::INFINITY,
            0.0,
            0.5,
        ];
        let a = gate_forward(&cfg(Gating::Top2), &logits, 3, 3).unwrap();
        assert_eq!(a.status, STATUS_NONFINITE);
        assert_eq!(a.topk_ids, vec![UNUSED, UNUSED, 1, 2, UNUSED, UNUSED]);
        assert_eq!(&a.probs[0..3], &[0.0; 3]);
        let ok = gate_forward(&cfg(Gating::Top2), &logits[3..6], 1, 3).unwrap();
        assert_eq!(ok.status, 0);
    }

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let a = gate_forward(&cfg(Gating::Top1), &[1000.0, 999.0], 1, 2).unwrap();
        assert!((a.probs[0] + a.probs[1] - 1.0).abs() < 1e-6);
        assert!((a.lse[0] - (1000.0 + (1.0 + (-1.0f32).exp()).ln())).abs() < 1e-3);
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let r = [0.0f32; 4];
        assert!(matches!(
            gate_forward(&cfg(Gating::Top2), &r[..1], 1, 1),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            gate_forward(&cfg(Gating::Top1), &r, 0, 4),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            gate_forward(&cfg(Gating::Top1), &r, 2, 4),
            Err(Error::Shape { .. })
        ));
        let nan = GateConfig {
            threshold: f32::NAN,
            ..GateConfig::default()
        };
        assert!(matches!(
            gate_forward(&nan, &r, 1, 4),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn expert_rules_count_as_written() {
        let rule = |rule, threshold, gap| GateConfig {
            rule,
            threshold,
            gap,
            ..GateConfig::top_k(4, true, RouterScore::Softmax)
        };
        let w = [0.4f32, 0.3, 0.2, 0.05];
        let sum = 0.95f32;
        use ExpertRule::*;
        use GapMode::{Softmax, Top2};
        // gaps 0.1, 0.1, 0.15 (softmax); / 0.95 with Top2.
        assert_eq!(rule_count(&rule(Gap, 0.12, Softmax), &w, sum), 3);
        assert_eq!(rule_count(&rule(Gap, 0.09, Softmax), &w, sum), 1);
        assert_eq!(rule_count(&rule(Gap, 0.16, Top2), &w, sum), 4);
        assert_eq!(rule_count(&rule(Gap, 0.0, Top2), &w, sum), 1);
        assert_eq!(rule_count(&rule(Gap, 1.0, Top2), &w, sum), 4);
        // ratios 0.75, 0.5, 0.125.
        assert_eq!(rule_count(&rule(Ratio, 0.5, Top2), &w, sum), 3);
        assert_eq!(rule_count(&rule(Ratio, 0.8, Top2), &w, sum), 1);
        assert_eq!(rule_count(&rule(Ratio, 0.0, Top2), &w, sum), 4);
        // taken mass 0.4, 0.7, 0.9 before experts 2, 3, 4.
        assert_eq!(rule_count(&rule(Mass, 0.5, Top2), &w, sum), 2);
        assert_eq!(rule_count(&rule(Mass, 0.75, Top2), &w, sum), 3);
        assert_eq!(rule_count(&rule(Mass, 1e-6, Top2), &w, sum), 1);
        assert_eq!(rule_count(&rule(Mass, 1.0, Top2), &w, sum), 4);
        assert_eq!(rule_count(&rule(Fixed, 0.0, Top2), &w, sum), 4);
        // Through the gate: the weights renormalize over the experts taken
        // (or stay raw), and the slots past them are unused.
        let logits = [2.0f32, 1.0, 0.5, -1.0, -3.0];
        for renorm in [true, false] {
            let c = GateConfig {
                renorm,
                ..rule(Mass, 0.5, Top2)
            };
            let out = gate_forward(&c, &logits, 1, 5).unwrap();
            assert_eq!(out.topk_ids[2..], [UNUSED, UNUSED]);
            let fixed = gate_forward(
                &GateConfig::top_k(4, false, RouterScore::Softmax),
                &logits,
                1,
                5,
            )
            .unwrap();
            let n = out.topk_ids.iter().filter(|&&i| i != UNUSED).count();
            assert!((1..4).contains(&n), "{out:?}");
            assert_eq!(out.topk_ids[..n], fixed.topk_ids[..n]);
            let s: f32 = out.topk_weights.iter().sum();
            if renorm {
                assert!((s - 1.0).abs() < 1e-6);
            } else {
                assert_eq!(out.topk_weights[..n], fixed.topk_weights[..n]);
            }
        }
    }
}
