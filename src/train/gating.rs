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
    /// A fixed top-k router (k from `--max-experts`), weights renormalized
    /// over the k: the router of Mixtral, Granite-MoE or Qwen3-MoE.
    TopK,
}

choice! { TrainGating, "gating",
    Dense = "dense": "Dense FFNs (the baseline without experts)",
    Top1 = "top1",
    Top2 = "top2",
    Adaptive = "adaptive",
    TopK = "topk": "A fixed top-k router (k = --max-experts), weights renormalized over the k",
}

impl TrainGating {
    /// The model's `(dense, gate.gating)`: a dense model keeps top-1 as its (unused) rule.
    pub fn split(self) -> (bool, Gating) {
        match self {
            TrainGating::Dense => (true, Gating::Top1),
            TrainGating::Top1 => (false, Gating::Top1),
            TrainGating::Top2 => (false, Gating::Top2),
            TrainGating::Adaptive => (false, Gating::Adaptive),
            TrainGating::TopK => (false, Gating::TopK),
        }
    }

    /// The choice a model's `(dense, gate.gating)` was made with (a
    /// top-k router with a rule is `--gating adaptive --max-experts K`).
    pub fn of(dense: bool, gating: Gating) -> TrainGating {
        match (dense, gating) {
            (true, _) => TrainGating::Dense,
            (false, Gating::Top1) => TrainGating::Top1,
            (false, Gating::Top2) => TrainGating::Top2,
            (false, Gating::Adaptive) => TrainGating::Adaptive,
            (false, Gating::TopK) => TrainGating::TopK,
        }
    }
}
