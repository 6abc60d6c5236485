//! The transformer language model: configuration, the typed parameter tree,
//! the model graph shared by training, evaluation, prefill and decode, and
//! the training and evaluation steps recorded as one submit each;
//! `reference` is their CPU twin.

pub mod config;
pub mod cpu;
pub mod graph;
pub mod params;
pub mod reference;
pub mod transformer;

pub use config::{FfnKind, ModelConfig};
pub use params::{
    BlockParam, BlockParams, DtypeChoice, FfnParams, HostTensor, ParamId, ParamSpec, Params,
    QuantScope, Storage, StorageChoice,
};
pub use transformer::{
    DataParallelTimes, EvalOut, EvalStep, HostParams, Model, OptConfig, StepArgs, StepStats,
    TrainStep,
};
