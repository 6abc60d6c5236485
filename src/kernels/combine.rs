//! Combine launcher: `y[t, :] = sum_j topk_weights[t, j] *
//! y_expert[slot_of_token[t, j], :]` (`shaders/combine.wgsl`), one dispatch,
//! a gather (no float atomics). Twin: `reference::combine::combine_forward`.

use super::{grid_1d, Kernel, ParamsLayout, UNUSED};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

/// Invocations per workgroup (4 output columns each).
pub const COMBINE_WG: u32 = 64;

const COMBINE_WGSL: &str = include_str!("../../shaders/combine.wgsl");

/// Specializations of the combine kernel. `vec4`: D is a multiple of 4, so
/// rows of `y_expert` are read with vec4 loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CombineSpec {
    pub vec4: bool,
}

impl CombineSpec {
    /// Kernel name (WGSL entry point, twin, conformance `kernel` field).
    pub fn name(&self) -> &'static str {
        "combine_forward"
    }

    pub fn def(&self) -> KernelDef {
        KernelDef::new(
            format!(
                "{}{}",
                self.name(),
                if self.vec4 { "_vec4" } else { "_scalar" }
            ),
            &[COMBINE_WGSL],
            self.name(),
            &[
                ("WG", COMBINE_WG),
                ("VEC4", self.vec4 as u32),
                ("UNUSED", UNUSED),
            ],
            &[
                Binding::Uniform,
                Binding::Read,      // topk_weights [T, K]
                Binding::Read,      // slot_of_token [T, K]
                Binding::Read,      // y_expert [R, D]
                Binding::ReadWrite, // y [T, D]
            ],
        )
    }

    pub fn all() -> Vec<Self> {
        vec![CombineSpec { vec4: false }, CombineSpec { vec4: true }]
    }
}

gpu_params! {
    /// Mirrors `struct CombineParams` in `shaders/combine.wgsl`.
    pub struct CombineParams {
        pub t: u32,
        pub k: u32,
        pub d: u32,
        pub nx: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<CombineParams>(Kernel::Combine(
        CombineSpec { vec4: true },
    ))]
}

/// The tensors combine reads and writes. T and K come from `topk_weights`,
/// D from `y`.
pub struct CombineBuffers<'a> {
    /// topk_weights [T, K]
    pub topk_weights: &'a Tensor<f32>,
    /// slot_of_token [T, K] (from the route)
    pub slot_of_token: &'a Tensor<u32>,
    /// y_expert [R, D], R = the routing layout's max_rows
    pub y_expert: &'a Tensor<f32>,
    /// y [T, D]
    pub y: &'a Tensor<f32>,
}

/// Check the shapes; returns (T, K, D). CPU only.
pub fn check(
    weights: &[usize],
    slots: &[usize],
    y_expert: &[usize],
    y: &[usize],
) -> Result<(usize, usize, usize)> {
    let &[t, k] = weights else {
        return Err(Error::shape(
            "combine",
            "topk_weights [T, K]",
            format!("{weights:?}"),
        ));
    };
    let &[ty, d] = y else {
        return Err(Error::shape("combine", "y [T, D]", format!("y {y:?}")));
    };
    if t == 0 || k == 0 || d == 0 {
        return Err(Error::invalid(
            "combine",
            format!("T = {t}, K = {k}, D = {d}: all must be >= 1"),
        ));
    }
    if ty != t {
        return Err(Error::shape(
            "combine",
            format!("y [{t}, D]"),
            format!("y {y:?}"),
        ));
    }
    if slots != [t, k] {
        return Err(Error::shape(
            "combine",
            format!("slot_of_token [{t}, {k}]"),
            format!("slot_of_token {slots:?}"),
        ));
    }
    if y_expert.len() != 2 || y_expert[1] != d || y_expert[0] == 0 {
        return Err(Error::shape(
            "combine",
            format!("y_expert [R, {d}] with R >= 1"),
            format!("y_expert {y_expert:?}"),
        ));
    }
    // u64: usize is 32 bits in the browser (wasm32).
    let largest = (t as u64).max(y_expert[0] as u64) * d as u64;
    if largest > u32::MAX as u64 {
        return Err(Error::Limit {
            what: "combine: elements of y / y_expert".into(),
            needed: largest,
            max: u32::MAX as u64,
        });
    }
    Ok((t, k, d))
}

/// The combine of one shape, ready to record.
pub struct Combine {
    pub t: usize,
    pub k: usize,
    pub d: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl Combine {
    pub fn new(ctx: &GpuContext, bufs: &CombineBuffers<'_>) -> Result<Self> {
        let (t, k, d) = check(
            &bufs.topk_weights.shape,
            &bufs.slot_of_token.shape,
            &bufs.y_expert.shape,
            &bufs.y.shape,
        )?;
        let groups = ((t * d.div_ceil(4)) as u32).div_ceil(COMBINE_WG);
        let grid = grid_1d(groups, ctx.limits.max_compute_workgroups_per_dimension);
        ctx.check_workgroups("combine workgroups (folded)", grid.1 as u64)?;
        let params = CombineParams {
            t: t as u32,
            k: k as u32,
            d: d as u32,
            nx: grid.0,
        };
        let pipeline = ctx.pipeline(&Kernel::Combine(CombineSpec { vec4: d % 4 == 0 }))?;
        let params_buf = uniform(ctx, &params);
        let dispatch = Dispatch::new(
            ctx,
            pipeline,
            &[
                &params_buf,
                &bufs.topk_weights.buffer,
                &bufs.slot_of_token.buffer,
                &bufs.y_expert.buffer,
                &bufs.y.buffer,
            ],
            Grid::Direct(grid.0, grid.1, 1),
        )?;
        Ok(Combine {
            t,
            k,
            d,
            dispatch,
            _params: params_buf,
        })
    }

    /// Record the combine: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_shapes_with_typed_errors() {
        assert_eq!(
            check(&[3, 2], &[3, 2], &[40, 8], &[3, 8]).unwrap(),
            (3, 2, 8)
        );
        assert!(matches!(
            check(&[0, 2], &[0, 2], &[40, 8], &[0, 8]),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            check(&[3, 2], &[3, 1], &[40, 8], &[3, 8]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&[3, 2], &[3, 2], &[40, 7], &[3, 8]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&[3, 2], &[3, 2], &[40, 8], &[4, 8]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&[6], &[3, 2], &[40, 8], &[3, 8]),
            Err(Error::Shape { .. })
        ));
    }
}
