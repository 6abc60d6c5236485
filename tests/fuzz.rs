//! Fuzzing of every parser of user files, on stable Rust: a seeded loop
//! mutates valid files (byte flips, insertions, truncations, and, for JSON,
//! structural edits: a value replaced by an extreme number, another type,
//! a removed or duplicated key) and hands each to the parser, which must
//! return a value or an error: never panic, hang or allocate without
//! bound. A panic is reported with its target, case number and the input
//! (written under target/fuzz-crashes/), to become a regression test.
//!
//! Targets: safetensors files (amoe's own, quantized ones), the shard index,
//! amoe's config.json, each Hugging Face family's config.json and
//! generation_config.json, tokenizer.json (amoe's and published ones),
//! state.json and a whole checkpoint's parts, calibration files, GGUF files.
//!
//! Cases per target: `AMOE_FUZZ_CASES` (default 400, what CI runs: about
//! a minute in all); `scripts/fuzz.sh` runs more.

mod common;

use amoe::checkpoint::gguf::{load_gguf, parse_gguf};
use amoe::checkpoint::hf::{parse_config, parse_generation_config};
use amoe::checkpoint::{parse_raw, parse_shard_index, FileBytes};
use amoe::infer::calibration::Calibration;
use amoe::infer::InferCheckpoint;
use amoe::model::ModelConfig;
use amoe::tokenizer::Tokenizer;
use amoe::util::Rng;
use serde_json::Value;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

fn cases() -> usize {
    std::env::var("AMOE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(repo(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Numbers that break arithmetic.
const EXTREMES: &[f64] = &[
    0.0,
    -0.0,
    -1.0,
    1.0,
    0.5,
    1e-30,
    1e30,
    1e300,
    -1e300,
    4294967296.0,
    9007199254740993.0,
    18446744073709551615.0,
    65505.0,
    3.0,
    1000000.0,
];

/// One structural edit of a JSON value (in place), at a random depth.
fn mutate_json(v: &mut Value, rng: &mut Rng) {
    let depth = rng.below(6);
    mutate_at(v, depth, rng);
}

fn mutate_at(node: &mut Value, depth: usize, rng: &mut Rng) {
    if depth > 0 {
        match node {
            Value::Object(m) if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                return mutate_at(m.get_mut(&k).unwrap(), depth - 1, rng);
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                return mutate_at(&mut a[i], depth - 1, rng);
            }
            _ => {}
        }
    }
    match rng.below(9) {
        0 => *node = serde_json::json!(EXTREMES[rng.below(EXTREMES.len())]),
        1 => *node = serde_json::json!(-(rng.below(1 << 20) as i64)),
        2 => *node = Value::Null,
        3 => *node = Value::String("x".repeat(rng.below(3))),
        4 => *node = Value::Bool(rng.below(2) == 0),
        5 => *node = serde_json::json!([]),
        6 => {
            if let Value::Object(m) = node {
                if !m.is_empty() {
                    let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                    m.remove(&k);
                }
            }
        }
        7 => {
            if let Value::Array(a) = node {
                if !a.is_empty() {
                    let x = a[rng.below(a.len())].clone();
                    a.push(x);
                }
            }
        }
        _ => *node = serde_json::json!((rng.below(1 << 16) as u64) << rng.below(48)),
    }
}

/// One byte-level edit.
fn mutate_bytes(b: &mut Vec<u8>, rng: &mut Rng) {
    if b.is_empty() {
        b.push(rng.below(256) as u8);
        return;
    }
    match rng.below(5) {
        0 => {
            let n = rng.below(b.len());
            b.truncate(n);
        }
        1 => {
            let i = rng.below(b.len());
            b.insert(i, rng.below(256) as u8);
        }
        2 => {
            let i = rng.below(b.len());
            b.remove(i);
        }
        3 => {
            // A little-endian u64 somewhere set to an extreme.
            let i = rng.below(b.len());
            let x = [u64::MAX, 1 << 40, 0, 1 << 62, u32::MAX as u64][rng.below(5)];
            for (j, byte) in x.to_le_bytes().iter().enumerate() {
                if let Some(slot) = b.get_mut(i + j) {
                    *slot = *byte;
                }
            }
        }
        _ => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len());
                b[i] = rng.below(256) as u8;
            }
        }
    }
}

/// A mutated copy of a JSON file: structural edits, then sometimes a byte
/// edit of the text.
fn mutated_json(valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(valid).unwrap();
    for _ in 0..1 + rng.below(3) {
        mutate_json(&mut v, rng);
    }
    let mut b = serde_json::to_vec(&v).unwrap();
    if rng.below(4) == 0 {
        mutate_bytes(&mut b, rng);
    }
    b
}

/// Run `parse` on `cases()` mutations of each seed input; a panic fails
/// the test with the target, the case and where its input was saved.
fn fuzz(target: &str, seeds: &[Vec<u8>], json: bool, mut parse: impl FnMut(&[u8])) -> usize {
    let n = cases();
    let mut rng = Rng::new(0x5eed ^ target.len() as u64);
    let watch = Watchdog::start(target);
    for (s, seed) in seeds.iter().enumerate() {
        // The valid file itself.
        parse(seed);
        for case in 0..n {
            let input = if json && rng.below(5) != 0 {
                mutated_json(seed, &mut rng)
            } else {
                let mut b = seed.clone();
                for _ in 0..1 + rng.below(3) {
                    mutate_bytes(&mut b, &mut rng);
                }
                b
            };
            watch.begin(format!("{target}-{s}-{case}"), &input);
            let r = catch_unwind(AssertUnwindSafe(|| parse(&input)));
            watch.end();
            if r.is_err() {
                let dir = repo("target/fuzz-crashes");
                std::fs::create_dir_all(&dir).unwrap();
                let file = dir.join(format!("{target}-{s}-{case}"));
                std::fs::write(&file, &input).unwrap();
                panic!(
                    "{target}: seed {s}, case {case} panicked; input in {}",
                    file.display()
                );
            }
        }
    }
    let total = seeds.len() * (n + 1);
    println!("{target:>22}: {total} cases, 0 crashes");
    total
}

/// Turns a hang into a finding: a case running longer than `LIMIT` has
/// its input saved and ends the process with the case named.
/// The case running now: its name, input and start.
type Running = std::sync::Arc<std::sync::Mutex<Option<(String, Vec<u8>, std::time::Instant)>>>;

struct Watchdog {
    state: Running,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

impl Watchdog {
    fn start(target: &str) -> Watchdog {
        let state: Running = Default::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, sp, target) = (state.clone(), stop.clone(), target.to_string());
        std::thread::spawn(move || {
            while !sp.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                if let Some((name, input, t)) = &*st.lock().unwrap() {
                    if t.elapsed() > LIMIT {
                        let dir = repo("target/fuzz-crashes");
                        let _ = std::fs::create_dir_all(&dir);
                        let file = dir.join(format!("{name}-hang"));
                        let _ = std::fs::write(&file, input);
                        eprintln!(
                            "{target}: case {name} ran past {LIMIT:?} (a hang); input in {}",
                            file.display()
                        );
                        std::process::exit(101);
                    }
                }
            }
        });
        Watchdog { state, stop }
    }

    fn begin(&self, name: String, input: &[u8]) {
        *self.state.lock().unwrap() = Some((name, input.to_vec(), std::time::Instant::now()));
    }

    fn end(&self) {
        *self.state.lock().unwrap() = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn fuzz_safetensors_and_the_shard_index() {
    let seeds = vec![
        read("data/demo/model.safetensors"),
        read("tests/fixtures/hf/olmoe/model.safetensors"),
    ];
    // The demo's file is 11 MB: fuzz a copy cut after its header and a
    // few tensors' worth, which still parses as far as the header goes.
    let seeds: Vec<Vec<u8>> = seeds
        .into_iter()
        .map(|b| {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            b[..(8 + n + 4096).min(b.len())].to_vec()
        })
        .collect();
    fuzz("safetensors", &seeds, false, |b| {
        if let Ok(ts) = parse_raw("f", FileBytes::new(b.to_vec())) {
            for t in ts.iter().take(4) {
                let _ = t.values_range(0..t.numel().min(64));
                let _ = t.any_non_finite();
            }
        }
    });
    // A quantized file (amoe quantize): packed tensors and their metadata.
    let dir = std::env::temp_dir().join(format!("amoe-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ck = InferCheckpoint::load(repo("tests/fixtures/hf/olmoe")).unwrap();
    amoe::checkpoint::quantized::write_quantized(
        &dir,
        false,
        &ck.cfg,
        &ck.weights,
        &ck.tokenizer,
        &ck.inference_state(),
        amoe::quant::QuantFormat::Q4,
        amoe::model::QuantScope::All,
    )
    .unwrap();
    let q = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    fuzz("quantized safetensors", &[q], false, |b| {
        if let Ok(ts) = parse_raw("f", FileBytes::new(b.to_vec())) {
            for t in &ts {
                let _ = t.values();
            }
        }
    });
    let index = read("tests/fixtures/hf/qwen2_moe/model.safetensors.index.json");
    fuzz("shard index", &[index], true, |b| {
        let _ = parse_shard_index("i", b);
    });
}

#[test]
fn fuzz_configs() {
    let amoe_configs = vec![read("data/demo/config.json"), read("data/top8/config.json")];
    fuzz("amoe config.json", &amoe_configs, true, |b| {
        if let Ok(cfg) = serde_json::from_slice::<ModelConfig>(b) {
            if cfg.validate().is_ok() {
                let _ = cfg.param_counts(1, cfg.gate.max_k());
                let _ = cfg.gpu_bytes(amoe::gpu::Dtype::F16);
                let _ = cfg.split_plan(amoe::gpu::Dtype::F16, 1 << 27, 1 << 27);
            }
        }
    });
    let hf: Vec<Vec<u8>> = common::HF_FIXTURES
        .iter()
        .map(|n| read(&format!("tests/fixtures/hf/{n}/config.json")))
        .collect();
    fuzz("hf config.json", &hf, true, |b| {
        if let Ok((_, cfg)) = parse_config("c", b) {
            let _ = cfg.gpu_bytes(amoe::gpu::Dtype::F16);
            let _ = cfg.split_plan(amoe::gpu::Dtype::F16, 1 << 27, 1 << 27);
        }
    });
    let generation: Vec<Vec<u8>> = common::HF_FIXTURES
        .iter()
        .map(|n| read(&format!("tests/fixtures/hf/{n}/generation_config.json")))
        .collect();
    let config = read("tests/fixtures/hf/mixtral/config.json");
    fuzz("generation_config", &generation, true, |b| {
        let _ = parse_generation_config(("c", &config), Some(("g", b)));
    });
    let calibration = serde_json::to_vec(&serde_json::json!({
        "format": "amoe-calibration", "version": 1, "rule": "mass", "gap": "top2",
        "max_experts": 8, "experts": 32, "target_experts": 4.0, "mean_experts": 4.0,
        "tokens": 4096, "data": "kjv",
        "layers": [
            {"layer": 0, "threshold": 0.4, "mean_experts": 4.1, "dropped_weight": 0.2},
            {"layer": 2, "threshold": 0.5, "mean_experts": 3.9, "dropped_weight": 0.3}
        ]
    }))
    .unwrap();
    assert!(Calibration::parse(std::str::from_utf8(&calibration).unwrap()).is_ok());
    fuzz("calibration", &[calibration], true, |b| {
        if let Ok(text) = std::str::from_utf8(b) {
            let _ = Calibration::parse(text);
        }
    });
}

#[test]
fn fuzz_tokenizers_and_checkpoint_parts() {
    // Token files are large; fuzz them with fewer cases each.
    let tokenizers = vec![
        read("data/demo/tokenizer.json"),
        read("tests/fixtures/hf/qwen2_moe/tokenizer.json"),
    ];
    fuzz("tokenizer.json", &tokenizers, true, |b| {
        if let Ok(text) = std::str::from_utf8(b) {
            if let Ok(t) = Tokenizer::from_json(text) {
                let _ = t.encode("And God said, let there be light");
            }
            if let Ok(t) = Tokenizer::from_pretrained_json(text, Some(0)) {
                let ids = t.encode("And God said").unwrap_or_default();
                let _ = t.decode(&ids);
            }
        }
    });
    // A whole checkpoint from its parts, state.json mutated (config and
    // tokenizer valid), then config.json mutated.
    let demo = repo("data/demo");
    let raw = amoe::checkpoint::read_model_raw(&demo).unwrap();
    let config = read("data/demo/config.json");
    let tokenizer = String::from_utf8(read("data/demo/tokenizer.json")).unwrap();
    let state = serde_json::to_vec(&serde_json::json!({
        "train": {"eval_gating": "adaptive"},
        "inference": {"eval_gating": "top2", "stop_ids": [0], "model_type": null}
    }))
    .unwrap();
    fuzz("state.json", &[state], true, |b| {
        let _ = InferCheckpoint::from_parts("d", &config, raw.clone(), &tokenizer, Some(b));
    });
    fuzz(
        "checkpoint config",
        std::slice::from_ref(&config),
        true,
        |b| {
            let _ = InferCheckpoint::from_parts("d", b, raw.clone(), &tokenizer, None);
        },
    );
}

#[test]
fn fuzz_gguf() {
    let seeds: Vec<Vec<u8>> = ["olmoe-q4_0", "qwen2_moe-q8_0", "granitemoe-f16"]
        .iter()
        .map(|n| read(&format!("tests/fixtures/gguf/{n}.gguf")))
        .collect();
    fuzz("gguf", &seeds, false, |b| {
        let file = FileBytes::new(b.to_vec());
        if let Ok(g) = parse_gguf("g", file.clone()) {
            let _ = g.tensors.len();
            if let Ok(m) = load_gguf("g", file) {
                // Every tensor's values, as the upload would read them.
                let _ = m.params.to_host();
            }
        }
    });
}
