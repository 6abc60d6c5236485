//! Placeholder: filled in by the route kernel work.

use crate::gpu::KernelDef;

/// Specializations of the route kernels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RouteSpec {}

impl RouteSpec {
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
