//! Placeholder: conformance cases of the decode kernels.

use super::CheckResult;
use crate::error::Result;
use crate::gpu::GpuContext;

/// A decode conformance case.
#[derive(Clone, Debug)]
pub enum Case {}

impl Case {
    pub fn names(&self) -> (String, String) {
        match *self {}
    }
}

pub fn cases() -> Vec<Case> {
    Vec::new()
}

pub async fn run(_ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    match *case {}
}
