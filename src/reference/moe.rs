//! CPU twin of `moe::MoeLayer::forward`, composed of the kernels' twins: router
//! matmul, gate, and the per-token decode FFN for the experts (an independent
//! formulation of what the grouped path computes through its slot plan).

use crate::error::Result;
use crate::kernels::decode::DecodeShape;
use crate::kernels::matmul::Trans;
use crate::kernels::moe_config::{MoeConfig, MoeWeights};
use crate::reference::decode::decode_ffn;
use crate::reference::gate::{gate_forward, GateOutput};
use crate::reference::matmul::matmul;

/// The layer's outputs and the routing decisions behind them.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeOutput {
    /// router_logits [T, E]
    pub logits: Vec<f32>,
    pub gate: GateOutput,
    /// y [T, D]
    pub y: Vec<f32>,
}

/// Forward of one MoE layer on `x [T, D]`.
pub fn moe_forward(cfg: &MoeConfig, w: &MoeWeights, x: &[f32], t: usize) -> Result<MoeOutput> {
    cfg.validate()?;
    w.validate(cfg)?;
    let (d, f, e, k) = (cfg.d, cfg.f, cfg.e, cfg.k());
    let logits = matmul(x, &w.w_router, t, e, d, Trans::NN, 1.0, 0.0, None);
    let gate = gate_forward(&cfg.gate, &logits, t, e)?;
    let shape = DecodeShape { t, k, e, d, f };
    let (_, y) = decode_ffn(
        &shape,
        cfg.activation,
        x,
        &gate.topk_ids,
        &gate.topk_weights,
        &w.w1,
        w.w3.as_deref(),
        &w.w2,
    );
    Ok(MoeOutput { logits, gate, y })
}
