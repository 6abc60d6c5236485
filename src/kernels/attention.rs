//! Attention launchers: causal multi-head self-attention for training
//! (`shaders/attention.wgsl`), flash-attention style (online softmax over
//! staged key tiles; no N x N matrix), so N up to thousands fits the WebGPU
//! default limits (<= 256 invocations, <= 16 KiB workgroup memory).
//!
//! - [`AttentionForward`]: `qkv [T, 3D]` -> `o [T, D]`, `lse [B, H, N]`; one
//!   dispatch (`attention_forward`).
//! - [`AttentionBackward`]: `qkv`, `o`, `do [T, D]`, `lse` -> `dqkv [T, 3D]`;
//!   two dispatches: `attention_backward_dq` (also writes the preprocess
//!   `delta = rowsum(do * o)` into a scratch buffer it owns) then
//!   `attention_backward_dkv`. Deterministic, no atomics.
//!
//! T = B*N rows (token t = b*N + n), D = H*Dh; head h uses columns
//! h*Dh .. (h+1)*Dh of q, k, v (the thirds of qkv) and of o.
//! Twins: `reference::attention::{attention_forward, attention_backward}`.

use super::matmul::wgsl_select;
use super::{grid_1d, Kernel, ParamsLayout};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

/// Invocations per workgroup.
pub const ATTENTION_WG: u32 = 32;

/// Rows (queries, or keys for dK/dV) per invocation: each staged vec4 feeds
/// this many FMAs, which is what counts on CPU adapters.
pub const ATTENTION_RQ: u32 = 4;

/// Rows per workgroup.
pub const ATTENTION_ROWS: u32 = ATTENTION_WG * ATTENTION_RQ;

/// Head widths with a compiled specialization (a row lives in Dh / 4
/// registers, its code unrolled at compile time; each width costs three
/// pipelines whose driver compilation takes seconds on CPU adapters).
pub const ATTENTION_DH: [u32; 3] = [16, 32, 64];

/// Workgroup memory every pass stays within (the WebGPU default limit).
const WG_MEMORY: u32 = 16384;

const ATTENTION_WGSL: &str = include_str!("../../shaders/attention.wgsl");

/// The passes of the attention family, one WGSL entry point each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionPass {
    Forward,
    BackwardDq,
    BackwardDkv,
}

impl AttentionPass {
    pub const ALL: [AttentionPass; 3] = [
        AttentionPass::Forward,
        AttentionPass::BackwardDq,
        AttentionPass::BackwardDkv,
    ];

    fn flag(self) -> &'static str {
        match self {
            AttentionPass::Forward => "forward",
            AttentionPass::BackwardDq => "dq",
            AttentionPass::BackwardDkv => "dkv",
        }
    }
}

/// One attention pass for one head width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionSpec {
    pub pass: AttentionPass,
    /// Head width Dh, one of [`ATTENTION_DH`].
    pub dh: u32,
}

impl AttentionSpec {
    /// Kernel name (WGSL entry point).
    pub fn name(&self) -> &'static str {
        match self.pass {
            AttentionPass::Forward => "attention_forward",
            AttentionPass::BackwardDq => "attention_backward_dq",
            AttentionPass::BackwardDkv => "attention_backward_dkv",
        }
    }

    /// Rows staged in workgroup memory per step: keys and values (query
    /// passes) or queries and output gradients plus two scalars per row
    /// (dK/dV), within 16 KiB.
    pub fn tile(&self) -> u32 {
        let per_row = match self.pass {
            AttentionPass::Forward | AttentionPass::BackwardDq => 2 * self.dh * 4,
            AttentionPass::BackwardDkv => (2 * self.dh + 2) * 4,
        };
        (WG_MEMORY / per_row).min(128)
    }

    pub fn def(&self) -> KernelDef {
        let bindings: &[Binding] = match self.pass {
            AttentionPass::Forward => &[
                Binding::Uniform,
                Binding::Read,      // qkv [T, 3D]
                Binding::ReadWrite, // o [T, D]
                Binding::ReadWrite, // lse [B, H, N]
            ],
            AttentionPass::BackwardDq => &[
                Binding::Uniform,
                Binding::Read,      // qkv [T, 3D]
                Binding::Read,      // o [T, D]
                Binding::Read,      // do [T, D]
                Binding::Read,      // lse [B, H, N]
                Binding::ReadWrite, // dqkv [T, 3D]
                Binding::ReadWrite, // delta [B, H, N]
            ],
            AttentionPass::BackwardDkv => &[
                Binding::Uniform,
                Binding::Read,      // qkv [T, 3D]
                Binding::Read,      // do [T, D]
                Binding::Read,      // lse [B, H, N]
                Binding::Read,      // delta [B, H, N]
                Binding::ReadWrite, // dqkv [T, 3D]
            ],
        };
        KernelDef::new(
            format!("{}_dh{}", self.name(), self.dh),
            &[&wgsl_select(ATTENTION_WGSL, &[self.pass.flag()])],
            self.name(),
            &[
                ("WG", ATTENTION_WG),
                ("RQ", ATTENTION_RQ),
                ("DH4", self.dh / 4),
                ("TILE", self.tile()),
            ],
            bindings,
        )
    }

    pub fn all() -> Vec<Self> {
        AttentionPass::ALL
            .into_iter()
            .flat_map(|pass| {
                ATTENTION_DH
                    .into_iter()
                    .map(move |dh| AttentionSpec { pass, dh })
            })
            .collect()
    }
}

gpu_params! {
    /// Mirrors `struct AttentionParams` in `shaders/attention.wgsl`.
    pub struct AttentionParams {
        pub b: u32,
        pub n: u32,
        pub h: u32,
        pub d: u32,
        pub blocks: u32,
        pub nx: u32,
        pub scale: f32,
        pub hkv: u32,
        pub qs4: u32,
        pub window: u32,
        pub _pad0: u32,
        pub _pad1: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<AttentionParams>(Kernel::Attention(
        AttentionSpec {
            pass: AttentionPass::Forward,
            dh: 32,
        },
    ))]
}

/// What the buffers alone cannot say: how the T rows split into sequences,
/// the heads, the window and the score scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Sequences B.
    pub b: usize,
    /// Tokens per sequence N (the context).
    pub n: usize,
    /// Query heads H.
    pub h: usize,
    /// Key/value heads Hkv (H a multiple of it).
    pub hkv: usize,
    /// Sliding window W (0: none).
    pub window: usize,
    /// Score scale; None: 1 / sqrt(Dh).
    pub scale: Option<f32>,
}

impl AttentionConfig {
    /// Multi-head attention (Hkv = H), no window, scale 1 / sqrt(Dh).
    pub fn mha(b: usize, n: usize, h: usize) -> Self {
        AttentionConfig {
            b,
            n,
            h,
            hkv: h,
            window: 0,
            scale: None,
        }
    }
}

/// The forward's tensors.
pub struct AttentionForwardBuffers<'a> {
    /// qkv [T, 3D]
    pub qkv: &'a Tensor<f32>,
    /// o [T, D] (written)
    pub o: &'a Tensor<f32>,
    /// lse [B, H, N] (written)
    pub lse: &'a Tensor<f32>,
}

/// The backward's tensors.
pub struct AttentionBackwardBuffers<'a> {
    /// qkv [T, (H + 2 Hkv) Dh]
    pub qkv: &'a Tensor<f32>,
    /// o [T, D] (the forward's output)
    pub o: &'a Tensor<f32>,
    /// do [T, D]: gradient of the loss with respect to o
    pub dout: &'a Tensor<f32>,
    /// lse [B, H, N] (the forward's)
    pub lse: &'a Tensor<f32>,
    /// dqkv [T, (H + 2 Hkv) Dh] (written, every element)
    pub dqkv: &'a Tensor<f32>,
}

/// Checked sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub hkv: usize,
    pub dh: usize,
    /// T = B*N
    pub t: usize,
    /// D = H*Dh (the output's columns)
    pub d: usize,
    /// Columns of qkv, (H + 2 Hkv) Dh.
    pub qs: usize,
    pub window: usize,
    pub scale: f32,
}

/// Whether the flash kernels take heads of width `dh` (a multiple of 4 up
/// to 64: a row lives in Dh / 4 registers).
pub fn supports_head_dim(dh: usize) -> bool {
    (4..=64).contains(&dh) && dh.is_multiple_of(4)
}

/// Check `cfg` against `qkv`'s shape; returns the sizes. CPU only.
pub fn check(cfg: AttentionConfig, qkv: &[usize]) -> Result<AttentionDims> {
    let AttentionConfig {
        b,
        n,
        h,
        hkv,
        window,
        scale,
    } = cfg;
    if b == 0 || n == 0 || h == 0 || hkv == 0 {
        return Err(Error::invalid(
            "attention",
            format!("B = {b}, N = {n}, H = {h}, Hkv = {hkv}: all must be >= 1"),
        ));
    }
    if !h.is_multiple_of(hkv) {
        return Err(Error::invalid(
            "attention",
            format!("H = {h} query heads are not a multiple of Hkv = {hkv}"),
        ));
    }
    let t = b * n;
    let heads = h + 2 * hkv;
    let &[tq, c] = qkv else {
        return Err(Error::shape(
            "attention",
            format!("qkv [{t}, (H + 2 Hkv) Dh]"),
            format!("qkv {qkv:?}"),
        ));
    };
    if tq != t || c == 0 || c % heads != 0 {
        return Err(Error::shape(
            "attention",
            format!("qkv [B*N = {t}, {heads} Dh]"),
            format!("qkv {qkv:?}"),
        ));
    }
    let dh = c / heads;
    let d = h * dh;
    if !supports_head_dim(dh) {
        return Err(Error::invalid(
            "attention",
            format!("head width Dh = {dh} unsupported: a multiple of 4 up to 64"),
        ));
    }
    let scale = scale.unwrap_or(1.0 / (dh as f32).sqrt());
    if !scale.is_finite() || scale <= 0.0 {
        return Err(Error::invalid("attention", format!("score scale {scale}")));
    }
    // u64: usize is 32 bits in the browser (wasm32).
    let largest = t as u64 * c as u64;
    if largest > u32::MAX as u64 {
        return Err(Error::Limit {
            what: "attention: elements of qkv".into(),
            needed: largest,
            max: u32::MAX as u64,
        });
    }
    Ok(AttentionDims {
        b,
        n,
        h,
        hkv,
        dh,
        t,
        d,
        qs: c,
        window,
        scale,
    })
}

fn expect(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::shape(
            "attention",
            format!("{name} {want:?}"),
            format!("{name} {got:?}"),
        ));
    }
    Ok(())
}

impl AttentionDims {
    /// The parameters and the grid of a pass over `heads` heads per
    /// sequence (H for the query passes, Hkv for dK/dV).
    fn params(
        &self,
        ctx: &GpuContext,
        what: &str,
        heads: usize,
    ) -> Result<(AttentionParams, Grid)> {
        let blocks = (self.n as u32).div_ceil(ATTENTION_ROWS);
        let groups = (self.b as u64) * (heads as u64) * blocks as u64;
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        if groups > u32::MAX as u64 {
            return Err(Error::Limit {
                what: format!("{what} workgroups"),
                needed: groups,
                max: u32::MAX as u64,
            });
        }
        let grid = grid_1d(groups as u32, max);
        ctx.check_workgroups(format!("{what} workgroups (folded)"), grid.1 as u64)?;
        let params = AttentionParams {
            b: self.b as u32,
            n: self.n as u32,
            h: self.h as u32,
            d: self.d as u32,
            blocks,
            nx: grid.0,
            scale: self.scale,
            hkv: self.hkv as u32,
            qs4: (self.qs / 4) as u32,
            window: self.window.min(u32::MAX as usize) as u32,
            _pad0: 0,
            _pad1: 0,
        };
        Ok((params, Grid::Direct(grid.0, grid.1, 1)))
    }

    fn spec(&self, pass: AttentionPass) -> AttentionSpec {
        AttentionSpec {
            pass,
            dh: self.dh as u32,
        }
    }
}

/// The attention forward of one shape, ready to record.
pub struct AttentionForward {
    pub dims: AttentionDims,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl AttentionForward {
    pub fn new(
        ctx: &GpuContext,
        cfg: AttentionConfig,
        bufs: &AttentionForwardBuffers<'_>,
    ) -> Result<Self> {
        let dims = check(cfg, &bufs.qkv.shape)?;
        expect("o", &bufs.o.shape, &[dims.t, dims.d])?;
        expect("lse", &bufs.lse.shape, &[dims.b, dims.h, dims.n])?;
        let (params, grid) = dims.params(ctx, "attention_forward", dims.h)?;
        let pipeline = ctx.pipeline(&Kernel::Attention(dims.spec(AttentionPass::Forward)))?;
        let params_buf = uniform(ctx, &params);
        let dispatch = Dispatch::new(
            ctx,
            pipeline,
            &[
                &params_buf,
                &bufs.qkv.buffer,
                &bufs.o.buffer,
                &bufs.lse.buffer,
            ],
            grid,
        )?;
        Ok(AttentionForward {
            dims,
            dispatch,
            _params: params_buf,
        })
    }

    /// Record the forward: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// The attention backward of one shape, ready to record. Owns the
/// `delta [B, H, N]` scratch passed from the dQ pass to the dK/dV pass.
pub struct AttentionBackward {
    pub dims: AttentionDims,
    dq: Dispatch,
    dkv: Dispatch,
    _delta: Tensor<f32>,
    /// The query passes' and the dK/dV pass's (grids of H and Hkv heads).
    _params: [wgpu::Buffer; 2],
}

impl AttentionBackward {
    pub fn new(
        ctx: &GpuContext,
        cfg: AttentionConfig,
        bufs: &AttentionBackwardBuffers<'_>,
    ) -> Result<Self> {
        let dims = check(cfg, &bufs.qkv.shape)?;
        expect("o", &bufs.o.shape, &[dims.t, dims.d])?;
        expect("do", &bufs.dout.shape, &[dims.t, dims.d])?;
        expect("lse", &bufs.lse.shape, &[dims.b, dims.h, dims.n])?;
        expect("dqkv", &bufs.dqkv.shape, &[dims.t, dims.qs])?;
        let (params, grid) = dims.params(ctx, "attention_backward", dims.h)?;
        // dK/dV: one workgroup per kv head, summing its query heads.
        let (kv_params, kv_grid) = dims.params(ctx, "attention_backward_dkv", dims.hkv)?;
        let kv_params_buf = uniform(ctx, &kv_params);
        let delta = Tensor::<f32>::zeros(ctx, "attention delta", &[dims.b, dims.h, dims.n])?;
        let params_buf = uniform(ctx, &params);
        let dq = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::Attention(dims.spec(AttentionPass::BackwardDq)))?,
            &[
                &params_buf,
                &bufs.qkv.buffer,
                &bufs.o.buffer,
                &bufs.dout.buffer,
                &bufs.lse.buffer,
                &bufs.dqkv.buffer,
                &delta.buffer,
            ],
            grid.clone(),
        )?;
        let dkv = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::Attention(dims.spec(AttentionPass::BackwardDkv)))?,
            &[
                &kv_params_buf,
                &bufs.qkv.buffer,
                &bufs.dout.buffer,
                &bufs.lse.buffer,
                &delta.buffer,
                &bufs.dqkv.buffer,
            ],
            kv_grid,
        )?;
        Ok(AttentionBackward {
            dims,
            dq,
            dkv,
            _delta: delta,
            _params: [params_buf, kv_params_buf],
        })
    }

    /// Record the backward: the dQ pass (with delta), then the dK/dV pass.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dq.record(pass);
        self.dkv.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(b: usize, n: usize, h: usize) -> AttentionConfig {
        AttentionConfig::mha(b, n, h)
    }

    #[test]
    fn rejects_bad_shapes_with_typed_errors() {
        let ok = check(cfg(2, 5, 2), &[10, 192]).unwrap();
        assert_eq!((ok.t, ok.d, ok.dh), (10, 64, 32));
        let invalid = |r: Result<AttentionDims>| matches!(r, Err(Error::InvalidArgument { .. }));
        let shape = |r: Result<AttentionDims>| matches!(r, Err(Error::Shape { .. }));
        assert!(invalid(check(cfg(0, 5, 2), &[0, 192])));
        assert!(shape(check(cfg(2, 5, 2), &[11, 192])));
        assert!(shape(check(cfg(2, 5, 2), &[10, 191])));
        assert!(shape(check(cfg(2, 5, 2), &[10, 3, 64])));
        // 144 columns are not (5 + 2 * 5) heads of one width.
        assert!(shape(check(cfg(2, 5, 5), &[10, 144])));
        // Dh = 24 is taken, Dh = 22 and Dh = 68 are not.
        assert_eq!(check(cfg(2, 5, 2), &[10, 144]).unwrap().dh, 24);
        assert!(invalid(check(cfg(2, 5, 2), &[10, 132])));
        assert!(invalid(check(cfg(2, 5, 2), &[10, 408])));
        // GQA: 4 query heads over 2 kv heads of 16: qkv [T, 128].
        let g = AttentionConfig {
            hkv: 2,
            ..cfg(2, 5, 4)
        };
        let ok = check(g, &[10, 128]).unwrap();
        assert_eq!((ok.dh, ok.d, ok.qs), (16, 64, 128));
        assert!(invalid(check(AttentionConfig { hkv: 3, ..g }, &[10, 160])));
    }

    #[test]
    fn tiles_fit_workgroup_memory() {
        for s in AttentionSpec::all() {
            let rows = s.tile();
            let bytes = match s.pass {
                AttentionPass::BackwardDkv => rows * (2 * s.dh + 2) * 4,
                _ => rows * 2 * s.dh * 4,
            };
            assert!(rows >= 16 && bytes <= WG_MEMORY, "{s:?}: {rows} rows");
        }
    }
}
