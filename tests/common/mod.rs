//! Test harness: one test body run on every adapter the machine has.
//!
//! Contexts are created once per test binary and shared. Under `CI=true`, or
//! when `AMOE_REQUIRE_ADAPTERS` is set, finding no adapter is a failure, not a
//! skip. `AMOE_REQUIRE_BACKENDS=vulkan,gl` makes a missing backend a failure too
//! (the test script sets it on machines where Mesa provides both).

#![allow(dead_code)]

use amoe::gpu::{AdapterFilter, GpuContext};
use amoe::kernels::{GateConfig, Gating};
use amoe::model::ModelConfig;
use std::sync::OnceLock;

fn contexts() -> &'static [GpuContext] {
    static CTX: OnceLock<Vec<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        let filter = AdapterFilter::from_args(None, None).expect("AMOE_BACKEND is valid");
        let ctxs = pollster::block_on(GpuContext::all(&filter)).unwrap_or_default();
        let strict = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
            || std::env::var("AMOE_REQUIRE_ADAPTERS").is_ok();
        if ctxs.is_empty() && strict {
            panic!("no GPU adapter found, and CI/AMOE_REQUIRE_ADAPTERS forbids skipping GPU tests");
        }
        if let Ok(want) = std::env::var("AMOE_REQUIRE_BACKENDS") {
            for b in want.split(',').filter(|s| !s.is_empty()) {
                assert!(
                    ctxs.iter().any(|c| c.backend() == b),
                    "backend {b} required by AMOE_REQUIRE_BACKENDS but not found; have {:?}",
                    ctxs.iter().map(|c| c.adapter_label()).collect::<Vec<_>>()
                );
            }
        }
        ctxs
    })
}

/// The lock of adapter `i`: one test body at a time on each adapter.
///
/// wgpu's GL backend gives up on its context lock after a few seconds (a
/// panic, not an error), and a concurrent test compiling a large shader on
/// llvmpipe can hold it longer; and tests that count the pipelines a step
/// builds need the context to themselves. Bodies on different adapters
/// (lavapipe and llvmpipe) run at once: two test threads keep both cores
/// busy where one adapter's work leaves one idle (a pipeline compile is
/// single-threaded).
fn adapter_lock(i: usize) -> std::sync::MutexGuard<'static, ()> {
    static LOCKS: OnceLock<Vec<std::sync::Mutex<()>>> = OnceLock::new();
    let locks = LOCKS.get_or_init(|| (0..contexts().len()).map(|_| Default::default()).collect());
    // A failed test poisons its lock; the next one may still run.
    locks[i].lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `body` on every adapter, one after the other. Returns how many
/// adapters ran it.
pub fn for_each_adapter(mut body: impl FnMut(&GpuContext)) -> usize {
    let ctxs = contexts();
    if ctxs.is_empty() {
        eprintln!("no GPU adapter: GPU test skipped (set CI=true to make this a failure)");
    }
    for (i, ctx) in ctxs.iter().enumerate() {
        let _guard = adapter_lock(i);
        eprintln!("-- on {}", ctx.adapter_label());
        body(ctx);
    }
    ctxs.len()
}

/// Run `body` on every adapter at once, a thread each (for a test whose
/// adapters' runs are independent and long). A panic on one fails the
/// test once all have finished. Returns how many adapters ran it.
pub fn for_each_adapter_at_once(body: impl Fn(&GpuContext) + Sync) -> usize {
    let ctxs = contexts();
    if ctxs.is_empty() {
        eprintln!("no GPU adapter: GPU test skipped (set CI=true to make this a failure)");
    }
    std::thread::scope(|s| {
        for (i, ctx) in ctxs.iter().enumerate() {
            let body = &body;
            s.spawn(move || {
                let _guard = adapter_lock(i);
                eprintln!("-- on {}", ctx.adapter_label());
                body(ctx);
            });
        }
    });
    ctxs.len()
}

/// `body` on the first adapter only: for model-level tests whose kernels
/// the conformance cases already check on every adapter, where a second
/// (slow, llvmpipe GL) run would prove nothing more.
pub fn on_first_adapter(body: impl FnOnce(&GpuContext)) -> usize {
    let ctxs = contexts();
    let Some(ctx) = ctxs.first() else {
        eprintln!("no GPU adapter: GPU test skipped (set CI=true to make this a failure)");
        return 0;
    };
    let _guard = adapter_lock(0);
    eprintln!("-- on {}", ctx.adapter_label());
    body(ctx);
    1
}

/// Run every conformance case of `family` on every adapter and fail with a
/// table of every failing case.
pub fn conformance_family(family: &str) {
    let cases = amoe::conformance::cases(Some(family));
    assert!(
        !cases.is_empty(),
        "family {family} has no conformance cases"
    );
    // The adapters' runs are independent: both at once.
    for_each_adapter_at_once(|ctx| {
        let report = pollster::block_on(amoe::conformance::run_cases(ctx, &cases, |_| {}));
        let bad: Vec<String> = report
            .kernels
            .iter()
            .filter(|r| !r.pass)
            .map(|r| {
                format!(
                    "{} [{}]: abs {:e} rel {:e} {}",
                    r.kernel,
                    r.case,
                    r.max_abs_err,
                    r.max_rel_err,
                    r.note.clone().unwrap_or_default()
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{} cases of {family} failed on {}:\n{}",
            bad.len(),
            ctx.adapter_label(),
            bad.join("\n")
        );
        assert!(
            !report.kernels.is_empty(),
            "no {family} case applies to {}",
            ctx.adapter_label()
        );
        eprintln!(
            "   {} {family} cases passed, {} not applicable here",
            report.kernels.len(),
            report.not_applicable.len()
        );
    });
}

/// The tiny transformer of the training-step tests (V 64, D 32, 2 layers,
/// 2 heads, context 16, F 32, E 4) under `gating`, or dense.
pub fn tiny_model(gating: Gating, dense: bool) -> ModelConfig {
    ModelConfig {
        vocab: 64,
        d: 32,
        layers: 2,
        heads: 2,
        context: 16,
        ffn: 32,
        experts: 4,
        moe_every: 1,
        dense,
        gate: GateConfig::new(gating),
        ..ModelConfig::default()
    }
}

/// The Hugging Face fixtures of `tests/fixtures/hf` (one per family).
pub const HF_FIXTURES: [&str; 9] = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "granitemoe",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
];

/// The directory of fixture `name`.
pub fn hf_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// Its `expected.json`: the reference library's numbers.
pub fn hf_expected(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(hf_fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON array of numbers, each parsed as f64 then cast: the exact float32
/// the reference wrote (shortest round-trip decimal).
pub fn json_floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Greedy tokens of a GPU run against the CPU twin's, with the twin's
/// margin at each step (best logit minus runner-up): equal, or the first
/// difference falls on a near-tie (margin below `NEAR_TIE`), where another
/// adapter's rounding may pick the other token; the sequences diverge from
/// there, so nothing after it is compared. The browser test's rule.
pub fn assert_same_greedy(gpu: &[u32], twin: &[u32], margins: &[f32], label: &str) {
    /// Far above the GPU-vs-twin logit error (about 1e-5 on lavapipe and
    /// llvmpipe), far below a real difference.
    const NEAR_TIE: f32 = 1e-2;
    match gpu.iter().zip(twin).position(|(a, b)| a != b) {
        None => assert_eq!(gpu.len(), twin.len(), "{label}: lengths"),
        Some(i) => assert!(
            margins.get(i).is_some_and(|&m| m < NEAR_TIE),
            "{label}: token {i} is {} on the GPU, {} in the twin, whose margin there was {:?} \
             (a difference is allowed only on a near-tie below {NEAR_TIE})",
            gpu[i],
            twin[i],
            margins.get(i)
        ),
    }
}

/// Largest |a - b| of two equally long slices.
pub fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A scratch directory under the system temp dir, unique to this process
/// and `name`, emptied when made and removed when dropped (a failing
/// test's too: the drop runs as the panic unwinds).
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    pub fn new(prefix: &str, name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first `lines` lines of the page's sonnets in `dir/sonnets.txt`: a
/// small training text (a few batches per epoch for a tiny model).
pub fn sonnets(dir: &std::path::Path, lines: usize) -> std::path::PathBuf {
    let src = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web/assets/sonnets.txt"),
    )
    .unwrap();
    let p = dir.join("sonnets.txt");
    std::fs::write(&p, src.lines().take(lines).collect::<Vec<_>>().join("\n")).unwrap();
    p
}
