//! Grouped expert FFN launcher (`shaders/expert.wgsl`): GEMM 1 with the row
//! gather fused and the activation in its epilogue (`expert_gemm1_gelu`,
//! `expert_gemm1_swiglu`), then GEMM 2 (`expert_gemm2`), over the routed slot
//! plan of the routing kernels (`RoutingLayout`). Both GEMMs are dispatched
//! indirectly from the routing buffer (words `ARGS1`, `ARGS2`), so the grid
//! follows the routed slots: unused slots (one-expert tokens under adaptive
//! gating) cost nothing. Twin: `reference::expert::expert_ffn`.
//!
//! Both GEMMs run the dense matmul's GEMM core (`kernels::matmul`), with the
//! same specializations; the row tile of the core is the routing `tile_m`.

use super::matmul::{gemm_core, subgroup_cores_pay, wgsl_select, MatmulSpec, MatmulVariant};
use super::{Activation, Kernel, ParamsLayout, RoutingLayout};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor, WeightRef};
use crate::gpu_params;
use crate::quant::QuantFormat;

const ACTIVATION_WGSL: &str = include_str!("../../shaders/activation.wgsl");
const EXPERT_WGSL: &str = include_str!("../../shaders/expert.wgsl");

/// Which of the two GEMMs (and which activation for the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpertStage {
    /// `h = gelu(x[tok] · W1[e])`
    Gemm1Gelu,
    /// GEMM 1 with GELU for training: also keeps the pre-activation `u`.
    Gemm1GeluTrain,
    /// `h = silu(x[tok] · W1[e]) * (x[tok] · W3[e])`
    Gemm1SwiGlu,
    /// GEMM 1 with SwiGLU for training: also keeps both products `u`, `u3`.
    Gemm1SwiGluTrain,
    /// `y_expert = h · W2[e]`
    Gemm2,
}

impl ExpertStage {
    pub const ALL: [ExpertStage; 5] = [
        ExpertStage::Gemm1Gelu,
        ExpertStage::Gemm1GeluTrain,
        ExpertStage::Gemm1SwiGlu,
        ExpertStage::Gemm1SwiGluTrain,
        ExpertStage::Gemm2,
    ];

    /// The WGSL entry point (also the twin's and the conformance kernel name).
    pub fn name(self) -> &'static str {
        match self {
            ExpertStage::Gemm1Gelu => "expert_gemm1_gelu",
            ExpertStage::Gemm1GeluTrain => "expert_gemm1_gelu_train",
            ExpertStage::Gemm1SwiGlu => "expert_gemm1_swiglu",
            ExpertStage::Gemm1SwiGluTrain => "expert_gemm1_swiglu_train",
            ExpertStage::Gemm2 => "expert_gemm2",
        }
    }

    /// GEMM 1 for `act`.
    pub fn gemm1(act: Activation) -> Self {
        match act {
            Activation::Gelu => ExpertStage::Gemm1Gelu,
            Activation::SwiGlu => ExpertStage::Gemm1SwiGlu,
        }
    }

    fn flags(self) -> Vec<&'static str> {
        match self {
            ExpertStage::Gemm1Gelu => vec!["gemm1"],
            ExpertStage::Gemm1GeluTrain => vec!["gemm1", "train"],
            ExpertStage::Gemm1SwiGlu => vec!["gemm1", "swiglu"],
            ExpertStage::Gemm1SwiGluTrain => vec!["gemm1", "swiglu", "train"],
            ExpertStage::Gemm2 => vec![],
        }
    }

    fn bindings(self) -> Vec<Binding> {
        match self {
            ExpertStage::Gemm1Gelu => vec![
                Binding::Uniform,
                Binding::Read,      // x [T, D]
                Binding::Read,      // token_of_slot [R]
                Binding::Read,      // routing [L]
                Binding::Read,      // w1 [E, D, F]
                Binding::ReadWrite, // h [R, F]
            ],
            ExpertStage::Gemm1GeluTrain => vec![
                Binding::Uniform,
                Binding::Read,      // x [T, D]
                Binding::Read,      // token_of_slot [R]
                Binding::Read,      // routing [L]
                Binding::Read,      // w1 [E, D, F]
                Binding::ReadWrite, // h [R, F]
                Binding::ReadWrite, // u [R, F]
            ],
            ExpertStage::Gemm1SwiGlu => vec![
                Binding::Uniform,
                Binding::Read,      // x [T, D]
                Binding::Read,      // token_of_slot [R]
                Binding::Read,      // routing [L]
                Binding::Read,      // w1 [E, D, F]
                Binding::Read,      // w3 [E, D, F]
                Binding::ReadWrite, // h [R, F]
            ],
            ExpertStage::Gemm1SwiGluTrain => vec![
                Binding::Uniform,
                Binding::Read,      // x [T, D]
                Binding::Read,      // token_of_slot [R]
                Binding::Read,      // routing [L]
                Binding::Read,      // w1 [E, D, F]
                Binding::Read,      // w3 [E, D, F]
                Binding::ReadWrite, // h [R, F]
                Binding::ReadWrite, // u [R, F]
                Binding::ReadWrite, // u3 [R, F]
            ],
            ExpertStage::Gemm2 => vec![
                Binding::Uniform,
                Binding::Read,      // h [R, F]
                Binding::Read,      // routing [L]
                Binding::Read,      // w2 [E, F, D]
                Binding::ReadWrite, // y_expert [R, D]
            ],
        }
    }
}

/// Specialization of one expert GEMM: the stage and the GEMM-core
/// configuration (its `beta` flag is unused). The core's row tile is the
/// routing `tile_m`, so GEMM 1 and GEMM 2 of one FFN share the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertSpec {
    pub stage: ExpertStage,
    pub core: MatmulSpec,
    /// Block-quantized weights (inference stages only), dequantized in
    /// registers as the tiles load; `core.b16` stays off.
    pub quant: Option<QuantFormat>,
}

impl ExpertSpec {
    /// Subgroup core with 32-row tiles: few rows per expert.
    pub const SUBGROUP_32: MatmulSpec = MatmulSpec {
        ng: 4,
        ..MatmulSpec::SUBGROUP_SQUARE
    };

    /// The GEMM cores `choose` picks from.
    pub fn cores() -> Vec<MatmulSpec> {
        vec![
            MatmulSpec::SUBGROUP_SQUARE,
            Self::SUBGROUP_32,
            MatmulSpec::BLOCKED_SQUARE,
            MatmulSpec::TILED,
        ]
    }

    /// Pick the core for `shape` on `ctx` (the spec returned is GEMM 1's;
    /// `ExpertFfn` derives GEMM 2's). As for the dense matmul (see
    /// `MatmulSpec::choose`): workgroup-memory tiles on GPUs, register blocking
    /// on CPU adapters, with subgroup sharing where subgroups of 8 exist. The
    /// row tile also pads every expert's rows (half a tile each on average):
    /// the 96-row subgroup core loads 1.8x fewer values per FMA than the
    /// 32-row one, which outweighs its padding down to about 48 rows per
    /// expert (T * K / E); below that the 32-row core wins.
    pub fn choose(ctx: &GpuContext, shape: &ExpertShape) -> ExpertSpec {
        let cpu = ctx.info.device_type == wgpu::DeviceType::Cpu;
        let rows_per_expert = shape.t * shape.k / shape.e.max(1);
        let core = if !cpu {
            MatmulSpec::TILED
        } else if subgroup_cores_pay(ctx) {
            if rows_per_expert >= 48 {
                MatmulSpec::SUBGROUP_SQUARE
            } else {
                Self::SUBGROUP_32
            }
        } else {
            MatmulSpec::BLOCKED_SQUARE
        };
        let core = if core.available(ctx) {
            core
        } else {
            MatmulSpec::BLOCKED_SHORT
        };
        ExpertSpec {
            stage: ExpertStage::gemm1(shape.act),
            core,
            quant: None,
        }
    }

    /// The same core for another stage.
    pub fn with_stage(self, stage: ExpertStage) -> Self {
        ExpertSpec { stage, ..self }
    }

    /// Row tile: the routing layout's `tile_m` for this core.
    pub fn tile_m(&self) -> usize {
        self.core.tile_rows() as usize
    }

    /// Output columns per workgroup.
    pub fn tile_n(&self) -> usize {
        self.core.tile_cols() as usize
    }

    pub fn name(&self) -> &'static str {
        self.stage.name()
    }

    pub fn def(&self) -> KernelDef {
        let mut flags = self.stage.flags();
        if self.core.b16() {
            flags.extend(["b16", "words"]);
        }
        match self.quant {
            Some(QuantFormat::Q8) => flags.extend(["packed", "words", "q8"]),
            Some(QuantFormat::Q4) => flags.extend(["packed", "words"]),
            None => {}
        }
        grouped_gemm_def(
            self.stage.name(),
            self.core,
            EXPERT_WGSL,
            &flags,
            matches!(
                self.stage,
                ExpertStage::Gemm1SwiGlu | ExpertStage::Gemm1SwiGluTrain
            ),
            &self.stage.bindings(),
        )
    }

    /// Every stage with every core, and the inference stages also with f16
    /// weights (training keeps f32 weights).
    pub fn all() -> Vec<Self> {
        ExpertStage::ALL
            .into_iter()
            .flat_map(|stage| {
                let train = matches!(
                    stage,
                    ExpertStage::Gemm1GeluTrain | ExpertStage::Gemm1SwiGluTrain
                );
                Self::cores().into_iter().flat_map(move |core| {
                    let plain = ExpertSpec {
                        stage,
                        core,
                        quant: None,
                    };
                    let stored = [
                        ExpertSpec {
                            core: core.with_b16(true),
                            ..plain
                        },
                        ExpertSpec {
                            quant: Some(QuantFormat::Q8),
                            ..plain
                        },
                        ExpertSpec {
                            quant: Some(QuantFormat::Q4),
                            ..plain
                        },
                    ];
                    std::iter::once(plain).chain(stored.into_iter().filter(move |_| !train))
                })
            })
            .collect()
    }
}

/// A grouped GEMM on the shared GEMM core (`shaders/matmul.wgsl`, beta off)
/// whose stage source (`shaders/expert.wgsl` or `expert_backward.wgsl`,
/// sections chosen by `flags`) supplies the loads and the epilogue: the
/// forward's and the backward's expert kernels differ only in those.
/// `dual`: the core computes two products (SwiGLU's gate and up).
pub(crate) fn grouped_gemm_def(
    entry: &'static str,
    core: MatmulSpec,
    stage_wgsl: &str,
    flags: &[&str],
    dual: bool,
    bindings: &[Binding],
) -> KernelDef {
    let core = core.with_beta(false);
    KernelDef::new(
        format!(
            "{entry}[{}{}]",
            core.label(),
            match (flags.contains(&"packed"), flags.contains(&"q8")) {
                (true, true) => " q8",
                (true, false) => " q4",
                _ => "",
            }
        ),
        &[
            ACTIVATION_WGSL,
            super::f16_source(flags.contains(&"words")),
            if flags.contains(&"packed") {
                super::QUANT_WGSL
            } else {
                ""
            },
            &wgsl_select(gemm_core(), &core.flags()),
            &wgsl_select(stage_wgsl, flags),
        ],
        entry,
        &[
            ("WX", core.wx),
            ("WY", core.wy),
            ("NG", core.ng),
            ("CV", core.cv),
            ("DUAL", dual as u32),
        ],
        bindings,
    )
}

/// Row tile of `spec` (the routing layout's `tile_m`).
pub fn tile_m(spec: &ExpertSpec) -> usize {
    spec.tile_m()
}

gpu_params! {
    /// Mirrors `struct ExpertParams` in `shaders/expert.wgsl`.
    pub struct ExpertParams {
        pub t: u32,
        pub e: u32,
        pub d: u32,
        pub f: u32,
        pub rows: u32,
        pub tile_expert: u32,
        pub max_tiles: u32,
        pub e0: u32,
        pub ec: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    ExpertStage::ALL
        .into_iter()
        .map(|stage| {
            ParamsLayout::of::<ExpertParams>(Kernel::Expert(ExpertSpec {
                stage,
                core: MatmulSpec::BLOCKED_SQUARE,
                quant: None,
            }))
        })
        .collect()
}

/// Shape of the expert FFN: T tokens, K slots per token, E experts, model
/// width D, hidden width F, activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertShape {
    pub t: usize,
    pub k: usize,
    pub e: usize,
    pub d: usize,
    pub f: usize,
    pub act: Activation,
}

impl ExpertShape {
    /// The routing layout the FFN reads with `spec`'s row tile.
    pub fn layout(&self, spec: &ExpertSpec) -> RoutingLayout {
        RoutingLayout {
            t: self.t,
            k: self.k,
            e: self.e,
            tile_m: spec.tile_m(),
        }
    }

    /// Sizes and limits that depend on the shape alone (no tensor needed):
    /// u32 indices, the storage-binding size of the stacked weights (which
    /// can pass the adapter's limit, 128 MiB by default, before anything
    /// else does), the indirect grid.
    /// `ec`: the experts whose weights one dispatch binds (E, or a part's).
    pub fn check_limits(&self, ctx: &GpuContext, spec: &ExpertSpec, ec: usize) -> Result<()> {
        let (t, k, e, d, f) = (self.t, self.k, self.e, self.d, self.f);
        if t == 0 || k == 0 || e == 0 || d == 0 || f == 0 {
            return Err(Error::invalid(
                "expert_ffn",
                format!("T = {t}, K = {k}, E = {e}, D = {d}, F = {f}: all must be >= 1"),
            ));
        }
        let layout = self.layout(spec);
        let rows = layout.max_rows() as u64;
        let weights = ec.min(e) as u64 * d as u64 * f as u64;
        // Elements of a weight (a u32 index reaches each; packed words are
        // fewer than the elements).
        let wsize = if spec.core.b16() { 2 } else { 4 };
        let sizes = [
            ("expert_ffn: x [T, D]", t as u64 * d as u64, 4),
            ("expert_ffn: w1 [E, D, F]", weights, wsize),
            ("expert_ffn: w2 [E, F, D]", weights, wsize),
            ("expert_ffn: h [R, F]", rows * f as u64, 4),
            ("expert_ffn: y_expert [R, D]", rows * d as u64, 4),
        ];
        for (what, count, size) in sizes {
            if count > u32::MAX as u64 {
                return Err(Error::Limit {
                    what: format!("{what}: elements (u32 indices)"),
                    needed: count,
                    max: u32::MAX as u64,
                });
            }
            ctx.check_binding(format!("{what}: storage binding bytes"), size * count)?;
        }
        ctx.check_workgroups(
            "expert_ffn: row tiles (indirect x)",
            layout.max_tiles() as u64,
        )?;
        ctx.check_workgroups(
            "expert_ffn: column tiles of GEMM 1",
            f.div_ceil(spec.tile_n()) as u64,
        )?;
        ctx.check_workgroups(
            "expert_ffn: column tiles of GEMM 2",
            d.div_ceil(spec.tile_n()) as u64,
        )?;
        spec.core.check(ctx)
    }
}

/// The tensors of the expert FFN (R = `RoutingLayout::max_rows()` for the
/// spec's `tile_m`).
pub struct ExpertBuffers<'a> {
    /// x [T, D]
    pub x: &'a Tensor<f32>,
    /// token_of_slot [R]
    pub token_of_slot: &'a Tensor<u32>,
    /// routing [RoutingLayout::len()], with `INDIRECT` usage
    pub routing: &'a Tensor<u32>,
    /// w1 [Ec, D, F] (f32, or f16 as w3 and w2 are): experts
    /// `e0 .. e0 + Ec` (all E of them, or one part of a split bank)
    pub w1: WeightRef<'a>,
    /// w3 [Ec, D, F], SwiGLU only
    pub w3: Option<WeightRef<'a>>,
    /// w2 [Ec, F, D]
    pub w2: WeightRef<'a>,
    /// The first expert the weights hold.
    pub e0: usize,
    /// h [R, F]
    pub h: &'a Tensor<f32>,
    /// y_expert [R, D]
    pub y_expert: &'a Tensor<f32>,
    /// u [R, F]: when given (training), GEMM 1 also keeps its
    /// pre-activation `x · W1` here for the backward.
    pub u: Option<&'a Tensor<f32>>,
    /// u3 [R, F]: with `u` under SwiGLU, the second product `x · W3`.
    pub u3: Option<&'a Tensor<f32>>,
}

/// The expert FFN of one shape on fixed tensors, ready to record.
pub struct ExpertFfn {
    pub shape: ExpertShape,
    pub spec: ExpertSpec,
    gemm1: Dispatch,
    gemm2: Dispatch,
    _params: wgpu::Buffer,
}

impl ExpertFfn {
    /// `spec` is usually `ExpertSpec::choose(ctx, shape)`; its stage is
    /// ignored (GEMM 1 follows `shape.act`).
    pub fn new(
        ctx: &GpuContext,
        shape: &ExpertShape,
        spec: ExpertSpec,
        bufs: ExpertBuffers<'_>,
    ) -> Result<Self> {
        let spec = match (bufs.u, bufs.u3, shape.act) {
            (Some(_), None, Activation::Gelu) => spec.with_stage(ExpertStage::Gemm1GeluTrain),
            (Some(_), Some(_), Activation::SwiGlu) => {
                spec.with_stage(ExpertStage::Gemm1SwiGluTrain)
            }
            (None, None, act) => spec.with_stage(ExpertStage::gemm1(act)),
            _ => {
                return Err(Error::invalid(
                    "expert_ffn",
                    "training keeps u (GELU) or u and u3 (SwiGLU); u3 without u, or with GELU, is not a plan",
                ))
            }
        };
        if bufs.w2.dtype != bufs.w1.dtype || bufs.w3.is_some_and(|w3| w3.dtype != bufs.w1.dtype) {
            return Err(Error::invalid(
                "expert_ffn",
                "w1, w3 and w2 must share one storage (f32, f16, q8 or q4)",
            ));
        }
        let quant = bufs.w1.dtype.quant();
        if quant.is_some() && (bufs.u.is_some() || bufs.u3.is_some()) {
            return Err(Error::invalid(
                "expert_ffn",
                "training reads f32 weights, not block-quantized ones",
            ));
        }
        let spec = ExpertSpec {
            core: spec.core.with_b16(bufs.w1.f16()),
            quant,
            ..spec
        };
        let ec = bufs.w1.shape.first().copied().unwrap_or(0);
        if ec == 0 || bufs.e0 + ec > shape.e {
            return Err(Error::invalid(
                "expert_ffn",
                format!(
                    "weights of experts {}..{} of E = {}",
                    bufs.e0,
                    bufs.e0 + ec,
                    shape.e
                ),
            ));
        }
        shape.check_limits(ctx, &spec, ec)?;
        for (name, kept) in [("u", bufs.u), ("u3", bufs.u3)] {
            if let Some(t) = kept {
                t.expect_shape(
                    "expert_ffn",
                    name,
                    &[shape.layout(&spec).max_rows(), shape.f],
                )?;
            }
        }
        let (t, e, d, f) = (shape.t, shape.e, shape.d, shape.f);
        let layout = shape.layout(&spec);
        let rows = layout.max_rows();
        bufs.w1.expect_shape("expert_ffn", "w1", &[ec, d, f])?;
        bufs.w2.expect_shape("expert_ffn", "w2", &[ec, f, d])?;
        let want: [(&str, &Tensor<f32>, Vec<usize>); 3] = [
            ("x", bufs.x, vec![t, d]),
            ("h", bufs.h, vec![rows, f]),
            ("y_expert", bufs.y_expert, vec![rows, d]),
        ];
        for (name, tensor, dims) in &want {
            tensor.expect_shape("expert_ffn", name, dims)?;
        }
        bufs.token_of_slot
            .expect_shape("expert_ffn", "token_of_slot", &[rows])?;
        bufs.routing
            .expect_shape("expert_ffn", "routing", &[layout.len()])?;
        if !bufs
            .routing
            .buffer
            .usage()
            .contains(wgpu::BufferUsages::INDIRECT)
        {
            return Err(Error::invalid(
                "expert_ffn",
                "the routing buffer needs INDIRECT usage (see kernels::route::routing_tensor)",
            ));
        }
        match (shape.act, bufs.w3) {
            (Activation::SwiGlu, Some(w3)) => w3.expect_shape("expert_ffn", "w3", &[ec, d, f])?,
            (Activation::SwiGlu, None) => {
                return Err(Error::invalid("expert_ffn", "SwiGLU needs w3 [E, D, F]"))
            }
            (Activation::Gelu, Some(_)) => {
                return Err(Error::invalid("expert_ffn", "GELU takes no w3"))
            }
            (Activation::Gelu, None) => {}
        }

        let params = ExpertParams {
            t: t as u32,
            e: e as u32,
            d: d as u32,
            f: f as u32,
            rows: rows as u32,
            tile_expert: layout.tile_expert() as u32,
            max_tiles: layout.max_tiles() as u32,
            e0: bufs.e0 as u32,
            ec: ec as u32,
            _pad0: 0,
            _pad1: 0,
            _pad2: 0,
        };
        let params_buf = uniform(ctx, &params);
        let gemm1 = ctx.pipeline(&Kernel::Expert(spec))?;
        let gemm2 = ctx.pipeline(&Kernel::Expert(spec.with_stage(ExpertStage::Gemm2)))?;
        let routing = &bufs.routing.buffer;
        let indirect = |word: usize| Grid::Indirect {
            buffer: routing.clone(),
            offset: (word * 4) as u64,
        };
        let (x, tos, w1, h) = (
            &bufs.x.buffer,
            &bufs.token_of_slot.buffer,
            bufs.w1.buffer,
            &bufs.h.buffer,
        );
        let gemm1 = match (bufs.w3, bufs.u) {
            (Some(w3), Some(u)) => {
                let u3 = bufs
                    .u3
                    .ok_or_else(|| Error::invalid("expert_ffn", "SwiGLU training needs u3"))?;
                Dispatch::new(
                    ctx,
                    gemm1,
                    &[
                        &params_buf,
                        x,
                        tos,
                        routing,
                        w1,
                        w3.buffer,
                        h,
                        &u.buffer,
                        &u3.buffer,
                    ],
                    indirect(RoutingLayout::ARGS1),
                )?
            }
            (None, Some(u)) => Dispatch::new(
                ctx,
                gemm1,
                &[&params_buf, x, tos, routing, w1, h, &u.buffer],
                indirect(RoutingLayout::ARGS1),
            )?,
            (Some(w3), None) => Dispatch::new(
                ctx,
                gemm1,
                &[&params_buf, x, tos, routing, w1, w3.buffer, h],
                indirect(RoutingLayout::ARGS1),
            )?,
            (None, None) => Dispatch::new(
                ctx,
                gemm1,
                &[&params_buf, x, tos, routing, w1, h],
                indirect(RoutingLayout::ARGS1),
            )?,
        };
        let gemm2 = Dispatch::new(
            ctx,
            gemm2,
            &[
                &params_buf,
                h,
                routing,
                bufs.w2.buffer,
                &bufs.y_expert.buffer,
            ],
            indirect(RoutingLayout::ARGS2),
        )?;
        Ok(ExpertFfn {
            shape: *shape,
            spec,
            gemm1,
            gemm2,
            _params: params_buf,
        })
    }

    /// Column tiles of GEMM 1 (over F): what the routing kernel writes at `ARGS1 + 1`.
    pub fn grid_y1(&self) -> u32 {
        self.shape.f.div_ceil(self.spec.tile_n()) as u32
    }

    /// Column tiles of GEMM 2 (over D): what the routing kernel writes at `ARGS2 + 1`.
    pub fn grid_y2(&self) -> u32 {
        self.shape.d.div_ceil(self.spec.tile_n()) as u32
    }

    /// Row tile (the routing layout's `tile_m`).
    pub fn tile_m(&self) -> usize {
        self.spec.tile_m()
    }

    /// Record GEMM 1 and GEMM 2, both dispatched from the routing buffer.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.gemm1.record(pass);
        self.gemm2.record(pass);
    }

    /// Whether the core shares rows through subgroups (for reports).
    pub fn variant(&self) -> MatmulVariant {
        self.spec.core.variant
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_modules_declare_only_their_bindings() {
        for spec in ExpertSpec::all() {
            let def = spec.def();
            let bindings = def.source.matches("@binding(").count();
            assert_eq!(bindings, def.bindings.len(), "{}", def.name);
            assert!(def.source.contains(&format!("fn {}(", spec.name())));
            assert_eq!(
                def.source.contains("w3"),
                matches!(
                    spec.stage,
                    ExpertStage::Gemm1SwiGlu | ExpertStage::Gemm1SwiGluTrain
                )
            );
        }
    }

    #[test]
    fn tiles_follow_the_core() {
        let s = ExpertSpec {
            stage: ExpertStage::Gemm2,
            core: MatmulSpec::SUBGROUP_SQUARE,
            quant: None,
        };
        assert_eq!(s.tile_m(), 96);
        assert_eq!(tile_m(&s), 96);
        assert_eq!(ExpertSpec::SUBGROUP_32.tile_rows(), 32);
    }
}
