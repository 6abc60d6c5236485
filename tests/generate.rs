//! Generation on the GPU against the CPU twin, the KV cache against full
//! recomputation, gating limits, seeded sampling and bad input, on every
//! adapter. Most tests use the shipped demo checkpoint (data/demo).

mod common;

use amoe::error::Error;
use amoe::infer::checkpoint::demo_dir;
use amoe::infer::reference::generate_greedy_margins;
use amoe::infer::sampling::argmax;
use amoe::infer::{Engine, GenConfig, InferCheckpoint, Sampling};
use amoe::kernels::{GateConfig, Gating};
use amoe::model::{HostParams, ModelConfig};
use amoe::tol::Tol;
use std::sync::OnceLock;

fn demo() -> &'static InferCheckpoint {
    static CK: OnceLock<InferCheckpoint> = OnceLock::new();
    CK.get_or_init(|| InferCheckpoint::load(demo_dir()).expect("the demo checkpoint loads"))
}

const PROMPT: &str = "And God said unto Noah,";

fn greedy(max_tokens: usize) -> GenConfig {
    GenConfig {
        max_tokens,
        sampling: Sampling::greedy(),
        stop_at_eot: false,
        logits: false,
    }
}

#[test]
fn greedy_generation_equals_the_cpu_twin_on_the_demo_checkpoint() {
    let ck = demo();
    let prompt = ck.tokenizer.encode(PROMPT).unwrap();
    let steps = 12;
    for gating in [ck.eval_gating, Gating::Adaptive] {
        let gate = ck.gate(Some(gating), None).unwrap();
        let (want, margins) =
            generate_greedy_margins(&ck.cfg, &ck.host().unwrap(), &prompt, steps, gate, None)
                .unwrap();
        assert_eq!(want.len(), steps);
        common::for_each_adapter(|ctx| {
            let mut engine = Engine::new(ctx, ck, gate).unwrap();
            let g = pollster::block_on(engine.generate(
                ctx,
                &ck.tokenizer,
                &prompt,
                &greedy(steps),
                |_| {},
            ))
            .unwrap();
            common::assert_same_greedy(
                &g.ids(),
                &want,
                &margins,
                &format!(
                    "{gating:?} on {}: GPU {:?} vs twin {:?}",
                    ctx.adapter_label(),
                    g.text,
                    ck.tokenizer.decode(&want).unwrap()
                ),
            );
        });
    }
}

/// Decode logits with the cache equal a prefill of the whole sequence.
#[test]
fn cached_decode_equals_full_recomputation() {
    let ck = demo();
    let prompt = ck.tokenizer.encode(PROMPT).unwrap();
    let v = ck.cfg.vocab;
    let tol = Tol {
        atol: 2e-4,
        rtol: 1e-4,
    };
    common::for_each_adapter(|ctx| {
        let gate = ck.gate(None, None).unwrap();
        let mut engine = Engine::new(ctx, ck, gate).unwrap();
        let mut seq = prompt.clone();
        let out = pollster::block_on(engine.prefill(ctx, &seq, true)).unwrap();
        assert_eq!(out.rows, seq.len());
        assert_eq!(out.routes.len(), seq.len());
        let mut next = argmax(out.last()).unwrap();
        let mut cached = Vec::new();
        for _ in 0..6 {
            let o = pollster::block_on(engine.decode(ctx, next)).unwrap();
            seq.push(next);
            next = argmax(o.last()).unwrap();
            cached.push(o);
        }
        // One prefill of the whole sequence gives every row.
        let full = pollster::block_on(engine.prefill(ctx, &seq, true)).unwrap();
        for (i, o) in cached.iter().enumerate() {
            let row = prompt.len() + i;
            let want = &full.logits[row * v..(row + 1) * v];
            let c = tol.compare(o.last(), want);
            assert!(
                c.pass,
                "position {row}: cached decode differs from recomputation by {:e}",
                c.max_abs_err
            );
            for (a, b) in o.routes[0].iter().zip(&full.routes[row]) {
                assert_eq!(a.experts, b.experts, "experts at position {row}");
                assert!(Tol::SOFTMAX.compare(&a.weights, &b.weights).pass);
            }
        }
    });
}

#[test]
fn adaptive_threshold_zero_is_top1_and_one_is_top2() {
    let ck = demo();
    let prompt = ck.tokenizer.encode(PROMPT).unwrap();
    let run = |ctx: &amoe::GpuContext, gating: Gating, threshold: f32| {
        let gate = ck.gate(Some(gating), Some(threshold)).unwrap();
        let mut engine = Engine::new(ctx, ck, gate).unwrap();
        let mut logits = Vec::new();
        let g =
            pollster::block_on(engine.generate(ctx, &ck.tokenizer, &prompt, &greedy(10), |_| {}))
                .unwrap();
        // Logits along the generated tokens, teacher-forced.
        let mut seq = prompt.clone();
        seq.extend(g.ids());
        let full = pollster::block_on(engine.prefill(ctx, &seq, true)).unwrap();
        logits.extend(full.logits);
        (g, full.routes, logits)
    };
    common::for_each_adapter(|ctx| {
        for (threshold, base) in [(0.0, Gating::Top1), (1.0, Gating::Top2)] {
            let (a, ra, la) = run(ctx, Gating::Adaptive, threshold);
            let (b, rb, lb) = run(ctx, base, threshold);
            assert_eq!(a.ids(), b.ids(), "adaptive T={threshold} vs {base:?}");
            let k = if base == Gating::Top1 { 1 } else { 2 };
            for (x, y) in ra.iter().zip(&rb) {
                for (p, q) in x.iter().zip(y) {
                    assert_eq!(p.experts, q.experts);
                    assert_eq!(p.experts.len(), k);
                }
            }
            assert_eq!(la, lb, "adaptive T={threshold} logits vs {base:?}");
        }
    });
}

#[test]
fn sampling_with_a_seed_repeats() {
    let ck = demo();
    let prompt = ck.tokenizer.encode(PROMPT).unwrap();
    let cfg = GenConfig {
        max_tokens: 16,
        sampling: Sampling {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: 7,
        },
        stop_at_eot: false,
        logits: false,
    };
    common::for_each_adapter(|ctx| {
        let gate = ck.gate(None, None).unwrap();
        let mut engine = Engine::new(ctx, ck, gate).unwrap();
        let mut gen =
            || pollster::block_on(engine.generate(ctx, &ck.tokenizer, &prompt, &cfg, |_| {}));
        let a = gen().unwrap();
        let b = gen().unwrap();
        assert_eq!(a.ids(), b.ids());
        assert_eq!(a.tokens.len(), 16);
    });
}

/// A tiny random model with a short context (and a byte-level tokenizer,
/// only needed for the text of tokens).
fn tiny(context: usize) -> InferCheckpoint {
    tiny_with(context, amoe::kernels::Activation::Gelu)
}

fn tiny_with(context: usize, activation: amoe::kernels::Activation) -> InferCheckpoint {
    let tokenizer =
        amoe::tokenizer::Tokenizer::train(["a b c d e f g h"].into_iter(), 300).unwrap();
    let cfg = ModelConfig {
        vocab: tokenizer.vocab_size(),
        d: 32,
        layers: 2,
        heads: 2,
        context,
        ffn: 32,
        experts: 4,
        activation,
        gate: GateConfig::new(Gating::Adaptive),
        ..ModelConfig::default()
    };
    InferCheckpoint {
        weights: HostParams::init(&cfg, 11).into_lazy(),
        cfg,
        stop_ids: vec![tokenizer.eot_id()],
        tokenizer,
        eval_gating: Gating::Top1,
        source: "tiny".into(),
        model_type: None,
    }
}

/// Greedy generation of `steps` tokens after `prompt` on every adapter
/// equals the CPU twin's, under adaptive gating (threshold 0.3). Returns
/// the fewest window slides seen.
fn engine_matches_the_twin(ck: &InferCheckpoint, prompt: &[u32], steps: usize) -> usize {
    let gate = ck.gate(Some(Gating::Adaptive), Some(0.3)).unwrap();
    let (want, margins) =
        generate_greedy_margins(&ck.cfg, &ck.host().unwrap(), prompt, steps, gate, None).unwrap();
    let mut slides = usize::MAX;
    common::for_each_adapter(|ctx| {
        let mut engine = Engine::new(ctx, ck, gate).unwrap();
        let g =
            pollster::block_on(engine.generate(ctx, &ck.tokenizer, prompt, &greedy(steps), |_| {}))
                .unwrap();
        common::assert_same_greedy(&g.ids(), &want, &margins, &ctx.adapter_label());
        slides = slides.min(g.slides);
    });
    slides
}

/// Past the context the window slides (the last half is prefilled again);
/// the twin slides the same way.
#[test]
fn sliding_window_matches_the_twin() {
    let slides = engine_matches_the_twin(&tiny(8), &[1, 2, 3, 4, 5], 20);
    assert!(slides >= 3, "slides {slides}");
}

/// A SwiGLU model (w3 in every FFN): prefill through the grouped path,
/// decode through the few-token path, the same tokens as the twin.
#[test]
fn swiglu_generation_matches_the_twin() {
    let ck = tiny_with(32, amoe::kernels::Activation::SwiGlu);
    assert!(ck.weights.blocks[0].ffn.w3.is_some());
    let prompt: Vec<u32> = (1..=20).collect();
    engine_matches_the_twin(&ck, &prompt, 8);
}

#[test]
fn bad_input_is_a_typed_error() {
    let ck = demo();
    let n = ck.cfg.context;
    common::for_each_adapter(|ctx| {
        let gate = ck.gate(None, None).unwrap();
        let mut engine = Engine::new(ctx, ck, gate).unwrap();
        let tk = &ck.tokenizer;
        let gen = |e: &mut Engine, p: &[u32], max: usize| {
            pollster::block_on(e.generate(ctx, tk, p, &greedy(max), |_| {}))
        };
        assert!(matches!(
            gen(&mut engine, &[], 4),
            Err(Error::InvalidArgument { .. })
        ));
        let long = vec![1u32; n + 1];
        assert!(matches!(
            gen(&mut engine, &long, 4),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            gen(&mut engine, &[1, 2], 0),
            Err(Error::InvalidArgument { .. })
        ));
        let v = ck.cfg.vocab as u32;
        assert!(gen(&mut engine, &[v], 4).is_err());
        // The engine still works after the errors.
        assert_eq!(gen(&mut engine, &[1, 2], 3).unwrap().tokens.len(), 3);
    });
    for t in [-0.1, 1.5, f32::NAN] {
        assert!(matches!(
            ck.gate(Some(Gating::Adaptive), Some(t)),
            Err(Error::InvalidArgument { .. })
        ));
    }
}

#[test]
fn broken_checkpoints_are_typed_errors() {
    let dir = std::env::temp_dir().join(format!("amoe_gen_bad_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let copy = |name: &str| std::fs::copy(demo_dir().join(name), dir.join(name)).unwrap();
    let is_ck = |r: amoe::Result<InferCheckpoint>| match r {
        Err(Error::Checkpoint { path, msg }) => format!("{path}: {msg}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("accepted"),
    };
    // Missing files.
    let m = is_ck(InferCheckpoint::load(&dir));
    assert!(m.contains("config.json") && m.contains("missing"), "{m}");
    copy("config.json");
    copy("tokenizer.json");
    let m = is_ck(InferCheckpoint::load(&dir));
    assert!(m.contains("model.safetensors"), "{m}");
    // Truncated weights.
    let bytes = std::fs::read(demo_dir().join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let m = is_ck(InferCheckpoint::load(&dir));
    assert!(m.contains("safetensors"), "{m}");
    // Another model's shapes: the config says a wider model.
    copy("model.safetensors");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["ffn"] = serde_json::json!(cfg["ffn"].as_u64().unwrap() * 2);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let m = is_ck(InferCheckpoint::load(&dir));
    assert!(m.contains("expected shape"), "{m}");
    // Not JSON.
    std::fs::write(dir.join("config.json"), "not json").unwrap();
    is_ck(InferCheckpoint::load(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `amoe eval`'s windows on the GPU give the loss the CPU twin gives on the
/// same windows, and every scored token's experts (1 or 2 under adaptive,
/// 1 under top-1).
#[test]
fn eval_matches_the_twin_on_its_windows() {
    use amoe::infer::eval::{evaluate, windows, EvalConfig};
    use amoe::kernels::UNUSED;
    use amoe::model::reference::forward_loss;
    let ck = demo();
    let text = "In the beginning God created the heaven and the earth. And the earth was \
                without form, and void; and darkness was upon the face of the deep. And the \
                Spirit of God moved upon the face of the waters. And God said, Let there be \
                light: and there was light. And God saw the light, that it was good: and God \
                divided the light from the darkness.";
    let ids = ck.tokenizer.encode(&text.repeat(3)).unwrap();
    let n = ck.cfg.context;
    assert!(ids.len() > n + 10, "{} tokens", ids.len());
    let cfg = EvalConfig {
        stride: n / 2,
        batch: 2,
    };
    for gating in [Gating::Adaptive, Gating::Top1] {
        let gate = ck.gate(Some(gating), None).unwrap();
        // The twin, window by window.
        let (mut sum, mut count) = (0.0f64, 0usize);
        for w in windows(&ids, n, cfg.stride).unwrap() {
            let c = w.targets.iter().filter(|&&t| t != UNUSED).count();
            let mean = forward_loss(
                &ck.cfg,
                &ck.host().unwrap(),
                &w.ids,
                &w.targets,
                1,
                Some(gate),
            )
            .unwrap();
            sum += mean as f64 * c as f64;
            count += c;
        }
        assert_eq!(count, ids.len() - 1);
        let want = sum / count as f64;
        common::for_each_adapter(|ctx| {
            let model = amoe::model::Model::new(ctx, &ck.cfg, &ck.host().unwrap()).unwrap();
            let mut calls = 0;
            let r = pollster::block_on(evaluate(ctx, &model, gate, &ids, cfg, &mut |_, _| {
                calls += 1
            }))
            .unwrap();
            assert_eq!((r.tokens, r.scored), (ids.len(), ids.len() - 1));
            assert!(calls >= 2);
            assert!(
                (r.loss - want).abs() <= 1e-4 * want,
                "{gating:?}: GPU loss {} vs twin {want}",
                r.loss
            );
            assert!((r.perplexity - r.loss.exp()).abs() < 1e-9 * r.perplexity);
            assert_eq!(r.experts_per_token.len(), ck.cfg.moe_layers().len());
            for l in &r.experts_per_token {
                match gating {
                    Gating::Top1 => assert_eq!(l.mean_experts, 1.0),
                    _ => assert!((1.0..=2.0).contains(&l.mean_experts), "{l:?}"),
                }
            }
        });
    }
}

/// Experts (and with `--quantize all` the attention projections) quantized
/// as the model loads (q8, q4) compute what f32 weights holding the
/// dequantized values compute (the kernels dequantize in registers, in the
/// f32 kernels' order), and stay near the unquantized model: the batched
/// evaluation (grouped GEMMs, dense matmuls) and the decode path
/// (mat-vecs, through the cached generation) both read them.
#[test]
fn quantized_experts_compute_their_dequantized_values() {
    use amoe::gpu::Dtype;
    use amoe::infer::eval::{evaluate, EvalConfig};
    use amoe::model::{HostTensor, Model, ParamId, QuantScope, Storage, StorageChoice};
    use amoe::quant::{rounded, QuantFormat};
    let ck = demo();
    let text = "And the LORD spake unto Moses, saying, Speak unto the children of Israel, \
                that they bring me an offering: of every man that giveth it willingly with \
                his heart ye shall take my offering. ";
    let ids = ck.tokenizer.encode(&text.repeat(4)).unwrap();
    let n = ck.cfg.context;
    let cfg = EvalConfig {
        stride: n / 2,
        batch: 2,
    };
    let gate = ck.gate(Some(Gating::Adaptive), None).unwrap();
    let host = ck.host().unwrap();
    let prompt = ck.tokenizer.encode(PROMPT).unwrap();
    // The quantized kernels are checked on every adapter by their
    // conformance cases (decode, expert); this checks the model's wiring.
    common::on_first_adapter(|ctx| {
        let loss = |params: &HostParams, storage: Storage| {
            let model = Model::with_dtype(ctx, &ck.cfg, params, storage).unwrap();
            assert_eq!(model.storage, storage);
            pollster::block_on(evaluate(ctx, &model, gate, &ids, cfg, &mut |_, _| {}))
                .unwrap()
                .loss
        };
        let plain = loss(&host, Dtype::F32.into());
        // The experts, or (`--quantize all`) also the attention projections
        // (the demo ties its unembedding to the token table, which stays
        // in floats).
        for (format, dtype, scope, near) in [
            (QuantFormat::Q8, Dtype::Q8, QuantScope::Experts, 0.01),
            (QuantFormat::Q4, Dtype::Q4, QuantScope::Experts, 0.1),
            (QuantFormat::Q4, Dtype::Q4, QuantScope::All, 0.1),
        ] {
            let all = scope == QuantScope::All;
            let covered = |id: ParamId| id.is_expert_bank() || (all && id.is_projection());
            let dequantized = host.map(|id, t| {
                if covered(id) {
                    HostTensor {
                        shape: t.shape.clone(),
                        data: rounded(format, "w", &t.data).unwrap(),
                    }
                } else {
                    t.clone()
                }
            });
            let storage = Storage {
                matmul: Dtype::F32,
                experts: dtype,
                projections: if all { dtype } else { Dtype::F32 },
            };
            let format = format!("{format} {scope}");
            let q = loss(&host, storage);
            let want = loss(&dequantized, Dtype::F32.into());
            assert!(
                (q - want).abs() <= 1e-5 * want,
                "{format}: loss {q} vs {want} on the dequantized f32 weights"
            );
            assert!(q != plain, "{format}: the same loss as unquantized ({q})");
            assert!(
                (q - plain).abs() <= near,
                "{format}: loss {q} vs {plain} unquantized"
            );
            // The decode path: greedy tokens equal those of the twin on
            // the dequantized values (up to a near-tie of the twin's logits).
            let choice = StorageChoice {
                dtype: amoe::model::DtypeChoice::F32,
                quant: Some(dtype.quant().unwrap()),
                scope,
            };
            let mut engine = Engine::with_dtype(ctx, ck, gate, choice).unwrap();
            assert_eq!(engine.storage(), storage);
            let g = pollster::block_on(engine.generate(
                ctx,
                &ck.tokenizer,
                &prompt,
                &greedy(10),
                |_| {},
            ))
            .unwrap();
            let (want_ids, margins) =
                generate_greedy_margins(&ck.cfg, &dequantized, &prompt, 10, gate, None).unwrap();
            common::assert_same_greedy(
                &g.ids(),
                &want_ids,
                &margins,
                &format!("{format}: GPU decode vs the twin on dequantized weights"),
            );
            // `amoe quantize`'s checkpoint: its weights read back are the
            // dequantized values, it loads in its format with no flag, and
            // the GPU holds the same words as quantizing on load (the same
            // loss, bit for bit, and the same tokens).
            let dir = std::env::temp_dir().join(format!(
                "amoe-quantized-{}-{dtype}-{scope}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            amoe::checkpoint::quantized::write_quantized(
                &dir,
                false,
                &ck.cfg,
                &ck.weights,
                &ck.tokenizer,
                &ck.inference_state(),
                dtype.quant().unwrap(),
                scope,
            )
            .unwrap();
            let qck = InferCheckpoint::load(&dir).unwrap();
            assert_eq!(qck.eval_gating, ck.eval_gating);
            assert_eq!(qck.stop_ids, ck.stop_ids);
            let read = qck.host().unwrap();
            assert!(read == dequantized, "{format}: the file's values");
            assert_eq!(loss(&read, storage).to_bits(), q.to_bits(), "{format}");
            let mut engine =
                Engine::with_dtype(ctx, &qck, gate, amoe::model::DtypeChoice::F32).unwrap();
            assert_eq!(engine.storage(), storage);
            let from_file = pollster::block_on(engine.generate(
                ctx,
                &qck.tokenizer,
                &prompt,
                &greedy(10),
                |_| {},
            ))
            .unwrap();
            assert_eq!(from_file.ids(), g.ids(), "{format}: quantized file");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    });
}

/// The near-tie rule of the GPU-vs-twin comparisons fails where it must.
#[test]
fn the_near_tie_rule_allows_only_near_ties() {
    use common::assert_same_greedy as same;
    same(&[1, 2, 3], &[1, 2, 3], &[1.0, 1.0, 1.0], "equal");
    same(
        &[1, 5, 9],
        &[1, 2, 3],
        &[1.0, 1e-3, 1.0],
        "a near-tie at token 1",
    );
    let fails = |gpu: &'static [u32], twin: &'static [u32], m: &'static [f32]| {
        std::panic::catch_unwind(|| same(gpu, twin, m, "x")).is_err()
    };
    assert!(fails(&[1, 5], &[1, 2], &[1.0, 0.5]), "a clear margin");
    assert!(fails(&[1], &[1, 2], &[1.0, 1.0]), "a token short");
}

/// The page's warm-up (`Engine::warm_lengths`, `compile_prefill`) leaves no
/// prompt length a compile: after it, prefills of every regime (a few
/// tokens, the decode mat-vecs' up to 16, the grouped GEMMs', the whole
/// context) build no new pipeline.
#[test]
fn warm_lengths_compile_every_prefill() {
    let ck = demo();
    let gate = ck.gate(Some(Gating::Adaptive), None).unwrap();
    let ids: Vec<u32> = (0..ck.cfg.context as u32).map(|i| i % 200 + 5).collect();
    common::for_each_adapter(|ctx| {
        let mut engine = Engine::with_dtype(ctx, ck, gate, amoe::model::DtypeChoice::F32).unwrap();
        let lengths = engine.warm_lengths();
        assert_eq!(lengths, [2, 16, 17, ck.cfg.context], "{lengths:?}");
        for &t in &lengths {
            engine.compile_prefill(ctx, t).unwrap();
        }
        let out = pollster::block_on(engine.prefill(ctx, &ids[..2], false)).unwrap();
        pollster::block_on(engine.decode(ctx, argmax(out.last()).unwrap())).unwrap();
        let built = ctx.pipelines_built();
        for t in [1, 3, 5, 9, 16, 17, 40, 100, ck.cfg.context] {
            pollster::block_on(engine.prefill(ctx, &ids[..t], false)).unwrap();
            assert_eq!(
                ctx.pipelines_built(),
                built,
                "a prefill of {t} tokens compiled a pipeline the warm-up did not"
            );
        }
        // Past the context: refused, as a prefill would be.
        assert!(engine.compile_prefill(ctx, ck.cfg.context + 1).is_err());
    });
}
