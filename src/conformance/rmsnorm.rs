//! Conformance cases of the RMSNorm kernels against their twins
//! (`reference::rmsnorm`), within `Tol::reduction` of the reduction length
//! (D for a row, T for the gain gradient). The backward cases use the twin's
//! `rstd`, so each kernel is checked on its own.
//!
//! One row of x is all zeros (rstd = 1 / sqrt(eps), y = 0), and outputs
//! start as NaN, so an element a kernel fails to write shows up.

use super::CheckResult;
use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::rmsnorm::{
    RmsNormBackward, RmsNormBackwardBuffers, RmsNormBackwardGain, RmsNormBackwardGainBuffers,
    RmsNormForward, RmsNormForwardBuffers, RmsNormSpec, RMSNORM_EPS,
};
use crate::reference::rmsnorm::{rmsnorm_backward, rmsnorm_backward_gain, rmsnorm_forward};
use crate::tol::Tol;
use crate::util::Rng;

/// An RMSNorm conformance case. `spec` is never `BackwardGainFinish`: the
/// `BackwardGain` case runs both gain passes.
#[derive(Clone, Debug)]
pub enum Case {
    Twin {
        spec: RmsNormSpec,
        t: usize,
        d: usize,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Twin { spec, t, d, .. } => (spec.name().to_string(), format!("T={t} D={d}")),
            Case::BadInputs => (
                RmsNormSpec::Forward.name().to_string(),
                "bad inputs: T = 0, shape mismatch, eps = 0".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for spec in [
        RmsNormSpec::Forward,
        RmsNormSpec::Backward,
        RmsNormSpec::BackwardGain,
    ] {
        for (i, &(t, d)) in [(1, 8), (37, 33), (3, 7), (130, 128), (64, 512), (300, 64)]
            .iter()
            .enumerate()
        {
            v.push(Case::Twin {
                spec,
                t,
                d,
                seed: i as u64 + 1,
            });
        }
    }
    v.push(Case::BadInputs);
    v
}

fn nan_tensor(ctx: &GpuContext, label: &str, shape: &[usize]) -> Result<Tensor<f32>> {
    let n = shape.iter().product();
    Tensor::from_slice(ctx, label, shape, &vec![f32::NAN; n])
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let Case::Twin { spec, t, d, seed } = *case else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let mut rng = Rng::new(seed ^ 0x2A5E);
    let mut x_h = rng.vec_sym(t * d, 2.0);
    let zero = t / 2;
    x_h[zero * d..(zero + 1) * d].fill(0.0);
    let g_h: Vec<f32> = (0..d).map(|_| 0.5 + rng.uniform()).collect();
    let dy_h = rng.vec_sym(t * d, 1.0);
    let (y_want, rstd_h) = rmsnorm_forward(&x_h, &g_h, RMSNORM_EPS, t, d);
    let x = Tensor::from_slice(ctx, "x", &[t, d], &x_h)?;
    let g = Tensor::from_slice(ctx, "g", &[d], &g_h)?;
    let dy = Tensor::from_slice(ctx, "dy", &[t, d], &dy_h)?;
    let parts = match spec {
        RmsNormSpec::Forward => {
            let y = nan_tensor(ctx, "y", &[t, d])?;
            let rstd = nan_tensor(ctx, "rstd", &[t])?;
            let k = RmsNormForward::new(
                ctx,
                RMSNORM_EPS,
                &RmsNormForwardBuffers {
                    x: &x,
                    g: &g,
                    y: &y,
                    rstd: &rstd,
                },
            )?;
            submit_pass(ctx, |pass| k.record(pass))?;
            let tol = Tol::reduction(d);
            vec![
                ("y", tol.compare(&y.read(ctx).await?, &y_want)),
                ("rstd", tol.compare(&rstd.read(ctx).await?, &rstd_h)),
            ]
        }
        RmsNormSpec::Backward => {
            let want = rmsnorm_backward(&x_h, &g_h, &dy_h, &rstd_h, t, d);
            let rstd = Tensor::from_slice(ctx, "rstd", &[t], &rstd_h)?;
            let dx = nan_tensor(ctx, "dx", &[t, d])?;
            let k = RmsNormBackward::new(
                ctx,
                &RmsNormBackwardBuffers {
                    x: &x,
                    g: &g,
                    dy: &dy,
                    rstd: &rstd,
                    dx: &dx,
                },
            )?;
            submit_pass(ctx, |pass| k.record(pass))?;
            vec![("dx", Tol::reduction(d).compare(&dx.read(ctx).await?, &want))]
        }
        RmsNormSpec::BackwardGain | RmsNormSpec::BackwardGainFinish => {
            let want = rmsnorm_backward_gain(&x_h, &dy_h, &rstd_h, t, d);
            let rstd = Tensor::from_slice(ctx, "rstd", &[t], &rstd_h)?;
            let dg = nan_tensor(ctx, "dg", &[d])?;
            let k = RmsNormBackwardGain::new(
                ctx,
                &RmsNormBackwardGainBuffers {
                    x: &x,
                    dy: &dy,
                    rstd: &rstd,
                    dg: &dg,
                },
            )?;
            submit_pass(ctx, |pass| k.record(pass))?;
            vec![("dg", Tol::reduction(t).compare(&dg.read(ctx).await?, &want))]
        }
    };
    Ok(CheckResult::from_comparisons(kernel, name, &parts))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_forward = |what: &str, x: &[usize], g: &[usize], y: &[usize], eps, want| {
        let scope = ctx.error_scope();
        let r = (|| -> Result<RmsNormForward> {
            let t = x.first().copied().unwrap_or(0);
            let x = Tensor::<f32>::zeros(ctx, "x", x)?;
            let g = Tensor::<f32>::zeros(ctx, "g", g)?;
            let y = Tensor::<f32>::zeros(ctx, "y", y)?;
            let rstd = Tensor::<f32>::zeros(ctx, "rstd", &[t])?;
            RmsNormForward::new(
                ctx,
                eps,
                &RmsNormForwardBuffers {
                    x: &x,
                    g: &g,
                    y: &y,
                    rstd: &rstd,
                },
            )
        })();
        checks.push(expect_error(scope, what, r, want));
    };
    try_forward("T = 0", &[0, 8], &[8], &[0, 8], RMSNORM_EPS, is_invalid);
    try_forward("eps = 0", &[4, 8], &[8], &[4, 8], 0.0, is_invalid);
    try_forward("g [D+1]", &[4, 8], &[9], &[4, 8], RMSNORM_EPS, is_shape);
    try_forward("y [T, D-1]", &[4, 8], &[8], &[4, 7], RMSNORM_EPS, is_shape);

    let scope = ctx.error_scope();
    let r = (|| -> Result<RmsNormBackward> {
        let x = Tensor::<f32>::zeros(ctx, "x", &[4, 8])?;
        let g = Tensor::<f32>::zeros(ctx, "g", &[8])?;
        let dy = Tensor::<f32>::zeros(ctx, "dy", &[4, 8])?;
        let rstd = Tensor::<f32>::zeros(ctx, "rstd", &[5])?;
        let dx = Tensor::<f32>::zeros(ctx, "dx", &[4, 8])?;
        RmsNormBackward::new(
            ctx,
            &RmsNormBackwardBuffers {
                x: &x,
                g: &g,
                dy: &dy,
                rstd: &rstd,
                dx: &dx,
            },
        )
    })();
    checks.push(expect_error(scope, "rstd [T+1]", r, is_shape));

    let scope = ctx.error_scope();
    let r = (|| -> Result<RmsNormBackwardGain> {
        let x = Tensor::<f32>::zeros(ctx, "x", &[4, 8])?;
        let dy = Tensor::<f32>::zeros(ctx, "dy", &[4, 8])?;
        let rstd = Tensor::<f32>::zeros(ctx, "rstd", &[4])?;
        let dg = Tensor::<f32>::zeros(ctx, "dg", &[4, 8])?;
        RmsNormBackwardGain::new(
            ctx,
            &RmsNormBackwardGainBuffers {
                x: &x,
                dy: &dy,
                rstd: &rstd,
                dg: &dg,
            },
        )
    })();
    checks.push(expect_error(scope, "dg [T, D]", r, is_shape));
    bad_inputs_result(kernel, case, checks)
}
