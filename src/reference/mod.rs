//! Plain-Rust twins of every WGSL kernel: same names, same argument order.
//! They are the oracle of the GPU tests and of `amoe conformance`.

pub mod activation;
pub mod adamw;
pub mod add;
pub mod attention;
pub mod combine;
pub mod complexity;
pub mod cross_entropy;
pub mod decode;
pub mod embedding;
pub mod expert;
#[cfg(test)]
pub(crate) mod finite_diff;
pub mod gate;
pub mod kv_cache;
pub mod matmul;
pub mod moe;
pub mod moe_backward;
pub mod moe_train;
pub mod qk;
pub mod rmsnorm;
pub mod route;
