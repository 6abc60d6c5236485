//! One MoE layer's training forward and backward on the GPU against the
//! slot-plan twins (which the library's unit tests check against the
//! per-token backward and finite differences), on every adapter.

mod common;

use amoe::conformance::Rng;
use amoe::kernels::{Activation, GateConfig, Gating};
use amoe::moe::{MoeConfig, MoeLayer, MoeWeights};
use amoe::reference::moe_backward::compose;
use amoe::reference::moe_train::AuxConfig;
use amoe::tol::Tol;

fn run(gating: Gating, split: usize, t: usize, seed: u64) {
    let cfg = MoeConfig {
        d: 24,
        f: 40,
        e: 6,
        activation: Activation::Gelu,
        gate: GateConfig {
            threshold: 0.4,
            ..GateConfig::new(gating)
        },
    };
    let w = MoeWeights::random(&cfg, seed);
    let mut rng = Rng::new(seed + 100);
    let x = rng.vec_sym(t * cfg.d, 1.0);
    let dy = rng.vec_sym(t * cfg.d, 1.0);
    let aux = AuxConfig {
        balance: 0.2,
        z_loss: 0.01,
    };
    common::for_each_adapter(|ctx| {
        let layer = MoeLayer::new(ctx, cfg, &w).unwrap();
        let plan = layer.plan_train(ctx, t, &aux, split).unwrap();
        plan.fwd.x.write(ctx, &x).unwrap();
        plan.dy.write(ctx, &dy).unwrap();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        plan.fwd.clear(&mut enc);
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            plan.fwd.record_pass(&mut pass);
            plan.record_backward(&mut pass);
        }
        ctx.submit_and_wait(enc).unwrap();
        let read = |t: &amoe::gpu::Tensor<f32>| pollster::block_on(t.read(ctx)).unwrap();
        let tile_m = plan.backward.shape.layout.tile_m;
        let (fw, layout) = compose::forward(&cfg, &w, &x, t, tile_m).unwrap();
        let want = compose::backward(&cfg, &w, &x, &fw, &layout, &dy, &aux);
        let ids = pollster::block_on(plan.fwd.topk_ids.read(ctx)).unwrap();
        assert_eq!(ids, fw.topk_ids, "routing differs from the twin");
        let checks = [
            ("y", read(&plan.fwd.y), fw.y.clone(), Tol::reduction(cfg.f)),
            ("dx", read(&plan.dx), want.dx.clone(), Tol::reduction(cfg.f)),
            (
                "dw_router",
                read(&plan.dw_router),
                want.dw_router.clone(),
                Tol::reduction(t),
            ),
            ("dw1", read(&plan.dw1), want.dw1.clone(), Tol::reduction(t)),
            ("dw2", read(&plan.dw2), want.dw2.clone(), Tol::reduction(t)),
            (
                "stats",
                read(plan.stats()),
                want.stats.clone(),
                Tol::reduction(t),
            ),
        ];
        for (name, got, want, tol) in checks {
            let c = tol.compare(&got, &want);
            assert!(
                c.pass,
                "{gating:?} split {split} T={t} {name} on {}: {c:?}",
                ctx.adapter_label()
            );
        }
    });
}

#[test]
fn top1_backward_matches_twin() {
    run(Gating::Top1, 1, 50, 1);
}

#[test]
fn top2_backward_matches_twin() {
    run(Gating::Top2, 1, 50, 2);
}

#[test]
fn adaptive_backward_matches_twin() {
    run(Gating::Adaptive, 1, 50, 3);
}

#[test]
fn split_k_weight_gradients_match_twin() {
    run(Gating::Adaptive, 3, 130, 4);
}

#[test]
fn one_token() {
    run(Gating::Top2, 1, 1, 5);
}
