//! Conformance of the q/k kernels (`qkv_bias`, `qk_norm`, `rope`) against
//! `reference::qk` on the layouts of published models: GQA, per-head and
//! whole-projection QK-norm, rotary positions of a batch of sequences and
//! of a call at the cache's step, forward and back.

use super::{bad_inputs_result, expect_error, is_shape, submit_pass, CheckResult};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::qk::{QkNormKernel, QkSpec, QkvBias, QkvShape, RopeTables, Rotary};
use crate::model::config::{Rope, RopeScaling};
use crate::reference::qk::{qk_norm, qkv_bias, rope};
use crate::tol::Tol;
use crate::util::Rng;

#[derive(Clone, Debug)]
pub enum Case {
    Bias {
        shape: QkvShape,
        seed: u64,
    },
    /// `whole`: gains over the whole q and k projections (OLMoE).
    Norm {
        shape: QkvShape,
        whole: bool,
        seed: u64,
    },
    /// Rows at `pos0 + t % period`, tables of `n` positions.
    Rope {
        shape: QkvShape,
        n: usize,
        pos0: usize,
        period: usize,
        backward: bool,
        llama3: bool,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        let s = |q: &QkvShape| format!("T={} H={} Hkv={} Dh={}", q.t, q.h, q.hkv, q.dh);
        match self {
            Case::Bias { shape, .. } => (QkSpec::Bias.name().into(), s(shape)),
            Case::Norm { shape, whole, .. } => (
                QkSpec::Norm.name().into(),
                format!("{} {}", s(shape), if *whole { "whole" } else { "per head" }),
            ),
            Case::Rope {
                shape,
                n,
                pos0,
                period,
                backward,
                llama3,
                ..
            } => (
                QkSpec::Rope.name().into(),
                format!(
                    "{} N={n} pos0={pos0} period={period}{}{}",
                    s(shape),
                    if *backward { " backward" } else { "" },
                    if *llama3 { " llama3" } else { "" }
                ),
            ),
            Case::BadInputs => (
                QkSpec::Norm.name().into(),
                "bad inputs: qkv width, gain shapes".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let sh = |t, h, hkv, dh| QkvShape { t, h, hkv, dh };
    let rope_case = |shape, n, pos0, period, backward, llama3, seed| Case::Rope {
        shape,
        n,
        pos0,
        period,
        backward,
        llama3,
        seed,
    };
    vec![
        Case::Bias {
            shape: sh(7, 4, 4, 16),
            seed: 1,
        },
        Case::Bias {
            shape: sh(130, 4, 2, 24),
            seed: 2,
        },
        Case::Norm {
            shape: sh(9, 4, 2, 32),
            whole: false,
            seed: 3,
        },
        Case::Norm {
            shape: sh(70, 4, 2, 16),
            whole: true,
            seed: 4,
        },
        Case::Norm {
            shape: sh(3, 2, 1, 128),
            whole: false,
            seed: 5,
        },
        // A batch of 3 sequences of 20 from position 0.
        rope_case(sh(60, 4, 2, 16), 20, 0, 20, false, false, 6),
        // Decode and prefill at the cache's step.
        rope_case(sh(1, 4, 1, 64), 256, 200, 1, false, true, 7),
        rope_case(sh(26, 2, 2, 24), 64, 5, 26, false, false, 8),
        rope_case(sh(40, 4, 2, 32), 40, 0, 40, true, false, 9),
        Case::BadInputs,
    ]
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let (shape, seed) = match case {
        Case::Bias { shape, seed }
        | Case::Norm { shape, seed, .. }
        | Case::Rope { shape, seed, .. } => (*shape, *seed),
        Case::BadInputs => return Ok(bad_inputs(ctx, &kernel, &name)),
    };
    let mut rng = Rng::new(seed);
    let width = shape.width();
    let x = rng.vec_sym(shape.t * width, 2.0);
    let qkv = Tensor::from_slice(ctx, "qkv", &[shape.t, width], &x)?;
    let mut want = x.clone();
    let tol = match case {
        Case::Bias { .. } => {
            let b = rng.vec_sym(width, 0.5);
            qkv_bias(&mut want, &b);
            let tb = Tensor::from_slice(ctx, "bias", &[width], &b)?;
            let k = QkvBias::new(ctx, shape, &tb, &qkv)?;
            submit_pass(ctx, |p| k.record(p))?;
            Tol::ELEMENTWISE
        }
        Case::Norm { whole, .. } => {
            let (qw, kw) = (shape.h * shape.dh, shape.hkv * shape.dh);
            let (lq, lk) = if *whole {
                (qw, kw)
            } else {
                (shape.dh, shape.dh)
            };
            let gq = rng.vec_sym(lq, 1.0);
            let gk = rng.vec_sym(lk, 1.0);
            qk_norm(&mut want, width, qw, kw, &gq, &gk, 1e-6);
            let tq = Tensor::from_slice(ctx, "q_norm", &[lq], &gq)?;
            let tk = Tensor::from_slice(ctx, "k_norm", &[lk], &gk)?;
            let k = QkNormKernel::new(ctx, shape, 1e-6, &tq, &tk, &qkv)?;
            submit_pass(ctx, |p| k.record(p))?;
            Tol::reduction(lq.max(lk))
        }
        Case::Rope {
            n,
            pos0,
            period,
            backward,
            llama3,
            ..
        } => {
            let cfg = Rope {
                theta: 10000.0,
                scaling: llama3.then_some(RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original: 64,
                }),
            };
            let (cos, sin) = cfg.tables(*n, shape.dh);
            let sign = if *backward { -1.0 } else { 1.0 };
            rope(
                &mut want,
                (shape.h, shape.hkv),
                shape.dh,
                &cos,
                &sin,
                *pos0,
                *period,
                sign,
            );
            let tables = RopeTables::new(ctx, *n, shape.dh, &cos, &sin)?;
            let step = Tensor::from_slice(ctx, "step", &[4], &[*pos0 as u32, 0, 0, 0])?;
            let k = Rotary::new(ctx, shape, &tables, &step, *period, *backward, &qkv)?;
            submit_pass(ctx, |p| k.record(p))?;
            Tol::ELEMENTWISE
        }
        Case::BadInputs => unreachable!("returned above"),
    };
    let got = qkv.read(ctx).await?;
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[("qkv", tol.compare(&got, &want))],
    ))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let shape = QkvShape {
        t: 2,
        h: 4,
        hkv: 2,
        dh: 8,
    };
    let scope = ctx.error_scope();
    let r = (|| -> Result<QkvBias> {
        let qkv = Tensor::<f32>::zeros(ctx, "qkv", &[2, 3 * 32])?;
        let b = Tensor::<f32>::zeros(ctx, "bias", &[96])?;
        QkvBias::new(ctx, shape, &b, &qkv)
    })();
    checks.push(expect_error(scope, "qkv [T, 3D] for GQA 4/2", r, is_shape));
    let scope = ctx.error_scope();
    let r = (|| -> Result<QkNormKernel> {
        let qkv = Tensor::<f32>::zeros(ctx, "qkv", &[2, 64])?;
        let g = Tensor::<f32>::zeros(ctx, "g", &[16])?;
        QkNormKernel::new(ctx, shape, 1e-6, &g, &g, &qkv)
    })();
    checks.push(expect_error(scope, "gains of 16 for Dh = 8", r, is_shape));
    bad_inputs_result(kernel, case, checks)
}
