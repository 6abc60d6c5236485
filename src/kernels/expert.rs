//! Placeholder: filled in by the expert kernel work.

use crate::gpu::KernelDef;

/// Specializations of the expert kernels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExpertSpec {}

impl ExpertSpec {
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
