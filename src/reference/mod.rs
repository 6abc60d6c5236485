//! Plain-Rust twins of every WGSL kernel: same names, same argument order.
//! They are the oracle of the GPU tests and of `amoe conformance`.

pub mod activation;
pub mod attention;
pub mod combine;
pub mod decode;
pub mod expert;
pub mod gate;
pub mod matmul;
pub mod moe;
pub mod route;
