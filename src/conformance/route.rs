//! Conformance cases of the route kernels (`route_count`, `route_scan`,
//! `route_scatter`, recorded by `kernels::route::Route`) against the twin
//! `reference::route::route`: the whole routing buffer, `token_of_slot` up to
//! the padded rows and `slot_of_token`, all compared exactly, dropless and
//! with a capacity that drops slots.
//!
//! The GPU buffers start dirty where the route must overwrite them
//! (`token_of_slot`, `slot_of_token`) and with the status bit set (which the
//! route must keep), and some cases record the route twice in one pass, to
//! show that nothing depends on leftovers of a previous run.

use super::CheckResult;
use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::route::{routing_tensor, Route, RouteBuffers, RouteConfig};
use crate::kernels::{RoutingLayout, STATUS_NONFINITE, UNUSED};
use crate::reference::route::route;
use crate::tol::compare_exact;
use crate::util::Rng;

/// How the expert ids of a case are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ids {
    /// Distinct random experts per token; `unused_pct` percent of the tokens
    /// have no expert at all (as after non-finite logits).
    Random { unused_pct: usize },
    /// Every first slot on expert `e`; second slots random (another expert).
    OneExpert(u32),
    /// Adaptive-like: first slot random, the second used for `two_pct`
    /// percent of the tokens.
    Adaptive { two_pct: usize },
    /// Experts drawn from only the lower half of E (the upper half is empty),
    /// skewed towards expert 0.
    Skewed,
    /// Random, with some ids out of range (>= E): they take no row.
    OutOfRange,
}

impl Ids {
    /// Short description for case names.
    pub fn label(&self) -> String {
        match *self {
            Ids::Random { unused_pct: 0 } => "random".into(),
            Ids::Random { unused_pct } => format!("random, {unused_pct}% tokens unused"),
            Ids::OneExpert(x) => format!("all first slots on expert {x}"),
            Ids::Adaptive { two_pct } => format!("adaptive-like, {two_pct}% two-expert"),
            Ids::Skewed => "skewed, upper half of experts empty".into(),
            Ids::OutOfRange => "some ids >= E".into(),
        }
    }
}

/// A route conformance case.
#[derive(Clone, Debug)]
pub enum Case {
    Twin {
        t: usize,
        k: usize,
        e: usize,
        tile_m: usize,
        ids: Ids,
        /// Record the route this many times in one pass.
        repeat: usize,
        /// Slots an expert takes at most (None: dropless).
        capacity: Option<u32>,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Twin {
                t,
                k,
                e,
                tile_m,
                ids,
                repeat,
                capacity,
                ..
            } => (
                "route".into(),
                format!(
                    "T={t} K={k} E={e} tile_m={tile_m} {}{}{}",
                    ids.label(),
                    match capacity {
                        Some(c) => format!(", capacity {c}"),
                        None => String::new(),
                    },
                    if *repeat > 1 {
                        format!(" x{repeat}")
                    } else {
                        String::new()
                    }
                ),
            ),
            Case::BadInputs => (
                "route".into(),
                "bad inputs: K > E, K = 0, T = 0, tile_m = 0, capacity 0, shape mismatch".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let c = |t, k, e, tile_m, ids, repeat, seed| Case::Twin {
        t,
        k,
        e,
        tile_m,
        ids,
        repeat,
        capacity: None,
        seed,
    };
    // With a capacity: ceil(factor T K / E) slots per expert.
    let cap = |t, k, e, tile_m, ids, factor, repeat, seed| Case::Twin {
        t,
        k,
        e,
        tile_m,
        ids,
        repeat,
        capacity: Some(crate::kernels::route::expert_capacity(factor, t, k, e)),
        seed,
    };
    let random = Ids::Random { unused_pct: 0 };
    vec![
        c(1, 1, 4, 16, random, 1, 1),
        c(1, 2, 8, 4, random, 2, 2),
        c(37, 2, 64, 16, random, 1, 3),
        c(300, 1, 8, 64, Ids::OneExpert(3), 1, 4),
        c(300, 2, 8, 32, Ids::OneExpert(5), 1, 5),
        c(129, 2, 4, 8, random, 2, 6),
        c(1000, 2, 3, 128, Ids::Random { unused_pct: 5 }, 1, 7),
        c(2000, 1, 16, 1, Ids::Skewed, 1, 8),
        c(4096, 2, 64, 64, Ids::Adaptive { two_pct: 20 }, 2, 9),
        c(4099, 2, 256, 64, Ids::Random { unused_pct: 2 }, 1, 10),
        c(5000, 2, 300, 32, Ids::Skewed, 1, 11),
        c(500, 2, 16, 16, Ids::OutOfRange, 1, 12),
        c(700, 2, 2, 16, Ids::Adaptive { two_pct: 50 }, 1, 13),
        // Dropping: skewed loads past capacity, across chunks, and an expert
        // whose capacity is taken by first choices only.
        cap(1, 2, 4, 4, random, 0.5, 1, 14),
        cap(300, 1, 8, 16, Ids::Skewed, 1.0, 1, 15),
        cap(1000, 2, 16, 32, Ids::Skewed, 1.25, 2, 16),
        cap(4096, 2, 64, 64, Ids::Adaptive { two_pct: 20 }, 0.5, 1, 17),
        cap(600, 2, 8, 16, Ids::OneExpert(2), 1.0, 1, 18),
        cap(2000, 2, 16, 8, Ids::Random { unused_pct: 5 }, 0.25, 1, 19),
        Case::BadInputs,
    ]
}

/// topk_ids [T, K] for a case.
pub fn make_ids(t: usize, k: usize, e: usize, ids: Ids, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let mut out = vec![UNUSED; t * k];
    for tok in 0..t {
        let row = &mut out[tok * k..(tok + 1) * k];
        let first = match ids {
            Ids::OneExpert(x) => x as usize,
            Ids::Skewed => {
                let half = e.div_ceil(2);
                if rng.below(3) == 0 {
                    0
                } else {
                    rng.below(half)
                }
            }
            _ => rng.below(e),
        };
        row[0] = first as u32;
        if k > 1 {
            let second = (first + 1 + rng.below(e - 1)) % e;
            let second = match ids {
                Ids::Skewed => (first + 1) % e.div_ceil(2).max(2),
                _ => second,
            };
            row[1] = second as u32;
        }
        match ids {
            Ids::Random { unused_pct } if rng.below(100) < unused_pct => row.fill(UNUSED),
            Ids::Adaptive { two_pct } if k > 1 && rng.below(100) >= two_pct => row[1] = UNUSED,
            Ids::OutOfRange if rng.below(10) == 0 => row[k - 1] = (e + rng.below(5)) as u32,
            _ => {}
        }
    }
    out
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let Case::Twin {
        t,
        k,
        e,
        tile_m,
        ids,
        repeat,
        capacity,
        seed,
    } = *case
    else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let layout = RoutingLayout { t, k, e, tile_m };
    let config = RouteConfig {
        layout,
        grid_y1: 3,
        grid_y2: 5,
        capacity,
    };
    let ids_host = make_ids(t, k, e, ids, seed);
    let (mut want_words, want_tos, want_sot) = route(&ids_host, &config);
    want_words[RoutingLayout::STATUS] = STATUS_NONFINITE;

    let topk_ids = Tensor::from_slice(ctx, "topk_ids", &[t, k], &ids_host)?;
    let routing = routing_tensor(ctx, &layout)?;
    let mut start = vec![0u32; layout.len()];
    start[RoutingLayout::STATUS] = STATUS_NONFINITE;
    routing.write(ctx, &start)?;
    let dirty = 0xAAAA_AAAAu32;
    let token_of_slot = Tensor::from_slice(
        ctx,
        "token_of_slot",
        &[layout.max_rows()],
        &vec![dirty; layout.max_rows()],
    )?;
    let slot_of_token = Tensor::from_slice(ctx, "slot_of_token", &[t, k], &vec![dirty; t * k])?;
    let r = Route::new(
        ctx,
        &config,
        &RouteBuffers {
            topk_ids: &topk_ids,
            routing: &routing,
            token_of_slot: &token_of_slot,
            slot_of_token: &slot_of_token,
        },
    )?;
    submit_pass(ctx, |pass| {
        for _ in 0..repeat {
            r.record(pass);
        }
    })?;
    let words = routing.read(ctx).await?;
    let rows = want_words[RoutingLayout::PADDED_ROWS] as usize;
    let tos = token_of_slot.read(ctx).await?;
    let sot = slot_of_token.read(ctx).await?;
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[
            ("routing", compare_exact(&words, &want_words)),
            (
                "token_of_slot",
                compare_exact(&tos[..rows], &want_tos[..rows]),
            ),
            ("slot_of_token", compare_exact(&sot, &want_sot)),
        ],
    ))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_route = |what: &str,
                         layout: RoutingLayout,
                         capacity: Option<u32>,
                         ids_k: usize,
                         rows: usize,
                         want| {
        let scope = ctx.error_scope();
        let r = (|| -> Result<Route> {
            let l = layout;
            let topk_ids = Tensor::<u32>::zeros(ctx, "topk_ids", &[l.t, ids_k])?;
            // RoutingLayout's sizes divide by tile_m.
            let words = if l.tile_m == 0 { 64 } else { l.len() };
            let routing = Tensor::<u32>::zeros(ctx, "routing", &[words])?;
            let token_of_slot = Tensor::<u32>::zeros(ctx, "token_of_slot", &[rows])?;
            let slot_of_token = Tensor::<u32>::zeros(ctx, "slot_of_token", &[l.t, l.k])?;
            Route::new(
                ctx,
                &RouteConfig {
                    capacity,
                    ..RouteConfig::new(l)
                },
                &RouteBuffers {
                    topk_ids: &topk_ids,
                    routing: &routing,
                    token_of_slot: &token_of_slot,
                    slot_of_token: &slot_of_token,
                },
            )
        })();
        checks.push(expect_error(scope, what, r, want));
    };
    let l = |t, k, e, tile_m| RoutingLayout { t, k, e, tile_m };
    let ok = l(8, 2, 4, 4);
    try_route(
        "K > E",
        l(8, 2, 1, 4),
        None,
        2,
        l(8, 2, 1, 4).max_rows(),
        is_invalid,
    );
    try_route(
        "K = 0",
        l(8, 0, 4, 4),
        None,
        0,
        l(8, 0, 4, 4).max_rows(),
        is_invalid,
    );
    try_route("T = 0", l(0, 2, 4, 4), None, 2, 16, is_invalid);
    try_route("tile_m = 0", l(8, 2, 4, 0), None, 2, 16, is_invalid);
    try_route("capacity 0", ok, Some(0), 2, ok.max_rows(), is_invalid);
    try_route(
        "topk_ids [T, 1] for K = 2",
        ok,
        None,
        1,
        ok.max_rows(),
        is_shape,
    );
    try_route(
        "token_of_slot too short",
        ok,
        None,
        2,
        ok.max_rows() - 1,
        is_shape,
    );
    bad_inputs_result(kernel, case, checks)
}
