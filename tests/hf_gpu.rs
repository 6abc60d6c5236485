//! Hugging Face models on the GPU, on every adapter: the nine fixtures of
//! `tests/fixtures/hf` give the reference library's logits at every prompt
//! position (prefill) and its greedy continuation (decode, one token at a
//! time through the KV cache); and random models with the axes the
//! fixtures do not reach (heads of 128, the cached prefill) equal the plain
//! CPU forward `model::cpu::logits`. Every fixture runs with f32 and with
//! f16 weight storage; f16 storage is bit for bit the f32 model on the
//! rounded weights.

mod common;

use common::max_err;

use amoe::gpu::{rounded_f16, Dtype};
use amoe::infer::{Engine, InferCheckpoint};
use amoe::kernels::{Activation, GateConfig, RouterScore};
use amoe::model::config::{QkNorm, Rope, RopeScaling};
use amoe::model::{cpu, DtypeChoice, FfnKind, HostParams, ModelConfig};
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

/// Largest |GPU - reference| with f16 storage of a fixture saved in f32.
/// Rounding each weight to f16 (relative error up to 2^-12 = 2.4e-4)
/// moves the reference's logits themselves: measured 4.8e-3 (qwen2) and
/// 7.2e-3 (olmoe) on both adapters; 1.5e-2 leaves a factor of 2. What the
/// GPU computes is checked tightly against the CPU forward on the rounded
/// weights (`LOGIT_TOL`). A fixture saved in bf16 or f16 loses nothing to
/// f16 storage (bf16 values inside f16's normal range are f16 values), so
/// it keeps `LOGIT_TOL` against the reference itself.
const F16_LOGIT_TOL: f32 = 1.5e-2;

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
        for ((name, ck, exp), dtype) in cks
            .iter()
            .flat_map(|c| [(c, DtypeChoice::F32), (c, DtypeChoice::F16)])
        {
            assert_eq!(ck.model_type.as_deref(), exp["model_type"].as_str());
            let gate = ck.gate(None, None).unwrap();
            let stored_16 = ck.weights.resolve_dtype(DtypeChoice::Auto) == Dtype::F16;
            let tol = if dtype == DtypeChoice::F16 && !stored_16 {
                F16_LOGIT_TOL
            } else {
                LOGIT_TOL
            };
            let mut engine = Engine::with_dtype(ctx, ck, gate, dtype).unwrap();
            assert_eq!(engine.storage().matmul.name(), dtype.name());
            let input = json_ids(&exp["input_ids"]);
            let want: Vec<f32> = exp["logits"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(json_floats)
                .collect();
            let out = pollster::block_on(engine.prefill(ctx, &input, true)).unwrap();
            let err = max_err(&out.logits, &want);
            if tol != LOGIT_TOL {
                // What the GPU computes: the model on f16-rounded weights.
                let mut rounded = ck.host().unwrap();
                for (id, t) in rounded.iter_mut() {
                    if id.is_matmul_weight() {
                        t.data = rounded_f16(&t.data);
                    }
                }
                let cpu = cpu::logits(&ck.cfg, &rounded, &input).unwrap();
                let e = max_err(&out.logits, &cpu);
                eprintln!("   {name:>10} (f16 weights): max |logit error| {e:.2e} against the CPU forward on the rounded weights");
                if e > LOGIT_TOL {
                    bad.push(format!(
                        "{name} f16: {e:.2e} from the CPU forward on rounded weights"
                    ));
                }
            }
            // Greedy: decode the reference's tokens one at a time through
            // the cache; each step's argmax must be the reference's next
            // token unless its margin was below twice the tolerance.
            let new = json_ids(&exp["greedy"]["new_tokens"]);
            let margins = json_floats(&exp["greedy"]["margins"]);
            let mut row = out.last().to_vec();
            let mut mismatches = Vec::new();
            for (step, (&w, &margin)) in new.iter().zip(&margins).enumerate() {
                let tok = argmax(&row) as u32;
                if tok != w && margin >= 2.0 * tol {
                    mismatches.push(format!("step {step}: {tok} for {w} (margin {margin})"));
                }
                row = pollster::block_on(engine.decode(ctx, w)).unwrap().logits;
            }
            eprintln!(
                "   {name:>10} ({dtype} weights, file {}): prefill max |logit error| {err:.2e}, greedy mismatches {mismatches:?}",
                if stored_16 { "16-bit" } else { "f32" }
            );
            if err > tol || !mismatches.is_empty() {
                bad.push(format!(
                    "{name} {dtype}: logit error {err:.2e}, {mismatches:?}"
                ));
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
                weights: p.clone().into_lazy(),
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

/// f16 storage computes exactly the f32 model on weights rounded to f16:
/// the kernels widen each half exactly and keep the f32 kernels' order of
/// operations, so prefill and decode logits are bit for bit the same (the
/// model with every axis, including the tied head's transposed GEMM, the
/// shared expert and the decode mat-vecs), and the f16 model takes half
/// the bytes of its matmul weights.
#[test]
fn f16_storage_is_the_f32_model_on_rounded_weights() {
    let cfg = wide(32);
    cfg.validate().unwrap();
    let mut p = random_params(&cfg, 77);
    for (id, t) in p.iter_mut() {
        if id.is_matmul_weight() {
            t.data = rounded_f16(&t.data);
        }
    }
    let ck = InferCheckpoint {
        cfg: cfg.clone(),
        weights: p.clone().into_lazy(),
        tokenizer: amoe::tokenizer::Tokenizer::train(["abc def ghi"].into_iter(), 300).unwrap(),
        eval_gating: cfg.gate.gating,
        source: "random, f16-exact weights".into(),
        stop_ids: vec![],
        model_type: None,
    };
    // Weights that are f16 values resolve to f16 storage by themselves.
    assert_eq!(p.resolve_dtype(DtypeChoice::Auto), Dtype::F16);
    let mut rng = amoe::util::Rng::new(5);
    let ids: Vec<u32> = (0..30).map(|_| rng.below(cfg.vocab) as u32).collect();
    common::for_each_adapter(|ctx| {
        let run = |dtype| {
            let mut engine = Engine::with_dtype(ctx, &ck, cfg.gate, dtype).unwrap();
            let mut logits = pollster::block_on(engine.prefill(ctx, &ids[..20], true))
                .unwrap()
                .logits;
            for &id in &ids[20..] {
                logits.extend(pollster::block_on(engine.decode(ctx, id)).unwrap().logits);
            }
            (logits, engine.weight_bytes())
        };
        let (l32, b32) = run(DtypeChoice::F32);
        let (l16, b16) = run(DtypeChoice::F16);
        let differ = l32
            .iter()
            .zip(&l16)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{differ} of {} logits differ", l32.len());
        let matmul: u64 = p
            .iter()
            .filter(|(id, _)| id.is_matmul_weight())
            .map(|(_, t)| t.data.len() as u64)
            .sum();
        assert_eq!(b32 - b16, 2 * matmul, "f32 {b32} bytes, f16 {b16}");
    });
}

/// `--dtype f16` on weights past f16's range is an error naming the tensor
/// (never infinities on the GPU); `auto` keeps such a model in f32.
#[test]
fn f16_refuses_weights_past_its_range() {
    let cfg = wide(32);
    let mut p = random_params(&cfg, 78);
    p.wte.data[3] = 1e6;
    assert_eq!(p.resolve_dtype(DtypeChoice::Auto), Dtype::F32);
    let ck = InferCheckpoint {
        cfg: cfg.clone(),
        weights: p.into_lazy(),
        tokenizer: amoe::tokenizer::Tokenizer::train(["abc def ghi"].into_iter(), 300).unwrap(),
        eval_gating: cfg.gate.gating,
        source: "random".into(),
        stop_ids: vec![],
        model_type: None,
    };
    common::for_each_adapter(|ctx| {
        let e = Engine::with_dtype(ctx, &ck, cfg.gate, DtypeChoice::F16)
            .err()
            .expect("f16 storage of 1e6")
            .to_string();
        assert!(e.contains("wte") && e.contains("--dtype f32"), "{e}");
    });
}

/// `--quantize-on-load q8|q4 --quantize all` on the fixtures whose
/// unembedding is untied: the GPU holds the experts, the attention
/// projections and the unembedding block-quantized (their values read back
/// are the quantizer's), computes the CPU forward on exactly the values it
/// holds within `LOGIT_TOL`, and stays near the reference (printed).
#[test]
fn quantized_projections_compute_their_stored_values() {
    use amoe::model::{QuantScope, StorageChoice};
    use amoe::quant::{rounded, QuantFormat};
    let names = ["mixtral", "qwen2_moe", "olmoe"];
    let cks: Vec<(&str, InferCheckpoint, Value)> = names
        .iter()
        .map(|&name| {
            let ck = InferCheckpoint::load(hf_fixture(name)).unwrap();
            assert!(!ck.cfg.tied, "{name}: an untied fixture");
            (name, ck, hf_expected(name))
        })
        .collect();
    common::on_first_adapter(|ctx| {
        for (name, ck, exp) in &cks {
            let input = json_ids(&exp["input_ids"]);
            let reference: Vec<f32> = exp["logits"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(json_floats)
                .collect();
            let file = ck.host().unwrap();
            for format in [QuantFormat::Q8, QuantFormat::Q4] {
                let choice = StorageChoice {
                    dtype: DtypeChoice::F32,
                    quant: Some(format),
                    scope: QuantScope::All,
                };
                let gate = ck.gate(None, None).unwrap();
                let mut engine = Engine::with_dtype(ctx, ck, gate, choice).unwrap();
                let q = engine.storage().projections;
                assert_eq!(q.quant(), Some(format), "{name}");
                assert_eq!(engine.storage().experts, q, "{name}");
                let held = pollster::block_on(engine.model().download(ctx)).unwrap();
                for ((id, h), (_, f)) in held.iter().zip(file.iter()) {
                    let want = if id.is_projection() || id.is_expert_bank() {
                        rounded(format, "w", &f.data).unwrap()
                    } else {
                        f.data.clone()
                    };
                    assert!(h.data == want, "{name} {format}: {id} on the GPU");
                }
                let out = pollster::block_on(engine.prefill(ctx, &input, true)).unwrap();
                let cpu = cpu::logits(&ck.cfg, &held, &input).unwrap();
                let e = max_err(&out.logits, &cpu);
                let r = max_err(&out.logits, &reference);
                eprintln!(
                    "   {name:>10} ({format} all): GPU vs CPU on the held values {e:.2e}, vs the reference {r:.2e}"
                );
                assert!(e <= LOGIT_TOL, "{name} {format}: {e}");
            }
        }
    });
}

/// Puts a context's split size back when dropped (also when a test body
/// panics, so that later tests of this binary see the real limit).
struct SplitAt<'a>(&'a amoe::gpu::GpuContext);

impl<'a> SplitAt<'a> {
    fn new(ctx: &'a amoe::gpu::GpuContext, bytes: u64) -> Self {
        ctx.set_split_bytes(bytes);
        SplitAt(ctx)
    }
}

impl Drop for SplitAt<'_> {
    fn drop(&mut self) {
        self.0.set_split_bytes(u64::MAX);
    }
}

/// Weights larger than one storage binding run in parts: with the split
/// size lowered to 16 KiB, the expert banks (8 KiB per expert) split into
/// parts of 2 experts, the token table and the untied unembedding into
/// vocabulary blocks, and the model still gives the logits of the unsplit
/// one: prefill (grouped expert GEMMs, one per part; the head's GEMM per
/// block of columns) bit for bit, decode (the mat-vecs add each part's
/// slots to y in turn, a different order of f32 sums) within 1e-6. Tied in
/// f32 (wte by rows, the transposed head per row block), untied in f16
/// (w_out by columns), and untied with q4 experts, projections and
/// unembedding (`--quantize all`, split at 2.5 KiB: w_out [64, 96] in parts
/// of 64 and 32 columns (71 would fit), cut at whole blocks, so each part
/// holds the unsplit weight's blocks and the same values). A single expert larger
/// than a binding is an error naming the weight.
#[test]
fn weights_larger_than_a_binding_run_in_parts() {
    use amoe::model::{QuantScope, StorageChoice};
    let mut rng = amoe::util::Rng::new(9);
    let ids: Vec<u32> = (0..30).map(|_| rng.below(96) as u32).collect();
    let q4_all = StorageChoice {
        dtype: DtypeChoice::F16,
        quant: Some(amoe::quant::QuantFormat::Q4),
        scope: QuantScope::All,
    };
    common::for_each_adapter(|ctx| {
        for (tied, dtype, split) in [
            (true, DtypeChoice::F32.into(), 16 * 1024),
            (false, DtypeChoice::F16.into(), 16 * 1024),
            (false, q4_all, 2560),
        ] {
            let dtype: StorageChoice = dtype;
            let cfg = ModelConfig { tied, ..wide(32) };
            cfg.validate().unwrap();
            let p = random_params(&cfg, 90);
            let ck = InferCheckpoint {
                cfg: cfg.clone(),
                weights: p.into_lazy(),
                tokenizer: amoe::tokenizer::Tokenizer::train(["abc def ghi"].into_iter(), 300)
                    .unwrap(),
                eval_gating: cfg.gate.gating,
                source: "random".into(),
                stop_ids: vec![],
                model_type: None,
            };
            let run = |split: Option<u64>| {
                let _at = split.map(|b| SplitAt::new(ctx, b));
                let mut engine = Engine::with_dtype(ctx, &ck, cfg.gate, dtype).unwrap();
                let prefill = pollster::block_on(engine.prefill(ctx, &ids[..20], true))
                    .unwrap()
                    .logits;
                let mut decode = Vec::new();
                for &id in &ids[20..] {
                    decode.extend(pollster::block_on(engine.decode(ctx, id)).unwrap().logits);
                }
                let out_parts = engine
                    .model()
                    .params
                    .w_out
                    .as_ref()
                    .map_or(0, |w| w.parts().len());
                (prefill, decode, engine.weight_bytes(), out_parts)
            };
            let (p1, d1, b1, _) = run(None);
            let (p2, d2, b2, out_parts) = run(Some(split));
            if dtype.quant.is_some() {
                assert_eq!(out_parts, 2, "w_out [64, 96] in q4 at 2.5 KiB");
            }
            let same = p1.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits());
            let err = max_err(&d1, &d2);
            eprintln!(
                "   tied {tied}, {dtype:?}: prefill bit for bit {same}, decode max |diff| {err:.1e}"
            );
            assert!(same, "tied {tied} {dtype:?}: prefill logits differ");
            assert!(err <= 1e-6, "tied {tied} {dtype:?}: decode {err}");
            assert_eq!(b1, b2);
        }
        // One expert (64 x 32 f32 = 8 KiB) past a 4 KiB binding.
        let cfg = wide(32);
        let ck = InferCheckpoint {
            cfg: cfg.clone(),
            weights: random_params(&cfg, 91).into_lazy(),
            tokenizer: amoe::tokenizer::Tokenizer::train(["abc def ghi"].into_iter(), 300).unwrap(),
            eval_gating: cfg.gate.gating,
            source: "random".into(),
            stop_ids: vec![],
            model_type: None,
        };
        let _at = SplitAt::new(ctx, 4096);
        let e = Engine::with_dtype(ctx, &ck, cfg.gate, DtypeChoice::F32)
            .err()
            .expect("an expert past the binding")
            .to_string();
        assert!(e.contains("w1") && e.contains("one storage binding"), "{e}");
    });
}
