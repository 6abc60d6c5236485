//! Placeholder: filled in by the roofline kernel work.

use crate::gpu::KernelDef;

/// Specializations of the roofline kernels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RooflineSpec {}

impl RooflineSpec {
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
