//! Placeholder: filled in by the gate kernel work.

use crate::gpu::KernelDef;

/// Specializations of the gate kernels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GateSpec {}

impl GateSpec {
    pub fn def(&self) -> KernelDef {
        match *self {}
    }
    pub fn all() -> Vec<Self> {
        Vec::new()
    }
}

pub fn params_layouts() -> Vec<super::ParamsLayout> {
    Vec::new()
}
