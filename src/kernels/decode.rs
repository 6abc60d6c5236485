//! Placeholder: filled in by the decode kernel work.

use crate::gpu::KernelDef;

/// Specializations of the decode kernels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DecodeSpec {}

impl DecodeSpec {
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
