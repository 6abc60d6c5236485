//! Small leaf utilities with no dependency on the rest of the crate: the
//! deterministic RNG that builds test data and initial weights, and a
//! wall-clock stopwatch that works natively and in the browser.

mod rng;
mod stopwatch;

pub use rng::Rng;
pub use stopwatch::Stopwatch;
