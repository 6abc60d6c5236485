//! One MoE layer forward on the GPU (one submission) against its twin
//! `reference::moe::moe_forward`, for every gating rule, both expert paths and
//! both activations, on every adapter; plus the identities that pin the
//! adaptive rule down and the bad inputs a user can give.

mod common;

use amoe::kernels::{Activation, GapMode, GateConfig, Gating, UNUSED};
use amoe::moe::{MoeConfig, MoeLayer, MoeWeights, Path};
use amoe::reference::moe::moe_forward;
use amoe::tol::{compare_exact, Tol};
use amoe::{Error, GpuContext};

fn config(gating: Gating, activation: Activation, d: usize, f: usize, e: usize) -> MoeConfig {
    MoeConfig {
        d,
        f,
        e,
        activation,
        gate: GateConfig::new(gating),
        capacity_factor: None,
    }
}

fn input(t: usize, d: usize, seed: u64) -> Vec<f32> {
    amoe::util::Rng::new(seed).vec_sym(t * d, 1.0)
}

/// GPU forward: (y, topk_ids).
fn gpu_forward(
    ctx: &GpuContext,
    cfg: MoeConfig,
    w: &MoeWeights,
    x: &[f32],
    t: usize,
    path: Path,
) -> amoe::Result<(Vec<f32>, Vec<u32>)> {
    let layer = MoeLayer::new(ctx, cfg, w)?;
    let plan = layer.plan(ctx, t, path)?;
    layer.forward(ctx, &plan, x)?;
    let y = pollster::block_on(plan.output(ctx))?;
    let ids = pollster::block_on(plan.topk_ids.read(ctx))?;
    Ok((y, ids))
}

#[test]
fn layer_forward_matches_twin_for_every_rule_and_path() {
    let cases = [
        // (gating, activation, T, D, F, E)
        (Gating::Top1, Activation::Gelu, 1, 32, 48, 4),
        (Gating::Top2, Activation::Gelu, 37, 32, 64, 8),
        (Gating::Adaptive, Activation::Gelu, 130, 64, 96, 16),
        (Gating::Adaptive, Activation::SwiGlu, 77, 32, 40, 8),
        (Gating::Top2, Activation::SwiGlu, 5, 16, 32, 3),
        (Gating::Adaptive, Activation::Gelu, 3, 32, 32, 20), // E > T: empty experts
    ];
    common::for_each_adapter(|ctx| {
        for (gating, act, t, d, f, e) in cases {
            let cfg = config(gating, act, d, f, e);
            let w = MoeWeights::random(&cfg, 1 + t as u64);
            let x = input(t, d, 2 + t as u64);
            let want = moe_forward(&cfg, &w, &x, t).unwrap();
            for path in [Path::Grouped, Path::Decode] {
                let (y, ids) = gpu_forward(ctx, cfg, &w, &x, t, path).unwrap();
                let what = format!("{gating:?} {act:?} T={t} D={d} F={f} E={e} {path:?}");
                assert!(
                    compare_exact(&ids, &want.gate.topk_ids).pass,
                    "{what}: routing differs"
                );
                let c = Tol::reduction(d.max(f)).compare(&y, &want.y);
                assert!(c.pass, "{what}: y differs from twin: {c:?}");
            }
        }
    });
}

#[test]
fn adaptive_threshold_zero_is_top1_and_one_is_top2() {
    let (t, d, f, e) = (64, 32, 48, 8);
    common::for_each_adapter(|ctx| {
        let base = config(Gating::Adaptive, Activation::Gelu, d, f, e);
        let w = MoeWeights::random(&base, 9);
        let x = input(t, d, 10);
        for gap in [GapMode::Top2, GapMode::Softmax] {
            let mut a0 = base;
            a0.gate.threshold = 0.0;
            a0.gate.gap = gap;
            let mut a1 = a0;
            a1.gate.threshold = 1.0;
            let (y_a0, ids_a0) = gpu_forward(ctx, a0, &w, &x, t, Path::Grouped).unwrap();
            let (y_a1, _) = gpu_forward(ctx, a1, &w, &x, t, Path::Grouped).unwrap();
            let top1 = config(Gating::Top1, Activation::Gelu, d, f, e);
            let top2 = config(Gating::Top2, Activation::Gelu, d, f, e);
            let (y_t1, ids_t1) = gpu_forward(ctx, top1, &w, &x, t, Path::Grouped).unwrap();
            let (y_t2, _) = gpu_forward(ctx, top2, &w, &x, t, Path::Grouped).unwrap();
            assert!(
                ids_a0.chunks(2).all(|r| r[1] == UNUSED),
                "threshold 0 took a second expert"
            );
            let first: Vec<u32> = ids_a0.chunks(2).map(|r| r[0]).collect();
            assert_eq!(first, ids_t1);
            assert_eq!(y_a0, y_t1, "{gap:?}: adaptive(0) must equal top1 exactly");
            assert_eq!(y_a1, y_t2, "{gap:?}: adaptive(1) must equal top2 exactly");
        }
    });
}

#[test]
fn nan_input_is_a_typed_error() {
    common::for_each_adapter(|ctx| {
        let cfg = config(Gating::Adaptive, Activation::Gelu, 16, 16, 4);
        let w = MoeWeights::random(&cfg, 3);
        let mut x = input(20, 16, 4);
        x[5 * 16 + 3] = f32::NAN;
        let r = gpu_forward(ctx, cfg, &w, &x, 20, Path::Grouped);
        assert!(matches!(r, Err(Error::NonFinite { .. })), "{r:?}");
    });
}

#[test]
fn bad_layer_inputs_are_typed_errors() {
    common::for_each_adapter(|ctx| {
        let cfg = config(Gating::Top2, Activation::Gelu, 16, 16, 4);
        let w = MoeWeights::random(&cfg, 3);
        let layer = MoeLayer::new(ctx, cfg, &w).unwrap();
        assert!(matches!(
            layer.plan(ctx, 0, Path::Auto),
            Err(Error::InvalidArgument { .. })
        ));
        let plan = layer.plan(ctx, 4, Path::Auto).unwrap();
        let r = layer.forward(ctx, &plan, &[0.0; 7]);
        assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");

        let one_expert = config(Gating::Top2, Activation::Gelu, 16, 16, 1);
        let r = MoeLayer::new(ctx, one_expert, &MoeWeights::random(&one_expert, 1));
        assert!(
            matches!(r, Err(Error::InvalidArgument { .. })),
            "K > E must fail"
        );

        let mut bad = cfg;
        bad.gate.gating = Gating::Adaptive;
        bad.gate.threshold = 1.5;
        assert!(matches!(
            MoeLayer::new(ctx, bad, &w),
            Err(Error::InvalidArgument { .. })
        ));

        let mut short = w.clone();
        short.w1.pop();
        assert!(matches!(
            MoeLayer::new(ctx, cfg, &short),
            Err(Error::Shape { .. })
        ));
        let swiglu = config(Gating::Top2, Activation::SwiGlu, 16, 16, 4);
        assert!(matches!(
            MoeLayer::new(ctx, swiglu, &w),
            Err(Error::InvalidArgument { .. })
        ));
    });
}
