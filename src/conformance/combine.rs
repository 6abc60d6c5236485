//! Conformance cases of `combine_forward` against the twin
//! `reference::combine::combine_forward`, within `Tol::ELEMENTWISE`.
//!
//! `slot_of_token` comes from the route twin; the padding rows of `y_expert`
//! hold NaN and unused slots carry a NaN weight, so reading a row or a
//! weight that the combine must skip shows up as a failure.

use super::route::{make_ids, Ids};
use super::CheckResult;
use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::combine::{Combine, CombineBuffers, CombineSpec};
use crate::kernels::route::RouteConfig;
use crate::kernels::{RoutingLayout, UNUSED};
use crate::reference::combine::combine_forward;
use crate::reference::route::route;
use crate::tol::Tol;
use crate::util::Rng;

/// A combine conformance case.
#[derive(Clone, Debug)]
pub enum Case {
    Twin {
        t: usize,
        k: usize,
        d: usize,
        e: usize,
        ids: Ids,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        let kernel = CombineSpec { vec4: true }.name().to_string();
        match self {
            Case::Twin {
                t, k, d, e, ids, ..
            } => (kernel, format!("T={t} K={k} D={d} E={e} {}", ids.label())),
            Case::BadInputs => (kernel, "bad inputs: T = 0, shape mismatch".into()),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let c = |t, k, d, e, ids, seed| Case::Twin {
        t,
        k,
        d,
        e,
        ids,
        seed,
    };
    vec![
        c(1, 1, 8, 4, Ids::Random { unused_pct: 0 }, 1),
        c(37, 2, 33, 8, Ids::Adaptive { two_pct: 30 }, 2),
        c(300, 2, 128, 16, Ids::Random { unused_pct: 5 }, 3),
        c(1000, 1, 64, 64, Ids::Skewed, 4),
        c(8, 2, 1000, 4, Ids::OneExpert(1), 5),
        c(50, 2, 7, 8, Ids::Adaptive { two_pct: 50 }, 6),
        c(3, 1, 1, 2, Ids::Random { unused_pct: 0 }, 7),
        Case::BadInputs,
    ]
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let Case::Twin {
        t,
        k,
        d,
        e,
        ids,
        seed,
    } = *case
    else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let tile_m = 16;
    let layout = RoutingLayout { t, k, e, tile_m };
    let ids_host = make_ids(t, k, e, ids, seed);
    let (_, token_of_slot, slots) = route(&ids_host, &RouteConfig::new(layout));
    let mut rng = Rng::new(seed ^ 0xC0B1);
    let rows = layout.max_rows();
    let mut y_expert = rng.vec_sym(rows * d, 2.0);
    for (r, &tok) in token_of_slot.iter().enumerate() {
        if tok == UNUSED {
            y_expert[r * d..(r + 1) * d].fill(f32::NAN);
        }
    }
    let weights: Vec<f32> = slots
        .iter()
        .map(|&s| if s == UNUSED { f32::NAN } else { rng.uniform() })
        .collect();
    let want = combine_forward(&weights, &slots, &y_expert, t, k, d);

    let topk_weights = Tensor::from_slice(ctx, "topk_weights", &[t, k], &weights)?;
    let slot_of_token = Tensor::from_slice(ctx, "slot_of_token", &[t, k], &slots)?;
    let y_expert = Tensor::from_slice(ctx, "y_expert", &[rows, d], &y_expert)?;
    let y = Tensor::<f32>::zeros(ctx, "y", &[t, d])?;
    let combine = Combine::new(
        ctx,
        &CombineBuffers {
            topk_weights: &topk_weights,
            slot_of_token: &slot_of_token,
            y_expert: &y_expert,
            y: &y,
        },
    )?;
    submit_pass(ctx, |pass| combine.record(pass))?;
    let got = y.read(ctx).await?;
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[("y", Tol::ELEMENTWISE.compare(&got, &want))],
    ))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_combine =
        |what: &str, w: [usize; 2], s: [usize; 2], ye: [usize; 2], yy: [usize; 2], want| {
            let scope = ctx.error_scope();
            let r = (|| -> Result<Combine> {
                let topk_weights = Tensor::<f32>::zeros(ctx, "topk_weights", &w)?;
                let slot_of_token = Tensor::<u32>::zeros(ctx, "slot_of_token", &s)?;
                let y_expert = Tensor::<f32>::zeros(ctx, "y_expert", &ye)?;
                let y = Tensor::<f32>::zeros(ctx, "y", &yy)?;
                Combine::new(
                    ctx,
                    &CombineBuffers {
                        topk_weights: &topk_weights,
                        slot_of_token: &slot_of_token,
                        y_expert: &y_expert,
                        y: &y,
                    },
                )
            })();
            checks.push(expect_error(scope, what, r, want));
        };
    try_combine("T = 0", [0, 2], [0, 2], [16, 8], [0, 8], is_invalid);
    try_combine(
        "slot_of_token [T, 1]",
        [4, 2],
        [4, 1],
        [16, 8],
        [4, 8],
        is_shape,
    );
    try_combine(
        "y_expert [R, D+1]",
        [4, 2],
        [4, 2],
        [16, 9],
        [4, 8],
        is_shape,
    );
    try_combine("y [T+1, D]", [4, 2], [4, 2], [16, 8], [5, 8], is_shape);
    bad_inputs_result(kernel, case, checks)
}
