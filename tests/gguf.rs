//! GGUF files (`tests/fixtures/gguf`, written by
//! `scripts/make_gguf_fixtures.py` with the `gguf` package): each loads,
//! amoe's CPU forward on the weights it reads reproduces the reference
//! library's logits on the same dequantized weights, the GPU computes the
//! model it stores (experts requantized into q8/q4), and the dequantizers
//! equal the package's on every block type.

mod common;

use common::max_err;

use amoe::checkpoint::gguf::{load_gguf, parse_gguf, GgmlType};
use amoe::checkpoint::{map_file, HfModel};
use amoe::infer::{Engine, InferCheckpoint};
use amoe::model::cpu;
use amoe::quant::rounded;
use common::{json_floats, json_ids};
use serde_json::Value;
use std::path::PathBuf;

/// name, model_type, the amoe format its experts load in.
const FIXTURES: &[(&str, &str, &str)] = &[
    ("qwen2_moe-q8_0", "qwen2_moe", "q8"),
    ("olmoe-q4_0", "olmoe", "q4"),
    ("granitemoe-f16", "granitemoe", "f16"),
    ("mixtral-q4_0", "mixtral", "q4"),
    ("qwen3_moe-k", "qwen3_moe", "q4"),
];

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/gguf/{name}.gguf"))
}

fn expected(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/gguf/{name}.expected.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load(name: &str) -> HfModel {
    let p = path(name);
    load_gguf(&p.display().to_string(), map_file(&p).unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// |ours - reference| on the prompt's logits, both f32 on the same
/// weights (the file's values dequantized): f32 rounding through two or
/// three layers, as for the Hugging Face fixtures (2e-5 there); the
/// K-quant model is 4 times wider (D = 256), so its sums are longer.
const LOGIT_TOL: f32 = 5e-5;

#[test]
fn gguf_logits_match_the_reference_on_the_dequantized_weights() {
    for &(name, model_type, _) in FIXTURES {
        let m = load(name);
        let exp = expected(name);
        assert_eq!(m.family.model_type(), model_type, "{name}");
        let input = json_ids(&exp["input_ids"]);
        let enc = m.tokenizer.encode(exp["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(enc, input, "{name}: the tokenizer from the metadata");
        let want: Vec<f32> = json_floats(&exp["logits"]);
        let got = cpu::logits(&m.cfg, &m.params.to_host().unwrap(), &input).unwrap();
        let err = max_err(&got, &want);
        println!("{name:>16}: max |logit error| {err:.3e}");
        assert!(err <= LOGIT_TOL, "{name}: max logit error {err}");
    }
}

/// The GPU holds the quantized tensors (experts, and attention projections
/// and an untied unembedding stored quantized in the file) in amoe's
/// nearest format, requantized from the file's blocks, and the other
/// matmul weights in f16: it computes the CPU forward on exactly the values
/// it holds (read back), each held tensor is the requantization of the
/// file's values, and the requantization's effect on the logits is printed
/// (the README's table).
#[test]
fn gguf_models_run_on_the_gpu_in_their_storage() {
    let cks: Vec<(&str, &str, InferCheckpoint)> = FIXTURES
        .iter()
        .map(|&(name, _, q)| {
            (
                name,
                q,
                InferCheckpoint::load(path(name)).unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        })
        .collect();
    common::on_first_adapter(|ctx| {
        for (name, q, ck) in &cks {
            let exp = expected(name);
            let gate = ck.gate(None, None).unwrap();
            let mut engine =
                Engine::with_dtype(ctx, ck, gate, amoe::model::DtypeChoice::Auto).unwrap();
            let storage = engine.storage();
            assert_eq!(storage.experts.name(), *q, "{name}");
            let input = json_ids(&exp["input_ids"]);
            let out = pollster::block_on(engine.prefill(ctx, &input, true)).unwrap();
            let file = ck.host().unwrap();
            let held = pollster::block_on(engine.model().download(ctx)).unwrap();
            // Relative RMS change of the requantized weights, experts and
            // projections apart.
            let (mut diff, mut norm) = ([0f64; 2], [0f64; 2]);
            for ((id, h), (_, f)) in held.iter().zip(file.iter()) {
                let dtype = storage.of(id);
                let want = match dtype.quant() {
                    Some(format) => rounded(format, "w", &f.data).unwrap(),
                    None if dtype == amoe::gpu::Dtype::F16 => amoe::gpu::rounded_f16(&f.data),
                    None => f.data.clone(),
                };
                assert!(h.data == want, "{name}: {id} held as {dtype}");
                if dtype.quant().is_some() {
                    let k = usize::from(id.is_projection());
                    for (a, b) in h.data.iter().zip(&f.data) {
                        diff[k] += ((a - b) as f64).powi(2);
                        norm[k] += (*b as f64).powi(2);
                    }
                }
            }
            let cpu = cpu::logits(&ck.cfg, &held, &input).unwrap();
            let e = max_err(&out.logits, &cpu);
            let reference = json_floats(&exp["logits"]);
            let rms = |a: &[f32], b: &[f32]| {
                (a.iter()
                    .zip(b)
                    .map(|(x, y)| ((x - y) as f64).powi(2))
                    .sum::<f64>()
                    / a.len() as f64)
                    .sqrt()
            };
            println!(
                "{name:>16} ({}): GPU vs CPU on the stored values {e:.2e}; relative RMS \
                 change: experts {:.4}, projections {:.4}; logits vs the reference on the \
                 file's values: RMS {:.2e}, max {:.2e}",
                storage.describe(),
                (diff[0] / norm[0].max(1e-30)).sqrt(),
                (diff[1] / norm[1].max(1e-30)).sqrt(),
                rms(&out.logits, &reference),
                max_err(&out.logits, &reference),
            );
            assert!(e <= 5e-5, "{name}: {e}");
        }
    });
}

/// The dequantizers against the `gguf` package's, bit for bit, on random
/// blocks of every type (subnormal f16 scales included).
#[test]
fn dequantizers_equal_the_reference_on_every_block_type() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/blocks.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut types = Vec::new();
    for b in v["blocks"].as_array().unwrap() {
        let ty = GgmlType::from_id(b["type_id"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(ty.name(), b["type"].as_str().unwrap());
        let hex = b["hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let mut got = Vec::new();
        ty.dequantize(&bytes, &mut got);
        let want = json_floats(&b["values"]);
        assert_eq!(got.len(), want.len(), "{}", ty.name());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0),
                "{} value {i}: {g} vs {w}",
                ty.name()
            );
        }
        types.push(ty.name());
    }
    assert!(types.len() >= 10, "{types:?}");
}

/// Bad files: errors that name the file and what is wrong.
#[test]
fn bad_gguf_files_are_named_errors() {
    let good = std::fs::read(path("olmoe-q4_0")).unwrap();
    let load_bytes = |b: Vec<u8>| {
        load_gguf("x.gguf", amoe::checkpoint::FileBytes::new(b))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    // Truncated: in the header, the metadata, the tensor infos, the data.
    for cut in [10, 100, 2000, good.len() / 2, good.len() - 100] {
        let m = load_bytes(good[..cut].to_vec());
        assert!(m.contains("x.gguf") && !m.is_empty(), "cut {cut}: {m}");
    }
    // Metadata that contradicts the tensors: a wider model.
    let g = parse_gguf("x", amoe::checkpoint::FileBytes::new(good.clone())).unwrap();
    assert!(g.tensors.len() > 10);
    let needle = b"olmoe.embedding_length";
    let at = good
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len();
    let mut wide = good.clone();
    // type u32 (4 bytes), then the value.
    wide[at + 4..at + 8].copy_from_slice(&96u32.to_le_bytes());
    let m = load_bytes(wide);
    assert!(
        m.contains("does not match") && m.contains("token_embd.weight"),
        "{m}"
    );
    // Not a GGUF file at all, through the command-line loader.
    let m = InferCheckpoint::load(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/blocks.json"),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(m.contains("not GGUF"), "{m}");
}
