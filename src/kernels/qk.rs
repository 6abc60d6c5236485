//! Launchers of what a block does to q and k between the QKV projection
//! and attention (`shaders/qk.wgsl`), each in place on `qkv [T, (H + 2 Hkv)
//! Dh]`: [`QkvBias`] (the q/k/v biases of the Qwen2 families), [`QkNormKernel`]
//! (RMSNorm of each q and k head, Qwen3, or of the whole q and k
//! projections, OLMoE) and [`Rotary`] (the rotary position embedding of
//! every q and k head, forward or backward). Twins: `reference::qk`.

use super::matmul::wgsl_select;
use super::{grid_1d, Kernel, ParamsLayout};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

/// Invocations per workgroup.
pub const QK_WG: u32 = 64;

const QK_WGSL: &str = include_str!("../../shaders/qk.wgsl");

/// The three entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QkSpec {
    Bias,
    Norm,
    Rope,
}

impl QkSpec {
    /// Kernel name (WGSL entry point, twin, conformance `kernel` field).
    pub fn name(&self) -> &'static str {
        match self {
            QkSpec::Bias => "qkv_bias",
            QkSpec::Norm => "qk_norm",
            QkSpec::Rope => "rope",
        }
    }

    fn flag(&self) -> &'static str {
        match self {
            QkSpec::Bias => "bias",
            QkSpec::Norm => "norm",
            QkSpec::Rope => "rope",
        }
    }

    fn bindings(&self) -> Vec<Binding> {
        match self {
            QkSpec::Bias => vec![Binding::Uniform, Binding::Read, Binding::ReadWrite],
            QkSpec::Norm => vec![
                Binding::Uniform,
                Binding::Read,
                Binding::Read,
                Binding::ReadWrite,
            ],
            QkSpec::Rope => vec![
                Binding::Uniform,
                Binding::Read,
                Binding::Read,
                Binding::Read,
                Binding::ReadWrite,
            ],
        }
    }

    pub fn def(&self) -> KernelDef {
        let src = wgsl_select(QK_WGSL, &[self.flag()]);
        KernelDef::new(
            self.name(),
            &[&src],
            self.name(),
            &[("WG", QK_WG)],
            &self.bindings(),
        )
    }

    pub fn all() -> Vec<Self> {
        vec![QkSpec::Bias, QkSpec::Norm, QkSpec::Rope]
    }
}

gpu_params! {
    /// Mirrors `struct QkParams` in `shaders/qk.wgsl`.
    pub struct QkParams {
        pub t: u32,
        pub h: u32,
        pub hkv: u32,
        pub dh: u32,
        pub seg: u32,
        pub period: u32,
        pub nx: u32,
        pub eps: f32,
        pub sign: f32,
        pub n: u32,
        pub segk: u32,
        pub _pad1: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    QkSpec::all()
        .into_iter()
        .map(|s| ParamsLayout::of::<QkParams>(Kernel::Qk(s)))
        .collect()
}

/// The heads of a qkv tensor: T rows of H query and Hkv key/value heads of
/// width Dh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvShape {
    pub t: usize,
    pub h: usize,
    pub hkv: usize,
    pub dh: usize,
}

impl QkvShape {
    /// Columns of qkv, (H + 2 Hkv) Dh.
    pub fn width(&self) -> usize {
        (self.h + 2 * self.hkv) * self.dh
    }

    fn check(&self, op: &'static str, qkv: &Tensor<f32>) -> Result<()> {
        let QkvShape { t, h, hkv, dh } = *self;
        if t == 0 || h == 0 || hkv == 0 || dh == 0 {
            return Err(Error::invalid(
                op,
                format!("T = {t}, H = {h}, Hkv = {hkv}, Dh = {dh}: all must be >= 1"),
            ));
        }
        if qkv.shape != [t, self.width()] {
            return Err(Error::shape(
                op,
                format!("qkv [{t}, {}]", self.width()),
                format!("qkv {:?}", qkv.shape),
            ));
        }
        let n = t as u64 * self.width() as u64;
        if n > u32::MAX as u64 {
            return Err(Error::Limit {
                what: format!("{op}: elements of qkv"),
                needed: n,
                max: u32::MAX as u64,
            });
        }
        Ok(())
    }

    fn params(&self) -> QkParams {
        QkParams {
            t: self.t as u32,
            h: self.h as u32,
            hkv: self.hkv as u32,
            dh: self.dh as u32,
            ..Default::default()
        }
    }
}

fn build(
    ctx: &GpuContext,
    spec: QkSpec,
    mut params: QkParams,
    invocations: usize,
    buffers: &[&wgpu::Buffer],
) -> Result<(Dispatch, wgpu::Buffer)> {
    let groups = (invocations as u64).div_ceil(QK_WG as u64);
    if groups > u32::MAX as u64 {
        return Err(Error::Limit {
            what: format!("{} workgroups", spec.name()),
            needed: groups,
            max: u32::MAX as u64,
        });
    }
    let grid = grid_1d(
        groups as u32,
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
        ctx.pipeline(&Kernel::Qk(spec))?,
        &all,
        Grid::Direct(grid.0, grid.1, 1),
    )?;
    Ok((dispatch, params))
}

/// `qkv[t, :] += bias`, ready to record.
pub struct QkvBias {
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl QkvBias {
    pub fn new(
        ctx: &GpuContext,
        shape: QkvShape,
        bias: &Tensor<f32>,
        qkv: &Tensor<f32>,
    ) -> Result<Self> {
        shape.check("qkv_bias", qkv)?;
        if bias.shape != [shape.width()] {
            return Err(Error::shape(
                "qkv_bias",
                format!("bias [{}]", shape.width()),
                format!("bias {:?}", bias.shape),
            ));
        }
        let (dispatch, params) = build(
            ctx,
            QkSpec::Bias,
            shape.params(),
            shape.t * shape.width(),
            &[&bias.buffer, &qkv.buffer],
        )?;
        Ok(QkvBias {
            dispatch,
            _params: params,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// RMSNorm of the q and k segments of every row, ready to record: the
/// segment width is the gains' length (Dh: per head; H Dh and Hkv Dh: the
/// whole projections).
pub struct QkNormKernel {
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl QkNormKernel {
    pub fn new(
        ctx: &GpuContext,
        shape: QkvShape,
        eps: f32,
        gq: &Tensor<f32>,
        gk: &Tensor<f32>,
        qkv: &Tensor<f32>,
    ) -> Result<Self> {
        shape.check("qk_norm", qkv)?;
        let (qw, kw) = (shape.h * shape.dh, shape.hkv * shape.dh);
        let (seg, segk, nq, nk) = if gq.shape == [shape.dh] && gk.shape == [shape.dh] {
            (shape.dh, shape.dh, shape.h, shape.hkv)
        } else if gq.shape == [qw] && gk.shape == [kw] {
            (qw, kw, 1, 1)
        } else {
            return Err(Error::shape(
                "qk_norm",
                format!(
                    "gains [Dh = {}] each, or [H Dh = {qw}] and [Hkv Dh = {kw}]",
                    shape.dh
                ),
                format!("q gain {:?}, k gain {:?}", gq.shape, gk.shape),
            ));
        };
        if !eps.is_finite() || eps <= 0.0 {
            return Err(Error::invalid("qk_norm", format!("eps = {eps}")));
        }
        let params = QkParams {
            seg: seg as u32,
            segk: segk as u32,
            eps,
            ..shape.params()
        };
        let (dispatch, params) = build(
            ctx,
            QkSpec::Norm,
            params,
            shape.t * (nq + nk),
            &[&gq.buffer, &gk.buffer, &qkv.buffer],
        )?;
        Ok(QkNormKernel {
            dispatch,
            _params: params,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// The rotary embedding's cos and sin tables `[N, Dh / 2]` on the GPU.
pub struct RopeTables {
    pub cos: Tensor<f32>,
    pub sin: Tensor<f32>,
}

impl RopeTables {
    pub fn new(ctx: &GpuContext, n: usize, dh: usize, cos: &[f32], sin: &[f32]) -> Result<Self> {
        let half = dh / 2;
        if n == 0
            || dh == 0
            || !dh.is_multiple_of(2)
            || cos.len() != n * half
            || sin.len() != n * half
        {
            return Err(Error::shape(
                "rope",
                format!("cos and sin [{n}, {half}] for an even Dh = {dh}"),
                format!("{} and {} values", cos.len(), sin.len()),
            ));
        }
        Ok(RopeTables {
            cos: Tensor::from_slice(ctx, "rope_cos", &[n, half], cos)?,
            sin: Tensor::from_slice(ctx, "rope_sin", &[n, half], sin)?,
        })
    }

    /// Positions in the tables.
    pub fn n(&self) -> usize {
        self.cos.shape[0]
    }
}

/// The rotary embedding of the q and k heads of every row, ready to record.
pub struct Rotary {
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl Rotary {
    /// Row t is at position `step[0] + t % period`; `backward` turns the
    /// other way (the gradient of the forward rotation).
    pub fn new(
        ctx: &GpuContext,
        shape: QkvShape,
        tables: &RopeTables,
        step: &Tensor<u32>,
        period: usize,
        backward: bool,
        qkv: &Tensor<f32>,
    ) -> Result<Self> {
        shape.check("rope", qkv)?;
        if !shape.dh.is_multiple_of(2) || tables.cos.shape != [tables.n(), shape.dh / 2] {
            return Err(Error::shape(
                "rope",
                format!("tables [N, Dh / 2 = {}] for an even Dh", shape.dh / 2),
                format!("tables {:?}, Dh = {}", tables.cos.shape, shape.dh),
            ));
        }
        if period == 0 || step.shape != [4] {
            return Err(Error::invalid(
                "rope",
                format!("period {period}, step {:?}", step.shape),
            ));
        }
        let params = QkParams {
            period: period as u32,
            sign: if backward { -1.0 } else { 1.0 },
            n: tables.n() as u32,
            ..shape.params()
        };
        let (dispatch, params) = build(
            ctx,
            QkSpec::Rope,
            params,
            shape.t * (shape.h + shape.hkv) * (shape.dh / 2),
            &[
                &step.buffer,
                &tables.cos.buffer,
                &tables.sin.buffer,
                &qkv.buffer,
            ],
        )?;
        Ok(Rotary {
            dispatch,
            _params: params,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}
