//! amoe: Mixture-of-Experts training and inference on any GPU through WebGPU.
//!
//! WGSL compute shaders do the router, the top-1 / top-2 / adaptive expert
//! selection (Li et al., EMNLP 2023), the token dispatch and the expert
//! matmuls; one wgpu code path runs them on Vulkan, Metal, DX12, OpenGL and in
//! the browser. See ARCHITECTURE.md for the data flow and decisions.

pub mod bench;
pub mod checkpoint;
pub mod choice;
pub mod conformance;
pub mod error;
pub mod gpu;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod moe;
pub mod quant;
pub mod reference;
pub mod tokenizer;
pub mod tol;
pub mod train;
pub mod util;
#[cfg(target_arch = "wasm32")]
pub mod web;

pub use error::{Error, Result};
pub use gpu::{AdapterFilter, GpuContext};
