//! The transformer language model: configuration, parameters on the GPU,
//! and the training and evaluation steps recorded as one submit each.

pub mod config;
pub mod transformer;

pub use config::{FfnKind, ModelConfig};
pub use transformer::{EvalStep, HostParams, Model, OptConfig, StepArgs, StepStats, TrainStep};
