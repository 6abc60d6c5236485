//! The transformer language model: configuration, parameters on the GPU,
//! and the training and evaluation steps recorded as one submit each;
//! `reference` is their CPU twin.

pub mod config;
pub mod reference;
pub mod transformer;

pub use config::{FfnKind, ModelConfig};
pub use transformer::{EvalStep, HostParams, Model, OptConfig, StepArgs, StepStats, TrainStep};
