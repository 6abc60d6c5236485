//! Curriculum complexity launcher (`shaders/complexity.wgsl`): per sequence
//! of a training batch, the fraction of its tokens that one MoE layer's gate
//! sent to two experts, written into that layer's column of
//! `complexity [B, cols]`. Twin: `reference::complexity::sequence_complexity`.

use super::{Kernel, ParamsLayout, UNUSED};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor};
use crate::gpu_params;

pub const COMPLEXITY_WG: u32 = 64;

const COMPLEXITY_WGSL: &str = include_str!("../../shaders/complexity.wgsl");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ComplexitySpec;

impl ComplexitySpec {
    pub fn name(&self) -> &'static str {
        "sequence_complexity"
    }

    pub fn def(&self) -> KernelDef {
        KernelDef::new(
            self.name(),
            &[COMPLEXITY_WGSL],
            self.name(),
            &[("WG", COMPLEXITY_WG), ("UNUSED", UNUSED)],
            &[
                Binding::Uniform,
                Binding::Read,      // topk_ids [B N, K]
                Binding::ReadWrite, // complexity [B, cols]
            ],
        )
    }

    pub fn all() -> Vec<Self> {
        vec![ComplexitySpec]
    }
}

gpu_params! {
    /// Mirrors `struct ComplexityParams` in `shaders/complexity.wgsl`.
    pub struct ComplexityParams {
        pub b: u32,
        pub n: u32,
        pub k: u32,
        pub col: u32,
        pub cols: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<ComplexityParams>(Kernel::Complexity(
        ComplexitySpec,
    ))]
}

/// One layer's column of the complexity matrix, ready to record.
pub struct SequenceComplexity {
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl SequenceComplexity {
    /// `topk_ids [B N, K]` (K 1..=8) of `b` sequences into column `col` of
    /// `complexity [B, cols]`.
    pub fn new(
        ctx: &GpuContext,
        b: usize,
        topk_ids: &Tensor<u32>,
        complexity: &Tensor<f32>,
        col: usize,
    ) -> Result<Self> {
        let op = "sequence_complexity";
        if topk_ids.shape.len() != 2 || b == 0 {
            return Err(Error::shape(
                op,
                "topk_ids [B N, K] with B >= 1",
                format!("{:?} with B = {b}", topk_ids.shape),
            ));
        }
        let (t, k) = (topk_ids.shape[0], topk_ids.shape[1]);
        if t == 0 || !t.is_multiple_of(b) || !(1..=crate::kernels::MAX_TOPK).contains(&k) {
            return Err(Error::shape(
                op,
                format!("topk_ids [{b} N, 1..={}]", crate::kernels::MAX_TOPK),
                format!("{:?}", topk_ids.shape),
            ));
        }
        let cols = complexity.shape.get(1).copied().unwrap_or(0);
        if complexity.shape.len() != 2 || complexity.shape[0] != b || col >= cols {
            return Err(Error::shape(
                op,
                format!("complexity [{b}, cols] with column {col} < cols"),
                format!("{:?}", complexity.shape),
            ));
        }
        if t as u64 * k as u64 > u32::MAX as u64 {
            return Err(Error::Limit {
                what: format!("{op}: slots"),
                needed: t as u64 * k as u64,
                max: u32::MAX as u64,
            });
        }
        let groups = (b as u32).div_ceil(COMPLEXITY_WG);
        ctx.check_workgroups("sequence_complexity workgroups", groups as u64)?;
        let params = uniform(
            ctx,
            &ComplexityParams {
                b: b as u32,
                n: (t / b) as u32,
                k: k as u32,
                col: col as u32,
                cols: cols as u32,
                _pad0: 0,
                _pad1: 0,
                _pad2: 0,
            },
        );
        let dispatch = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::Complexity(ComplexitySpec))?,
            &[&params, &topk_ids.buffer, &complexity.buffer],
            Grid::Direct(groups, 1, 1),
        )?;
        Ok(SequenceComplexity {
            dispatch,
            _params: params,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}
