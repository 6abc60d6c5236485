//! RMSNorm launchers (`shaders/rmsnorm.wgsl`): the pre-norm of the
//! transformer, `y = x * rstd * g` with `rstd = 1 / sqrt(mean(x^2) + eps)`
//! saved for the backward, and its backward (`dx` one dispatch, the gain
//! gradient `dg` two: fixed chunks of rows, then the chunks in order; no
//! atomics, the same sums every run). Twins: `reference::rmsnorm`.

use super::matmul::wgsl_select;
use super::{grid_1d, Kernel, ParamsLayout};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

/// Invocations per workgroup (a power of two: the row reduction is a tree).
pub const RMSNORM_WG: u32 = 64;

/// Rows per chunk of the gain gradient's first pass. At T = 8192 that is 128
/// partial rows, enough invocations to fill a GPU in both passes.
pub const RMSNORM_GAIN_ROWS: u32 = 64;

/// The usual epsilon of RMSNorm.
pub const RMSNORM_EPS: f32 = 1e-5;

const RMSNORM_WGSL: &str = include_str!("../../shaders/rmsnorm.wgsl");

/// The four RMSNorm kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RmsNormSpec {
    Forward,
    Backward,
    BackwardGain,
    BackwardGainFinish,
}

impl RmsNormSpec {
    /// Kernel name (WGSL entry point, conformance `kernel` field).
    pub fn name(&self) -> &'static str {
        match self {
            RmsNormSpec::Forward => "rmsnorm_forward",
            RmsNormSpec::Backward => "rmsnorm_backward",
            RmsNormSpec::BackwardGain => "rmsnorm_backward_gain",
            RmsNormSpec::BackwardGainFinish => "rmsnorm_backward_gain_finish",
        }
    }

    fn flag(&self) -> &'static str {
        match self {
            RmsNormSpec::Forward => "forward",
            RmsNormSpec::Backward => "backward",
            RmsNormSpec::BackwardGain => "gain",
            RmsNormSpec::BackwardGainFinish => "finish",
        }
    }

    fn bindings(&self) -> Vec<Binding> {
        match self {
            RmsNormSpec::Forward => vec![
                Binding::Uniform,
                Binding::Read,      // x [T, D]
                Binding::Read,      // g [D]
                Binding::ReadWrite, // y [T, D]
                Binding::ReadWrite, // rstd [T]
            ],
            RmsNormSpec::Backward => vec![
                Binding::Uniform,
                Binding::Read,      // x [T, D]
                Binding::Read,      // g [D]
                Binding::Read,      // dy [T, D]
                Binding::Read,      // rstd [T]
                Binding::ReadWrite, // dx [T, D]
            ],
            RmsNormSpec::BackwardGain => vec![
                Binding::Uniform,
                Binding::Read,      // x [T, D]
                Binding::Read,      // dy [T, D]
                Binding::Read,      // rstd [T]
                Binding::ReadWrite, // partials [C, D]
            ],
            RmsNormSpec::BackwardGainFinish => vec![
                Binding::Uniform,
                Binding::Read,      // partials [C, D]
                Binding::ReadWrite, // dg [D]
            ],
        }
    }

    pub fn def(&self) -> KernelDef {
        let src = wgsl_select(RMSNORM_WGSL, &[self.flag()]);
        KernelDef::new(
            self.name(),
            &[&src],
            self.name(),
            &[("WG", RMSNORM_WG), ("ROWS", RMSNORM_GAIN_ROWS)],
            &self.bindings(),
        )
    }

    pub fn all() -> Vec<Self> {
        vec![
            RmsNormSpec::Forward,
            RmsNormSpec::Backward,
            RmsNormSpec::BackwardGain,
            RmsNormSpec::BackwardGainFinish,
        ]
    }
}

gpu_params! {
    /// Mirrors `struct RmsNormParams` in `shaders/rmsnorm.wgsl`.
    pub struct RmsNormParams {
        pub t: u32,
        pub d: u32,
        pub eps: f32,
        pub nx: u32,
        pub chunks: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    RmsNormSpec::all()
        .into_iter()
        .map(|s| ParamsLayout::of::<RmsNormParams>(Kernel::RmsNorm(s)))
        .collect()
}

/// Chunks of the gain gradient's first pass: the rows of `partials [C, D]`.
pub fn gain_chunks(t: usize) -> usize {
    t.div_ceil(RMSNORM_GAIN_ROWS as usize)
}

/// Check x [T, D] and the tensors that must match it: `rows` of shape [T, D]
/// (y, dy, dx), `per_row` of shape [T] (rstd), `per_col` of shape [D] (g,
/// dg). Returns (T, D). CPU only.
pub fn check(
    op: &'static str,
    x: &[usize],
    rows: &[(&str, &[usize])],
    per_row: &[(&str, &[usize])],
    per_col: &[(&str, &[usize])],
) -> Result<(usize, usize)> {
    let &[t, d] = x else {
        return Err(Error::shape(op, "x [T, D]", format!("x {x:?}")));
    };
    if t == 0 || d == 0 {
        return Err(Error::invalid(
            op,
            format!("T = {t}, D = {d}: both must be >= 1"),
        ));
    }
    let expect = |name: &str, got: &[usize], want: &[usize]| {
        if got == want {
            Ok(())
        } else {
            Err(Error::shape(
                op,
                format!("{name} {want:?}"),
                format!("{name} {got:?}"),
            ))
        }
    };
    for (name, s) in rows {
        expect(name, s, &[t, d])?;
    }
    for (name, s) in per_row {
        expect(name, s, &[t])?;
    }
    for (name, s) in per_col {
        expect(name, s, &[d])?;
    }
    // u64: usize is 32 bits in the browser (wasm32).
    if t as u64 * d as u64 > u32::MAX as u64 {
        return Err(Error::Limit {
            what: format!("{op}: elements of x"),
            needed: t as u64 * d as u64,
            max: u32::MAX as u64,
        });
    }
    Ok((t, d))
}

/// One dispatch of `spec` over `groups` workgroups.
fn build(
    ctx: &GpuContext,
    spec: RmsNormSpec,
    params_buf: &wgpu::Buffer,
    groups: usize,
    buffers: &[&wgpu::Buffer],
) -> Result<Dispatch> {
    let grid = grid_1d(
        groups as u32,
        ctx.limits.max_compute_workgroups_per_dimension,
    );
    ctx.check_workgroups(
        format!("{} workgroups (folded)", spec.name()),
        grid.1 as u64,
    )?;
    let mut all = vec![params_buf];
    all.extend_from_slice(buffers);
    Dispatch::new(
        ctx,
        ctx.pipeline(&Kernel::RmsNorm(spec))?,
        &all,
        Grid::Direct(grid.0, grid.1, 1),
    )
}

/// The x-grid of `groups` workgroups, as the shader's `nx` wants it.
fn nx(ctx: &GpuContext, groups: usize) -> u32 {
    grid_1d(
        groups as u32,
        ctx.limits.max_compute_workgroups_per_dimension,
    )
    .0
}

/// Tensors of `rmsnorm_forward`.
pub struct RmsNormForwardBuffers<'a> {
    /// x [T, D]
    pub x: &'a Tensor<f32>,
    /// g [D] (gain)
    pub g: &'a Tensor<f32>,
    /// y [T, D]
    pub y: &'a Tensor<f32>,
    /// rstd [T] (saved for the backward)
    pub rstd: &'a Tensor<f32>,
}

/// `y = x * rstd * g`, one workgroup per row, ready to record.
pub struct RmsNormForward {
    pub t: usize,
    pub d: usize,
    pub eps: f32,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl RmsNormForward {
    /// `eps` is usually `RMSNORM_EPS`.
    pub fn new(ctx: &GpuContext, eps: f32, bufs: &RmsNormForwardBuffers<'_>) -> Result<Self> {
        const OP: &str = "rmsnorm_forward";
        let (t, d) = check(
            OP,
            &bufs.x.shape,
            &[("y", &bufs.y.shape)],
            &[("rstd", &bufs.rstd.shape)],
            &[("g", &bufs.g.shape)],
        )?;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::invalid(OP, format!("eps = {eps} must be > 0")));
        }
        let params = RmsNormParams {
            t: t as u32,
            d: d as u32,
            eps,
            nx: nx(ctx, t),
            chunks: gain_chunks(t) as u32,
            ..Default::default()
        };
        let params_buf = uniform(ctx, &params);
        let dispatch = build(
            ctx,
            RmsNormSpec::Forward,
            &params_buf,
            t,
            &[
                &bufs.x.buffer,
                &bufs.g.buffer,
                &bufs.y.buffer,
                &bufs.rstd.buffer,
            ],
        )?;
        Ok(RmsNormForward {
            t,
            d,
            eps,
            dispatch,
            _params: params_buf,
        })
    }

    /// Record the forward: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// Tensors of `rmsnorm_backward`.
pub struct RmsNormBackwardBuffers<'a> {
    /// x [T, D] (the forward's input)
    pub x: &'a Tensor<f32>,
    /// g [D]
    pub g: &'a Tensor<f32>,
    /// dy [T, D]
    pub dy: &'a Tensor<f32>,
    /// rstd [T] (saved by the forward)
    pub rstd: &'a Tensor<f32>,
    /// dx [T, D] (overwritten)
    pub dx: &'a Tensor<f32>,
}

/// `dx = rstd * (g dy - xhat * mean(g dy xhat))`, one workgroup per row,
/// ready to record.
pub struct RmsNormBackward {
    pub t: usize,
    pub d: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl RmsNormBackward {
    pub fn new(ctx: &GpuContext, bufs: &RmsNormBackwardBuffers<'_>) -> Result<Self> {
        let (t, d) = check(
            "rmsnorm_backward",
            &bufs.x.shape,
            &[("dy", &bufs.dy.shape), ("dx", &bufs.dx.shape)],
            &[("rstd", &bufs.rstd.shape)],
            &[("g", &bufs.g.shape)],
        )?;
        let params = RmsNormParams {
            t: t as u32,
            d: d as u32,
            nx: nx(ctx, t),
            chunks: gain_chunks(t) as u32,
            ..Default::default()
        };
        let params_buf = uniform(ctx, &params);
        let dispatch = build(
            ctx,
            RmsNormSpec::Backward,
            &params_buf,
            t,
            &[
                &bufs.x.buffer,
                &bufs.g.buffer,
                &bufs.dy.buffer,
                &bufs.rstd.buffer,
                &bufs.dx.buffer,
            ],
        )?;
        Ok(RmsNormBackward {
            t,
            d,
            dispatch,
            _params: params_buf,
        })
    }

    /// Record the backward: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// Tensors of the gain gradient.
pub struct RmsNormBackwardGainBuffers<'a> {
    /// x [T, D] (the forward's input)
    pub x: &'a Tensor<f32>,
    /// dy [T, D]
    pub dy: &'a Tensor<f32>,
    /// rstd [T] (saved by the forward)
    pub rstd: &'a Tensor<f32>,
    /// dg [D] (overwritten)
    pub dg: &'a Tensor<f32>,
}

/// `dg[d] = sum_t dy[t, d] * xhat[t, d]`: partial sums over fixed chunks of
/// `RMSNORM_GAIN_ROWS` rows into its own `partials [C, D]`, then the chunks
/// in order. Ready to record.
pub struct RmsNormBackwardGain {
    pub t: usize,
    pub d: usize,
    partial: Dispatch,
    finish: Dispatch,
    _partials: Tensor<f32>,
    _params: wgpu::Buffer,
}

impl RmsNormBackwardGain {
    pub fn new(ctx: &GpuContext, bufs: &RmsNormBackwardGainBuffers<'_>) -> Result<Self> {
        let (t, d) = check(
            "rmsnorm_backward_gain",
            &bufs.x.shape,
            &[("dy", &bufs.dy.shape)],
            &[("rstd", &bufs.rstd.shape)],
            &[("dg", &bufs.dg.shape)],
        )?;
        let chunks = gain_chunks(t);
        let wg = RMSNORM_WG as usize;
        let partial_groups = (chunks * d).div_ceil(wg);
        let finish_groups = d.div_ceil(wg);
        // One nx for both passes: the larger grid folds first, and a 1-D
        // grid of the smaller one ignores nx (wid.y = 0).
        let params = RmsNormParams {
            t: t as u32,
            d: d as u32,
            nx: nx(ctx, partial_groups),
            chunks: chunks as u32,
            ..Default::default()
        };
        let params_buf = uniform(ctx, &params);
        let partials = Tensor::<f32>::zeros(ctx, "rmsnorm gain partials", &[chunks, d])?;
        let partial = build(
            ctx,
            RmsNormSpec::BackwardGain,
            &params_buf,
            partial_groups,
            &[
                &bufs.x.buffer,
                &bufs.dy.buffer,
                &bufs.rstd.buffer,
                &partials.buffer,
            ],
        )?;
        let finish = build(
            ctx,
            RmsNormSpec::BackwardGainFinish,
            &params_buf,
            finish_groups,
            &[&partials.buffer, &bufs.dg.buffer],
        )?;
        Ok(RmsNormBackwardGain {
            t,
            d,
            partial,
            finish,
            _partials: partials,
            _params: params_buf,
        })
    }

    /// Record the gain gradient: two dispatches (chunks, then their sum).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.partial.record(pass);
        self.finish.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_shapes_with_typed_errors() {
        let ok = check(
            "t",
            &[5, 8],
            &[("y", &[5, 8])],
            &[("r", &[5])],
            &[("g", &[8])],
        );
        assert_eq!(ok.unwrap(), (5, 8));
        assert!(matches!(
            check("t", &[0, 8], &[("y", &[0, 8])], &[], &[]),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            check("t", &[5, 8], &[("y", &[5, 7])], &[], &[]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check("t", &[5, 8], &[], &[("r", &[4])], &[]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check("t", &[5, 8], &[], &[], &[("g", &[5])]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check("t", &[40], &[], &[], &[]),
            Err(Error::Shape { .. })
        ));
        assert_eq!(gain_chunks(1), 1);
        assert_eq!(gain_chunks(65), 2);
    }
}
