//! Roofline microbenchmarks (`shaders/roofline.wgsl`): the adapter's FMA peak
//! and in-shader copy bandwidth. `amoe bench kernels` reports every kernel's
//! GFLOP/s also as a percentage of the measured peak.
//!
//! Twin: `fma_expected`, the closed form of the FMA chain, which the bench
//! checks so that a compiler cannot have optimized the work away.

use crate::error::Result;
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};

use super::{grid_1d, Kernel, ParamsLayout};

const WGSL: &str = include_str!("../../shaders/roofline.wgsl");
const WG: u32 = 64;

crate::gpu_params! {
    /// Params of `shaders/roofline.wgsl`.
    pub struct RooflineParams {
        pub n: u32,
        pub iters: u32,
        pub stride: u32,
        pub _pad0: u32,
    }
}

/// The two roofline kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RooflineSpec {
    Fma,
    Copy,
}

impl RooflineSpec {
    pub fn def(&self) -> KernelDef {
        let entry = match self {
            RooflineSpec::Fma => "roofline_fma",
            RooflineSpec::Copy => "roofline_copy",
        };
        KernelDef::new(
            entry,
            &[WGSL],
            entry,
            &[("WG", WG)],
            &[Binding::Uniform, Binding::Read, Binding::ReadWrite],
        )
    }
    pub fn all() -> Vec<Self> {
        vec![RooflineSpec::Fma, RooflineSpec::Copy]
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<RooflineParams>(Kernel::Roofline(
        RooflineSpec::Fma,
    ))]
}

/// A roofline kernel bound to its buffers, ready to record.
pub struct Roofline {
    dispatch: Dispatch,
    /// FLOPs (fma) or bytes moved (copy) per dispatch.
    pub work: f64,
}

impl Roofline {
    /// FMA chains: `invocations` threads, `iters` iterations each.
    pub fn fma(
        ctx: &GpuContext,
        invocations: u32,
        iters: u32,
        src: &Tensor<f32>,
        dst: &Tensor<f32>,
    ) -> Result<Self> {
        let params = RooflineParams {
            n: invocations,
            iters,
            stride: 0,
            _pad0: 0,
        };
        let work = invocations as f64 * iters as f64 * 16.0 * 8.0 * 4.0 * 2.0;
        Self::build(
            ctx,
            RooflineSpec::Fma,
            params,
            invocations.div_ceil(WG),
            src,
            dst,
            work,
        )
    }

    /// Copy `dst = src` (vec4 elements), one per invocation.
    pub fn copy(ctx: &GpuContext, src: &Tensor<f32>, dst: &Tensor<f32>) -> Result<Self> {
        let n = (src.numel().min(dst.numel()) / 4) as u32;
        let params = RooflineParams {
            n,
            iters: 0,
            stride: 0,
            _pad0: 0,
        };
        let workgroups = n.div_ceil(WG);
        let work = 2.0 * 16.0 * n as f64;
        Self::build(ctx, RooflineSpec::Copy, params, workgroups, src, dst, work)
    }

    fn build(
        ctx: &GpuContext,
        spec: RooflineSpec,
        params: RooflineParams,
        workgroups: u32,
        src: &Tensor<f32>,
        dst: &Tensor<f32>,
        work: f64,
    ) -> Result<Self> {
        let pipeline = ctx.pipeline(&Kernel::Roofline(spec))?;
        let u = uniform(ctx, &params);
        let grid = grid_1d(workgroups, ctx.limits.max_compute_workgroups_per_dimension);
        let dispatch = Dispatch::new(
            ctx,
            pipeline,
            &[&u, &src.buffer, &dst.buffer],
            Grid::Direct(grid.0, grid.1, 1),
        )?;
        Ok(Roofline { dispatch, work })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass) {
        self.dispatch.record(pass);
    }
}

/// Closed form of one invocation's FMA result (sum of the 8 chains, per lane)
/// for a starting value `a`: chain j starts at `a + j`.
pub fn fma_expected(a: f32, iters: u32) -> f32 {
    let (m, c) = (0.999f64, 0.001f64);
    let fixed = c / (1.0 - m);
    let decay = m.powi(16 * iters as i32);
    (0..8)
        .map(|j| fixed + (a as f64 + j as f64 - fixed) * decay)
        .sum::<f64>() as f32
}
