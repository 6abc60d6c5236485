//! The whole training step on the GPU: a tiny model overfits one batch
//! under each gating rule, on every adapter.

mod common;

use amoe::kernels::Gating;
use amoe::model::{HostParams, Model, ModelConfig, OptConfig, StepArgs, TrainStep};
use amoe::util::Rng;

use common::tiny_model as tiny;

fn overfit(cfg: ModelConfig) {
    let b = 4;
    let t = b * cfg.context;
    let mut rng = Rng::new(7);
    let seq: Vec<u32> = (0..t + 1).map(|_| rng.below(cfg.vocab) as u32).collect();
    let ids = seq[..t].to_vec();
    let targets = seq[1..].to_vec();
    let host = HostParams::init(&cfg, 1);
    let mut opt = OptConfig::default();
    opt.adamw.lr = 1e-2;
    common::for_each_adapter(|ctx| {
        let model = Model::new(ctx, &cfg, &host).unwrap();
        let step = TrainStep::new(ctx, &model, b, &opt).unwrap();
        let mut first = None;
        let mut last = 0.0;
        for s in 1..=80u64 {
            let args = StepArgs {
                ids: &ids,
                targets: &targets,
                lr: opt.adamw.lr,
                step: s,
                complexity: true,
            };
            let st = pollster::block_on(step.step(ctx, &model, &args)).unwrap();
            first.get_or_insert(st.loss);
            last = st.loss;
            assert_eq!(st.complexity.len(), b);
        }
        let first = first.unwrap();
        eprintln!(
            "   {:?} dense={}: loss {first:.3} -> {last:.3}",
            cfg.gate.gating, cfg.dense
        );
        assert!(
            (first - (cfg.vocab as f32).ln()).abs() < 0.5,
            "initial loss {first}"
        );
        assert!(last < 0.3 * first, "loss fell only from {first} to {last}");
    });
}

#[test]
fn tiny_model_overfits_one_batch_adaptive() {
    overfit(tiny(Gating::Adaptive, false));
}

#[test]
fn tiny_model_overfits_one_batch_top1() {
    overfit(tiny(Gating::Top1, false));
}

#[test]
fn tiny_model_overfits_one_batch_top2() {
    overfit(tiny(Gating::Top2, false));
}

#[test]
fn tiny_model_overfits_one_batch_top2_with_capacity() {
    overfit(ModelConfig {
        capacity_factor: Some(1.0),
        ..tiny(Gating::Top2, false)
    });
}

#[test]
fn tiny_swiglu_model_overfits_one_batch_top2() {
    overfit(ModelConfig {
        activation: amoe::kernels::Activation::SwiGlu,
        ..tiny(Gating::Top2, false)
    });
}

#[test]
fn tiny_dense_model_overfits_one_batch() {
    overfit(tiny(Gating::Top1, true));
}
