//! One full training step on the GPU against its CPU twin
//! (`model::reference::train_step`), from the same parameters and batch,
//! on every adapter: the loss, the gradient norm, the routing, every
//! gradient, the AdamW moments and every parameter after the step.

mod common;

use amoe::kernels::Gating;
use amoe::model::reference::{train_step, AdamState, CpuStepStats};
use amoe::model::{HostParams, Model, ModelConfig, OptConfig, StepArgs, TrainStep};
use amoe::tol::Tol;
use amoe::util::Rng;

use common::tiny_model as tiny;

/// Learning rate of the step: large enough that weight decay (lr * 0.1 *
/// |p|) is well above the parameter tolerance.
const LR: f32 = 1e-2;
/// Clip norm: below every config's gradient norm (about 1 to 2 with the
/// small unembedding init), so clipping is active, but not so far below
/// that s g nears AdamW's eps.
const CLIP: f32 = 0.5;

/// Per-tensor tolerance of a gradient (and of the AdamW moments): the
/// reduction preset for the longest sum in the backward (T tokens), scaled
/// to the tensor's magnitude (gradients are O(1 / T), not O(1)), with the
/// relative part loosened for the ~20 kernels of f32 rounding chained
/// between the loss and the embedding.
fn grad_tol(want: &[f32], t: usize) -> Tol {
    let scale = want.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
    let r = Tol::reduction(t);
    Tol {
        atol: r.atol * scale,
        rtol: 10.0 * r.rtol,
    }
}

struct Report {
    lines: Vec<String>,
    bad: Vec<String>,
}

impl Report {
    fn check(&mut self, what: &str, ok: bool, detail: String) {
        let line = format!("{what}: {detail}");
        if !ok {
            self.bad.push(line.clone());
        }
        self.lines.push(line);
    }
}

fn compare(cfg: &ModelConfig, seed: u64) {
    let b = 2;
    let t = b * cfg.context;
    let mut rng = Rng::new(seed);
    let seq: Vec<u32> = (0..t + 1).map(|_| rng.below(cfg.vocab) as u32).collect();
    let (ids, targets) = (seq[..t].to_vec(), seq[1..].to_vec());
    let host = HostParams::init(cfg, seed);
    let opt = OptConfig {
        clip: Some(CLIP),
        ..OptConfig::default()
    };

    let mut want_p = host.clone();
    let mut want_st = AdamState::new(cfg);
    let want = train_step(
        cfg,
        &mut want_p,
        &mut want_st,
        &ids,
        &targets,
        b,
        &opt,
        LR,
        1,
    )
    .unwrap();
    assert!(
        want.grad_norm > CLIP,
        "clipping inactive: norm {}",
        want.grad_norm
    );

    common::for_each_adapter(|ctx| {
        let model = Model::new(ctx, cfg, &host).unwrap();
        let step = TrainStep::new(ctx, &model, b, &opt).unwrap();
        let args = StepArgs {
            ids: &ids,
            targets: &targets,
            lr: LR,
            step: 1,
            complexity: true,
        };
        let got = pollster::block_on(step.step(ctx, &model, &args)).unwrap();
        let read = |x: &amoe::gpu::Tensor<f32>| pollster::block_on(x.read(ctx)).unwrap();
        let grads: Vec<Vec<f32>> = step.grads.values().map(read).collect();
        let m: Vec<Vec<f32>> = step.m.values().map(read).collect();
        let v: Vec<Vec<f32>> = step.v.values().map(read).collect();
        let params = pollster::block_on(model.download(ctx)).unwrap();
        let mut r = Report {
            lines: Vec::new(),
            bad: Vec::new(),
        };
        check_step(
            cfg, t, &want, &want_p, &want_st, &got, &grads, &m, &v, &params, &mut r,
        );
        for l in &r.lines {
            eprintln!("   {l}");
        }
        assert!(
            r.bad.is_empty(),
            "{:?} dense={} on {}: {} checks failed:\n{}",
            cfg.gate.gating,
            cfg.dense,
            ctx.adapter_label(),
            r.bad.len(),
            r.bad.join("\n")
        );
    });
}

#[allow(clippy::too_many_arguments)]
fn check_step(
    cfg: &ModelConfig,
    t: usize,
    want: &CpuStepStats,
    want_p: &HostParams,
    want_st: &AdamState,
    got: &amoe::model::StepStats,
    grads: &[Vec<f32>],
    m: &[Vec<f32>],
    v: &[Vec<f32>],
    params: &HostParams,
    r: &mut Report,
) {
    // (a) Loss and norm: sums over V logits and T tokens, then the mean.
    let lt = Tol::reduction(cfg.vocab * t);
    let c = lt.compare(&[got.loss], &[want.loss]);
    r.check(
        "loss",
        c.pass,
        format!(
            "gpu {} cpu {} (abs {:e})",
            got.loss, want.loss, c.max_abs_err
        ),
    );
    let c = Tol::reduction(t).compare(&[got.grad_norm], &[want.grad_norm]);
    r.check(
        "grad norm",
        c.pass,
        format!(
            "gpu {} cpu {} (rel {:e})",
            got.grad_norm, want.grad_norm, c.max_rel_err
        ),
    );
    // Routing is discrete: the same decisions, or the gradients differ
    // for a reason other than rounding.
    r.check(
        "expert counts",
        got.expert_counts == want.expert_counts,
        format!("gpu {:?} cpu {:?}", got.expert_counts, want.expert_counts),
    );
    let bits = |v: &[Vec<f32>]| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
    r.check(
        "complexity vectors",
        bits(&got.complexity) == bits(&want.complexity),
        format!("gpu {:?} cpu {:?}", got.complexity, want.complexity),
    );
    r.check(
        "dropped slots",
        got.dropped_slots == want.dropped_slots,
        format!("gpu {:?} cpu {:?}", got.dropped_slots, want.dropped_slots),
    );
    if cfg.capacity_factor.is_some() {
        r.check(
            "capacity drops slots",
            want.dropped_slots.iter().all(|&n| n > 0),
            format!("dropped per layer {:?}", want.dropped_slots),
        );
    }
    if cfg.gate.gating == Gating::Adaptive && !cfg.dense && cfg.capacity_factor.is_none() {
        // Otherwise adaptive degenerates to top-1 or top-2 here.
        let slots: Vec<u32> = want.expert_counts.iter().map(|c| c.iter().sum()).collect();
        r.check(
            "adaptive mixes one and two experts",
            slots
                .iter()
                .all(|&n| n as usize > t && (n as usize) < 2 * t),
            format!("slots per layer {slots:?} of {t} tokens"),
        );
    }
    let c = Tol::reduction(t).compare(&got.balance_loss, &want.balance_loss);
    r.check(
        "balance loss",
        c.pass,
        format!("gpu {:?} cpu {:?}", got.balance_loss, want.balance_loss),
    );

    let s = want.clip_scale;
    // The clip factor the GPU applied, from its own m = (1 - b1) s g: one
    // scalar, so a tight check.
    let (mut mg, mut gg) = (0.0f64, 0.0f64);
    for (mi, gi) in m.iter().zip(grads) {
        for (&a, &b) in mi.iter().zip(gi) {
            mg += a as f64 * b as f64;
            gg += b as f64 * b as f64;
        }
    }
    let s_gpu = (mg / (gg * (1.0 - cfg_beta(1)) as f64)) as f32;
    r.check(
        "clip scale",
        (s_gpu - s).abs() <= 1e-5 * s,
        format!("gpu {s_gpu} cpu {s}"),
    );
    let lr = LR;
    let (mut zero, mut resolved, mut unresolved, mut total) = (0usize, 0usize, 0usize, 0usize);
    let params_list: Vec<&[f32]> = params.values().map(|t| t.data.as_slice()).collect();
    let want_list: Vec<&[f32]> = want_p.values().map(|t| t.data.as_slice()).collect();
    for (i, (name, wg)) in want.grads.iter().enumerate() {
        let wg = &wg.data;
        // (b) The gradient.
        let tol = grad_tol(wg, t);
        let c = tol.compare(&grads[i], wg);
        r.check(
            &format!("grad {name}"),
            c.pass,
            format!(
                "abs {:.2e} (atol {:.2e}) rel {:.2e} first bad {:?}",
                c.max_abs_err, tol.atol, c.max_rel_err, c.first_bad
            ),
        );
        // The moments after one step: m = (1 - b1) s g, v = (1 - b2) (s g)^2,
        // so the clip factor is checked here (AdamW's first update is
        // nearly invariant to it).
        let b1 = 1.0 - cfg_beta(1);
        let mt = Tol {
            atol: tol.atol * s * b1,
            rtol: tol.rtol,
        };
        let c = mt.compare(&m[i], &want_st.m[i]);
        r.check(
            &format!("m {name}"),
            c.pass,
            format!("abs {:.2e} rel {:.2e}", c.max_abs_err, c.max_rel_err),
        );
        let gmax = wg.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
        let vt = Tol {
            atol: 2.0 * tol.atol * gmax * s * s * (1.0 - cfg_beta(2)),
            rtol: 2.0 * tol.rtol,
        };
        let c = vt.compare(&v[i], &want_st.v[i]);
        r.check(
            &format!("v {name}"),
            c.pass,
            format!("abs {:.2e} rel {:.2e}", c.max_abs_err, c.max_rel_err),
        );

        // (c) The parameters. The first AdamW step moves an element by
        // lr * a(g) (+ decay), a(g) = s g / (|s g| + eps): lr * sign(g)
        // once |s g| >> eps. So a parameter may differ by what the
        // gradient tolerance allows in a(g), plus a small fraction of lr
        // for rounding: a tight check (~1e-3 lr) wherever the sign of g is
        // certain (or g is exactly zero: ids not in the batch, a dense
        // FFN's router), up to 2 lr only where the tolerance straddles 0.
        let eps = OptConfig::default().adamw.eps as f64;
        let a = |x: f64| s as f64 * x / ((s as f64 * x).abs() + eps);
        let (gp, wp) = (params_list[i], want_list[i]);
        let strict = 1e-3 * lr;
        let mut worst = (0.0f32, 0usize);
        let mut fails = 0usize;
        for j in 0..wg.len() {
            let g = wg[j] as f64;
            let diff = (gp[j] - wp[j]).abs();
            let lim = if g == 0.0 {
                // The GPU's gradient must be an exact zero too.
                zero += 1;
                if grads[i][j] != 0.0 {
                    fails += 1;
                }
                strict
            } else {
                let bound = (tol.atol + tol.rtol * wg[j].abs()) as f64;
                let spread = (a(g - bound) - a(g)).abs().max((a(g + bound) - a(g)).abs());
                let lim = strict + lr * spread as f32;
                if lim <= 2.0 * strict {
                    resolved += 1;
                } else {
                    unresolved += 1;
                }
                lim
            };
            if diff.is_nan() || diff > lim {
                fails += 1;
            }
            if diff > worst.0 {
                worst = (diff, j);
            }
        }
        total += wg.len();
        r.check(
            &format!("param {name}"),
            fails == 0,
            format!(
                "{fails} elements off, worst |diff| {:.2e} at {} (lr {lr:e})",
                worst.0, worst.1
            ),
        );
    }
    // The strict comparison must cover nearly every element, or it proves
    // little.
    r.check(
        "param coverage",
        (zero + resolved) as f64 >= 0.99 * total as f64,
        format!("{resolved} resolved, {zero} zero, {unresolved} loose of {total}"),
    );
}

/// beta1 / beta2 of `OptConfig::default()`.
fn cfg_beta(i: usize) -> f32 {
    let a = OptConfig::default().adamw;
    if i == 1 {
        a.beta1
    } else {
        a.beta2
    }
}

#[test]
fn step_matches_twin_top1() {
    compare(&tiny(Gating::Top1, false), 11);
}

#[test]
fn step_matches_twin_top2() {
    compare(&tiny(Gating::Top2, false), 12);
}

#[test]
fn step_matches_twin_adaptive() {
    compare(&tiny(Gating::Adaptive, false), 13);
}

#[test]
fn step_matches_twin_top2_with_capacity() {
    let cfg = ModelConfig {
        capacity_factor: Some(0.75),
        ..tiny(Gating::Top2, false)
    };
    compare(&cfg, 15);
}

#[test]
fn step_matches_twin_adaptive_swiglu() {
    let cfg = ModelConfig {
        activation: amoe::kernels::Activation::SwiGlu,
        ..tiny(Gating::Adaptive, false)
    };
    compare(&cfg, 16);
}

#[test]
fn step_matches_twin_dense() {
    compare(&tiny(Gating::Top1, true), 14);
}

#[test]
fn step_matches_twin_rope_swiglu() {
    // A Mixtral-like layout: rotary positions, SwiGLU experts, top-2
    // renormalized.
    let cfg = ModelConfig {
        rope: Some(amoe::model::config::Rope {
            theta: 10000.0,
            scaling: None,
        }),
        activation: amoe::kernels::Activation::SwiGlu,
        ..tiny(Gating::Top2, false)
    };
    compare(&cfg, 18);
}

#[test]
fn step_matches_twin_gqa_window() {
    // GQA 4/2 with head_dim 12 (!= d / heads), a sliding window shorter
    // than the context, rotary positions, a score scale of its own.
    let cfg = ModelConfig {
        heads: 4,
        kv_heads: Some(2),
        head_dim: Some(12),
        sliding_window: Some(6),
        attn_scale: Some(0.3),
        rope: Some(amoe::model::config::Rope {
            theta: 10000.0,
            scaling: None,
        }),
        ..tiny(Gating::Top2, false)
    };
    compare(&cfg, 19);
}
