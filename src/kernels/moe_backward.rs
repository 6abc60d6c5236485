//! Launchers of the MoE layer's backward (`shaders/moe_backward.wgsl` for the
//! routing side, `shaders/expert_backward.wgsl` for the grouped expert
//! GEMMs), over the forward's slot plan. Every scatter-add of the backward is
//! a gather over the sorted slot order: no float atomics, the same bits run
//! to run. Twins: `reference::moe_backward` (same names), and the whole layer
//! against `reference::moe_train::moe_layer_backward`.
//!
//! Order of one layer's backward (`MoeBackward::record`):
//! 1. `combine_backward_slots` (dys = w dy per slot row) and
//!    `combine_backward_weights` (dw = <dy, y_expert>);
//! 2. `gate_stats` (f_e, P_e, losses) and `gate_backward` (dz);
//! 3. `expert_gemm2_backward_gelu` (da) and `expert_gemm1_backward` (dxs),
//!    dispatched indirectly like the forward GEMMs (SwiGLU:
//!    `expert_gemm2_backward_swiglu` gives da and da3, and
//!    `expert_gemm1_backward_swiglu` sums both paths over K = 2F);
//! 4. the dispatch backward: dx = sum_j dxs[slot_of_token[t, j]] (the combine
//!    kernel with unit weights);
//! 5. `expert_weight_grad_w2` / `_w1` (split-K, then
//!    `expert_weight_grad_reduce` when split > 1; SwiGLU's dW3 is `_w1` on
//!    da3);
//! 6. the router's two dense GEMMs: dx += dz · W_r^T, dW_r = x^T · dz.

use super::combine::{Combine, CombineBuffers};
use super::matmul::{wgsl_select, Matmul, MatmulShape, MatmulSpec, Trans};
use super::{grid_1d, Kernel, ParamsLayout, RoutingLayout, UNUSED};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

const EXPERT_BACKWARD_WGSL: &str = include_str!("../../shaders/expert_backward.wgsl");
const MOE_BACKWARD_WGSL: &str = include_str!("../../shaders/moe_backward.wgsl");

/// Invocations per workgroup of the routing-side kernels.
pub const MOE_BACKWARD_WG: u32 = 64;

/// The routing-side kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoeBackwardSpec {
    CombineSlots,
    CombineWeights,
    GateStats,
    GateBackward,
    WeightGradReduce,
}

impl MoeBackwardSpec {
    pub const ALL: [MoeBackwardSpec; 5] = [
        MoeBackwardSpec::CombineSlots,
        MoeBackwardSpec::CombineWeights,
        MoeBackwardSpec::GateStats,
        MoeBackwardSpec::GateBackward,
        MoeBackwardSpec::WeightGradReduce,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            MoeBackwardSpec::CombineSlots => "combine_backward_slots",
            MoeBackwardSpec::CombineWeights => "combine_backward_weights",
            MoeBackwardSpec::GateStats => "gate_stats",
            MoeBackwardSpec::GateBackward => "gate_backward",
            MoeBackwardSpec::WeightGradReduce => "expert_weight_grad_reduce",
        }
    }

    fn flag(&self) -> &'static str {
        match self {
            MoeBackwardSpec::CombineSlots => "slots",
            MoeBackwardSpec::CombineWeights => "weights",
            MoeBackwardSpec::GateStats => "stats",
            MoeBackwardSpec::GateBackward => "gate",
            MoeBackwardSpec::WeightGradReduce => "reduce",
        }
    }

    fn bindings(&self) -> Vec<Binding> {
        use Binding::*;
        match self {
            // dy, topk_weights, slot_of_token, token_of_slot, routing -> dys
            MoeBackwardSpec::CombineSlots => vec![Uniform, Read, Read, Read, Read, Read, ReadWrite],
            // dy, slot_of_token, y_expert -> dw
            MoeBackwardSpec::CombineWeights => vec![Uniform, Read, Read, Read, ReadWrite],
            // probs, topk_ids, lse -> stats
            MoeBackwardSpec::GateStats => vec![Uniform, Read, Read, Read, ReadWrite],
            // probs, topk_ids, topk_weights, dw, lse, stats -> dz
            MoeBackwardSpec::GateBackward => {
                vec![Uniform, Read, Read, Read, Read, Read, Read, ReadWrite]
            }
            // partial -> out
            MoeBackwardSpec::WeightGradReduce => vec![Uniform, Read, ReadWrite],
        }
    }

    pub fn def(&self) -> KernelDef {
        KernelDef::new(
            self.name(),
            &[&wgsl_select(MOE_BACKWARD_WGSL, &[self.flag()])],
            self.name(),
            &[("WG", MOE_BACKWARD_WG), ("UNUSED", UNUSED)],
            &self.bindings(),
        )
    }

    pub fn all() -> Vec<Self> {
        Self::ALL.to_vec()
    }
}

/// The grouped expert GEMMs of the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpertBackwardStage {
    /// `da = (dys · W2[e]^T) * gelu'(u)`
    Gemm2Gelu,
    /// SwiGLU: `dh = dys · W2[e]^T`, `da = dh * u3 * silu'(u)`, `da3 = dh * silu(u)`
    Gemm2SwiGlu,
    /// `dxs = da · W1[e]^T`
    Gemm1,
    /// SwiGLU: `dxs = da · W1[e]^T + da3 · W3[e]^T`
    Gemm1SwiGlu,
    /// `dW1[e] = x[tok]^T · da` over the expert's rows
    WeightW1,
    /// `dW2[e] = h^T · dys` over the expert's rows
    WeightW2,
}

impl ExpertBackwardStage {
    pub const ALL: [ExpertBackwardStage; 6] = [
        ExpertBackwardStage::Gemm2Gelu,
        ExpertBackwardStage::Gemm2SwiGlu,
        ExpertBackwardStage::Gemm1,
        ExpertBackwardStage::Gemm1SwiGlu,
        ExpertBackwardStage::WeightW1,
        ExpertBackwardStage::WeightW2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExpertBackwardStage::Gemm2Gelu => "expert_gemm2_backward_gelu",
            ExpertBackwardStage::Gemm2SwiGlu => "expert_gemm2_backward_swiglu",
            ExpertBackwardStage::Gemm1 => "expert_gemm1_backward",
            ExpertBackwardStage::Gemm1SwiGlu => "expert_gemm1_backward_swiglu",
            ExpertBackwardStage::WeightW1 => "expert_weight_grad_w1",
            ExpertBackwardStage::WeightW2 => "expert_weight_grad_w2",
        }
    }

    fn flags(self) -> Vec<&'static str> {
        match self {
            ExpertBackwardStage::Gemm2Gelu => vec!["dh", "rowgemm"],
            ExpertBackwardStage::Gemm2SwiGlu => vec!["dh", "swiglu", "rowgemm"],
            ExpertBackwardStage::Gemm1 => vec!["dx", "rowgemm"],
            ExpertBackwardStage::Gemm1SwiGlu => vec!["dx", "swiglu", "rowgemm"],
            ExpertBackwardStage::WeightW1 => vec!["dw1", "wgrad"],
            ExpertBackwardStage::WeightW2 => vec!["dw2", "wgrad"],
        }
    }

    fn bindings(self) -> Vec<Binding> {
        use Binding::*;
        match self {
            // dys, routing, w2, u -> da
            ExpertBackwardStage::Gemm2Gelu => vec![Uniform, Read, Read, Read, Read, ReadWrite],
            // dys, routing, w2, u -> da; u3 -> da3
            ExpertBackwardStage::Gemm2SwiGlu => {
                vec![Uniform, Read, Read, Read, Read, ReadWrite, Read, ReadWrite]
            }
            // da, routing, w1 -> dxs
            ExpertBackwardStage::Gemm1 => vec![Uniform, Read, Read, Read, ReadWrite],
            // da, routing, w1 -> dxs; da3, w3
            ExpertBackwardStage::Gemm1SwiGlu => {
                vec![Uniform, Read, Read, Read, ReadWrite, Read, Read]
            }
            // x, token_of_slot, routing, da -> dw1
            ExpertBackwardStage::WeightW1 => vec![Uniform, Read, Read, Read, Read, ReadWrite],
            // h, routing, dys -> dw2
            ExpertBackwardStage::WeightW2 => vec![Uniform, Read, Read, Read, ReadWrite],
        }
    }
}

/// One backward expert GEMM on one GEMM core (the forward's core, so that
/// the row tile matches the routing layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertBackwardSpec {
    pub stage: ExpertBackwardStage,
    pub core: MatmulSpec,
}

impl ExpertBackwardSpec {
    pub fn name(&self) -> &'static str {
        self.stage.name()
    }

    pub fn def(&self) -> KernelDef {
        super::expert::grouped_gemm_def(
            self.stage.name(),
            self.core,
            EXPERT_BACKWARD_WGSL,
            &self.stage.flags(),
            false,
            &self.stage.bindings(),
        )
    }

    pub fn all() -> Vec<Self> {
        ExpertBackwardStage::ALL
            .into_iter()
            .flat_map(|stage| {
                super::expert::ExpertSpec::cores()
                    .into_iter()
                    .map(move |core| ExpertBackwardSpec { stage, core })
            })
            .collect()
    }
}

gpu_params! {
    /// Mirrors `struct MoeBackParams` in `shaders/moe_backward.wgsl`.
    pub struct MoeBackParams {
        pub t: u32,
        pub k: u32,
        pub e: u32,
        pub d: u32,
        pub rows: u32,
        pub nx: u32,
        pub raw_single: u32,
        pub n: u32,
        pub split: u32,
        pub balance: f32,
        pub z_loss: f32,
        pub padded_rows_word: u32,
        pub topk: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
}

gpu_params! {
    /// Mirrors `struct ExpertBackParams` in `shaders/expert_backward.wgsl`.
    pub struct ExpertBackParams {
        pub t: u32,
        pub e: u32,
        pub d: u32,
        pub f: u32,
        pub rows: u32,
        pub tile_expert: u32,
        pub max_tiles: u32,
        pub offsets: u32,
        pub m_tiles: u32,
        pub split: u32,
        pub _pad0: u32,
        pub _pad1: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    let mut v: Vec<ParamsLayout> = MoeBackwardSpec::ALL
        .into_iter()
        .map(|s| ParamsLayout::of::<MoeBackParams>(Kernel::MoeBackward(s)))
        .collect();
    v.extend(ExpertBackwardStage::ALL.into_iter().map(|stage| {
        ParamsLayout::of::<ExpertBackParams>(Kernel::ExpertBackward(ExpertBackwardSpec {
            stage,
            core: MatmulSpec::BLOCKED_SQUARE,
        }))
    }));
    v
}

/// A top-k router's combine weights, for its gradient: renormalized over
/// the experts a token takes, or the raw scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopKWeights {
    Renorm,
    Raw,
}

impl TopKWeights {
    /// The gate's rule as the backward sees it.
    pub fn of(gate: &crate::kernels::GateConfig) -> Option<TopKWeights> {
        (gate.gating == crate::kernels::Gating::TopK).then_some(if gate.renorm {
            TopKWeights::Renorm
        } else {
            TopKWeights::Raw
        })
    }

    /// `MoeBackParams::topk`.
    pub fn code(w: Option<TopKWeights>) -> u32 {
        match w {
            None => 0,
            Some(TopKWeights::Renorm) => 1,
            Some(TopKWeights::Raw) => 2,
        }
    }
}

/// Shape and rule of one layer's backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeBackwardShape {
    pub layout: RoutingLayout,
    pub d: usize,
    pub f: usize,
    /// A one-expert token's weight is the raw p1 (it carries a gradient).
    pub raw_single: bool,
    /// How a top-k router's weights depend on its scores (`None`: top-1,
    /// top-2 or adaptive gating).
    pub topk: Option<TopKWeights>,
    /// Load-balancing coefficient (0.01).
    pub balance: f32,
    /// Router z-loss coefficient (0 = off).
    pub z_loss: f32,
    /// K chunks of each expert's rows in the weight GEMMs (>= 1).
    pub split: usize,
    /// SwiGLU experts (w3, u3, dw3); GELU otherwise.
    pub swiglu: bool,
}

/// What the backward reads (from the forward) and writes.
pub struct MoeBackwardBuffers<'a> {
    /// x [T, D]: the layer input
    pub x: &'a Tensor<f32>,
    /// dy [T, D]: gradient of the layer output
    pub dy: &'a Tensor<f32>,
    /// probs [T, E], topk_ids / topk_weights [T, K], lse [T] (gate outputs)
    pub probs: &'a Tensor<f32>,
    pub topk_ids: &'a Tensor<u32>,
    pub topk_weights: &'a Tensor<f32>,
    pub lse: &'a Tensor<f32>,
    /// routing, token_of_slot [R], slot_of_token [T, K] (route outputs)
    pub routing: &'a Tensor<u32>,
    pub token_of_slot: &'a Tensor<u32>,
    pub slot_of_token: &'a Tensor<u32>,
    /// y_expert [R, D] (expert forward, or the rows other ranks' experts
    /// sent back)
    pub y_expert: &'a Tensor<f32>,
    /// w_router [D, E]
    pub w_router: &'a Tensor<f32>,
    /// The expert GEMMs' part: `None` for a layer whose experts run on
    /// other ranks (expert parallelism: each slot's input gradient is
    /// written into `scratch.dxs` from outside).
    pub experts: Option<ExpertGradBuffers<'a>>,
    /// outputs: dx [T, D], dw_router [D, E]
    pub dx: &'a Tensor<f32>,
    pub dw_router: &'a Tensor<f32>,
}

/// The expert GEMMs' buffers of a layer's backward.
pub struct ExpertGradBuffers<'a> {
    /// u, h [R, F] (expert forward); u3 [R, F] (SwiGLU)
    pub u: &'a Tensor<f32>,
    pub u3: Option<&'a Tensor<f32>>,
    pub h: &'a Tensor<f32>,
    /// w1 [E, D, F], w2 [E, F, D], w3 [E, D, F] (SwiGLU)
    pub w1: &'a Tensor<f32>,
    pub w2: &'a Tensor<f32>,
    pub w3: Option<&'a Tensor<f32>>,
    /// outputs: dw1 [E, D, F], dw2 [E, F, D], dw3 [E, D, F] (SwiGLU)
    pub dw1: &'a Tensor<f32>,
    pub dw2: &'a Tensor<f32>,
    pub dw3: Option<&'a Tensor<f32>>,
}

/// Scratch tensors of the backward (allocated once per shape).
pub struct MoeBackwardScratch {
    /// dys [R, D]
    pub dys: Tensor<f32>,
    /// dw [T, K]
    pub dw: Tensor<f32>,
    /// stats [2E + 2]: f, P, balance loss, z loss
    pub stats: Tensor<f32>,
    /// dz [T, E]
    pub dz: Tensor<f32>,
    /// da [R, F] (with the expert GEMMs)
    pub da: Option<Tensor<f32>>,
    /// da3 [R, F] (SwiGLU)
    pub da3: Option<Tensor<f32>>,
    /// dxs [R, D]
    pub dxs: Tensor<f32>,
    /// ones [T, K]: the dispatch backward is a combine with unit weights
    pub ones: Tensor<f32>,
    /// split-K partials [split, E, max(D F)] (split > 1 only)
    pub partial: Option<Tensor<f32>>,
}

/// The expert GEMMs of a layer's backward: input gradients, then weight
/// gradients.
struct ExpertGemms {
    gemm2: Dispatch,
    gemm1: Dispatch,
    wgrad2: Dispatch,
    reduce2: Option<Dispatch>,
    wgrad1: Dispatch,
    reduce1: Option<Dispatch>,
    /// SwiGLU: dW3 (the dW1 kernel on da3) and its split-K reduction.
    wgrad3: Option<(Dispatch, Option<Dispatch>)>,
}

/// Every dispatch of one layer's backward, ready to record.
pub struct MoeBackward {
    pub shape: MoeBackwardShape,
    pub scratch: MoeBackwardScratch,
    slots: Dispatch,
    weights: Dispatch,
    stats: Dispatch,
    gate: Dispatch,
    /// The expert GEMMs (`None`: the layer's experts run elsewhere).
    experts: Option<ExpertGemms>,
    dispatch_back: Combine,
    router_dx: Matmul,
    router_dw: Matmul,
    _params: Vec<wgpu::Buffer>,
}

impl MoeBackward {
    /// `core` must be the forward expert FFN's GEMM core (its row tile is the
    /// routing layout's `tile_m`; its column tile sets the indirect grids).
    pub fn new(
        ctx: &GpuContext,
        shape: &MoeBackwardShape,
        core: MatmulSpec,
        b: &MoeBackwardBuffers<'_>,
    ) -> Result<Self> {
        let l = shape.layout;
        let (t, k, e, d, f) = (l.t, l.k, l.e, shape.d, shape.f);
        if t == 0 || k == 0 || e == 0 || d == 0 || f == 0 || shape.split == 0 {
            return Err(Error::invalid(
                "moe_backward",
                format!(
                    "T = {t}, K = {k}, E = {e}, D = {d}, F = {f}, split = {}: all must be >= 1",
                    shape.split
                ),
            ));
        }
        if core.tile_rows() as usize != l.tile_m {
            return Err(Error::invalid(
                "moe_backward",
                format!(
                    "GEMM core row tile {} != routing tile_m {}",
                    core.tile_rows(),
                    l.tile_m
                ),
            ));
        }
        let rows = l.max_rows();
        let checks: [(&str, &Tensor<f32>, Vec<usize>); 9] = [
            ("x", b.x, vec![t, d]),
            ("dy", b.dy, vec![t, d]),
            ("probs", b.probs, vec![t, e]),
            ("topk_weights", b.topk_weights, vec![t, k]),
            ("lse", b.lse, vec![t]),
            ("y_expert", b.y_expert, vec![rows, d]),
            ("w_router", b.w_router, vec![d, e]),
            ("dx", b.dx, vec![t, d]),
            ("dw_router", b.dw_router, vec![d, e]),
        ];
        for (name, tensor, want) in &checks {
            tensor.expect_shape("moe_backward", name, want)?;
        }
        if let Some(x) = &b.experts {
            let checks: [(&str, &Tensor<f32>, Vec<usize>); 6] = [
                ("u", x.u, vec![rows, f]),
                ("h", x.h, vec![rows, f]),
                ("w1", x.w1, vec![e, d, f]),
                ("w2", x.w2, vec![e, f, d]),
                ("dw1", x.dw1, vec![e, d, f]),
                ("dw2", x.dw2, vec![e, f, d]),
            ];
            for (name, tensor, want) in &checks {
                tensor.expect_shape("moe_backward", name, want)?;
            }
        }
        let swiglu = match b
            .experts
            .as_ref()
            .map(|x| (shape.swiglu, x.u3, x.w3, x.dw3))
        {
            Some((true, Some(u3), Some(w3), Some(dw3))) => {
                u3.expect_shape("moe_backward", "u3", &[rows, f])?;
                w3.expect_shape("moe_backward", "w3", &[e, d, f])?;
                dw3.expect_shape("moe_backward", "dw3", &[e, d, f])?;
                Some((u3, w3, dw3))
            }
            Some((false, None, None, None)) | None => None,
            _ => {
                return Err(Error::invalid(
                    "moe_backward",
                    "SwiGLU needs u3, w3 and dw3; GELU takes none of them",
                ))
            }
        };
        b.topk_ids
            .expect_shape("moe_backward", "topk_ids", &[t, k])?;
        b.slot_of_token
            .expect_shape("moe_backward", "slot_of_token", &[t, k])?;
        b.token_of_slot
            .expect_shape("moe_backward", "token_of_slot", &[rows])?;
        b.routing
            .expect_shape("moe_backward", "routing", &[l.len()])?;
        let wsize = (e * d * f) as u64;
        let split_elems = shape.split as u64 * wsize;
        if (rows * f.max(d)) as u64 > u32::MAX as u64 || split_elems > u32::MAX as u64 {
            return Err(Error::Limit {
                what: "moe_backward: elements of the slot tensors / split-K partials (u32 indices)"
                    .into(),
                needed: ((rows * f.max(d)) as u64).max(split_elems),
                max: u32::MAX as u64,
            });
        }

        let scratch = MoeBackwardScratch {
            dys: Tensor::zeros(ctx, "dys", &[rows, d])?,
            dw: Tensor::zeros(ctx, "dw", &[t, k])?,
            stats: Tensor::zeros(ctx, "gate_stats", &[2 * e + 2])?,
            dz: Tensor::zeros(ctx, "dz", &[t, e])?,
            da: match &b.experts {
                Some(_) => Some(Tensor::zeros(ctx, "da", &[rows, f])?),
                None => None,
            },
            da3: match swiglu {
                Some(_) => Some(Tensor::zeros(ctx, "da3", &[rows, f])?),
                None => None,
            },
            dxs: Tensor::zeros(ctx, "dxs", &[rows, d])?,
            ones: Tensor::from_slice(ctx, "ones", &[t, k], &vec![1.0f32; t * k])?,
            partial: if shape.split > 1 && b.experts.is_some() {
                ctx.check_binding("moe_backward: split-K partials bytes", 4 * split_elems)?;
                Some(Tensor::zeros(
                    ctx,
                    "wgrad_partial",
                    &[shape.split, e, d * f],
                )?)
            } else {
                None
            },
        };
        let max_x = ctx.limits.max_compute_workgroups_per_dimension;
        let mut params = Vec::new();
        let mk = |n_items: usize, n: usize| -> (wgpu::Buffer, (u32, u32)) {
            let grid = grid_1d((n_items as u32).div_ceil(MOE_BACKWARD_WG), max_x);
            let p = MoeBackParams {
                t: t as u32,
                k: k as u32,
                e: e as u32,
                d: d as u32,
                rows: rows as u32,
                nx: grid.0,
                raw_single: shape.raw_single as u32,
                n: n as u32,
                split: shape.split as u32,
                balance: shape.balance,
                z_loss: shape.z_loss,
                padded_rows_word: RoutingLayout::PADDED_ROWS as u32,
                topk: TopKWeights::code(shape.topk),
                _pad0: 0,
                _pad1: 0,
                _pad2: 0,
            };
            (uniform(ctx, &p), grid)
        };
        let pipe = |s: MoeBackwardSpec| ctx.pipeline(&Kernel::MoeBackward(s));
        let direct = |g: (u32, u32)| Grid::Direct(g.0, g.1, 1);

        let (p_slots, g_slots) = mk(rows * d, 0);
        let slots = Dispatch::new(
            ctx,
            pipe(MoeBackwardSpec::CombineSlots)?,
            &[
                &p_slots,
                &b.dy.buffer,
                &b.topk_weights.buffer,
                &b.slot_of_token.buffer,
                &b.token_of_slot.buffer,
                &b.routing.buffer,
                &scratch.dys.buffer,
            ],
            direct(g_slots),
        )?;
        let (p_w, g_w) = mk(t * k, 0);
        let weights = Dispatch::new(
            ctx,
            pipe(MoeBackwardSpec::CombineWeights)?,
            &[
                &p_w,
                &b.dy.buffer,
                &b.slot_of_token.buffer,
                &b.y_expert.buffer,
                &scratch.dw.buffer,
            ],
            direct(g_w),
        )?;
        let (p_s, _) = mk(1, 0);
        let stats = Dispatch::new(
            ctx,
            pipe(MoeBackwardSpec::GateStats)?,
            &[
                &p_s,
                &b.probs.buffer,
                &b.topk_ids.buffer,
                &b.lse.buffer,
                &scratch.stats.buffer,
            ],
            Grid::Direct(1, 1, 1),
        )?;
        let (p_g, g_g) = mk(t, 0);
        let gate = Dispatch::new(
            ctx,
            pipe(MoeBackwardSpec::GateBackward)?,
            &[
                &p_g,
                &b.probs.buffer,
                &b.topk_ids.buffer,
                &b.topk_weights.buffer,
                &scratch.dw.buffer,
                &b.lse.buffer,
                &scratch.stats.buffer,
                &scratch.dz.buffer,
            ],
            direct(g_g),
        )?;

        let dispatch_back = Combine::new(
            ctx,
            &CombineBuffers {
                topk_weights: &scratch.ones,
                slot_of_token: b.slot_of_token,
                y_expert: &scratch.dxs,
                y: b.dx,
            },
        )?;
        // Expert GEMMs (where this rank runs the layer's experts).
        let experts = match (&b.experts, &scratch.da) {
            (Some(x), Some(da)) => {
                let m_tiles = |m: usize| m.div_ceil(core.tile_rows() as usize);
                let ep = |m: usize| ExpertBackParams {
                    t: t as u32,
                    e: e as u32,
                    d: d as u32,
                    f: f as u32,
                    rows: rows as u32,
                    tile_expert: l.tile_expert() as u32,
                    max_tiles: l.max_tiles() as u32,
                    offsets: l.offsets() as u32,
                    m_tiles: m_tiles(m) as u32,
                    split: shape.split as u32,
                    _pad0: 0,
                    _pad1: 0,
                };
                let epipe = |stage| {
                    ctx.pipeline(&Kernel::ExpertBackward(ExpertBackwardSpec { stage, core }))
                };
                let indirect = |word: usize| Grid::Indirect {
                    buffer: b.routing.buffer.clone(),
                    offset: (word * 4) as u64,
                };
                let p_rows = uniform(ctx, &ep(1));
                let mut gemm2_bufs = vec![
                    &p_rows,
                    &scratch.dys.buffer,
                    &b.routing.buffer,
                    &x.w2.buffer,
                    &x.u.buffer,
                    &da.buffer,
                ];
                let mut gemm1_bufs = vec![
                    &p_rows,
                    &da.buffer,
                    &b.routing.buffer,
                    &x.w1.buffer,
                    &scratch.dxs.buffer,
                ];
                let (stage2, stage1) = match (swiglu, &scratch.da3) {
                    (Some((u3, w3, _)), Some(da3)) => {
                        gemm2_bufs.extend([&u3.buffer, &da3.buffer]);
                        gemm1_bufs.extend([&da3.buffer, &w3.buffer]);
                        (
                            ExpertBackwardStage::Gemm2SwiGlu,
                            ExpertBackwardStage::Gemm1SwiGlu,
                        )
                    }
                    _ => (ExpertBackwardStage::Gemm2Gelu, ExpertBackwardStage::Gemm1),
                };
                let gemm2 = Dispatch::new(
                    ctx,
                    epipe(stage2)?,
                    &gemm2_bufs,
                    indirect(RoutingLayout::ARGS1),
                )?;
                let gemm1 = Dispatch::new(
                    ctx,
                    epipe(stage1)?,
                    &gemm1_bufs,
                    indirect(RoutingLayout::ARGS2),
                )?;
                let tn = core.tile_cols() as usize;
                let wgrid = |m: usize, n: usize| -> Result<Grid> {
                    let x = (e * m_tiles(m)) as u64;
                    ctx.check_workgroups("moe_backward: weight-gradient tiles", x)?;
                    Ok(Grid::Direct(
                        x as u32,
                        n.div_ceil(tn) as u32,
                        shape.split as u32,
                    ))
                };
                let p_w2 = uniform(ctx, &ep(f));
                let p_w1 = uniform(ctx, &ep(d));
                let target = |out: &Tensor<f32>| -> wgpu::Buffer {
                    match &scratch.partial {
                        Some(p) => p.buffer.clone(),
                        None => out.buffer.clone(),
                    }
                };
                let wgrad2 = Dispatch::new(
                    ctx,
                    epipe(ExpertBackwardStage::WeightW2)?,
                    &[
                        &p_w2,
                        &x.h.buffer,
                        &b.routing.buffer,
                        &scratch.dys.buffer,
                        &target(x.dw2),
                    ],
                    wgrid(f, d)?,
                )?;
                let wgrad_x = |da: &Tensor<f32>, dw: &Tensor<f32>| -> Result<Dispatch> {
                    Dispatch::new(
                        ctx,
                        epipe(ExpertBackwardStage::WeightW1)?,
                        &[
                            &p_w1,
                            &b.x.buffer,
                            &b.token_of_slot.buffer,
                            &b.routing.buffer,
                            &da.buffer,
                            &target(dw),
                        ],
                        wgrid(d, f)?,
                    )
                };
                let wgrad1 = wgrad_x(da, x.dw1)?;
                let (p_red, g_red) = mk(e * d * f, e * d * f);
                let reduce = |out: &Tensor<f32>| -> Result<Option<Dispatch>> {
                    match &scratch.partial {
                        Some(p) => Ok(Some(Dispatch::new(
                            ctx,
                            pipe(MoeBackwardSpec::WeightGradReduce)?,
                            &[&p_red, &p.buffer, &out.buffer],
                            direct(g_red),
                        )?)),
                        None => Ok(None),
                    }
                };
                let reduce2 = reduce(x.dw2)?;
                let reduce1 = reduce(x.dw1)?;
                let wgrad3 = match (swiglu, &scratch.da3) {
                    (Some((_, _, dw3)), Some(da3)) => Some((wgrad_x(da3, dw3)?, reduce(dw3)?)),
                    _ => None,
                };
                params.extend([p_rows, p_w2, p_w1, p_red]);
                Some(ExpertGemms {
                    gemm2,
                    gemm1,
                    wgrad2,
                    reduce2,
                    wgrad1,
                    reduce1,
                    wgrad3,
                })
            }
            _ => None,
        };

        // Router: dx += dz · W_r^T ; dW_r = x^T · dz.
        let dx_shape = MatmulShape {
            m: t,
            n: d,
            k: e,
            trans: Trans::NT,
            alpha: 1.0,
            beta: 1.0,
        };
        let router_dx = Matmul::new(
            ctx,
            &dx_shape,
            MatmulSpec::choose(ctx, t, d, e, Trans::NT).with_beta(true),
            &scratch.dz,
            b.w_router,
            b.dx,
        )?;
        let dw_shape = MatmulShape {
            m: d,
            n: e,
            k: t,
            trans: Trans::TN,
            alpha: 1.0,
            beta: 0.0,
        };
        let router_dw = Matmul::new(
            ctx,
            &dw_shape,
            MatmulSpec::choose(ctx, d, e, t, Trans::TN),
            b.x,
            &scratch.dz,
            b.dw_router,
        )?;
        params.extend([p_slots, p_w, p_s, p_g]);
        Ok(MoeBackward {
            shape: *shape,
            scratch,
            slots,
            weights,
            stats,
            gate,
            experts,
            dispatch_back,
            router_dx,
            router_dw,
            _params: params,
        })
    }

    /// Record the whole backward of the layer (the forward of the same plan
    /// must have been recorded before, in this or an earlier submit).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record_stats(pass);
        self.record_after_stats(pass);
    }

    /// `gate_stats` alone: f, P and the losses, from the forward's routing
    /// only. Data-parallel training records it before the backward and
    /// replaces f with the global batch's between the two submits.
    pub fn record_stats(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.stats.record(pass);
    }

    /// The backward past `gate_stats` (its stats must be in place).
    /// Without the expert GEMMs (a layer whose experts run on other
    /// ranks), the slots' input gradients must be in `scratch.dxs`.
    pub fn record_after_stats(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record_slots_and_gate(pass);
        if let Some(x) = &self.experts {
            x.gemm2.record(pass);
            x.gemm1.record(pass);
        }
        self.dispatch_back.record(pass);
        if let Some(x) = &self.experts {
            x.record_weight_grads(pass);
        }
        self.router_dx.record(pass);
        self.router_dw.record(pass);
    }

    /// Expert parallelism, the routing rank's part before the exchange
    /// (after `record_stats`): each slot's output gradient `dys` (sent to
    /// its expert's rank), the gradient of the routing weights and the
    /// gate's backward.
    pub fn record_slots_and_gate(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.slots.record(pass);
        self.weights.record(pass);
        self.gate.record(pass);
    }

    /// Expert parallelism, the routing rank's part after the exchange
    /// (each slot's input gradient written into `scratch.dxs`): the
    /// gradient of the layer input, through the experts and the router, and
    /// the router's weight gradient.
    pub fn record_input_grads(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch_back.record(pass);
        self.router_dx.record(pass);
        self.router_dw.record(pass);
    }

    /// Expert parallelism, an expert bank's backward over received rows
    /// (a plan of weight-1, one-expert rows; no router): each row's output
    /// gradient in `dy`, its input gradient into `dx`, the experts' weight
    /// gradients.
    /// Nothing past the slots without the expert GEMMs.
    pub fn record_experts(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.slots.record(pass);
        if let Some(x) = &self.experts {
            x.gemm2.record(pass);
            x.gemm1.record(pass);
            self.dispatch_back.record(pass);
            x.record_weight_grads(pass);
        }
    }
}

impl ExpertGemms {
    fn record_weight_grads(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.wgrad2.record(pass);
        if let Some(r) = &self.reduce2 {
            r.record(pass);
        }
        self.wgrad1.record(pass);
        if let Some(r) = &self.reduce1 {
            r.record(pass);
        }
        if let Some((w, r)) = &self.wgrad3 {
            w.record(pass);
            if let Some(r) = r {
                r.record(pass);
            }
        }
    }
}
