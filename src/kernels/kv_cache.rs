//! KV-cache launchers (`shaders/kv_cache.wgsl`) for generation: the token +
//! position embedding of tokens that start at a position read from the GPU
//! (`kv_embed`), appending a call's keys and values to a layer's cache
//! (`kv_append`) and causal attention of a call's queries over the cache
//! (`kv_attention`). Twin: `reference::kv_cache`.
//!
//! Where a call starts (`pos0`) lives in a small `step [4]` u32 tensor the
//! host writes before each submit ([`KvStep::set`]): the bind groups are
//! built once and serve every decode step. The host checks `pos0 + T <= N`
//! ([`KvStep::set`] refuses more); the shaders also ignore positions past N.

use super::{grid_1d, Kernel, ParamsLayout};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor, WeightRef};
use crate::gpu_params;

use super::matmul::wgsl_select;

/// Invocations per workgroup of the elementwise entry points.
pub const KV_WG: u32 = 64;
/// Invocations per workgroup of `kv_attention` (and the largest head width).
pub const KV_ATTN_WG: u32 = 64;

const KV_WGSL: &str = include_str!("../../shaders/kv_cache.wgsl");

/// The three KV-cache kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvSpec {
    Embed,
    /// `kv_embed` with wte stored as f16.
    EmbedF16,
    Append,
    Attention,
}

impl KvSpec {
    /// Kernel name (WGSL entry point, twin, conformance `kernel` field).
    pub fn name(&self) -> &'static str {
        match self {
            KvSpec::Embed | KvSpec::EmbedF16 => "kv_embed",
            KvSpec::Append => "kv_append",
            KvSpec::Attention => "kv_attention",
        }
    }

    fn flags(&self) -> &'static [&'static str] {
        match self {
            KvSpec::Embed => &["embed"],
            KvSpec::EmbedF16 => &["embed", "w16"],
            KvSpec::Append => &["append"],
            KvSpec::Attention => &["attend"],
        }
    }

    fn bindings(&self) -> Vec<Binding> {
        match self {
            KvSpec::Embed | KvSpec::EmbedF16 => vec![
                Binding::Uniform,
                Binding::Read,      // step [4]
                Binding::Read,      // ids [T]
                Binding::Read,      // wte [V, D]
                Binding::Read,      // wpe [N, D]
                Binding::ReadWrite, // x [T, D]
            ],
            KvSpec::Append => vec![
                Binding::Uniform,
                Binding::Read,      // step [4]
                Binding::Read,      // qkv [T, (H + 2 Hkv) Dh]
                Binding::ReadWrite, // k_cache [Hkv, N, Dh]
                Binding::ReadWrite, // v_cache [Hkv, N, Dh]
            ],
            KvSpec::Attention => vec![
                Binding::Uniform,
                Binding::Read,      // step [4]
                Binding::Read,      // qkv [T, (H + 2 Hkv) Dh]
                Binding::Read,      // k_cache [Hkv, N, Dh]
                Binding::Read,      // v_cache [Hkv, N, Dh]
                Binding::ReadWrite, // o [T, H Dh]
            ],
        }
    }

    pub fn def(&self) -> KernelDef {
        let src = wgsl_select(KV_WGSL, self.flags());
        let f16 = *self == KvSpec::EmbedF16;
        KernelDef::new(
            format!("{}{}", self.name(), if f16 { "_f16" } else { "" }),
            &[super::f16_source(f16), &src],
            self.name(),
            &[("WG", KV_WG), ("KV_WG", KV_ATTN_WG)],
            &self.bindings(),
        )
    }

    pub fn all() -> Vec<Self> {
        vec![
            KvSpec::Embed,
            KvSpec::EmbedF16,
            KvSpec::Append,
            KvSpec::Attention,
        ]
    }
}

gpu_params! {
    /// Mirrors `struct KvParams` in `shaders/kv_cache.wgsl`.
    pub struct KvParams {
        pub t: u32,
        pub d: u32,
        pub h: u32,
        pub dh: u32,
        pub n: u32,
        pub v: u32,
        pub nx: u32,
        pub scale: f32,
        pub hkv: u32,
        pub window: u32,
        pub emb_scale: f32,
        pub has_wpe: u32,
        pub v0: u32,
        pub vc: u32,
        pub _pad0: u32,
        pub _pad1: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    KvSpec::all()
        .into_iter()
        .map(|s| ParamsLayout::of::<KvParams>(Kernel::KvCache(s)))
        .collect()
}

/// The GPU-side position of a call: `step [4]`, `step[0] = pos0`.
pub struct KvStep {
    pub tensor: Tensor<u32>,
    /// Cache capacity N.
    pub n: usize,
}

impl KvStep {
    pub fn new(ctx: &GpuContext, n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::invalid("kv_cache", "cache of 0 positions"));
        }
        Ok(KvStep {
            tensor: Tensor::zeros(ctx, "kv_step", &[4])?,
            n,
        })
    }

    /// Write where the next call of `t` tokens starts (queued before the
    /// next submit). `pos0 + t` must not exceed the capacity.
    pub fn set(&self, ctx: &GpuContext, pos0: usize, t: usize) -> Result<()> {
        check_span(pos0, t, self.n)?;
        self.tensor.write(ctx, &[pos0 as u32, 0, 0, 0])
    }
}

/// `Error::Limit` unless positions `pos0 .. pos0 + t` fit a cache of `n`.
pub fn check_span(pos0: usize, t: usize, n: usize) -> Result<()> {
    if pos0 + t > n {
        return Err(Error::Limit {
            what: "kv_cache: positions (context window)".into(),
            needed: (pos0 + t) as u64,
            max: n as u64,
        });
    }
    Ok(())
}

/// Sizes of the KV kernels of one call shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvShape {
    /// Tokens per call T.
    pub t: usize,
    /// Query heads H.
    pub h: usize,
    /// Key/value heads Hkv (H a multiple of it).
    pub hkv: usize,
    /// Head width Dh.
    pub dh: usize,
    /// Cache capacity N.
    pub n: usize,
    /// Sliding window W: a query sees itself and the W - 1 keys before it
    /// (0: every earlier key).
    pub window: usize,
    /// Score scale (1 / sqrt(Dh) unless the model says otherwise).
    pub scale: f32,
}

impl KvShape {
    /// Multi-head attention of H heads of width Dh, no window.
    pub fn mha(t: usize, h: usize, dh: usize, n: usize) -> KvShape {
        KvShape {
            t,
            h,
            hkv: h,
            dh,
            n,
            window: 0,
            scale: 1.0 / (dh as f32).sqrt(),
        }
    }

    /// Columns of the attention output, H Dh.
    pub fn d(&self) -> usize {
        self.h * self.dh
    }

    /// Columns of qkv, (H + 2 Hkv) Dh.
    pub fn qkv_width(&self) -> usize {
        (self.h + 2 * self.hkv) * self.dh
    }

    /// The cache shape `[Hkv, N, Dh]`.
    pub fn cache(&self) -> [usize; 3] {
        [self.hkv, self.n, self.dh]
    }

    fn check(&self) -> Result<()> {
        let KvShape {
            t, h, hkv, dh, n, ..
        } = *self;
        if t == 0 || h == 0 || hkv == 0 || dh == 0 || n == 0 {
            return Err(Error::invalid(
                "kv_cache",
                format!("T = {t}, H = {h}, Hkv = {hkv}, Dh = {dh}, N = {n}: all must be >= 1"),
            ));
        }
        if h % hkv != 0 {
            return Err(Error::invalid(
                "kv_cache",
                format!("H = {h} query heads are not a multiple of Hkv = {hkv}"),
            ));
        }
        if dh as u32 > 4 * KV_ATTN_WG {
            return Err(Error::invalid(
                "kv_cache",
                format!("head width Dh = {dh} > {}", 4 * KV_ATTN_WG),
            ));
        }
        if !self.scale.is_finite() || self.scale <= 0.0 {
            return Err(Error::invalid(
                "kv_cache",
                format!("score scale {}", self.scale),
            ));
        }
        let largest = (t.max(n) as u64) * self.qkv_width() as u64;
        if largest > u32::MAX as u64 {
            return Err(Error::Limit {
                what: "kv_cache: elements".into(),
                needed: largest,
                max: u32::MAX as u64,
            });
        }
        Ok(())
    }

    fn params(&self, v: usize) -> KvParams {
        KvParams {
            t: self.t as u32,
            d: self.d() as u32,
            h: self.h as u32,
            dh: self.dh as u32,
            n: self.n as u32,
            v: v as u32,
            nx: 0,
            scale: self.scale,
            hkv: self.hkv as u32,
            window: self.window.min(u32::MAX as usize) as u32,
            emb_scale: 1.0,
            has_wpe: 0,
            v0: 0,
            vc: v as u32,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

fn expect(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::shape(
            "kv_cache",
            format!("{name} {want:?}"),
            format!("{name} {got:?}"),
        ));
    }
    Ok(())
}

fn build(
    ctx: &GpuContext,
    spec: KvSpec,
    mut params: KvParams,
    groups: usize,
    buffers: &[&wgpu::Buffer],
) -> Result<(Dispatch, wgpu::Buffer)> {
    let grid = grid_1d(
        groups.min(u32::MAX as usize) as u32,
        ctx.limits.max_compute_workgroups_per_dimension,
    );
    ctx.check_workgroups(
        format!("{} workgroups (folded)", spec.name()),
        grid.1 as u64,
    )?;
    params.nx = grid.0;
    let params = uniform(ctx, &params);
    let mut all = vec![&params];
    all.extend_from_slice(buffers);
    let dispatch = Dispatch::new(
        ctx,
        ctx.pipeline(&Kernel::KvCache(spec))?,
        &all,
        Grid::Direct(grid.0, grid.1, 1),
    )?;
    Ok((dispatch, params))
}

/// Tensors of `kv_embed`.
pub struct KvEmbedBuffers<'a> {
    pub step: &'a KvStep,
    /// ids [T] (validated by the host: every id < V)
    pub ids: &'a Tensor<u32>,
    /// wte [V, D] (f32 or f16)
    pub wte: WeightRef<'a>,
    /// wpe [N, D]; None for rotary models.
    pub wpe: Option<&'a Tensor<f32>>,
    /// x [T, D]
    pub x: &'a Tensor<f32>,
    /// Token embedding multiplier.
    pub scale: f32,
    /// `(v0, V)`: `wte` holds rows `v0 ..` of a V-row table (one part of a
    /// split table). None: the whole table.
    pub rows: Option<(usize, usize)>,
}

/// `x[i, :] = wte[ids[i], :] * scale + wpe[pos0 + i, :]`, ready to record.
pub struct KvEmbed {
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl KvEmbed {
    pub fn new(ctx: &GpuContext, bufs: &KvEmbedBuffers<'_>) -> Result<Self> {
        let &[t] = bufs.ids.shape.as_slice() else {
            return Err(Error::shape(
                "kv_cache",
                "ids [T]",
                format!("{:?}", bufs.ids.shape),
            ));
        };
        let &[v, d] = bufs.wte.shape else {
            return Err(Error::shape(
                "kv_cache",
                "wte [V, D]",
                format!("{:?}", bufs.wte.shape),
            ));
        };
        let n = bufs.step.n;
        if let Some(wpe) = bufs.wpe {
            expect("wpe", &wpe.shape, &[n, d])?;
        }
        expect("x", &bufs.x.shape, &[t, d])?;
        if t == 0 || d == 0 || v == 0 || !bufs.scale.is_finite() {
            return Err(Error::invalid(
                "kv_cache",
                format!("T = {t}, D = {d}, V = {v}, scale {}", bufs.scale),
            ));
        }
        let (v0, all) = bufs.rows.unwrap_or((0, v));
        if v0 + v > all {
            return Err(Error::invalid(
                "kv_cache",
                format!("wte rows {v0}..{} of a table of {all}", v0 + v),
            ));
        }
        let params = KvParams {
            emb_scale: bufs.scale,
            has_wpe: bufs.wpe.is_some() as u32,
            v0: v0 as u32,
            vc: v as u32,
            ..KvShape::mha(t, 1, d, n).params(all)
        };
        bufs.wte.expect_float("kv_cache")?;
        let (dispatch, params) = build(
            ctx,
            if bufs.wte.f16() {
                KvSpec::EmbedF16
            } else {
                KvSpec::Embed
            },
            params,
            (t * d).div_ceil(KV_WG as usize),
            &[
                &bufs.step.tensor.buffer,
                &bufs.ids.buffer,
                bufs.wte.buffer,
                bufs.wpe.map_or(bufs.wte.buffer, |w| &w.buffer),
                &bufs.x.buffer,
            ],
        )?;
        Ok(KvEmbed {
            dispatch,
            _params: params,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// One layer's cache: `k_cache`, `v_cache` [Hkv, N, Dh].
pub struct KvCache {
    pub k: Tensor<f32>,
    pub v: Tensor<f32>,
}

impl KvCache {
    pub fn new(ctx: &GpuContext, h: usize, n: usize, dh: usize) -> Result<Self> {
        Ok(KvCache {
            k: Tensor::zeros(ctx, "k_cache", &[h, n, dh])?,
            v: Tensor::zeros(ctx, "v_cache", &[h, n, dh])?,
        })
    }

    /// Bytes on the GPU.
    pub fn bytes(&self) -> u64 {
        self.k.bytes() + self.v.bytes()
    }
}

fn check_qkv(shape: &KvShape, step: &KvStep, qkv: &Tensor<f32>, cache: &KvCache) -> Result<()> {
    shape.check()?;
    if step.n != shape.n {
        return Err(Error::shape(
            "kv_cache",
            format!("step of N = {}", shape.n),
            step.n,
        ));
    }
    expect("qkv", &qkv.shape, &[shape.t, shape.qkv_width()])?;
    expect("k_cache", &cache.k.shape, &shape.cache())?;
    expect("v_cache", &cache.v.shape, &shape.cache())
}

/// Append a call's keys and values to a layer's cache, ready to record.
pub struct KvAppend {
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl KvAppend {
    pub fn new(
        ctx: &GpuContext,
        shape: &KvShape,
        step: &KvStep,
        qkv: &Tensor<f32>,
        cache: &KvCache,
    ) -> Result<Self> {
        check_qkv(shape, step, qkv, cache)?;
        let (dispatch, params) = build(
            ctx,
            KvSpec::Append,
            shape.params(0),
            (shape.t * shape.hkv * shape.dh).div_ceil(KV_WG as usize),
            &[
                &step.tensor.buffer,
                &qkv.buffer,
                &cache.k.buffer,
                &cache.v.buffer,
            ],
        )?;
        Ok(KvAppend {
            dispatch,
            _params: params,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// Causal attention of a call's queries over a layer's cache (which must
/// already hold this call's keys: record [`KvAppend`] first).
pub struct KvAttention {
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl KvAttention {
    pub fn new(
        ctx: &GpuContext,
        shape: &KvShape,
        step: &KvStep,
        qkv: &Tensor<f32>,
        cache: &KvCache,
        o: &Tensor<f32>,
    ) -> Result<Self> {
        check_qkv(shape, step, qkv, cache)?;
        expect("o", &o.shape, &[shape.t, shape.d()])?;
        let (dispatch, params) = build(
            ctx,
            KvSpec::Attention,
            shape.params(0),
            shape.t * shape.h,
            &[
                &step.tensor.buffer,
                &qkv.buffer,
                &cache.k.buffer,
                &cache.v.buffer,
                &o.buffer,
            ],
        )?;
        Ok(KvAttention {
            dispatch,
            _params: params,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}
