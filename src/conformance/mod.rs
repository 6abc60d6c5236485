//! Kernel conformance: every GPU kernel against its CPU twin on shape tables
//! that cover the edge cases (T = 1, T not a multiple of the workgroup, E > T,
//! empty experts, exact ties; see ARCHITECTURE.md, Testing). Used by `cargo test`, by
//! `amoe conformance` on a user's own GPU, and by the browser page.

pub mod adamw;
pub mod add;
pub mod attention;
pub mod combine;
pub mod complexity;
pub mod cross_entropy;
pub mod decode;
pub mod embedding;
pub mod expert;
pub mod gate;
pub mod kv_cache;
pub mod matmul;
pub mod moe_backward;
pub mod qk;
pub mod rmsnorm;
pub mod route;

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::tol::{compare_exact, Comparison};
use serde::Serialize;

/// One kernel on one case: the worst errors seen and the verdict.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// Kernel name as in WGSL and the launcher, e.g. `gate_adaptive_forward`.
    pub kernel: String,
    /// Case description, e.g. `T=37 E=8 threshold=0.1`.
    pub case: String,
    pub max_abs_err: f64,
    pub max_rel_err: f64,
    pub pass: bool,
    /// Throughput of the GPU run, where the case is big enough to mean anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// Why it failed (first mismatch, or the error returned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl CheckResult {
    /// Merge several comparisons of one case (e.g. ids exact + weights within tol).
    pub fn from_comparisons(
        kernel: impl Into<String>,
        case: impl Into<String>,
        parts: &[(&str, Comparison)],
    ) -> Self {
        let mut r = CheckResult {
            kernel: kernel.into(),
            case: case.into(),
            max_abs_err: 0.0,
            max_rel_err: 0.0,
            pass: true,
            gflops: None,
            note: None,
        };
        for (what, c) in parts {
            r.max_abs_err = r.max_abs_err.max(c.max_abs_err);
            r.max_rel_err = r.max_rel_err.max(c.max_rel_err);
            if !c.pass {
                r.pass = false;
                if r.note.is_none() {
                    r.note = Some(match c.first_bad {
                        Some(i) => format!("{what}: first mismatch at element {i}"),
                        None => format!("{what}: mismatch"),
                    });
                }
            }
        }
        r
    }

    fn failed(kernel: String, case: String, err: String) -> Self {
        CheckResult {
            kernel,
            case,
            max_abs_err: f64::NAN,
            max_rel_err: f64::NAN,
            pass: false,
            gflops: None,
            note: Some(err),
        }
    }
}

/// A conformance case of any family.
#[derive(Clone, Debug)]
pub enum Case {
    Matmul(matmul::Case),
    Gate(gate::Case),
    Route(route::Case),
    Expert(expert::Case),
    Combine(combine::Case),
    Decode(decode::Case),
    Add(add::Case),
    MoeBackward(moe_backward::Case),
    Embedding(embedding::Case),
    AdamW(adamw::Case),
    CrossEntropy(cross_entropy::Case),
    RmsNorm(rmsnorm::Case),
    Attention(attention::Case),
    KvCache(kv_cache::Case),
    Complexity(complexity::Case),
    Qk(qk::Case),
}

/// Kernel families, as `--kernel` filters name them.
pub const FAMILIES: &[&str] = &[
    "matmul",
    "gate",
    "route",
    "expert",
    "combine",
    "decode",
    "add",
    "moe_backward",
    "embedding",
    "adamw",
    "cross_entropy",
    "rmsnorm",
    "attention",
    "kv_cache",
    "complexity",
    "qk",
];

impl Case {
    pub fn family(&self) -> &'static str {
        match self {
            Case::Matmul(_) => "matmul",
            Case::Gate(_) => "gate",
            Case::Route(_) => "route",
            Case::Expert(_) => "expert",
            Case::Combine(_) => "combine",
            Case::Decode(_) => "decode",
            Case::Add(_) => "add",
            Case::MoeBackward(_) => "moe_backward",
            Case::Embedding(_) => "embedding",
            Case::AdamW(_) => "adamw",
            Case::CrossEntropy(_) => "cross_entropy",
            Case::RmsNorm(_) => "rmsnorm",
            Case::Attention(_) => "attention",
            Case::KvCache(_) => "kv_cache",
            Case::Complexity(_) => "complexity",
            Case::Qk(_) => "qk",
        }
    }

    /// (kernel, case) names, known before running.
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Matmul(c) => c.names(),
            Case::Gate(c) => c.names(),
            Case::Route(c) => c.names(),
            Case::Expert(c) => c.names(),
            Case::Combine(c) => c.names(),
            Case::Decode(c) => c.names(),
            Case::Add(c) => c.names(),
            Case::MoeBackward(c) => c.names(),
            Case::Embedding(c) => c.names(),
            Case::AdamW(c) => c.names(),
            Case::CrossEntropy(c) => c.names(),
            Case::RmsNorm(c) => c.names(),
            Case::Attention(c) => c.names(),
            Case::KvCache(c) => c.names(),
            Case::Complexity(c) => c.names(),
            Case::Qk(c) => c.names(),
        }
    }

    /// Whether this adapter can run the case at all (a subgroup kernel needs
    /// subgroups, a tiled one enough workgroup memory); `Err` says why not.
    /// Such cases are listed as not applicable, never counted as passed.
    pub fn applies(&self, ctx: &GpuContext) -> std::result::Result<(), String> {
        let r = match self {
            Case::Matmul(c) => c.spec.check(ctx),
            Case::Expert(expert::Case::Ffn(c)) => c.core.check(ctx),
            Case::MoeBackward(c) if c.long_run && !moe_backward::long_run_differs(ctx) => {
                return Err(
                    "a long run takes the same kernels as a short one on this adapter".into(),
                )
            }
            _ => Ok(()),
        };
        r.map_err(|e| e.to_string())
    }

    /// Run the case; an error becomes a failed result naming it.
    pub async fn run(&self, ctx: &GpuContext) -> CheckResult {
        let r: Result<CheckResult> = match self {
            Case::Matmul(c) => matmul::run(ctx, c).await,
            Case::Gate(c) => gate::run(ctx, c).await,
            Case::Route(c) => route::run(ctx, c).await,
            Case::Expert(c) => expert::run(ctx, c).await,
            Case::Combine(c) => combine::run(ctx, c).await,
            Case::Decode(c) => decode::run(ctx, c).await,
            Case::Add(c) => add::run(ctx, c).await,
            Case::MoeBackward(c) => moe_backward::run(ctx, c).await,
            Case::Embedding(c) => embedding::run(ctx, c).await,
            Case::AdamW(c) => adamw::run(ctx, c).await,
            Case::CrossEntropy(c) => cross_entropy::run(ctx, c).await,
            Case::RmsNorm(c) => rmsnorm::run(ctx, c).await,
            Case::Attention(c) => attention::run(ctx, c).await,
            Case::KvCache(c) => kv_cache::run(ctx, c).await,
            Case::Complexity(c) => complexity::run(ctx, c).await,
            Case::Qk(c) => qk::run(ctx, c).await,
        };
        r.unwrap_or_else(|e| {
            let (k, c) = self.names();
            CheckResult::failed(k, c, e.to_string())
        })
    }
}

/// Every case of every family (or of one family).
pub fn cases(family: Option<&str>) -> Vec<Case> {
    let mut v = Vec::new();
    v.extend(matmul::cases().into_iter().map(Case::Matmul));
    v.extend(gate::cases().into_iter().map(Case::Gate));
    v.extend(route::cases().into_iter().map(Case::Route));
    v.extend(expert::cases().into_iter().map(Case::Expert));
    v.extend(combine::cases().into_iter().map(Case::Combine));
    v.extend(decode::cases().into_iter().map(Case::Decode));
    v.extend(add::cases().into_iter().map(Case::Add));
    v.extend(moe_backward::cases().into_iter().map(Case::MoeBackward));
    v.extend(embedding::cases().into_iter().map(Case::Embedding));
    v.extend(adamw::cases().into_iter().map(Case::AdamW));
    v.extend(cross_entropy::cases().into_iter().map(Case::CrossEntropy));
    v.extend(rmsnorm::cases().into_iter().map(Case::RmsNorm));
    v.extend(attention::cases().into_iter().map(Case::Attention));
    v.extend(kv_cache::cases().into_iter().map(Case::KvCache));
    v.extend(complexity::cases().into_iter().map(Case::Complexity));
    v.extend(qk::cases().into_iter().map(Case::Qk));
    v.retain(|c| family.is_none_or(|f| c.family() == f));
    v
}

/// Results of every case on one adapter.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterReport {
    pub backend: String,
    pub name: String,
    pub kernels: Vec<CheckResult>,
    /// Cases this adapter cannot run ("kernel [case]: why"), not run.
    pub not_applicable: Vec<String>,
}

impl AdapterReport {
    pub fn pass(&self) -> bool {
        !self.kernels.is_empty() && self.kernels.iter().all(|k| k.pass)
    }
}

/// Run `cases` on `ctx`, calling `progress` after each.
pub async fn run_cases(
    ctx: &GpuContext,
    cases: &[Case],
    mut progress: impl FnMut(&CheckResult),
) -> AdapterReport {
    let mut kernels = Vec::with_capacity(cases.len());
    let mut not_applicable = Vec::new();
    for c in cases {
        if let Err(why) = c.applies(ctx) {
            let (k, name) = c.names();
            not_applicable.push(format!("{k} [{name}]: {why}"));
            continue;
        }
        let r = c.run(ctx).await;
        progress(&r);
        kernels.push(r);
        // The page stays responsive between cases (its table grows).
        #[cfg(target_arch = "wasm32")]
        crate::web::yield_to_browser().await;
    }
    AdapterReport {
        backend: ctx.backend(),
        name: ctx.info.name.clone(),
        kernels,
        not_applicable,
    }
}

/// Record `f` into one compute pass, submit it and wait.
pub(crate) fn submit_pass(
    ctx: &GpuContext,
    f: impl FnOnce(&mut wgpu::ComputePass<'_>),
) -> Result<()> {
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("conformance"),
        });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("conformance"),
            timestamp_writes: None,
        });
        f(&mut pass);
    }
    ctx.submit_and_wait(enc)
}

/// A bad-input check: `Ok(())` when `r` failed with the wanted error and wgpu
/// reported nothing in `scope` (opened before the attempt), else what went
/// wrong.
pub(crate) fn expect_error<T>(
    scope: crate::gpu::ErrorScope<'_>,
    what: &str,
    r: Result<T>,
    want: fn(&Error) -> bool,
) -> std::result::Result<(), String> {
    let gpu = scope.finish(what);
    match (r, gpu) {
        (_, Err(e)) => Err(format!("{what}: wgpu reported {e}")),
        (Ok(_), _) => Err(format!("{what}: accepted")),
        (Err(e), _) if !want(&e) => Err(format!("{what}: wrong error {e}")),
        (Err(_), _) => Ok(()),
    }
}

/// A result for a list of bad-input checks.
pub(crate) fn bad_inputs_result(
    kernel: &str,
    case: &str,
    checks: Vec<std::result::Result<(), String>>,
) -> CheckResult {
    let fails: Vec<String> = checks.into_iter().filter_map(|c| c.err()).collect();
    let mut r = CheckResult::from_comparisons(
        kernel,
        case,
        &[("errors", compare_exact(&[fails.is_empty()], &[true]))],
    );
    if !fails.is_empty() {
        r.note = Some(fails.join("; "));
    }
    r
}

pub(crate) fn is_shape(e: &Error) -> bool {
    matches!(e, Error::Shape { .. })
}

pub(crate) fn is_invalid(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument { .. })
}
