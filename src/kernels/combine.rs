//! Placeholder: filled in by the combine kernel work.

use crate::gpu::KernelDef;

/// Specializations of the combine kernels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CombineSpec {}

impl CombineSpec {
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
