//! Elementwise add launcher (`shaders/add.wgsl`): `out = a + b` over tensors
//! of one shape; the transformer's residual adds and gradient sums. Twin:
//! `reference::add::add_forward`.

use super::{grid_1d, Kernel, ParamsLayout};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

pub const ADD_WG: u32 = 64;

const ADD_WGSL: &str = include_str!("../../shaders/add.wgsl");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddSpec;

impl AddSpec {
    pub fn name(&self) -> &'static str {
        "add_forward"
    }

    pub fn def(&self) -> KernelDef {
        KernelDef::new(
            self.name(),
            &[ADD_WGSL],
            self.name(),
            &[("WG", ADD_WG)],
            &[
                Binding::Uniform,
                Binding::Read,      // a [N]
                Binding::Read,      // b [N]
                Binding::ReadWrite, // out [N]
            ],
        )
    }

    pub fn all() -> Vec<Self> {
        vec![AddSpec]
    }
}

gpu_params! {
    /// Mirrors `struct AddParams` in `shaders/add.wgsl`.
    pub struct AddParams {
        pub n: u32,
        pub nx: u32,
        pub scale: f32,
        pub _pad1: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<AddParams>(Kernel::Add(AddSpec))]
}

/// `out = a + scale * b` on fixed tensors, ready to record.
pub struct Add {
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl Add {
    /// `a`, `b` and `out` must have one shape; `out` may not be `a` or `b`
    /// (one buffer is never bound both read and read_write).
    pub fn new(
        ctx: &GpuContext,
        a: &Tensor<f32>,
        b: &Tensor<f32>,
        out: &Tensor<f32>,
    ) -> Result<Self> {
        Self::scaled(ctx, a, b, 1.0, out)
    }

    /// `out = a + scale * b` (a residual multiplier).
    pub fn scaled(
        ctx: &GpuContext,
        a: &Tensor<f32>,
        b: &Tensor<f32>,
        scale: f32,
        out: &Tensor<f32>,
    ) -> Result<Self> {
        if !scale.is_finite() {
            return Err(Error::invalid("add", format!("scale {scale}")));
        }
        if a.shape != b.shape || a.shape != out.shape {
            return Err(Error::shape(
                "add",
                format!("a, b and out of one shape {:?}", a.shape),
                format!("b {:?}, out {:?}", b.shape, out.shape),
            ));
        }
        if out.buffer == a.buffer || out.buffer == b.buffer {
            return Err(Error::invalid("add", "out aliases an input"));
        }
        let n = a.numel();
        if n == 0 || n as u64 > u32::MAX as u64 {
            return Err(Error::invalid(
                "add",
                format!("{n} elements (1..=u32::MAX)"),
            ));
        }
        let grid = grid_1d(
            (n as u32).div_ceil(ADD_WG),
            ctx.limits.max_compute_workgroups_per_dimension,
        );
        ctx.check_workgroups("add workgroups (folded)", grid.1 as u64)?;
        let params = uniform(
            ctx,
            &AddParams {
                n: n as u32,
                nx: grid.0,
                scale,
                _pad1: 0,
            },
        );
        let dispatch = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::Add(AddSpec))?,
            &[&params, &a.buffer, &b.buffer, &out.buffer],
            Grid::Direct(grid.0, grid.1, 1),
        )?;
        Ok(Add {
            dispatch,
            _params: params,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}
