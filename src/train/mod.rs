//! Host-side pieces of training: tokenizer, corpus and batches, the curriculum order,
//! metrics logs and plots. The GPU model and the optimizer live elsewhere; these modules
//! only produce the token ids and targets the model consumes and record what it reports.
//!
//! `tokenizer`, `data` and `curriculum` compile for wasm32 (a browser page can tokenize and
//! batch); reading files, metrics logs and plots are native only.

pub mod curriculum;
pub mod data;
pub mod gating;
#[cfg(not(target_arch = "wasm32"))]
pub mod metrics;
#[cfg(not(target_arch = "wasm32"))]
pub mod plot;
#[cfg(not(target_arch = "wasm32"))]
pub mod reproduce;
pub mod session;
pub mod tokenizer;
#[cfg(not(target_arch = "wasm32"))]
pub mod trainer;

pub use gating::TrainGating;
pub use tokenizer::Tokenizer;
