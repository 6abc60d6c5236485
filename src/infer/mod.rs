//! Inference: a checkpoint on the GPU, prefill through the grouped MoE path,
//! decode through the few-token path with a KV cache, sampling, per-token
//! routing traces, and the CPU twin of greedy generation.
//!
//! ```text
//! prompt ids --prefill (T = P, flash attention, grouped experts)--> K/V cache, logits
//!            --decode  (T = 1, kv_attention over the cache, mat-vec experts)--> logits
//!            --sampler (host)--> next id --> ...
//! ```
//! A decode step is one encoder and one submit; what comes back is one row
//! of logits and each MoE layer's experts and weights for the token.

pub mod calibration;
pub mod checkpoint;
pub mod engine;
pub mod eval;
pub mod reference;
pub mod routes;
pub mod sampling;
pub mod sweep;

pub use checkpoint::InferCheckpoint;
pub use engine::{Engine, GenConfig, GenToken, Generation, LayerRoute, StepOut, StopReason};
pub use sampling::{Sampler, Sampling};
