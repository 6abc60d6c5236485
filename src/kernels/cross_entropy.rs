//! Cross-entropy launchers (`shaders/cross_entropy.wgsl`): the training loss
//! fused with its gradient (`cross_entropy_forward_backward`, which rewrites
//! the logits in place with `(softmax - onehot) * scale`), the loss alone for
//! validation (`cross_entropy_forward`), and a deterministic `loss_sum` into
//! `out [2] = (sum, counted targets)` that the host reads once per step.
//! Twins: `reference::cross_entropy`.
//!
//! A target `UNUSED` (0xFFFFFFFF) marks an ignored position: loss 0, zero
//! gradient, not counted. The host validates targets (`check_targets`); the
//! shader treats any other target `>= V` the same way instead of reading out
//! of bounds.

use super::matmul::wgsl_select;
use super::{grid_1d, Kernel, ParamsLayout, UNUSED};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

/// Invocations per workgroup (a power of two; one row per workgroup, so
/// V = 8192 is 32 columns per invocation).
pub const CROSS_ENTROPY_WG: u32 = 256;

const CROSS_ENTROPY_WGSL: &str = include_str!("../../shaders/cross_entropy.wgsl");

/// The three cross-entropy kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrossEntropySpec {
    ForwardBackward,
    Forward,
    LossSum,
}

impl CrossEntropySpec {
    /// Kernel name (WGSL entry point, twin, conformance `kernel` field).
    pub fn name(&self) -> &'static str {
        match self {
            CrossEntropySpec::ForwardBackward => "cross_entropy_forward_backward",
            CrossEntropySpec::Forward => "cross_entropy_forward",
            CrossEntropySpec::LossSum => "loss_sum",
        }
    }

    fn flag(&self) -> &'static str {
        match self {
            CrossEntropySpec::ForwardBackward => "fb",
            CrossEntropySpec::Forward => "fwd",
            CrossEntropySpec::LossSum => "sum",
        }
    }

    fn bindings(&self) -> Vec<Binding> {
        match self {
            CrossEntropySpec::ForwardBackward => vec![
                Binding::Uniform,
                Binding::ReadWrite, // logits [T, V] (becomes dlogits)
                Binding::Read,      // targets [T]
                Binding::ReadWrite, // loss [T]
            ],
            CrossEntropySpec::Forward => vec![
                Binding::Uniform,
                Binding::Read,      // logits [T, V]
                Binding::Read,      // targets [T]
                Binding::ReadWrite, // loss [T]
            ],
            CrossEntropySpec::LossSum => vec![
                Binding::Uniform,
                Binding::Read,      // loss [T]
                Binding::Read,      // targets [T]
                Binding::ReadWrite, // out [2]
            ],
        }
    }

    pub fn def(&self) -> KernelDef {
        let src = wgsl_select(CROSS_ENTROPY_WGSL, &[self.flag()]);
        KernelDef::new(
            self.name(),
            &[&src],
            self.name(),
            &[("WG", CROSS_ENTROPY_WG)],
            &self.bindings(),
        )
    }

    pub fn all() -> Vec<Self> {
        vec![
            CrossEntropySpec::ForwardBackward,
            CrossEntropySpec::Forward,
            CrossEntropySpec::LossSum,
        ]
    }
}

gpu_params! {
    /// Mirrors `struct CrossEntropyParams` in `shaders/cross_entropy.wgsl`.
    pub struct CrossEntropyParams {
        pub t: u32,
        pub v: u32,
        pub scale: f32,
        pub nx: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    CrossEntropySpec::all()
        .into_iter()
        .map(|s| ParamsLayout::of::<CrossEntropyParams>(Kernel::CrossEntropy(s)))
        .collect()
}

/// Validate targets against the vocabulary: each is `< v` or `UNUSED`.
/// Returns the number of counted (non-ignored) targets, whose inverse is the
/// usual gradient scale. A target `>= v` is a typed error.
pub fn check_targets(targets: &[u32], v: usize) -> Result<usize> {
    let mut counted = 0;
    for (t, &tgt) in targets.iter().enumerate() {
        if tgt == UNUSED {
            continue;
        }
        if tgt as usize >= v {
            return Err(Error::invalid(
                "cross_entropy",
                format!("target {tgt} at position {t} is outside the vocabulary V = {v}"),
            ));
        }
        counted += 1;
    }
    Ok(counted)
}

/// Check logits [T, V], targets [T], loss [T]. Returns (T, V). CPU only.
pub fn check(
    op: &'static str,
    logits: &[usize],
    targets: &[usize],
    loss: &[usize],
) -> Result<(usize, usize)> {
    let &[t, v] = logits else {
        return Err(Error::shape(
            op,
            "logits [T, V]",
            format!("logits {logits:?}"),
        ));
    };
    if t == 0 || v == 0 {
        return Err(Error::invalid(
            op,
            format!("T = {t}, V = {v}: both must be >= 1"),
        ));
    }
    if targets != [t] {
        return Err(Error::shape(
            op,
            format!("targets [{t}]"),
            format!("targets {targets:?}"),
        ));
    }
    if loss != [t] {
        return Err(Error::shape(
            op,
            format!("loss [{t}]"),
            format!("loss {loss:?}"),
        ));
    }
    // u64: usize is 32 bits in the browser (wasm32).
    if t as u64 * v as u64 > u32::MAX as u64 {
        return Err(Error::Limit {
            what: format!("{op}: elements of logits"),
            needed: t as u64 * v as u64,
            max: u32::MAX as u64,
        });
    }
    Ok((t, v))
}

/// Tensors of the cross-entropy kernels.
pub struct CrossEntropyBuffers<'a> {
    /// logits [T, V]; `cross_entropy_forward_backward` overwrites them with
    /// dlogits
    pub logits: &'a Tensor<f32>,
    /// targets [T] (`UNUSED` = ignored)
    pub targets: &'a Tensor<u32>,
    /// loss [T] (overwritten)
    pub loss: &'a Tensor<f32>,
}

/// One row-per-workgroup cross-entropy kernel of one shape, ready to record.
pub struct CrossEntropy {
    pub spec: CrossEntropySpec,
    pub t: usize,
    pub v: usize,
    params: CrossEntropyParams,
    params_buf: wgpu::Buffer,
    dispatch: Dispatch,
}

impl CrossEntropy {
    /// The training kernel: loss and, in place of the logits, their gradient
    /// `(softmax - onehot) * scale` (usually 1 / counted targets).
    pub fn forward_backward(
        ctx: &GpuContext,
        scale: f32,
        bufs: &CrossEntropyBuffers<'_>,
    ) -> Result<Self> {
        Self::new(ctx, CrossEntropySpec::ForwardBackward, scale, bufs)
    }

    /// The validation kernel: loss only, logits untouched.
    pub fn forward(ctx: &GpuContext, bufs: &CrossEntropyBuffers<'_>) -> Result<Self> {
        Self::new(ctx, CrossEntropySpec::Forward, 0.0, bufs)
    }

    fn new(
        ctx: &GpuContext,
        spec: CrossEntropySpec,
        scale: f32,
        bufs: &CrossEntropyBuffers<'_>,
    ) -> Result<Self> {
        let (t, v) = check(
            spec.name(),
            &bufs.logits.shape,
            &bufs.targets.shape,
            &bufs.loss.shape,
        )?;
        if !scale.is_finite() {
            return Err(Error::invalid(spec.name(), format!("scale = {scale}")));
        }
        let grid = grid_1d(t as u32, ctx.limits.max_compute_workgroups_per_dimension);
        ctx.check_workgroups(
            format!("{} workgroups (folded)", spec.name()),
            grid.1 as u64,
        )?;
        let params = CrossEntropyParams {
            t: t as u32,
            v: v as u32,
            scale,
            nx: grid.0,
        };
        let params_buf = uniform(ctx, &params);
        let dispatch = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::CrossEntropy(spec))?,
            &[
                &params_buf,
                &bufs.logits.buffer,
                &bufs.targets.buffer,
                &bufs.loss.buffer,
            ],
            Grid::Direct(grid.0, grid.1, 1),
        )?;
        Ok(CrossEntropy {
            spec,
            t,
            v,
            params,
            params_buf,
            dispatch,
        })
    }

    /// Change the gradient scale for the next submissions (a queued write of
    /// the uniform: no new buffer, ordered before later submits).
    pub fn set_scale(&self, ctx: &GpuContext, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::invalid(self.spec.name(), format!("scale = {scale}")));
        }
        let params = CrossEntropyParams {
            scale,
            ..self.params
        };
        ctx.queue
            .write_buffer(&self.params_buf, 0, bytemuck::bytes_of(&params));
        Ok(())
    }

    /// Record the kernel: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// Tensors of `loss_sum`.
pub struct LossSumBuffers<'a> {
    /// loss [T]
    pub loss: &'a Tensor<f32>,
    /// targets [T] (a target `>= V`, such as `UNUSED`, is not counted)
    pub targets: &'a Tensor<u32>,
    /// out [2] = (sum of loss, counted targets as f32)
    pub out: &'a Tensor<f32>,
}

/// `out = (sum_t loss[t], counted targets)`, one workgroup, a fixed order.
pub struct LossSum {
    pub t: usize,
    pub v: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl LossSum {
    /// `v`: the vocabulary, which decides which targets count.
    pub fn new(ctx: &GpuContext, v: usize, bufs: &LossSumBuffers<'_>) -> Result<Self> {
        const OP: &str = "loss_sum";
        let &[t] = bufs.loss.shape.as_slice() else {
            return Err(Error::shape(
                OP,
                "loss [T]",
                format!("loss {:?}", bufs.loss.shape),
            ));
        };
        if t == 0 || v == 0 {
            return Err(Error::invalid(
                OP,
                format!("T = {t}, V = {v}: both must be >= 1"),
            ));
        }
        bufs.targets.expect_shape(OP, "targets", &[t])?;
        bufs.out.expect_shape(OP, "out", &[2])?;
        if t as u64 > u32::MAX as u64 || v as u64 > u32::MAX as u64 {
            return Err(Error::Limit {
                what: format!("{OP}: T or V"),
                needed: t.max(v) as u64,
                max: u32::MAX as u64,
            });
        }
        let params = CrossEntropyParams {
            t: t as u32,
            v: v as u32,
            scale: 0.0,
            nx: 1,
        };
        let params_buf = uniform(ctx, &params);
        let dispatch = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::CrossEntropy(CrossEntropySpec::LossSum))?,
            &[
                &params_buf,
                &bufs.loss.buffer,
                &bufs.targets.buffer,
                &bufs.out.buffer,
            ],
            Grid::Direct(1, 1, 1),
        )?;
        Ok(LossSum {
            t,
            v,
            dispatch,
            _params: params_buf,
        })
    }

    /// Record the sum: one dispatch of one workgroup.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_shapes_and_targets_with_typed_errors() {
        assert_eq!(check("t", &[4, 10], &[4], &[4]).unwrap(), (4, 10));
        assert!(matches!(
            check("t", &[0, 10], &[0], &[0]),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            check("t", &[4, 10], &[5], &[4]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check("t", &[4, 10], &[4], &[4, 1]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check("t", &[40], &[40], &[40]),
            Err(Error::Shape { .. })
        ));
        assert_eq!(check_targets(&[0, UNUSED, 9, 3], 10).unwrap(), 3);
        assert!(matches!(
            check_targets(&[0, 10], 10),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
