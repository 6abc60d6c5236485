//! Typed launchers, one module per shader family. Each launcher checks shapes
//! and limits, fills the family's params struct, and records dispatches into a
//! caller's command encoder (nothing is submitted here).
//!
//! `Kernel` is the typed pipeline-cache key: one variant per family, each
//! holding that family's small spec (tile sizes, mode...).

pub mod adamw;
pub mod add;
pub mod attention;
pub mod combine;
pub mod common;
pub mod complexity;
pub mod cross_entropy;
pub mod decode;
pub mod embedding;
pub mod expert;
pub mod gate;
pub mod kv_cache;
pub mod matmul;
pub mod moe_backward;
pub mod moe_config;
pub mod qk;
pub mod rmsnorm;
pub mod roofline;
pub mod route;

/// The f16 widening every kernel reading f16 weights prepends
/// (`shaders/f16.wgsl`).
pub(crate) const F16_WGSL: &str = include_str!("../../shaders/f16.wgsl");
/// Block-quantized weights' index and dequantization helpers (needs F16_WGSL).
pub(crate) const QUANT_WGSL: &str = include_str!("../../shaders/quant.wgsl");

/// `F16_WGSL` when a kernel reads f16 weights, else nothing.
pub(crate) fn f16_source(f16: bool) -> &'static str {
    if f16 {
        F16_WGSL
    } else {
        ""
    }
}

pub use common::*;

use crate::gpu::{GpuParams, KernelDef, KernelKey};

/// Typed identity of a compiled pipeline: the key of `GpuContext::pipeline`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Matmul(matmul::MatmulSpec),
    Gate(gate::GateSpec),
    Route(route::RouteSpec),
    Expert(expert::ExpertSpec),
    Combine(combine::CombineSpec),
    Decode(decode::DecodeSpec),
    Roofline(roofline::RooflineSpec),
    MoeBackward(moe_backward::MoeBackwardSpec),
    ExpertBackward(moe_backward::ExpertBackwardSpec),
    Add(add::AddSpec),
    Embedding(embedding::EmbeddingSpec),
    AdamW(adamw::AdamWSpec),
    CrossEntropy(cross_entropy::CrossEntropySpec),
    RmsNorm(rmsnorm::RmsNormSpec),
    Attention(attention::AttentionSpec),
    KvCache(kv_cache::KvSpec),
    Complexity(complexity::ComplexitySpec),
    Qk(qk::QkSpec),
}

impl Kernel {
    pub fn def(&self) -> KernelDef {
        match self {
            Kernel::Matmul(s) => s.def(),
            Kernel::Gate(s) => s.def(),
            Kernel::Route(s) => s.def(),
            Kernel::Expert(s) => s.def(),
            Kernel::Combine(s) => s.def(),
            Kernel::Decode(s) => s.def(),
            Kernel::Roofline(s) => s.def(),
            Kernel::MoeBackward(s) => s.def(),
            Kernel::ExpertBackward(s) => s.def(),
            Kernel::Add(s) => s.def(),
            Kernel::Embedding(s) => s.def(),
            Kernel::AdamW(s) => s.def(),
            Kernel::CrossEntropy(s) => s.def(),
            Kernel::RmsNorm(s) => s.def(),
            Kernel::Attention(s) => s.def(),
            Kernel::KvCache(s) => s.def(),
            Kernel::Complexity(s) => s.def(),
            Kernel::Qk(s) => s.def(),
        }
    }

    /// Every entry point and specialization amoe can build: what the naga
    /// cross-compilation test translates to SPIR-V, MSL, HLSL and GLSL.
    pub fn all() -> Vec<Kernel> {
        let mut v = Vec::new();
        v.extend(matmul::MatmulSpec::all().into_iter().map(Kernel::Matmul));
        v.extend(gate::GateSpec::all().into_iter().map(Kernel::Gate));
        v.extend(route::RouteSpec::all().into_iter().map(Kernel::Route));
        v.extend(expert::ExpertSpec::all().into_iter().map(Kernel::Expert));
        v.extend(combine::CombineSpec::all().into_iter().map(Kernel::Combine));
        v.extend(decode::DecodeSpec::all().into_iter().map(Kernel::Decode));
        v.extend(
            roofline::RooflineSpec::all()
                .into_iter()
                .map(Kernel::Roofline),
        );
        v.extend(
            moe_backward::MoeBackwardSpec::all()
                .into_iter()
                .map(Kernel::MoeBackward),
        );
        v.extend(
            moe_backward::ExpertBackwardSpec::all()
                .into_iter()
                .map(Kernel::ExpertBackward),
        );
        v.extend(add::AddSpec::all().into_iter().map(Kernel::Add));
        v.extend(
            embedding::EmbeddingSpec::all()
                .into_iter()
                .map(Kernel::Embedding),
        );
        v.extend(adamw::AdamWSpec::all().into_iter().map(Kernel::AdamW));
        v.extend(
            cross_entropy::CrossEntropySpec::all()
                .into_iter()
                .map(Kernel::CrossEntropy),
        );
        v.extend(rmsnorm::RmsNormSpec::all().into_iter().map(Kernel::RmsNorm));
        v.extend(
            attention::AttentionSpec::all()
                .into_iter()
                .map(Kernel::Attention),
        );
        v.extend(kv_cache::KvSpec::all().into_iter().map(Kernel::KvCache));
        v.extend(
            complexity::ComplexitySpec::all()
                .into_iter()
                .map(Kernel::Complexity),
        );
        v.extend(qk::QkSpec::all().into_iter().map(Kernel::Qk));
        v
    }
}

impl KernelKey for Kernel {
    fn def(&self) -> KernelDef {
        Kernel::def(self)
    }
}

/// A Rust params struct and the WGSL source declaring its twin, for the
/// layout test (naga reflection).
#[derive(Clone, Debug)]
pub struct ParamsLayout {
    pub wgsl_name: &'static str,
    pub fields: Vec<(&'static str, usize)>,
    pub size: usize,
    /// A kernel whose source declares the WGSL struct.
    pub kernel: Kernel,
}

impl ParamsLayout {
    pub fn of<P: GpuParams>(kernel: Kernel) -> Self {
        ParamsLayout {
            wgsl_name: P::WGSL_NAME,
            fields: P::fields(),
            size: std::mem::size_of::<P>(),
            kernel,
        }
    }
}

/// Every params struct of every family.
pub fn params_layouts() -> Vec<ParamsLayout> {
    let mut v = Vec::new();
    v.extend(matmul::params_layouts());
    v.extend(gate::params_layouts());
    v.extend(route::params_layouts());
    v.extend(expert::params_layouts());
    v.extend(combine::params_layouts());
    v.extend(decode::params_layouts());
    v.extend(roofline::params_layouts());
    v.extend(moe_backward::params_layouts());
    v.extend(add::params_layouts());
    v.extend(complexity::params_layouts());
    v.extend(embedding::params_layouts());
    v.extend(adamw::params_layouts());
    v.extend(cross_entropy::params_layouts());
    v.extend(rmsnorm::params_layouts());
    v.extend(attention::params_layouts());
    v.extend(kv_cache::params_layouts());
    v.extend(qk::params_layouts());
    v
}

/// Workgroup grid for `n` workgroups, folded into 2-D past the per-dimension
/// limit. Shaders recover the linear index as `id.x + id.y * nx`.
pub fn grid_1d(n: u32, max_per_dim: u32) -> (u32, u32) {
    if n <= max_per_dim {
        (n.max(1), 1)
    } else {
        let y = n.div_ceil(max_per_dim);
        (n.div_ceil(y), y)
    }
}
