//! Dense matmul launcher: `C[M, N] = alpha * op(A) · op(B) + beta * C`, f32,
//! row-major, with the three transposes the backward pass needs (`Trans`),
//! any M, N, K. One WGSL entry point, `matmul` (`shaders/matmul.wgsl`); the
//! transpose is a pair of strides in the params. Twin:
//! `reference::matmul::matmul` (same arguments, same order).
//!
//! Three kinds of specialization (`MatmulVariant`), chosen per adapter by
//! `MatmulSpec::choose`:
//! - `Blocked`: no workgroup memory; each invocation owns a block of up to
//!   32 x 16 outputs. For CPU adapters without subgroups (llvmpipe via GL).
//! - `Subgroup`: the same, with the A rows of a block loaded once per
//!   subgroup of 8 and shared by `subgroupBroadcast` (up to 128 x 16 outputs
//!   per invocation). For CPU adapters with 8-wide subgroups (lavapipe).
//! - `Tiled`: 64 x 64 workgroup-memory tiles, 4 x 4 outputs per invocation,
//!   for GPUs, where shared memory is fast and registers are few.
//!
//! The GEMM core of `shaders/matmul.wgsl` is shared with the expert kernels
//! (`kernels::expert`), which supply their own loaders and epilogue.

use std::fmt;

use super::{grid_1d, Kernel, ParamsLayout};
use crate::error::{Error, Result};
use crate::gpu::{
    uniform, Binding, Dispatch, Dtype, GpuContext, Grid, KernelDef, Tensor, WeightRef,
};
use crate::gpu_params;

const MATMUL_WGSL: &str = include_str!("../../shaders/matmul.wgsl");

/// Which operands are given transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Trans {
    /// A [M, K], B [K, N].
    NN,
    /// A [M, K], B given as [N, K]: `A · Bᵀ`.
    NT,
    /// A given as [K, M], B [K, N]: `Aᵀ · B`.
    TN,
}

impl Trans {
    pub const ALL: [Trans; 3] = [Trans::NN, Trans::NT, Trans::TN];

    pub fn name(self) -> &'static str {
        match self {
            Trans::NN => "nn",
            Trans::NT => "nt",
            Trans::TN => "tn",
        }
    }

    /// Shape of the A tensor for an (M, K) problem.
    pub fn a_shape(self, m: usize, k: usize) -> [usize; 2] {
        match self {
            Trans::TN => [k, m],
            _ => [m, k],
        }
    }

    /// Shape of the B tensor for a (K, N) problem.
    pub fn b_shape(self, k: usize, n: usize) -> [usize; 2] {
        match self {
            Trans::NT => [n, k],
            _ => [k, n],
        }
    }

    /// Element strides `(a_sm, a_sk, b_sk, b_sn)`: `A(m, k) = a[m * a_sm + k * a_sk]`,
    /// `B(k, n) = b[k * b_sk + n * b_sn]`.
    pub fn strides(self, m: usize, n: usize, k: usize) -> (usize, usize, usize, usize) {
        match self {
            Trans::NN => (k, 1, n, 1),
            Trans::NT => (k, 1, 1, k),
            Trans::TN => (1, m, n, 1),
        }
    }
}

impl fmt::Display for Trans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the GEMM core shares operands between invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulVariant {
    /// Registers only; each invocation loads all it uses.
    Blocked,
    /// Registers, A rows shared through `subgroupBroadcast` (subgroup size 8).
    Subgroup,
    /// Workgroup-memory tiles (64 x 64, K steps of 16).
    Tiled,
}

impl MatmulVariant {
    pub fn name(self) -> &'static str {
        match self {
            MatmulVariant::Blocked => "blocked",
            MatmulVariant::Subgroup => "subgroup",
            MatmulVariant::Tiled => "tiled",
        }
    }

    /// Rows per row group of one invocation (the subgroup shares 8 rows).
    pub fn rows_per_group(self) -> u32 {
        match self {
            MatmulVariant::Subgroup => SUBGROUP_SIZE,
            _ => 1,
        }
    }
}

/// The subgroup size the subgroup variant is written for.
pub const SUBGROUP_SIZE: u32 = 8;
/// Most row groups per invocation the GEMM core unrolls.
pub const MAX_GROUPS: u32 = 32;
/// Most accumulator rows per invocation (`NG * RPG` in the shader).
pub const MAX_ROWS: u32 = 128;
/// Workgroup memory of the tiled core (A tile and two B tiles of 256 vec4).
pub const TILED_WORKGROUP_BYTES: u32 = 3 * 256 * 16;

/// A GEMM-core configuration: the pipeline-cache key of a matmul kernel.
/// The tile of one workgroup is `tile_rows() x tile_cols()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulSpec {
    pub variant: MatmulVariant,
    /// Workgroup size along x (invocations side by side along N).
    pub wx: u32,
    /// Workgroup size along y (invocations stacked along M).
    pub wy: u32,
    /// Row groups per invocation (rows = ng x `rows_per_group`), 1..=16.
    pub ng: u32,
    /// vec4 column chunks per invocation, 1..=4.
    pub cv: u32,
    /// The kernel reads C (beta != 0). `Matmul::new` sets it from the shape.
    pub beta: bool,
    /// How B is stored: f32, f16 (two to a word) or block-quantized (q8,
    /// q4: `quant`, dequantized in registers as B loads). `Matmul::new`
    /// sets it from B.
    pub b: Dtype,
}

impl MatmulSpec {
    /// Subgroup core, 96 x 96 outputs per subgroup: large M and N on lavapipe.
    pub const SUBGROUP_SQUARE: MatmulSpec = MatmulSpec::core(MatmulVariant::Subgroup, 8, 1, 12, 3);
    /// Subgroup core, 128 x 32: N <= 32 (the router GEMM, N = E).
    pub const SUBGROUP_NARROW: MatmulSpec = MatmulSpec::core(MatmulVariant::Subgroup, 8, 1, 16, 1);
    /// Subgroup core, 16 x 128: M <= 16 (a few tokens).
    pub const SUBGROUP_SHORT: MatmulSpec = MatmulSpec::core(MatmulVariant::Subgroup, 8, 1, 2, 4);
    /// Register-blocked core, 32 x 128 per workgroup of 8 (32 x 16 per invocation).
    pub const BLOCKED_SQUARE: MatmulSpec = MatmulSpec::core(MatmulVariant::Blocked, 8, 1, 32, 4);
    /// Register-blocked core, 256 x 16 per workgroup of 1 x 8 (32 x 16 per
    /// invocation, all of N): N <= 16.
    pub const BLOCKED_NARROW: MatmulSpec = MatmulSpec::core(MatmulVariant::Blocked, 1, 8, 32, 4);
    /// Register-blocked core, 1 x 128 per workgroup of 8: M <= 4 (mat-vec).
    pub const BLOCKED_SHORT: MatmulSpec = MatmulSpec::core(MatmulVariant::Blocked, 8, 1, 1, 4);
    /// Workgroup-memory tiles, 64 x 64 per workgroup of 16 x 16.
    pub const TILED: MatmulSpec = MatmulSpec::core(MatmulVariant::Tiled, 16, 16, 4, 1);

    const fn core(variant: MatmulVariant, wx: u32, wy: u32, ng: u32, cv: u32) -> Self {
        MatmulSpec {
            variant,
            wx,
            wy,
            ng,
            cv,
            beta: false,
            b: Dtype::F32,
        }
    }

    /// The configurations `choose` picks from (beta = false).
    pub fn configs() -> Vec<Self> {
        vec![
            Self::SUBGROUP_SQUARE,
            Self::SUBGROUP_NARROW,
            Self::SUBGROUP_SHORT,
            Self::BLOCKED_SQUARE,
            Self::BLOCKED_NARROW,
            Self::BLOCKED_SHORT,
            Self::TILED,
        ]
    }

    /// Kernel name (WGSL entry point, twin, conformance `kernel` field).
    pub fn name(&self) -> &'static str {
        "matmul"
    }

    /// This configuration with C read or not.
    pub fn with_beta(self, beta: bool) -> Self {
        MatmulSpec { beta, ..self }
    }

    /// This configuration with B stored as `b`.
    pub fn with_b(self, b: Dtype) -> Self {
        MatmulSpec { b, ..self }
    }

    /// This configuration with B stored as f16 or f32.
    pub fn with_b16(self, b16: bool) -> Self {
        self.with_b(if b16 { Dtype::F16 } else { Dtype::F32 })
    }

    /// Whether B is stored as f16.
    pub fn b16(&self) -> bool {
        self.b == Dtype::F16
    }

    pub fn tile_rows(&self) -> u32 {
        self.wy * self.ng * self.variant.rows_per_group()
    }

    pub fn tile_cols(&self) -> u32 {
        self.wx * 4 * self.cv
    }

    /// e.g. `subgroup 96x96` (the outputs of one workgroup), then ` beta`
    /// when C is read and B's storage unless f32 (` f16`, ` q8`, ` q4`).
    pub fn label(&self) -> String {
        format!(
            "{} {}x{}{}{}",
            self.variant.name(),
            self.tile_rows(),
            self.tile_cols(),
            if self.beta { " beta" } else { "" },
            match self.b {
                Dtype::F32 => String::new(),
                b => format!(" {b}"),
            }
        )
    }

    /// Check the configuration itself (core limits), then the adapter.
    pub fn check(&self, ctx: &GpuContext) -> Result<()> {
        self.check_core()?;
        self.check_adapter(ctx)
    }

    fn check_core(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("matmul", format!("spec {self:?}: {msg}")));
        let rows = self.ng * self.variant.rows_per_group();
        if !(1..=MAX_GROUPS).contains(&self.ng)
            || rows > MAX_ROWS
            || !(1..=4).contains(&self.cv)
            || self.wx == 0
            || self.wy == 0
        {
            return bad(format!(
                "ng must be in 1..={MAX_GROUPS} with at most {MAX_ROWS} rows per invocation, cv in 1..=4, wx and wy >= 1"
            ));
        }
        match self.variant {
            MatmulVariant::Subgroup if self.wx != SUBGROUP_SIZE => {
                bad(format!("the subgroup core needs wx = {SUBGROUP_SIZE}"))
            }
            MatmulVariant::Tiled if *self != Self::TILED.with_beta(self.beta).with_b(self.b) => {
                bad("the tiled core is fixed at wx = wy = 16, ng = 4, cv = 1".into())
            }
            _ => Ok(()),
        }
    }

    fn check_adapter(&self, ctx: &GpuContext) -> Result<()> {
        let invocations = self.wx * self.wy;
        let max = ctx.limits.max_compute_invocations_per_workgroup;
        if invocations > max
            || self.wx > ctx.limits.max_compute_workgroup_size_x
            || self.wy > ctx.limits.max_compute_workgroup_size_y
        {
            return Err(Error::Limit {
                what: format!("matmul {}: invocations per workgroup", self.label()),
                needed: invocations as u64,
                max: max as u64,
            });
        }
        if self.variant == MatmulVariant::Tiled
            && TILED_WORKGROUP_BYTES > ctx.limits.max_compute_workgroup_storage_size
        {
            return Err(Error::Limit {
                what: "matmul tiled: workgroup memory".into(),
                needed: TILED_WORKGROUP_BYTES as u64,
                max: ctx.limits.max_compute_workgroup_storage_size as u64,
            });
        }
        if self.variant == MatmulVariant::Subgroup && !subgroups_of_8(ctx) {
            return Err(Error::invalid(
                "matmul",
                format!(
                    "the subgroup variant needs SUBGROUP with a fixed subgroup size of {SUBGROUP_SIZE}; {} has {}",
                    ctx.adapter_label(),
                    if ctx.has_subgroups() {
                        format!("sizes {}..={}", ctx.info.subgroup_min_size, ctx.info.subgroup_max_size)
                    } else if ctx.info.backend == wgpu::Backend::BrowserWebGpu {
                        // The browser may offer them: wgpu 30's WebGPU backend
                        // has no entry for the `subgroups` feature in its
                        // feature map, so it never requests it.
                        "no subgroups through wgpu's WebGPU backend, which does not request the browser's `subgroups` feature".into()
                    } else {
                        "no subgroups".into()
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Whether this specialization can run on `ctx`.
    pub fn available(&self, ctx: &GpuContext) -> bool {
        self.check(ctx).is_ok()
    }

    /// Pick the specialization for an (M, N, K) problem on `ctx`.
    ///
    /// - CPU adapters (lavapipe, llvmpipe, SwiftShader): every storage load of
    ///   a lane-varying address runs a per-lane loop, so loads, not FMAs, set
    ///   the speed, and workgroup barriers are expensive. Register blocking
    ///   with the largest blocks wins; with 8-wide subgroups each A value is
    ///   loaded once per subgroup and broadcast (about 2x the blocked core).
    ///   Narrow N (the router GEMM: N = E <= 32) and short M (a few tokens)
    ///   get blocks of that shape, so lanes do not compute padding.
    /// - GPUs: classic 64 x 64 workgroup-memory tiles.
    pub fn choose(ctx: &GpuContext, m: usize, n: usize, k: usize, trans: Trans) -> MatmulSpec {
        Self::choose_for(ctx, m, n, k, trans, Dtype::F32)
    }

    /// [`MatmulSpec::choose`] for a B operand stored as `b`. For f16 and
    /// the block-quantized formats the register-blocked core is never
    /// taken, the tiled core is: on Chromium's SwiftShader (a CPU adapter
    /// without subgroups: the page's fallback) a blocked GEMM dispatch
    /// reading f16 or packed words never completes (tried: the page's
    /// conformance stalls at the first such case), while the tiled one
    /// does. lavapipe's subgroup cores and GPUs' tiles are as for f32. One
    /// rule on every adapter, so that native tests run the page's choice.
    pub fn choose_for(
        ctx: &GpuContext,
        m: usize,
        n: usize,
        k: usize,
        trans: Trans,
        b: Dtype,
    ) -> MatmulSpec {
        let pick = Self::choose_f32(ctx, m, n, k, trans);
        if b != Dtype::F32 && pick.variant == MatmulVariant::Blocked && Self::TILED.available(ctx) {
            Self::TILED.with_b(b)
        } else {
            pick.with_b(b)
        }
    }

    fn choose_f32(ctx: &GpuContext, m: usize, n: usize, k: usize, trans: Trans) -> MatmulSpec {
        let _ = (k, trans);
        let cpu = ctx.info.device_type == wgpu::DeviceType::Cpu;
        let pick = if !cpu {
            Self::TILED
        } else if subgroup_cores_pay(ctx) {
            if n <= 32 {
                Self::SUBGROUP_NARROW
            } else if m <= 16 {
                Self::SUBGROUP_SHORT
            } else {
                Self::SUBGROUP_SQUARE
            }
        } else if n <= 16 {
            Self::BLOCKED_NARROW
        } else if m <= 4 {
            Self::BLOCKED_SHORT
        } else {
            Self::BLOCKED_SQUARE
        };
        if pick.available(ctx) {
            pick
        } else {
            // A device below WebGPU's default limits: the smallest workgroup.
            Self::BLOCKED_SHORT
        }
    }

    pub fn def(&self) -> KernelDef {
        KernelDef::new(
            format!("{}[{}]", self.name(), self.label()),
            &[
                super::f16_source(self.b != Dtype::F32),
                if self.b.quant().is_some() {
                    super::QUANT_WGSL
                } else {
                    ""
                },
                &wgsl_select(MATMUL_WGSL, &self.flags()),
            ],
            "matmul",
            &[
                ("WX", self.wx),
                ("WY", self.wy),
                ("NG", self.ng),
                ("CV", self.cv),
                ("DUAL", 0),
                ("BETA", self.beta as u32),
            ],
            &[
                Binding::Uniform,
                Binding::Read,      // a [M, K] or [K, M]
                Binding::Read,      // b [K, N] or [N, K]
                Binding::ReadWrite, // c [M, N]
            ],
        )
    }

    /// The `//#if` flags of `shaders/matmul.wgsl` this variant keeps (the
    /// GEMM core's, then `b16` for the loaders of f16 weights, `packed`
    /// (and `q8`) for block-quantized ones).
    pub(crate) fn flags(&self) -> Vec<&'static str> {
        let mut f = match self.variant {
            MatmulVariant::Blocked => vec![],
            MatmulVariant::Subgroup => vec!["subgroup"],
            MatmulVariant::Tiled => vec!["tiled"],
        };
        match self.b {
            Dtype::F32 => {}
            Dtype::F16 => f.push("b16"),
            Dtype::Q8 => f.extend(["packed", "q8"]),
            Dtype::Q4 => f.push("packed"),
        }
        f
    }

    /// Every specialization (each configuration with and without beta,
    /// with B in each storage).
    pub fn all() -> Vec<Self> {
        Self::configs()
            .into_iter()
            .flat_map(|s| [s, s.with_beta(true)])
            .flat_map(|s| [Dtype::F32, Dtype::F16, Dtype::Q8, Dtype::Q4].map(|b| s.with_b(b)))
            .collect()
    }
}

/// Whether `ctx` has subgroups of exactly 8 invocations.
pub fn subgroups_of_8(ctx: &GpuContext) -> bool {
    ctx.has_subgroups()
        && ctx.info.subgroup_min_size == SUBGROUP_SIZE
        && ctx.info.subgroup_max_size == SUBGROUP_SIZE
}

/// Whether the matmul and expert GEMMs take the subgroup cores: where
/// subgroups of 8 exist (lavapipe) and the device is set for a long run
/// (`GpuContext::set_long_running`: training, `bench kernels`). Those cores
/// run about 15% faster training steps and 20-30% faster prefills on
/// lavapipe, but its driver takes 1-4 s to compile each (the
/// register-blocked cores: 0.1-0.3 s): the demo's first token took 14 s
/// with them, 1.4 s without. A first token, an evaluation or a test is not
/// long enough to win that back.
pub fn subgroup_cores_pay(ctx: &GpuContext) -> bool {
    subgroups_of_8(ctx) && ctx.long_running()
}

/// Keep the sections of a WGSL file that `flags` select: lines between
/// `//#if NAME` and `//#else` (or `//#endif`) stay when NAME is in `flags`,
/// lines between `//#else` and `//#endif` stay when it is not. Sections may
/// nest. This is how modules without subgroups avoid mentioning them (naga
/// validates a whole module against the device's capabilities).
pub(crate) fn wgsl_select(src: &str, flags: &[&str]) -> String {
    let mut out = String::with_capacity(src.len());
    let mut keep: Vec<bool> = Vec::new();
    for line in src.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("//#if ") {
            keep.push(flags.contains(&name.trim()));
            continue;
        }
        if t.starts_with("//#else") {
            if let Some(k) = keep.last_mut() {
                *k = !*k;
            }
            continue;
        }
        if t.starts_with("//#endif") {
            keep.pop();
            continue;
        }
        if keep.iter().all(|&k| k) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The GEMM core of `shaders/matmul.wgsl` (between `//#begin core` and
/// `//#end core`), for kernels that bring their own loaders and epilogue.
pub(crate) fn gemm_core() -> &'static str {
    // The markers stand alone on their lines (the header comment quotes them).
    let start = MATMUL_WGSL.find("\n//#begin core\n").unwrap_or(0);
    let end = MATMUL_WGSL
        .find("\n//#end core\n")
        .unwrap_or(MATMUL_WGSL.len());
    &MATMUL_WGSL[start..end.max(start)]
}

gpu_params! {
    /// Mirrors `struct MatmulParams` in `shaders/matmul.wgsl`.
    pub struct MatmulParams {
        pub m: u32,
        pub n: u32,
        pub k: u32,
        pub grid_x: u32,
        pub alpha: f32,
        pub beta: f32,
        pub a_sm: u32,
        pub a_sk: u32,
        pub b_sk: u32,
        pub b_sn: u32,
        pub ldc: u32,
        pub c0: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<MatmulParams>(Kernel::Matmul(
        MatmulSpec::BLOCKED_SQUARE,
    ))]
}

/// One matmul problem: `C[M, N] = alpha * op(A) · op(B) + beta * C`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans: Trans,
    pub alpha: f32,
    pub beta: f32,
}

impl MatmulShape {
    /// `C = A · B` (NN, alpha 1, beta 0).
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        MatmulShape {
            m,
            n,
            k,
            trans: Trans::NN,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// Check tensor shapes (CPU only). Indices are u32 on the GPU.
    pub fn check(&self, a: &[usize], b: &[usize], c: &[usize]) -> Result<()> {
        let (m, n, k, t) = (self.m, self.n, self.k, self.trans);
        let want = [
            ("a", a, t.a_shape(m, k)),
            ("b", b, t.b_shape(k, n)),
            ("c", c, [m, n]),
        ];
        for (name, got, want) in want {
            if got != want {
                return Err(Error::shape(
                    "matmul",
                    format!("{t} with M={m} N={n} K={k}: {name} {want:?}"),
                    format!("{name} {got:?}"),
                ));
            }
        }
        for (name, count) in [
            ("a", m as u64 * k as u64),
            ("b", k as u64 * n as u64),
            ("c", m as u64 * n as u64),
        ] {
            if count > u32::MAX as u64 {
                return Err(Error::Limit {
                    what: format!("matmul: elements of {name}"),
                    needed: count,
                    max: u32::MAX as u64,
                });
            }
        }
        if !self.alpha.is_finite() || !self.beta.is_finite() {
            return Err(Error::invalid(
                "matmul",
                format!(
                    "alpha = {}, beta = {}: both must be finite",
                    self.alpha, self.beta
                ),
            ));
        }
        Ok(())
    }

    pub fn params(&self, grid_x: u32) -> MatmulParams {
        let (a_sm, a_sk, b_sk, b_sn) = self.trans.strides(self.m, self.n, self.k);
        MatmulParams {
            m: self.m as u32,
            n: self.n as u32,
            k: self.k as u32,
            grid_x,
            alpha: self.alpha,
            beta: self.beta,
            a_sm: a_sm as u32,
            a_sk: a_sk as u32,
            b_sk: b_sk as u32,
            b_sn: b_sn as u32,
            ldc: self.n as u32,
            c0: 0,
        }
    }
}

/// A matmul of one shape on fixed tensors, ready to record: pipeline, params
/// and bind group are built once.
pub struct Matmul {
    pub shape: MatmulShape,
    pub spec: MatmulSpec,
    /// None when M or N is 0 (nothing to do).
    dispatch: Option<Dispatch>,
    _params: wgpu::Buffer,
}

impl Matmul {
    /// `a`, `b`, `c` must have the shapes `shape.trans` implies; `b` is
    /// an f32 tensor or a weight in any storage. `spec` (usually from
    /// `MatmulSpec::choose`) gets its `beta` flag from the shape and its
    /// B storage from `b`.
    pub fn new<'b>(
        ctx: &GpuContext,
        shape: &MatmulShape,
        spec: MatmulSpec,
        a: &Tensor<f32>,
        b: impl Into<WeightRef<'b>>,
        c: &Tensor<f32>,
    ) -> Result<Self> {
        Self::new_cols(ctx, shape, spec, a, b, c, 0)
    }

    /// As `new`, writing C into columns `col .. col + N` of `c [M, L]`
    /// (the unembedding of one part of a split vocabulary: its logits go
    /// to their columns of the full row).
    pub fn new_cols<'b>(
        ctx: &GpuContext,
        shape: &MatmulShape,
        spec: MatmulSpec,
        a: &Tensor<f32>,
        b: impl Into<WeightRef<'b>>,
        c: &Tensor<f32>,
        col: usize,
    ) -> Result<Self> {
        let b = b.into();
        let ldc = match c.shape.as_slice() {
            &[m, l] if m == shape.m && col + shape.n <= l => l,
            _ => {
                return Err(Error::shape(
                    "matmul",
                    format!("c [{}, >= {}]", shape.m, col + shape.n),
                    format!("c {:?}", c.shape),
                ))
            }
        };
        shape.check(&a.shape, b.shape, &[shape.m, shape.n])?;
        if shape.m as u64 * ldc as u64 > u32::MAX as u64 {
            return Err(Error::Limit {
                what: "matmul: elements of c".into(),
                needed: shape.m as u64 * ldc as u64,
                max: u32::MAX as u64,
            });
        }
        let spec = spec.with_beta(shape.beta != 0.0).with_b(b.dtype);
        spec.check(ctx)?;
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        let tiles_m = shape.m.div_ceil(spec.tile_rows() as usize) as u64;
        let tiles_n = shape.n.div_ceil(spec.tile_cols() as usize) as u64;
        ctx.check_workgroups(format!("matmul {}: column tiles", spec.label()), tiles_n)?;
        if tiles_m > u32::MAX as u64 {
            return Err(Error::Limit {
                what: "matmul: row tiles".into(),
                needed: tiles_m,
                max: u32::MAX as u64,
            });
        }
        // Row tiles past the per-dimension limit fold into z.
        let (gx, gz) = grid_1d(tiles_m as u32, max);
        ctx.check_workgroups(
            format!("matmul {}: row tiles (folded)", spec.label()),
            gz as u64,
        )?;
        let pipeline = ctx.pipeline(&Kernel::Matmul(spec))?;
        let params = uniform(
            ctx,
            &MatmulParams {
                ldc: ldc as u32,
                c0: col as u32,
                ..shape.params(gx)
            },
        );
        let dispatch = Dispatch::new(
            ctx,
            pipeline,
            &[&params, &a.buffer, b.buffer, &c.buffer],
            Grid::Direct(gx, tiles_n as u32, gz),
        )?;
        Ok(Matmul {
            shape: *shape,
            spec,
            dispatch: (shape.m > 0 && shape.n > 0).then_some(dispatch),
            _params: params,
        })
    }

    /// Record the matmul: one dispatch (none when M or N is 0).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        if let Some(d) = &self.dispatch {
            d.record(pass);
        }
    }
}

/// One-shot matmul for tests and tools: upload, run, read back `C [M, N]`.
/// `c` is the initial C (needed when beta != 0; zeros when None).
pub async fn matmul(
    ctx: &GpuContext,
    shape: &MatmulShape,
    spec: MatmulSpec,
    a: &[f32],
    b: &[f32],
    c: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let (m, n, k, t) = (shape.m, shape.n, shape.k, shape.trans);
    let a = Tensor::from_slice(ctx, "a", &t.a_shape(m, k), a)?;
    let b = Tensor::from_slice(ctx, "b", &t.b_shape(k, n), b)?;
    let c = match c {
        Some(c) => Tensor::from_slice(ctx, "c", &[m, n], c)?,
        None => Tensor::zeros(ctx, "c", &[m, n])?,
    };
    let mm = Matmul::new(ctx, shape, spec, &a, &b, &c)?;
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("matmul"),
        });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("matmul"),
            timestamp_writes: None,
        });
        mm.record(&mut pass);
    }
    ctx.submit_and_wait(encoder)?;
    c.read(ctx).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_follow_flags() {
        let src = "a\n//#if subgroup\nb\n//#else\nc\n//#endif\nd\n";
        assert_eq!(wgsl_select(src, &["subgroup"]), "a\nb\nd\n");
        assert_eq!(wgsl_select(src, &[]), "a\nc\nd\n");
        let nested = "//#if x\n//#if y\n1\n//#else\n2\n//#endif\n//#endif\n3\n";
        assert_eq!(wgsl_select(nested, &["x"]), "2\n3\n");
        assert_eq!(wgsl_select(nested, &["y"]), "3\n");
    }

    #[test]
    fn modules_without_subgroups_never_mention_them() {
        for spec in MatmulSpec::all() {
            let src = spec.def().source;
            let mentions = src.contains("subgroupBroadcast(");
            assert_eq!(
                mentions,
                spec.variant == MatmulVariant::Subgroup,
                "{spec:?}"
            );
            assert_eq!(
                src.contains("workgroupBarrier("),
                spec.variant == MatmulVariant::Tiled
            );
        }
    }

    #[test]
    fn configs_are_valid_and_tiles_add_up() {
        for spec in MatmulSpec::all() {
            spec.check_core().unwrap();
        }
        assert_eq!(MatmulSpec::SUBGROUP_SQUARE.tile_rows(), 96);
        assert_eq!(MatmulSpec::SUBGROUP_SQUARE.tile_cols(), 96);
        assert_eq!(MatmulSpec::TILED.tile_rows(), 64);
        assert_eq!(MatmulSpec::TILED.tile_cols(), 64);
        for bad in [
            MatmulSpec {
                ng: 33,
                ..MatmulSpec::BLOCKED_SQUARE
            },
            // 17 groups of 8 rows: past the 128 accumulator rows.
            MatmulSpec {
                ng: 17,
                ..MatmulSpec::SUBGROUP_SQUARE
            },
            MatmulSpec {
                cv: 5,
                ..MatmulSpec::BLOCKED_SQUARE
            },
        ] {
            assert!(bad.check_core().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shape_errors_name_the_operand() {
        let s = MatmulShape {
            trans: Trans::TN,
            ..MatmulShape::nn(3, 4, 5)
        };
        s.check(&[5, 3], &[5, 4], &[3, 4]).unwrap();
        let e = s.check(&[3, 5], &[5, 4], &[3, 4]).unwrap_err().to_string();
        assert!(e.contains("a [5, 3]") && e.contains("a [3, 5]"), "{e}");
        let nt = MatmulShape {
            trans: Trans::NT,
            ..s
        };
        assert!(nt.check(&[3, 5], &[4, 5], &[3, 4]).is_ok());
        assert!(nt.check(&[3, 5], &[4, 5], &[4, 3]).is_err());
    }

    #[test]
    fn core_is_extracted() {
        let core = gemm_core();
        assert!(core.contains("fn gemm_row(") && core.contains("fn gemm_run("));
        assert!(!core.contains("MatmulParams"));
    }
}
