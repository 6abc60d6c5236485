//! Placeholder: filled in by the matmul kernel work.

use crate::gpu::KernelDef;

/// Specializations of the matmul kernels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MatmulSpec {}

impl MatmulSpec {
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
