//! CPU twin of generation: every next token from a full recomputation of
//! the window with `model::reference::forward` (no cache), greedy, with the
//! engine's sliding-window rule. The GPU engine must give the same tokens.

use crate::error::Result;
use crate::infer::engine::{check_prompt, slide, LayerRoute};
use crate::infer::sampling::argmax;
use crate::kernels::{GateConfig, UNUSED};
use crate::model::reference::{forward, to_float};
use crate::model::{HostParams, ModelConfig};

/// Logits [len, V] and per-token routes of `ids` (from position 0), under
/// `gate`. The sequence is padded to the context: attention is causal and
/// every other op works per token, so the padding changes no earlier row.
pub fn window_forward(
    cfg: &ModelConfig,
    params: &[Vec<f32>],
    ids: &[u32],
    gate: GateConfig,
) -> Result<(Vec<f32>, Vec<Vec<LayerRoute>>)> {
    check_prompt(cfg, ids)?;
    let n = cfg.context;
    let mut padded = ids.to_vec();
    padded.resize(n, 0);
    let targets = vec![UNUSED; n];
    let tr = forward::<f32>(cfg, params, &padded, &targets, 1, Some(gate))?;
    let len = ids.len();
    let logits = tr.logits[..len * cfg.vocab].to_vec();
    let mut routes = vec![Vec::new(); len];
    for l in cfg.moe_layers() {
        let c = &tr.blocks[l].ffn;
        let k = c.topk_ids.len() / n;
        for (i, r) in routes.iter_mut().enumerate() {
            let mut lr = LayerRoute {
                layer: l,
                experts: Vec::new(),
                weights: Vec::new(),
            };
            for j in 0..k {
                if c.topk_ids[i * k + j] != UNUSED {
                    lr.experts.push(c.topk_ids[i * k + j]);
                    lr.weights.push(c.topk_weights[i * k + j]);
                }
            }
            r.push(lr);
        }
    }
    Ok((logits, routes))
}

/// Greedy generation of `max_tokens` tokens after `prompt` (stopping early
/// at `eot` if given), recomputing the window for every token.
pub fn generate_greedy(
    cfg: &ModelConfig,
    host: &HostParams,
    prompt: &[u32],
    max_tokens: usize,
    gate: GateConfig,
    eot: Option<u32>,
) -> Result<Vec<u32>> {
    Ok(generate_greedy_margins(cfg, host, prompt, max_tokens, gate, eot)?.0)
}

/// [`generate_greedy`], with each step's margin: its best logit minus the
/// runner-up (where another adapter's rounding may pick the other token).
pub fn generate_greedy_margins(
    cfg: &ModelConfig,
    host: &HostParams,
    prompt: &[u32],
    max_tokens: usize,
    gate: GateConfig,
    eot: Option<u32>,
) -> Result<(Vec<u32>, Vec<f32>)> {
    check_prompt(cfg, prompt)?;
    let params = to_float::<f32>(host);
    let v = cfg.vocab;
    let mut seq = prompt.to_vec();
    let mut start = 0usize;
    let mut out = Vec::new();
    let mut margins = Vec::new();
    let (logits, _) = window_forward(cfg, &params, &seq, gate)?;
    let mut last = logits[logits.len() - v..].to_vec();
    for _ in 0..max_tokens {
        let id = argmax(&last)?;
        if Some(id) == eot {
            break;
        }
        let best = last[id as usize];
        let second = last
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != id as usize)
            .map(|(_, &x)| x)
            .fold(f32::NEG_INFINITY, f32::max);
        margins.push(best - second);
        if let Some(s) = slide(start, seq.len(), cfg.context) {
            start = s;
        }
        seq.push(id);
        out.push(id);
        let (logits, _) = window_forward(cfg, &params, &seq[start..], gate)?;
        last = logits[logits.len() - v..].to_vec();
    }
    Ok((out, margins))
}
