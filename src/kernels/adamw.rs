//! AdamW launchers (`shaders/adamw.wgsl`): one `AdamW` per parameter tensor
//! (`adamw_step`, decoupled weight decay, gradient scaled by the clipping
//! factor `clip[1]`), and `GradNorm`, which plans the global gradient norm
//! over every gradient tensor of a model (`grad_norm_partial` per tensor
//! into its own range of one partials buffer, then `grad_norm_finish` into
//! `clip [2] = (norm, scale)`). Twins: `reference::adamw`.
//!
//! A training step records `GradNorm` and then every `AdamW` in one pass;
//! before submitting it the host calls `AdamW::set_step` (learning rate and
//! bias corrections of this step: a queued uniform write, no new buffer).
//! When the norm is not finite, scale is 0 and every `adamw_step` leaves its
//! tensors untouched; the host reads `clip[0]` and stops.

use super::matmul::wgsl_select;
use super::{grid_1d, Kernel, ParamsLayout};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;
use std::ops::Range;

/// Invocations per workgroup of every AdamW kernel (a power of two).
pub const ADAMW_WG: u32 = 256;

/// Gradient elements per partial sum of squares (16 per invocation).
pub const GRAD_NORM_CHUNK: u32 = 4096;

const ADAMW_WGSL: &str = include_str!("../../shaders/adamw.wgsl");

/// The three AdamW kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AdamWSpec {
    Step,
    GradNormPartial,
    GradNormFinish,
}

impl AdamWSpec {
    /// Kernel name (WGSL entry point, twin, conformance `kernel` field).
    pub fn name(&self) -> &'static str {
        match self {
            AdamWSpec::Step => "adamw_step",
            AdamWSpec::GradNormPartial => "grad_norm_partial",
            AdamWSpec::GradNormFinish => "grad_norm_finish",
        }
    }

    fn flag(&self) -> &'static str {
        match self {
            AdamWSpec::Step => "step",
            AdamWSpec::GradNormPartial => "partial",
            AdamWSpec::GradNormFinish => "finish",
        }
    }

    fn bindings(&self) -> Vec<Binding> {
        match self {
            AdamWSpec::Step => vec![
                Binding::Uniform,
                Binding::ReadWrite, // p [n]
                Binding::Read,      // g [n]
                Binding::ReadWrite, // m [n]
                Binding::ReadWrite, // v [n]
                Binding::Read,      // clip [2]
            ],
            AdamWSpec::GradNormPartial => vec![
                Binding::Uniform,
                Binding::Read,      // g [n]
                Binding::ReadWrite, // partials [P]
            ],
            AdamWSpec::GradNormFinish => vec![
                Binding::Uniform,
                Binding::Read,      // partials [P]
                Binding::ReadWrite, // clip [2]
            ],
        }
    }

    pub fn def(&self) -> KernelDef {
        let src = wgsl_select(ADAMW_WGSL, &[self.flag()]);
        KernelDef::new(
            self.name(),
            &[&src],
            self.name(),
            &[("WG", ADAMW_WG), ("CHUNK", GRAD_NORM_CHUNK)],
            &self.bindings(),
        )
    }

    pub fn all() -> Vec<Self> {
        vec![
            AdamWSpec::Step,
            AdamWSpec::GradNormPartial,
            AdamWSpec::GradNormFinish,
        ]
    }
}

gpu_params! {
    /// Mirrors `struct AdamWParams` in `shaders/adamw.wgsl`.
    pub struct AdamWParams {
        pub lr: f32,
        pub beta1: f32,
        pub beta2: f32,
        pub eps: f32,
        pub weight_decay: f32,
        pub bc1: f32,
        pub bc2: f32,
        pub n: u32,
        pub nx: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
}

gpu_params! {
    /// Mirrors `struct GradNormParams` in `shaders/adamw.wgsl`.
    pub struct GradNormParams {
        pub n: u32,
        pub offset: u32,
        pub clip_enabled: u32,
        pub max_norm: f32,
        pub nx: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![
        ParamsLayout::of::<AdamWParams>(Kernel::AdamW(AdamWSpec::Step)),
        ParamsLayout::of::<GradNormParams>(Kernel::AdamW(AdamWSpec::GradNormPartial)),
        ParamsLayout::of::<GradNormParams>(Kernel::AdamW(AdamWSpec::GradNormFinish)),
    ]
}

/// Hyperparameters of one parameter tensor's AdamW.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Learning rate of step 1 (`set_step` changes it per step).
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (0 for gains and biases, usually).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// PyTorch's `AdamW` defaults.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = |b: f32| (0.0..1.0).contains(&b);
        if !ok(self.beta1) || !ok(self.beta2) {
            return Err(Error::invalid(
                "adamw",
                format!(
                    "beta1 = {}, beta2 = {}: both must be in [0, 1)",
                    self.beta1, self.beta2
                ),
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid(
                "adamw",
                format!("eps = {} must be > 0", self.eps),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid(
                "adamw",
                format!("weight_decay = {} must be >= 0", self.weight_decay),
            ));
        }
        check_lr(self.lr)
    }

    /// The uniform of step `step` (1-based) at learning rate `lr`: the bias
    /// corrections are computed in f64 (`1 - beta^step` loses digits in f32
    /// for beta2 close to 1 at small steps).
    pub fn params(&self, lr: f32, step: u64, n: u32, nx: u32) -> AdamWParams {
        let exp = step.min(i32::MAX as u64) as i32;
        AdamWParams {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bc1: (1.0 - (self.beta1 as f64).powi(exp)) as f32,
            bc2: (1.0 - (self.beta2 as f64).powi(exp)) as f32,
            n,
            nx,
            ..Default::default()
        }
    }
}

fn check_lr(lr: f32) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::invalid(
            "adamw",
            format!("learning rate {lr} must be >= 0"),
        ));
    }
    Ok(())
}

/// Tensors of one `adamw_step`.
pub struct AdamWBuffers<'a> {
    /// p [n] (the parameter, updated in place)
    pub p: &'a Tensor<f32>,
    /// g [n] (its gradient, any shape with n elements)
    pub g: &'a Tensor<f32>,
    /// m [n] (first moment, zeros at step 1)
    pub m: &'a Tensor<f32>,
    /// v [n] (second moment, zeros at step 1)
    pub v: &'a Tensor<f32>,
    /// clip [2] = (global norm, gradient scale), written by `GradNorm`
    pub clip: &'a Tensor<f32>,
}

/// The AdamW step of one parameter tensor, ready to record.
pub struct AdamW {
    pub n: usize,
    pub config: AdamWConfig,
    nx: u32,
    params_buf: wgpu::Buffer,
    dispatch: Dispatch,
}

impl AdamW {
    /// Built for step 1 at `config.lr`; call `set_step` before later steps.
    pub fn new(ctx: &GpuContext, config: &AdamWConfig, bufs: &AdamWBuffers<'_>) -> Result<Self> {
        const OP: &str = "adamw_step";
        config.validate()?;
        let n = bufs.p.numel();
        if n == 0 {
            return Err(Error::invalid(OP, "the parameter tensor is empty"));
        }
        let shape = &bufs.p.shape;
        bufs.g.expect_shape(OP, "g", shape)?;
        bufs.m.expect_shape(OP, "m", shape)?;
        bufs.v.expect_shape(OP, "v", shape)?;
        bufs.clip.expect_shape(OP, "clip", &[2])?;
        if n as u64 > u32::MAX as u64 {
            return Err(Error::Limit {
                what: format!("{OP}: elements of p"),
                needed: n as u64,
                max: u32::MAX as u64,
            });
        }
        let groups = (n as u32).div_ceil(ADAMW_WG);
        let grid = grid_1d(groups, ctx.limits.max_compute_workgroups_per_dimension);
        ctx.check_workgroups("adamw_step workgroups (folded)", grid.1 as u64)?;
        let params_buf = uniform(ctx, &config.params(config.lr, 1, n as u32, grid.0));
        let dispatch = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::AdamW(AdamWSpec::Step))?,
            &[
                &params_buf,
                &bufs.p.buffer,
                &bufs.g.buffer,
                &bufs.m.buffer,
                &bufs.v.buffer,
                &bufs.clip.buffer,
            ],
            Grid::Direct(grid.0, grid.1, 1),
        )?;
        Ok(AdamW {
            n,
            config: *config,
            nx: grid.0,
            params_buf,
            dispatch,
        })
    }

    /// Learning rate and bias corrections of step `step` (1-based) for the
    /// next submissions: a queued write of the uniform, no new buffer.
    pub fn set_step(&self, ctx: &GpuContext, lr: f32, step: u64) -> Result<()> {
        check_lr(lr)?;
        if step == 0 {
            return Err(Error::invalid("adamw", "steps count from 1"));
        }
        let params = self.config.params(lr, step, self.n as u32, self.nx);
        ctx.queue
            .write_buffer(&self.params_buf, 0, bytemuck::bytes_of(&params));
        Ok(())
    }

    /// Record the step: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// Partial sums of squares of a tensor of `n` elements.
pub fn grad_norm_chunks(n: usize) -> usize {
    n.div_ceil(GRAD_NORM_CHUNK as usize)
}

/// `grad_norm_partial` of one gradient tensor into `partials[offset ..
/// offset + grad_norm_chunks(n)]`, ready to record.
pub struct GradNormPartial {
    pub n: usize,
    pub offset: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl GradNormPartial {
    pub fn new(
        ctx: &GpuContext,
        g: &Tensor<f32>,
        partials: &Tensor<f32>,
        offset: usize,
    ) -> Result<Self> {
        const OP: &str = "grad_norm_partial";
        let n = g.numel();
        let chunks = grad_norm_chunks(n);
        if n == 0 {
            return Err(Error::invalid(OP, "the gradient tensor is empty"));
        }
        if offset + chunks > partials.numel() {
            return Err(Error::shape(
                OP,
                format!("partials of at least {} elements", offset + chunks),
                format!("partials {:?}", partials.shape),
            ));
        }
        if n as u64 > u32::MAX as u64 - GRAD_NORM_CHUNK as u64 {
            return Err(Error::Limit {
                what: format!("{OP}: elements of g"),
                needed: n as u64,
                max: u32::MAX as u64 - GRAD_NORM_CHUNK as u64,
            });
        }
        let grid = grid_1d(
            chunks as u32,
            ctx.limits.max_compute_workgroups_per_dimension,
        );
        ctx.check_workgroups("grad_norm_partial workgroups (folded)", grid.1 as u64)?;
        let params = GradNormParams {
            n: n as u32,
            offset: offset as u32,
            nx: grid.0,
            ..Default::default()
        };
        let params_buf = uniform(ctx, &params);
        let dispatch = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::AdamW(AdamWSpec::GradNormPartial))?,
            &[&params_buf, &g.buffer, &partials.buffer],
            Grid::Direct(grid.0, grid.1, 1),
        )?;
        Ok(GradNormPartial {
            n,
            offset,
            dispatch,
            _params: params_buf,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// `grad_norm_finish`: every partial, in order, into `clip [2]`.
pub struct GradNormFinish {
    pub count: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl GradNormFinish {
    /// `max_norm`: clip the global norm to this (> 0), or `None` for no
    /// clipping (scale 1, or 0 when the norm is not finite).
    pub fn new(
        ctx: &GpuContext,
        partials: &Tensor<f32>,
        clip: &Tensor<f32>,
        max_norm: Option<f32>,
    ) -> Result<Self> {
        const OP: &str = "grad_norm_finish";
        clip.expect_shape(OP, "clip", &[2])?;
        if let Some(x) = max_norm {
            if !(x.is_finite() && x > 0.0) {
                return Err(Error::invalid(OP, format!("max_norm = {x} must be > 0")));
            }
        }
        let count = partials.numel();
        if count as u64 > u32::MAX as u64 {
            return Err(Error::Limit {
                what: format!("{OP}: partials"),
                needed: count as u64,
                max: u32::MAX as u64,
            });
        }
        let params = GradNormParams {
            n: count as u32,
            clip_enabled: max_norm.is_some() as u32,
            max_norm: max_norm.unwrap_or(0.0),
            nx: 1,
            ..Default::default()
        };
        let params_buf = uniform(ctx, &params);
        let dispatch = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::AdamW(AdamWSpec::GradNormFinish))?,
            &[&params_buf, &partials.buffer, &clip.buffer],
            Grid::Direct(1, 1, 1),
        )?;
        Ok(GradNormFinish {
            count,
            dispatch,
            _params: params_buf,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// The plan of the global gradient norm of a model: each gradient tensor
/// gets its own range of one partials buffer (in the order given), one
/// `GradNormPartial` per tensor and one `GradNormFinish` into `clip`.
pub struct GradNorm {
    ranges: Vec<Range<usize>>,
    partial: Vec<GradNormPartial>,
    finish: GradNormFinish,
    partials: Tensor<f32>,
}

impl GradNorm {
    pub fn new(
        ctx: &GpuContext,
        grads: &[&Tensor<f32>],
        clip: &Tensor<f32>,
        max_norm: Option<f32>,
    ) -> Result<Self> {
        if grads.is_empty() {
            return Err(Error::invalid("grad_norm", "no gradient tensor"));
        }
        let mut ranges = Vec::with_capacity(grads.len());
        let mut next = 0;
        for g in grads {
            let chunks = grad_norm_chunks(g.numel());
            ranges.push(next..next + chunks);
            next += chunks;
        }
        let partials = Tensor::<f32>::zeros(ctx, "grad norm partials", &[next.max(1)])?;
        let partial = grads
            .iter()
            .zip(&ranges)
            .map(|(g, r)| GradNormPartial::new(ctx, g, &partials, r.start))
            .collect::<Result<Vec<_>>>()?;
        let finish = GradNormFinish::new(ctx, &partials, clip, max_norm)?;
        Ok(GradNorm {
            ranges,
            partial,
            finish,
            partials,
        })
    }

    /// The partials of gradient tensor `i` (in the order given to `new`).
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// partials [P]: every tensor's sums of squares (for inspection).
    pub fn partials(&self) -> &Tensor<f32> {
        &self.partials
    }

    /// Record the norm: one dispatch per gradient tensor, then the finish.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for p in &self.partial {
            p.record(pass);
        }
        self.finish.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_corrections_and_config_checks() {
        let c = AdamWConfig::default();
        let p = c.params(0.5, 2, 10, 1);
        assert!((p.bc1 - 0.19).abs() < 1e-7);
        assert_eq!(p.bc2, (1.0 - (0.999f32 as f64).powi(2)) as f32);
        assert_eq!(p.lr, 0.5);
        assert!(c.validate().is_ok());
        let bad = AdamWConfig { beta2: 1.0, ..c };
        assert!(matches!(bad.validate(), Err(Error::InvalidArgument { .. })));
        let bad = AdamWConfig { lr: f32::NAN, ..c };
        assert!(matches!(bad.validate(), Err(Error::InvalidArgument { .. })));
        assert_eq!(grad_norm_chunks(1), 1);
        assert_eq!(grad_norm_chunks(4097), 2);
    }
}
