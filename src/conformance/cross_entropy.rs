//! Conformance cases of the cross-entropy kernels against their twins
//! (`reference::cross_entropy`, run in f64 on the f32 inputs): the loss
//! within `Tol::reduction(V)`, the gradient within `Tol::SOFTMAX` scaled by
//! the gradient scale, `loss_sum` within `Tol::reduction(T)` and its count
//! exactly.
//!
//! Cases mix in ignored targets (`UNUSED`: loss 0, zero gradient row), V
//! smaller than the workgroup, and logits of magnitude 60 (exp overflows f32
//! without the max subtracted). The validation kernel must leave the logits
//! bit-identical.

use super::CheckResult;
use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::cross_entropy::{
    check_targets, CrossEntropy, CrossEntropyBuffers, CrossEntropySpec, LossSum, LossSumBuffers,
};
use crate::kernels::UNUSED;
use crate::reference::cross_entropy::{
    cross_entropy_forward, cross_entropy_forward_backward, loss_sum,
};
use crate::tol::{compare_exact, Tol};
use crate::util::Rng;

/// A cross-entropy conformance case. For `LossSum`, `v` only decides which
/// targets count.
#[derive(Clone, Debug)]
pub enum Case {
    Twin {
        spec: CrossEntropySpec,
        t: usize,
        v: usize,
        /// Percent of targets that are `UNUSED`.
        ignored_pct: u32,
        /// Logits uniform in [-magnitude, magnitude).
        magnitude: f32,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Twin {
                spec,
                t,
                v,
                ignored_pct,
                magnitude,
                ..
            } => (
                spec.name().to_string(),
                format!("T={t} V={v} ignored={ignored_pct}% |logits|<{magnitude}"),
            ),
            Case::BadInputs => (
                CrossEntropySpec::ForwardBackward.name().to_string(),
                "bad inputs: T = 0, shape mismatch, target >= V".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for spec in [CrossEntropySpec::ForwardBackward, CrossEntropySpec::Forward] {
        let c = |t, vv, ignored_pct, magnitude, seed| Case::Twin {
            spec,
            t,
            v: vv,
            ignored_pct,
            magnitude,
            seed,
        };
        v.extend([
            c(1, 8, 0, 2.0, 1),
            c(37, 100, 20, 4.0, 2),
            c(5, 3, 0, 2.0, 3),
            c(64, 4096, 10, 8.0, 4),
            c(8, 8192, 0, 4.0, 5),
            c(16, 1000, 0, 60.0, 6),
            c(4, 50, 100, 2.0, 7),
        ]);
    }
    let s = |t, ignored_pct, seed| Case::Twin {
        spec: CrossEntropySpec::LossSum,
        t,
        v: 1000,
        ignored_pct,
        magnitude: 10.0,
        seed,
    };
    v.extend([s(1, 0, 8), s(300, 25, 9), s(8192, 5, 10)]);
    v.push(Case::BadInputs);
    v
}

fn make_targets(t: usize, v: usize, ignored_pct: u32, rng: &mut Rng) -> Vec<u32> {
    (0..t)
        .map(|_| {
            if rng.below(100) < ignored_pct as usize {
                UNUSED
            } else {
                rng.below(v) as u32
            }
        })
        .collect()
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let Case::Twin {
        spec,
        t,
        v,
        ignored_pct,
        magnitude,
        seed,
    } = *case
    else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let mut rng = Rng::new(seed ^ 0xCE01);
    let targets_h = make_targets(t, v, ignored_pct, &mut rng);
    let targets = Tensor::from_slice(ctx, "targets", &[t], &targets_h)?;
    if spec == CrossEntropySpec::LossSum {
        let loss_h: Vec<f32> = targets_h
            .iter()
            .map(|&tg| {
                if tg == UNUSED {
                    0.0
                } else {
                    rng.uniform() * magnitude
                }
            })
            .collect();
        let want = loss_sum(&loss_h, &targets_h, v);
        let loss = Tensor::from_slice(ctx, "loss", &[t], &loss_h)?;
        let out = Tensor::from_slice(ctx, "out", &[2], &[f32::NAN; 2])?;
        let k = LossSum::new(
            ctx,
            v,
            &LossSumBuffers {
                loss: &loss,
                targets: &targets,
                out: &out,
            },
        )?;
        submit_pass(ctx, |pass| k.record(pass))?;
        let got = out.read(ctx).await?;
        return Ok(CheckResult::from_comparisons(
            kernel,
            name,
            &[
                ("sum", Tol::reduction(t).compare(&got[..1], &want[..1])),
                ("count", compare_exact(&got[1..], &want[1..])),
            ],
        ));
    }

    let logits_h = rng.vec_sym(t * v, magnitude);
    let logits64: Vec<f64> = logits_h.iter().map(|&x| x as f64).collect();
    let counted = check_targets(&targets_h, v)?;
    let scale = 1.0 / counted.max(1) as f32;
    let logits = Tensor::from_slice(ctx, "logits", &[t, v], &logits_h)?;
    let loss = Tensor::from_slice(ctx, "loss", &[t], &vec![f32::NAN; t])?;
    let bufs = CrossEntropyBuffers {
        logits: &logits,
        targets: &targets,
        loss: &loss,
    };
    let down = |x: Vec<f64>| x.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let loss_tol = Tol::reduction(v);
    let parts = if spec == CrossEntropySpec::ForwardBackward {
        let mut grad64 = logits64;
        let loss_want = down(cross_entropy_forward_backward(
            &mut grad64,
            &targets_h,
            t,
            v,
            scale as f64,
        ));
        let k = CrossEntropy::forward_backward(ctx, scale, &bufs)?;
        submit_pass(ctx, |pass| k.record(pass))?;
        let grad_tol = Tol {
            atol: Tol::SOFTMAX.atol * scale,
            rtol: Tol::SOFTMAX.rtol,
        };
        vec![
            ("loss", loss_tol.compare(&loss.read(ctx).await?, &loss_want)),
            (
                "dlogits",
                grad_tol.compare(&logits.read(ctx).await?, &down(grad64)),
            ),
        ]
    } else {
        let loss_want = down(cross_entropy_forward(&logits64, &targets_h, t, v));
        let k = CrossEntropy::forward(ctx, &bufs)?;
        submit_pass(ctx, |pass| k.record(pass))?;
        vec![
            ("loss", loss_tol.compare(&loss.read(ctx).await?, &loss_want)),
            (
                "logits untouched",
                compare_exact(&logits.read(ctx).await?, &logits_h),
            ),
        ]
    };
    Ok(CheckResult::from_comparisons(kernel, name, &parts))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_ce = |what: &str, logits: &[usize], targets: &[usize], loss: &[usize], want| {
        let scope = ctx.error_scope();
        let r = (|| -> Result<CrossEntropy> {
            let logits = Tensor::<f32>::zeros(ctx, "logits", logits)?;
            let targets = Tensor::<u32>::zeros(ctx, "targets", targets)?;
            let loss = Tensor::<f32>::zeros(ctx, "loss", loss)?;
            CrossEntropy::forward_backward(
                ctx,
                1.0,
                &CrossEntropyBuffers {
                    logits: &logits,
                    targets: &targets,
                    loss: &loss,
                },
            )
        })();
        checks.push(expect_error(scope, what, r, want));
    };
    try_ce("T = 0", &[0, 8], &[0], &[0], is_invalid);
    try_ce("targets [T+1]", &[4, 8], &[5], &[4], is_shape);
    try_ce("loss [T, 1]", &[4, 8], &[4], &[4, 1], is_shape);
    try_ce("logits [T*V]", &[32], &[4], &[4], is_shape);

    let scope = ctx.error_scope();
    let r = (|| -> Result<LossSum> {
        let loss = Tensor::<f32>::zeros(ctx, "loss", &[4])?;
        let targets = Tensor::<u32>::zeros(ctx, "targets", &[4])?;
        let out = Tensor::<f32>::zeros(ctx, "out", &[1])?;
        LossSum::new(
            ctx,
            8,
            &LossSumBuffers {
                loss: &loss,
                targets: &targets,
                out: &out,
            },
        )
    })();
    checks.push(expect_error(scope, "loss_sum out [1]", r, is_shape));

    let scope = ctx.error_scope();
    checks.push(expect_error(
        scope,
        "target >= V",
        check_targets(&[1, UNUSED, 8], 8),
        is_invalid,
    ));
    bad_inputs_result(kernel, case, checks)
}
