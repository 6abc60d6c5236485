//! Conformance cases of the gate kernels (`gate_top1_forward`,
//! `gate_top2_forward`, `gate_adaptive_forward`, `gate_topk_forward`) against their twin
//! `reference::gate::gate_forward`: ids and status exactly, probabilities,
//! weights and logsumexp within `Tol::SOFTMAX`. Random logits are resampled
//! until the adaptive decision is clear of the threshold; exact ties and
//! non-finite logits have cases of their own.

use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass, CheckResult};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::gate::{kernel_name, Gate, GateBuffers};
use crate::kernels::{
    ExpertRule, GapMode, GateConfig, Gating, RouterScore, RoutingLayout, SingleWeight, UNUSED,
};
use crate::reference::gate::{gap, gate_forward, top2_of, top2_probs, GateOutput};
use crate::tol::{compare_exact, Comparison, Tol};
use crate::util::Rng;

/// How the logits of a case are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Uniform in [-3, 3), resampled while an adaptive decision is within
    /// 1e-3 of the threshold.
    Random,
    /// Rows with exact ties: all equal, tied first place, tied second place.
    Ties,
    /// Random, with NaN, +inf or -inf in some tokens.
    NonFinite,
}

/// A gate conformance case.
#[derive(Clone, Debug)]
pub enum Case {
    /// GPU against the twin.
    Twin {
        config: GateConfig,
        t: usize,
        e: usize,
        logits: Logits,
        seed: u64,
    },
    /// Adaptive at threshold 0 selects as top1 does (first column, no second
    /// expert); at threshold 1 it is top2 (ids and weights). GPU against GPU.
    Equivalence {
        t: usize,
        e: usize,
        gap: GapMode,
        threshold_one: bool,
    },
    /// A top-k rule (`ExpertRule`) at its extremes is the fixed top-1
    /// (`top_one`) or the fixed top-k, ids and weights bit for bit. GPU
    /// against GPU.
    RuleExtreme {
        config: GateConfig,
        t: usize,
        e: usize,
        top_one: bool,
    },
    /// Bad shapes and arguments give typed errors and no wgpu error.
    BadInputs,
}

impl Logits {
    fn label(&self) -> &'static str {
        match self {
            Logits::Random => "random",
            Logits::Ties => "exact ties",
            Logits::NonFinite => "NaN/inf in some tokens",
        }
    }
}

fn gap_name(g: GapMode) -> &'static str {
    match g {
        GapMode::Softmax => "softmax",
        GapMode::Top2 => "top2",
    }
}

fn describe(c: &GateConfig) -> String {
    let mut s = String::new();
    if c.gating == Gating::TopK {
        let rule = match c.rule {
            ExpertRule::Fixed => String::new(),
            ExpertRule::Gap => format!(" rule=gap T={} gap={}", c.threshold, gap_name(c.gap)),
            r => format!(" rule={r} {}", c.threshold),
        };
        return format!(
            " k={} {} {}{rule}",
            c.k,
            c.score,
            if c.renorm { "renormalized" } else { "raw" }
        );
    }
    if c.gating == Gating::Adaptive {
        s.push_str(&format!(
            " threshold={} gap={}",
            c.threshold,
            gap_name(c.gap)
        ));
    }
    if c.gating != Gating::Top2 {
        let w = match c.single_weight {
            SingleWeight::RawP1 => "raw_p1",
            SingleWeight::One => "one",
        };
        s.push_str(&format!(" single={w}"));
    }
    s
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Twin {
                config,
                t,
                e,
                logits,
                ..
            } => (
                kernel_name(config.gating).to_string(),
                format!("T={t} E={e} {}{}", logits.label(), describe(config)),
            ),
            Case::Equivalence {
                t,
                e,
                gap,
                threshold_one,
            } => (
                kernel_name(Gating::Adaptive).to_string(),
                format!(
                    "T={t} E={e} gap={} threshold={}, same as {}",
                    gap_name(*gap),
                    if *threshold_one { 1 } else { 0 },
                    if *threshold_one { "top2" } else { "top1" }
                ),
            ),
            Case::RuleExtreme {
                config,
                t,
                e,
                top_one,
            } => (
                kernel_name(Gating::TopK).to_string(),
                format!(
                    "T={t} E={e}{}, same as fixed top-{}",
                    describe(config),
                    if *top_one { 1 } else { config.k }
                ),
            ),
            Case::BadInputs => (
                "gate_adaptive_forward".into(),
                "bad inputs: K > E, T = 0, threshold outside [0, 1] or NaN, shape mismatch, top-k rules out of place".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let cfg = |gating, threshold, gap, single_weight| GateConfig {
        gating,
        threshold,
        gap,
        single_weight,
        ..GateConfig::default()
    };
    use GapMode::{Softmax, Top2};
    use Gating::{Adaptive, Top1};
    use SingleWeight::{One, RawP1};
    let shapes = [
        (1, 8),
        (37, 16),
        (5, 64),
        (300, 64),
        (1000, 256),
        (130, 2),
        (70, 5),
        (1, 3),
    ];
    for (i, &(t, e)) in shapes.iter().enumerate() {
        for gating in [Gating::Top1, Gating::Top2, Gating::Adaptive] {
            v.push(Case::Twin {
                config: GateConfig::new(gating),
                t,
                e,
                logits: Logits::Random,
                seed: 100 + i as u64,
            });
        }
    }
    // Both gap modes, both single-weight policies, several thresholds.
    for (j, config) in [
        cfg(Adaptive, 0.1, Softmax, RawP1),
        cfg(Adaptive, 0.2, Top2, One),
        cfg(Adaptive, 0.5, Softmax, One),
        cfg(Adaptive, 0.0, Top2, RawP1),
        cfg(Adaptive, 1.0, Softmax, RawP1),
        cfg(Top1, 0.1, Top2, One),
    ]
    .into_iter()
    .enumerate()
    {
        v.push(Case::Twin {
            config,
            t: 257,
            e: 16,
            logits: Logits::Random,
            seed: 200 + j as u64,
        });
    }
    // Exact ties, under every rule, threshold 0 included (a tie has gap 0).
    for e in [8, 7] {
        for config in [
            GateConfig::new(Gating::Top1),
            GateConfig::new(Gating::Top2),
            cfg(Adaptive, 0.0, Top2, RawP1),
            cfg(Adaptive, 0.0, Softmax, One),
        ] {
            v.push(Case::Twin {
                config,
                t: 67,
                e,
                logits: Logits::Ties,
                seed: 300,
            });
        }
    }
    for e in [12, 9] {
        for gating in [Gating::Top1, Gating::Top2, Gating::Adaptive] {
            v.push(Case::Twin {
                config: GateConfig::new(gating),
                t: 70,
                e,
                logits: Logits::NonFinite,
                seed: 400,
            });
        }
    }
    // Pretrained models' fixed top-k: k up to 8, E up to 128, softmax raw
    // (OLMoE, Qwen2-MoE) or renormalized (Mixtral, Granite, Qwen3-MoE),
    // a one-expert sigmoid gate (Qwen2-MoE's shared expert), ties, NaN.
    for (j, (t, e, k, renorm, score, logits)) in [
        (37, 8, 2, true, RouterScore::Softmax, Logits::Random),
        (130, 64, 8, false, RouterScore::Softmax, Logits::Random),
        (65, 128, 8, true, RouterScore::Softmax, Logits::Random),
        (70, 16, 4, true, RouterScore::Sigmoid, Logits::Random),
        (33, 1, 1, false, RouterScore::Sigmoid, Logits::Random),
        (67, 8, 4, false, RouterScore::Softmax, Logits::Ties),
        (70, 12, 8, true, RouterScore::Softmax, Logits::NonFinite),
    ]
    .into_iter()
    .enumerate()
    {
        v.push(Case::Twin {
            config: GateConfig::top_k(k, renorm, score),
            t,
            e,
            logits,
            seed: 500 + j as u64,
        });
    }
    // Adaptive expert counts on a top-k router: each rule with the
    // model's weights raw or renormalized, k = 1 to 8, both gap measures,
    // sigmoid scores, ties at the extremes, NaN.
    let rule = |k, renorm, score, rule, threshold, gap| GateConfig {
        rule,
        threshold,
        gap,
        ..GateConfig::top_k(k, renorm, score)
    };
    use ExpertRule::{Gap, Mass, Ratio};
    use RouterScore::Sigmoid;
    let sm = RouterScore::Softmax;
    for (j, (t, e, config, logits)) in [
        (
            130,
            64,
            rule(8, false, sm, Gap, 0.01, Softmax),
            Logits::Random,
        ),
        (97, 16, rule(4, true, sm, Gap, 0.3, Top2), Logits::Random),
        (65, 32, rule(8, true, sm, Ratio, 0.5, Top2), Logits::Random),
        (70, 8, rule(2, false, sm, Ratio, 0.2, Top2), Logits::Random),
        (130, 64, rule(8, false, sm, Mass, 0.5, Top2), Logits::Random),
        (66, 16, rule(4, true, sm, Mass, 0.9, Top2), Logits::Random),
        (
            70,
            16,
            rule(4, true, Sigmoid, Ratio, 0.9, Top2),
            Logits::Random,
        ),
        (33, 8, rule(1, true, sm, Gap, 1.0, Top2), Logits::Random),
        (67, 8, rule(4, true, sm, Gap, 0.0, Softmax), Logits::Ties),
        (67, 8, rule(4, false, sm, Ratio, 1.0, Top2), Logits::Ties),
        (67, 7, rule(4, true, sm, Mass, 1.0, Top2), Logits::Ties),
        (
            70,
            12,
            rule(8, true, sm, Mass, 0.6, Top2),
            Logits::NonFinite,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        v.push(Case::Twin {
            config,
            t,
            e,
            logits,
            seed: 600 + j as u64,
        });
    }
    for (config, top_one) in [
        (rule(8, true, sm, Gap, 0.0, Top2), true),
        (rule(8, false, sm, Gap, 1.0, Softmax), false),
        (rule(4, false, sm, Ratio, 1.0, Top2), true),
        (rule(8, true, sm, Ratio, 0.0, Top2), false),
        (rule(8, false, sm, Mass, 1e-6, Top2), true),
        (rule(8, true, sm, Mass, 1.0, Top2), false),
    ] {
        v.push(Case::RuleExtreme {
            config,
            t: 129,
            e: 32,
            top_one,
        });
    }
    for (t, e, gap) in [(200, 16, Top2), (65, 64, Softmax)] {
        for threshold_one in [false, true] {
            v.push(Case::Equivalence {
                t,
                e,
                gap,
                threshold_one,
            });
        }
    }
    v.push(Case::BadInputs);
    v
}

/// Logits [T, E] for a case; for adaptive configs, no decision lies within
/// 1e-3 of the threshold (checked with the twin's own formulas).
pub fn make_logits(config: &GateConfig, t: usize, e: usize, kind: Logits, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(t * e);
    for tok in 0..t {
        let row = match kind {
            Logits::Ties => tie_row(&mut rng, e, tok),
            _ => loop {
                let row = rng.vec_sym(e, 3.0);
                let clear = match (config.gating, config.rule) {
                    (Gating::Adaptive, _) => clear_of_threshold(config, &row),
                    (Gating::TopK, r) if r != ExpertRule::Fixed => rule_clear(config, &row),
                    _ => true,
                };
                if clear {
                    break row;
                }
            },
        };
        out.extend(row);
    }
    if kind == Logits::NonFinite {
        for tok in (0..t).step_by(7) {
            let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(tok / 7) % 3];
            out[tok * e + rng.below(e)] = bad;
        }
    }
    out
}

fn clear_of_threshold(config: &GateConfig, row: &[f32]) -> bool {
    let (_, l1, i2, l2) = top2_of(row);
    let s: f32 = row.iter().map(|&v| (v - l1).exp()).sum();
    let (p1, p2) = top2_probs(l1, l2, i2 != UNUSED, s);
    (gap(config.gap, p1, p2) - config.threshold).abs() > 1e-3
}

/// Whether every decision of a top-k rule on `row` (computed with the
/// twin's own formulas) lies more than 1e-3 from its threshold, so that the
/// GPU's exp cannot flip it.
fn rule_clear(config: &GateConfig, row: &[f32]) -> bool {
    let Ok(out) = gate_forward(
        &GateConfig {
            rule: ExpertRule::Fixed,
            renorm: false,
            ..*config
        },
        row,
        1,
        row.len(),
    ) else {
        return false;
    };
    let w = &out.topk_weights;
    let sum: f32 = w.iter().sum();
    let t = config.threshold;
    // Parameters that decide without comparing a score: nothing to flip.
    match config.rule {
        ExpertRule::Mass if t >= 1.0 => return true,
        ExpertRule::Ratio if t <= 0.0 => return true,
        _ => {}
    }
    let mut taken = w[0];
    (1..w.len()).all(|j| {
        let margin = match config.rule {
            ExpertRule::Gap => {
                let g = w[j - 1] - w[j];
                let g = if config.gap == GapMode::Top2 {
                    g / sum
                } else {
                    g
                };
                g - t
            }
            ExpertRule::Ratio => w[j] / w[0] - t,
            ExpertRule::Mass => taken - t,
            ExpertRule::Fixed => 1.0,
        };
        taken += w[j];
        margin.abs() > 1e-3
    })
}

/// Rows with exact ties, of small integers (exactly representable).
fn tie_row(rng: &mut Rng, e: usize, tok: usize) -> Vec<f32> {
    let mut row: Vec<f32> = (0..e).map(|_| rng.below(4) as f32 - 2.0).collect();
    let a = rng.below(e);
    let b = (a + 1 + rng.below(e - 1)) % e;
    match tok % 4 {
        // all equal
        0 => row.fill(1.5),
        // first place tied between a and b
        1 => {
            row[a] = 4.0;
            row[b] = 4.0;
        }
        // second place tied between a and b, first elsewhere
        2 => {
            let c = (0..e).find(|&c| c != a && c != b).unwrap_or(a);
            row[a] = 3.0;
            row[b] = 3.0;
            if c != a {
                row[c] = 5.0;
            }
        }
        // three-way tie for first when there is room
        _ => {
            for x in row.iter_mut().step_by(3) {
                *x = 6.0;
            }
        }
    }
    row
}

async fn run_gpu(
    ctx: &GpuContext,
    config: &GateConfig,
    logits: &[f32],
    t: usize,
    e: usize,
) -> Result<GateOutput> {
    let k = config.max_k();
    let router_logits = Tensor::from_slice(ctx, "router_logits", &[t, e], logits)?;
    let probs = Tensor::<f32>::zeros(ctx, "probs", &[t, e])?;
    let topk_ids = Tensor::<u32>::zeros(ctx, "topk_ids", &[t, k])?;
    let topk_weights = Tensor::<f32>::zeros(ctx, "topk_weights", &[t, k])?;
    let lse = Tensor::<f32>::zeros(ctx, "lse", &[t])?;
    let routing = Tensor::<u32>::zeros(ctx, "routing", &[RoutingLayout::HEADER])?;
    let gate = Gate::new(
        ctx,
        config,
        &GateBuffers {
            router_logits: &router_logits,
            probs: &probs,
            topk_ids: &topk_ids,
            topk_weights: &topk_weights,
            lse: &lse,
            routing: &routing,
        },
    )?;
    submit_pass(ctx, |pass| gate.record(pass))?;
    let words = routing.read(ctx).await?;
    Ok(GateOutput {
        probs: probs.read(ctx).await?,
        topk_ids: topk_ids.read(ctx).await?,
        topk_weights: topk_weights.read(ctx).await?,
        lse: lse.read(ctx).await?,
        status: words[RoutingLayout::STATUS],
    })
}

fn compare(got: &GateOutput, want: &GateOutput) -> Vec<(&'static str, Comparison)> {
    vec![
        ("topk_ids", compare_exact(&got.topk_ids, &want.topk_ids)),
        ("status", compare_exact(&[got.status], &[want.status])),
        (
            "topk_weights",
            Tol::SOFTMAX.compare(&got.topk_weights, &want.topk_weights),
        ),
        ("probs", Tol::SOFTMAX.compare(&got.probs, &want.probs)),
        ("lse", Tol::SOFTMAX.compare(&got.lse, &want.lse)),
    ]
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    match case {
        Case::Twin {
            config,
            t,
            e,
            logits,
            seed,
        } => {
            let x = make_logits(config, *t, *e, *logits, *seed);
            let want = gate_forward(config, &x, *t, *e)?;
            let got = run_gpu(ctx, config, &x, *t, *e).await?;
            Ok(CheckResult::from_comparisons(
                kernel,
                name,
                &compare(&got, &want),
            ))
        }
        Case::Equivalence {
            t,
            e,
            gap,
            threshold_one,
        } => {
            let adaptive = GateConfig {
                gating: Gating::Adaptive,
                threshold: if *threshold_one { 1.0 } else { 0.0 },
                gap: *gap,
                single_weight: SingleWeight::RawP1,
                ..GateConfig::default()
            };
            let x = make_logits(&adaptive, *t, *e, Logits::Random, 500);
            let a = run_gpu(ctx, &adaptive, &x, *t, *e).await?;
            if *threshold_one {
                let b = run_gpu(ctx, &GateConfig::new(Gating::Top2), &x, *t, *e).await?;
                Ok(CheckResult::from_comparisons(
                    kernel,
                    name,
                    &[
                        ("topk_ids", compare_exact(&a.topk_ids, &b.topk_ids)),
                        (
                            "topk_weights",
                            Tol::SOFTMAX.compare(&a.topk_weights, &b.topk_weights),
                        ),
                    ],
                ))
            } else {
                let top1 = GateConfig {
                    gating: Gating::Top1,
                    ..adaptive
                };
                let b = run_gpu(ctx, &top1, &x, *t, *e).await?;
                let first: Vec<u32> = a.topk_ids.iter().step_by(2).copied().collect();
                let second: Vec<u32> = a.topk_ids.iter().skip(1).step_by(2).copied().collect();
                let w_first: Vec<f32> = a.topk_weights.iter().step_by(2).copied().collect();
                Ok(CheckResult::from_comparisons(
                    kernel,
                    name,
                    &[
                        ("first ids", compare_exact(&first, &b.topk_ids)),
                        ("second ids", compare_exact(&second, &vec![UNUSED; *t])),
                        (
                            "first weights",
                            Tol::SOFTMAX.compare(&w_first, &b.topk_weights),
                        ),
                    ],
                ))
            }
        }
        Case::RuleExtreme {
            config,
            t,
            e,
            top_one,
        } => {
            let x = make_logits(
                &GateConfig::top_k(config.k, config.renorm, config.score),
                *t,
                *e,
                Logits::Random,
                700,
            );
            let a = run_gpu(ctx, config, &x, *t, *e).await?;
            let fixed = GateConfig::top_k(
                if *top_one { 1 } else { config.k },
                config.renorm,
                config.score,
            );
            let b = run_gpu(ctx, &fixed, &x, *t, *e).await?;
            let (k, kb) = (config.k, fixed.k);
            // The rule's first kb slots are the fixed top-kb's; the rest unused.
            let ids: Vec<u32> = a
                .topk_ids
                .chunks(k)
                .flat_map(|r| r[..kb].to_vec())
                .collect();
            let w: Vec<f32> = a
                .topk_weights
                .chunks(k)
                .flat_map(|r| r[..kb].to_vec())
                .collect();
            let rest: Vec<u32> = a
                .topk_ids
                .chunks(k)
                .flat_map(|r| r[kb..].to_vec())
                .collect();
            Ok(CheckResult::from_comparisons(
                kernel,
                name,
                &[
                    ("ids", compare_exact(&ids, &b.topk_ids)),
                    ("weights (bit for bit)", compare_exact(&w, &b.topk_weights)),
                    (
                        "slots past the rule's",
                        compare_exact(&rest, &vec![UNUSED; rest.len()]),
                    ),
                ],
            ))
        }
        Case::BadInputs => Ok(bad_inputs(ctx, &kernel, &name)),
    }
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_gate = |what: &str,
                        config: GateConfig,
                        t: usize,
                        e: usize,
                        probs_e: usize,
                        want: fn(&Error) -> bool| {
        let scope = ctx.error_scope();
        let k = config.max_k();
        let r = (|| -> Result<Gate> {
            let logits = Tensor::<f32>::zeros(ctx, "router_logits", &[t, e])?;
            let probs = Tensor::<f32>::zeros(ctx, "probs", &[t, probs_e])?;
            let ids = Tensor::<u32>::zeros(ctx, "topk_ids", &[t, k])?;
            let w = Tensor::<f32>::zeros(ctx, "topk_weights", &[t, k])?;
            let lse = Tensor::<f32>::zeros(ctx, "lse", &[t])?;
            let routing = Tensor::<u32>::zeros(ctx, "routing", &[RoutingLayout::HEADER])?;
            Gate::new(
                ctx,
                &config,
                &GateBuffers {
                    router_logits: &logits,
                    probs: &probs,
                    topk_ids: &ids,
                    topk_weights: &w,
                    lse: &lse,
                    routing: &routing,
                },
            )
        })();
        checks.push(expect_error(scope, what, r, want));
    };
    let th = |threshold| GateConfig {
        threshold,
        ..GateConfig::default()
    };
    try_gate("K > E", GateConfig::new(Gating::Top2), 4, 1, 1, is_invalid);
    try_gate("T = 0", GateConfig::new(Gating::Top1), 0, 4, 4, is_invalid);
    try_gate("threshold NaN", th(f32::NAN), 4, 4, 4, is_invalid);
    try_gate("threshold 1.5", th(1.5), 4, 4, 4, is_invalid);
    try_gate("threshold -0.1", th(-0.1), 4, 4, 4, is_invalid);
    try_gate("probs [T, E-1]", GateConfig::default(), 4, 4, 3, is_shape);
    let topk_rule = |rule, threshold, score| GateConfig {
        rule,
        threshold,
        ..GateConfig::top_k(4, true, score)
    };
    let sm = RouterScore::Softmax;
    try_gate(
        "mass P = 0",
        topk_rule(ExpertRule::Mass, 0.0, sm),
        4,
        8,
        8,
        is_invalid,
    );
    try_gate(
        "mass on sigmoid scores",
        topk_rule(ExpertRule::Mass, 0.5, RouterScore::Sigmoid),
        4,
        8,
        8,
        is_invalid,
    );
    try_gate(
        "ratio r NaN",
        topk_rule(ExpertRule::Ratio, f32::NAN, sm),
        4,
        8,
        8,
        is_invalid,
    );
    try_gate(
        "a top-k rule under adaptive gating",
        GateConfig {
            rule: ExpertRule::Gap,
            ..GateConfig::default()
        },
        4,
        8,
        8,
        is_invalid,
    );
    bad_inputs_result(kernel, case, checks)
}
