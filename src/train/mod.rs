//! Host-side pieces of training: corpus and batches, the curriculum order,
//! metrics logs and plots. The tokenizer (`crate::tokenizer`), the GPU model and the
//! optimizer live elsewhere; these modules only produce the token ids and targets the
//! model consumes and record what it reports.
//!
//! `data` and `curriculum` compile for wasm32 (a browser page can batch); reading
//! files, metrics logs and plots are native only.

pub mod collective;
pub mod curriculum;
pub mod data;
pub mod expert_parallel;
pub mod gating;
#[cfg(not(target_arch = "wasm32"))]
pub mod metrics;
#[cfg(not(target_arch = "wasm32"))]
pub mod plot;
#[cfg(not(target_arch = "wasm32"))]
pub mod reproduce;
pub mod session;
#[cfg(not(target_arch = "wasm32"))]
pub mod trainer;

pub use gating::TrainGating;
