//! Gate launcher: softmax of the router logits plus the top-1 / top-2 /
//! adaptive expert selection of every token (`shaders/gate.wgsl`), one
//! dispatch. Twin: `reference::gate::gate_forward`.
//!
//! Outputs: `probs [T, E]` (kept for the load-balancing loss and the backward),
//! `topk_ids [T, K]` (`UNUSED` for an unused slot), `topk_weights [T, K]` (0 for
//! an unused slot), `lse [T]` (logsumexp of the logits, for the z-loss), and
//! `STATUS_NONFINITE` ORed into `routing[RoutingLayout::STATUS]` when a token's
//! logits hold a NaN or an infinity (that token then gets no expert).

use super::{
    grid_1d, GapMode, GateConfig, Gating, Kernel, ParamsLayout, RoutingLayout, SingleWeight,
};
use super::{STATUS_NONFINITE, UNUSED};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

/// Invocations per workgroup (one token each).
pub const GATE_WG: u32 = 64;

const GATE_WGSL: &str = include_str!("../../shaders/gate.wgsl");

/// Specializations of the gate kernels: one entry point per gating rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GateSpec {
    pub gating: Gating,
}

/// Kernel name of a gating rule: WGSL entry point, conformance `kernel` field.
pub fn kernel_name(gating: Gating) -> &'static str {
    match gating {
        Gating::Top1 => "gate_top1_forward",
        Gating::Top2 => "gate_top2_forward",
        Gating::Adaptive => "gate_adaptive_forward",
        Gating::TopK => "gate_topk_forward",
    }
}

impl GateSpec {
    /// Kernel name (WGSL entry point).
    pub fn name(&self) -> &'static str {
        kernel_name(self.gating)
    }

    pub fn def(&self) -> KernelDef {
        KernelDef::new(
            self.name(),
            &[GATE_WGSL],
            self.name(),
            &[
                ("WG", GATE_WG),
                ("UNUSED", UNUSED),
                ("STATUS_WORD", RoutingLayout::STATUS as u32),
                ("STATUS_NONFINITE", STATUS_NONFINITE),
            ],
            &[
                Binding::Uniform,
                Binding::Read,      // router_logits [T, E]
                Binding::ReadWrite, // probs [T, E]
                Binding::ReadWrite, // topk_ids [T, K]
                Binding::ReadWrite, // topk_weights [T, K]
                Binding::ReadWrite, // lse [T]
                Binding::ReadWrite, // routing [RoutingLayout::len()]
            ],
        )
    }

    pub fn all() -> Vec<Self> {
        [Gating::Top1, Gating::Top2, Gating::Adaptive, Gating::TopK]
            .into_iter()
            .map(|gating| GateSpec { gating })
            .collect()
    }
}

gpu_params! {
    /// Mirrors `struct GateParams` in `shaders/gate.wgsl`.
    pub struct GateParams {
        pub t: u32,
        pub e: u32,
        pub k: u32,
        pub gap_mode: u32,
        pub single_one: u32,
        pub threshold: f32,
        pub nx: u32,
        pub flags: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<GateParams>(Kernel::Gate(GateSpec {
        gating: Gating::Adaptive,
    }))]
}

/// The tensors the gate reads and writes. T and E are taken from `router_logits`.
pub struct GateBuffers<'a> {
    /// router_logits [T, E]
    pub router_logits: &'a Tensor<f32>,
    /// probs [T, E]
    pub probs: &'a Tensor<f32>,
    /// topk_ids [T, K], K = `config.max_k()`
    pub topk_ids: &'a Tensor<u32>,
    /// topk_weights [T, K]
    pub topk_weights: &'a Tensor<f32>,
    /// lse [T]
    pub lse: &'a Tensor<f32>,
    /// routing [RoutingLayout::len()]: only the status word is touched.
    pub routing: &'a Tensor<u32>,
}

/// Check the config and shapes; returns (T, E). CPU only, so it is unit-tested.
pub fn check(
    config: &GateConfig,
    logits: &[usize],
    probs: &[usize],
    ids: &[usize],
    weights: &[usize],
    lse: &[usize],
    routing: &[usize],
) -> Result<(usize, usize)> {
    let &[t, e] = logits else {
        return Err(Error::shape(
            "gate",
            "router_logits [T, E]",
            format!("{logits:?}"),
        ));
    };
    if t == 0 {
        return Err(Error::invalid("gate", "T = 0 tokens"));
    }
    if e == 0 {
        return Err(Error::invalid("gate", "E = 0 experts"));
    }
    config.validate(e)?;
    let k = config.max_k();
    let want = |name: &str, got: &[usize], want: &[usize]| -> Result<()> {
        if got != want {
            return Err(Error::shape(
                "gate",
                format!("{name} {want:?}"),
                format!("{name} {got:?}"),
            ));
        }
        Ok(())
    };
    want("probs", probs, &[t, e])?;
    want("topk_ids", ids, &[t, k])?;
    want("topk_weights", weights, &[t, k])?;
    want("lse", lse, &[t])?;
    if routing.len() != 1 || routing[0] < RoutingLayout::HEADER {
        return Err(Error::shape(
            "gate",
            format!("routing [n] with n >= {}", RoutingLayout::HEADER),
            format!("routing {routing:?}"),
        ));
    }
    Ok((t, e))
}

/// The gate of one shape, ready to record.
pub struct Gate {
    pub config: GateConfig,
    pub t: usize,
    pub e: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl Gate {
    pub fn new(ctx: &GpuContext, config: &GateConfig, bufs: &GateBuffers<'_>) -> Result<Self> {
        let (t, e) = check(
            config,
            &bufs.router_logits.shape,
            &bufs.probs.shape,
            &bufs.topk_ids.shape,
            &bufs.topk_weights.shape,
            &bufs.lse.shape,
            &bufs.routing.shape,
        )?;
        let k = config.max_k();
        // Element indices are u32 in the shader (u64 here: usize is 32 bits on wasm32).
        let elements = t as u64 * e as u64;
        if elements > u32::MAX as u64 {
            return Err(Error::Limit {
                what: "gate: T * E router logits".into(),
                needed: elements,
                max: u32::MAX as u64,
            });
        }
        let t32 = t as u32;
        let groups = t32.div_ceil(GATE_WG);
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        let grid = grid_1d(groups, max);
        ctx.check_workgroups("gate workgroups (folded)", grid.1 as u64)?;
        let params = GateParams {
            t: t32,
            e: e as u32,
            k: k as u32,
            gap_mode: match config.gap {
                GapMode::Softmax => 0,
                GapMode::Top2 => 1,
            },
            single_one: match config.single_weight {
                SingleWeight::RawP1 => 0,
                SingleWeight::One => 1,
            },
            threshold: config.threshold,
            nx: grid.0,
            flags: config.renorm as u32
                | (((config.score == crate::kernels::RouterScore::Sigmoid) as u32) << 1)
                | (config.rule.code() << 2),
        };
        let pipeline = ctx.pipeline(&Kernel::Gate(GateSpec {
            gating: config.gating,
        }))?;
        let params_buf = uniform(ctx, &params);
        let dispatch = Dispatch::new(
            ctx,
            pipeline,
            &[
                &params_buf,
                &bufs.router_logits.buffer,
                &bufs.probs.buffer,
                &bufs.topk_ids.buffer,
                &bufs.topk_weights.buffer,
                &bufs.lse.buffer,
                &bufs.routing.buffer,
            ],
            Grid::Direct(grid.0, grid.1, 1),
        )?;
        Ok(Gate {
            config: *config,
            t,
            e,
            dispatch,
            _params: params_buf,
        })
    }

    /// K: slots per token.
    pub fn k(&self) -> usize {
        self.config.max_k()
    }

    /// Record the gate: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(config: &GateConfig, t: usize, e: usize) -> Result<(usize, usize)> {
        let k = config.max_k();
        check(config, &[t, e], &[t, e], &[t, k], &[t, k], &[t], &[64])
    }

    #[test]
    fn rejects_bad_arguments_with_typed_errors() {
        let top2 = GateConfig::new(Gating::Top2);
        assert!(shapes(&top2, 4, 8).is_ok());
        // K > E
        assert!(matches!(
            shapes(&top2, 4, 1),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(shapes(&GateConfig::new(Gating::Top1), 4, 1).is_ok());
        // T = 0, E = 0
        assert!(matches!(
            shapes(&top2, 0, 8),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            shapes(&GateConfig::new(Gating::Top1), 3, 0),
            Err(Error::InvalidArgument { .. })
        ));
        // threshold outside [0, 1] or NaN
        for th in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
            let c = GateConfig {
                threshold: th,
                ..GateConfig::default()
            };
            assert!(
                matches!(shapes(&c, 4, 8), Err(Error::InvalidArgument { .. })),
                "{th}"
            );
        }
        // shape mismatches
        let c = GateConfig::default();
        assert!(matches!(
            check(&c, &[4, 8], &[4, 7], &[4, 2], &[4, 2], &[4], &[64]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&c, &[4, 8], &[4, 8], &[4, 1], &[4, 2], &[4], &[64]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&c, &[32], &[4, 8], &[4, 2], &[4, 2], &[4], &[64]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&c, &[4, 8], &[4, 8], &[4, 2], &[4, 2], &[4], &[3]),
            Err(Error::Shape { .. })
        ));
    }
}
