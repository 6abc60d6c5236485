//! Hugging Face models on the GPU, on every adapter: the nine fixtures of
//! `tests/fixtures/hf` give the reference library's logits at every prompt
//! position (prefill) and its greedy continuation (decode, one token at a
//! time through the KV cache); and random models with the axes the
//! fixtures do not reach (heads of 128, the cached prefill) equal the plain
//! CPU forward `model::cpu::logits`.

mod common;

use amoe::infer::{Engine, InferCheckpoint};
use amoe::kernels::{Activation, GateConfig, RouterScore};
use amoe::model::config::{QkNorm, Rope, RopeScaling};
use amoe::model::{cpu, FfnKind, HostParams, ModelConfig};
use common::{hf_expected, hf_fixture, json_floats, json_ids, HF_FIXTURES};
use serde_json::Value;

/// Largest |GPU - reference| over the prompt's logits (and |GPU - CPU
/// forward| of the random models). The reference is float32 PyTorch; the
/// GPU sums in f32 too, in tiles and in another order (GEMMs over D = 64
/// and the expert widths, attention over up to 42 keys, the unembedding),
/// so the two differ by a few f32 ulps per partial sum through 2-3 layers,
/// on logits up to ~5: measured 2.4e-6 to 4.7e-6 on lavapipe (Vulkan) and
/// llvmpipe (GL), 1.3e-6 for the random models (printed with
/// `--nocapture`). 3e-5 leaves a factor of 6 for other adapters' FMA
/// contraction and exp, and is 100 times below the smallest greedy margin
/// (0.0039), so every greedy token must agree.
const LOGIT_TOL: f32 = 3e-5;

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[test]
fn fixtures_match_the_reference_on_the_gpu() {
    let cks: Vec<(&str, InferCheckpoint, Value)> = HF_FIXTURES
        .iter()
        .map(|&name| {
            let ck =
                InferCheckpoint::load(hf_fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, ck, hf_expected(name))
        })
        .collect();
    common::for_each_adapter(|ctx| {
        let mut bad = Vec::new();
        for (name, ck, exp) in &cks {
            assert_eq!(ck.model_type.as_deref(), exp["model_type"].as_str());
            let gate = ck.gate(None, None).unwrap();
            let mut engine = Engine::new(ctx, ck, gate).unwrap();
            let input = json_ids(&exp["input_ids"]);
            let want: Vec<f32> = exp["logits"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(json_floats)
                .collect();
            let out = pollster::block_on(engine.prefill(ctx, &input, true)).unwrap();
            let err = max_err(&out.logits, &want);
            // Greedy: decode the reference's tokens one at a time through
            // the cache; each step's argmax must be the reference's next
            // token unless its margin was below twice the tolerance.
            let new = json_ids(&exp["greedy"]["new_tokens"]);
            let margins = json_floats(&exp["greedy"]["margins"]);
            let mut row = out.last().to_vec();
            let mut mismatches = Vec::new();
            for (step, (&w, &margin)) in new.iter().zip(&margins).enumerate() {
                let tok = argmax(&row) as u32;
                if tok != w && margin >= 2.0 * LOGIT_TOL {
                    mismatches.push(format!("step {step}: {tok} for {w} (margin {margin})"));
                }
                row = pollster::block_on(engine.decode(ctx, w)).unwrap().logits;
            }
            eprintln!("   {name:>10}: prefill max |logit error| {err:.2e}, greedy mismatches {mismatches:?}");
            if err > LOGIT_TOL || !mismatches.is_empty() {
                bad.push(format!("{name}: logit error {err:.2e}, {mismatches:?}"));
            }
        }
        assert!(bad.is_empty(), "on {}: {bad:?}", ctx.adapter_label());
    });
}

/// A model with every axis at once, at sizes the fixtures do not reach.
fn wide(head_dim: usize) -> ModelConfig {
    ModelConfig {
        vocab: 96,
        d: 64,
        layers: 3,
        heads: 4,
        kv_heads: Some(2),
        head_dim: Some(head_dim),
        context: 40,
        ffn: 32,
        experts: 16,
        activation: Activation::SwiGlu,
        gate: GateConfig::top_k(8, false, RouterScore::Softmax),
        rope: Some(Rope {
            theta: 10000.0,
            scaling: Some(RopeScaling::Linear { factor: 2.0 }),
        }),
        max_positions: Some(64),
        qkv_bias: true,
        qk_norm: QkNorm::PerHead,
        sliding_window: Some(9),
        ffn_kinds: Some(vec![FfnKind::Dense, FfnKind::Moe, FfnKind::Moe]),
        dense_ffn: Some(48),
        shared_ffn: Some(24),
        tied: true,
        embedding_multiplier: 1.5,
        residual_multiplier: 0.7,
        logits_scaling: 2.0,
        ..ModelConfig::default()
    }
}

/// Random weights with non-trivial gains and biases.
fn random_params(cfg: &ModelConfig, seed: u64) -> HostParams {
    let mut rng = amoe::util::Rng::new(seed);
    let mut p = HostParams::init(cfg, seed);
    for (_, t) in p.iter_mut() {
        for x in &mut t.data {
            *x += rng.vec_sym(1, 0.1)[0];
        }
    }
    p
}

#[test]
fn wide_heads_and_every_axis_match_the_cpu_forward() {
    let cases: Vec<(ModelConfig, HostParams)> = [128, 256, 32]
        .into_iter()
        .enumerate()
        .map(|(i, dh)| {
            let cfg = wide(dh);
            cfg.validate().unwrap();
            let p = random_params(&cfg, 40 + i as u64);
            (cfg, p)
        })
        .collect();
    common::for_each_adapter(|ctx| {
        for (cfg, p) in &cases {
            let dh = cfg.head_dim();
            let ck = InferCheckpoint {
                cfg: cfg.clone(),
                host: p.clone(),
                tokenizer: amoe::tokenizer::Tokenizer::train(["abc def ghi"].into_iter(), 300)
                    .unwrap(),
                eval_gating: cfg.gate.gating,
                source: format!("random head_dim {dh}"),
                stop_ids: vec![],
                model_type: None,
            };
            let mut rng = amoe::util::Rng::new(dh as u64);
            let ids: Vec<u32> = (0..30).map(|_| rng.below(cfg.vocab) as u32).collect();
            let want = cpu::logits(cfg, p, &ids).unwrap();
            let mut engine = Engine::new(ctx, &ck, cfg.gate).unwrap();
            // Prefill 20 (flash for Dh <= 64, the cached kernel past it),
            // then decode the rest one by one.
            let out = pollster::block_on(engine.prefill(ctx, &ids[..20], true)).unwrap();
            let v = cfg.vocab;
            let mut err = max_err(&out.logits, &want[..20 * v]);
            for (i, &id) in ids.iter().enumerate().skip(20) {
                let o = pollster::block_on(engine.decode(ctx, id)).unwrap();
                err = err.max(max_err(&o.logits, &want[i * v..(i + 1) * v]));
            }
            eprintln!("   head_dim {dh}: max |logit error| {err:.2e}");
            assert!(err <= LOGIT_TOL, "head_dim {dh}: {err}");
            // `amoe eval`'s loss over one full window (batch graph; heads
            // past 64 run one window at a time over a scratch cache)
            // against the CPU forward's cross-entropy.
            let n = cfg.context;
            let seq: Vec<u32> = (0..=n).map(|_| rng.below(cfg.vocab) as u32).collect();
            let logits = cpu::logits(cfg, p, &seq[..n]).unwrap();
            let want: f64 = (0..n)
                .map(|i| {
                    let row = &logits[i * v..(i + 1) * v];
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                    m + z.ln() - row[seq[i + 1] as usize] as f64
                })
                .sum::<f64>()
                / n as f64;
            let model = amoe::model::Model::new(ctx, cfg, p).unwrap();
            let rep = pollster::block_on(amoe::infer::eval::evaluate(
                ctx,
                &model,
                cfg.gate,
                &seq,
                amoe::infer::eval::EvalConfig {
                    stride: n,
                    batch: 4,
                },
                &mut |_, _| {},
            ))
            .unwrap();
            eprintln!("   head_dim {dh}: eval loss {} vs CPU {want}", rep.loss);
            assert!(
                (rep.loss - want).abs() < 1e-4,
                "head_dim {dh}: eval {} vs {want}",
                rep.loss
            );
        }
    });
}
