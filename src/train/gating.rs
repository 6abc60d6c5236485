//! The training run's FFN choice: dense FFNs, or MoE layers under a gating rule
//! (`amoe train --gating`, the page's training form).

use crate::choice::choice;
use crate::kernels::Gating;

/// FFN layers of a training run: dense, or MoE with a gating rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrainGating {
    /// Dense FFNs (the baseline without experts).
    Dense,
    Top1,
    Top2,
    Adaptive,
}

choice! { TrainGating, "gating",
    Dense = "dense": "Dense FFNs (the baseline without experts)",
    Top1 = "top1",
    Top2 = "top2",
    Adaptive = "adaptive",
}

impl TrainGating {
    /// The model's `(dense, gate.gating)`: a dense model keeps top-1 as its (unused) rule.
    pub fn split(self) -> (bool, Gating) {
        match self {
            TrainGating::Dense => (true, Gating::Top1),
            TrainGating::Top1 => (false, Gating::Top1),
            TrainGating::Top2 => (false, Gating::Top2),
            TrainGating::Adaptive => (false, Gating::Adaptive),
        }
    }

    /// The choice a model's `(dense, gate.gating)` was made with; None
    /// for a pretrained model's fixed top-k, which training does not take.
    pub fn of(dense: bool, gating: Gating) -> Option<TrainGating> {
        match (dense, gating) {
            (true, _) => Some(TrainGating::Dense),
            (false, Gating::Top1) => Some(TrainGating::Top1),
            (false, Gating::Top2) => Some(TrainGating::Top2),
            (false, Gating::Adaptive) => Some(TrainGating::Adaptive),
            (false, Gating::TopK) => None,
        }
    }
}
