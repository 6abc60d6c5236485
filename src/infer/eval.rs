//! Perplexity of a model over a text (`amoe eval`): the text's ids are cut
//! into windows of the context length N that start every `stride` tokens;
//! each next-token prediction is scored once, in the first window that holds
//! it after the first (each window scores its last predictions, so that a
//! scored token has up to N - stride tokens of context before the ones the
//! previous window scored). The windows run as batches of the evaluation
//! step (the training graph without the backward, under the chosen gate,
//! dropless), which also reads back every token's experts: the mean experts
//! per scored token of each MoE layer.
//!
//! Twin: `model::reference::forward_loss` on the same windows.

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::{Gates, UNUSED};
use crate::model::{EvalStep, Model};
use crate::util::Stopwatch;
use serde::Serialize;

/// How to cut the text and run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalConfig {
    /// Tokens between window starts, 1..=N (N: the model's context).
    pub stride: usize,
    /// Windows per GPU batch.
    pub batch: usize,
}

/// One window: input ids [N] (padded), targets [N] (`UNUSED` where not
/// scored or padded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
}

/// The windows of `ids` for context `n` and `stride`: every prediction of
/// `ids[j]` from `ids[..j]` (j >= 1) is a target exactly once.
pub fn windows(ids: &[u32], n: usize, stride: usize) -> Result<Vec<Window>> {
    if n == 0 || stride == 0 || stride > n {
        return Err(Error::invalid(
            "eval",
            format!("stride {stride} must be in 1..={n} (the context length)"),
        ));
    }
    if ids.len() < 2 {
        return Err(Error::invalid(
            "eval",
            format!(
                "{} token(s) of text: at least 2 are needed to score a prediction",
                ids.len()
            ),
        ));
    }
    let last = ids.len() - 1;
    let mut out = Vec::new();
    // Targets up to index `scored` (of ids) are done.
    let mut scored = 0usize;
    let mut begin = 0usize;
    while scored < last {
        let end = (begin + n).min(last);
        let mut w = Window {
            ids: vec![0; n],
            targets: vec![UNUSED; n],
        };
        w.ids[..end - begin].copy_from_slice(&ids[begin..end]);
        // Row i predicts ids[begin + i + 1]; score those not scored yet.
        let first = scored.max(begin) + 1;
        w.targets[first - 1 - begin..end - begin].copy_from_slice(&ids[first..=end]);
        scored = end;
        out.push(w);
        begin += stride;
    }
    Ok(out)
}

/// Mean experts per scored token of one MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerExperts {
    pub layer: usize,
    pub mean_experts: f64,
}

/// What an evaluation measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    /// Tokens of the text and predictions scored (tokens - 1).
    pub tokens: usize,
    pub scored: usize,
    pub windows: usize,
    pub stride: usize,
    /// Mean cross-entropy of the scored predictions (nats) and exp of it.
    pub loss: f64,
    pub perplexity: f64,
    /// Scored tokens per second of GPU work (upload, forward, readback).
    pub tokens_per_s: f64,
    pub seconds: f64,
    pub experts_per_token: Vec<LayerExperts>,
}

/// Evaluate `ids` with `model` under `gate`; `progress(windows done, of)`
/// after each batch.
pub async fn evaluate(
    ctx: &GpuContext,
    model: &Model,
    gate: impl Into<Gates>,
    ids: &[u32],
    cfg: EvalConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport> {
    Ok(
        evaluate_with(ctx, model, gate.into(), ids, cfg, 0, progress)
            .await?
            .0,
    )
}

/// Every scored token's `k` highest router scores, per MoE layer, ranked.
#[derive(Clone, Debug, PartialEq)]
pub struct RankedScores {
    /// Scores kept per token.
    pub k: usize,
    /// Per MoE layer (transformer layer index, scores [tokens, k], each
    /// row descending).
    pub layers: Vec<(usize, Vec<f32>)>,
}

/// `evaluate`, also keeping each scored token's `k` highest router scores
/// per MoE layer (the statistics that thresholds are chosen from).
pub async fn evaluate_ranked(
    ctx: &GpuContext,
    model: &Model,
    gate: impl Into<Gates>,
    ids: &[u32],
    cfg: EvalConfig,
    k: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(EvalReport, RankedScores)> {
    if k == 0 || k > model.cfg.experts {
        return Err(Error::invalid(
            "eval",
            format!("{k} ranked scores of {} experts", model.cfg.experts),
        ));
    }
    evaluate_with(ctx, model, gate.into(), ids, cfg, k, progress).await
}

/// The `k` highest of one token's router scores, highest first.
pub fn highest(scores: &[f32], k: usize) -> Vec<f32> {
    let mut p = scores.to_vec();
    p.sort_by(|a, b| b.total_cmp(a));
    p.truncate(k);
    p
}

/// `k` = 0: no scores.
async fn evaluate_with(
    ctx: &GpuContext,
    model: &Model,
    gate: Gates,
    ids: &[u32],
    cfg: EvalConfig,
    k: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(EvalReport, RankedScores)> {
    let n = model.cfg.context;
    let wins = windows(ids, n, cfg.stride)?;
    if cfg.batch == 0 {
        return Err(Error::invalid("eval", "batch of 0 windows"));
    }
    let moe_layers = model.cfg.moe_layers().len();
    if moe_layers > 0 {
        gate.validate(model.cfg.experts, moe_layers)?;
    }
    // Heads wider than the flash kernel takes: one window at a time
    // (the model graph attends over a scratch cache).
    let wide = !crate::kernels::attention::supports_head_dim(model.cfg.head_dim());
    let b = if wide { 1 } else { cfg.batch.min(wins.len()) };
    let step = EvalStep::with_scores(ctx, model, b, gate, k > 0)?;
    let moe = model.cfg.moe_layers();
    let mut experts = vec![0u64; moe.len()];
    let mut ranked = RankedScores {
        k,
        layers: moe.iter().map(|&l| (l, Vec::new())).collect(),
    };
    let e = model.cfg.experts;
    let (mut sum, mut count, mut scored) = (0.0f64, 0.0f64, 0usize);
    let clock = Stopwatch::start();
    for (i, chunk) in wins.chunks(b).enumerate() {
        let mut bids = Vec::with_capacity(b * n);
        let mut targets = Vec::with_capacity(b * n);
        for w in chunk {
            bids.extend_from_slice(&w.ids);
            targets.extend_from_slice(&w.targets);
        }
        // A short last batch: windows with nothing to score.
        bids.resize(b * n, 0);
        targets.resize(b * n, UNUSED);
        let out = step.loss_and_routes(ctx, model, &bids, &targets).await?;
        sum += out.loss_sum;
        count += out.count;
        for (slot, (_, topk)) in experts.iter_mut().zip(&out.routes) {
            let k = topk.len() / (b * n);
            for (row, _) in targets.iter().enumerate().filter(|(_, &t)| t != UNUSED) {
                *slot += topk[row * k..(row + 1) * k]
                    .iter()
                    .filter(|&&e| e != UNUSED)
                    .count() as u64;
            }
        }
        for ((_, out), probs) in ranked.layers.iter_mut().zip(&out.scores) {
            for (row, _) in targets.iter().enumerate().filter(|(_, &t)| t != UNUSED) {
                out.extend(highest(&probs[row * e..(row + 1) * e], k));
            }
        }
        scored += targets.iter().filter(|&&t| t != UNUSED).count();
        progress(((i + 1) * b).min(wins.len()), wins.len());
    }
    let seconds = clock.seconds();
    let loss = sum / count.max(1.0);
    if !loss.is_finite() {
        return Err(Error::NonFinite {
            op: "eval",
            msg: format!("mean loss {loss} over {scored} tokens"),
        });
    }
    let report = EvalReport {
        tokens: ids.len(),
        scored,
        windows: wins.len(),
        stride: cfg.stride,
        loss,
        perplexity: loss.exp(),
        tokens_per_s: scored as f64 / seconds.max(1e-9),
        seconds,
        experts_per_token: moe
            .iter()
            .zip(&experts)
            .map(|(&layer, &e)| LayerExperts {
                layer,
                mean_experts: e as f64 / scored.max(1) as f64,
            })
            .collect(),
    };
    Ok((report, ranked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prediction_is_scored_once_with_its_context() {
        for len in [2usize, 3, 7, 16, 17, 33, 100] {
            for n in [1usize, 4, 8, 16] {
                for stride in (1..=n).filter(|s| n % s == 0 || *s == n - 1 || *s == 1) {
                    let ids: Vec<u32> = (0..len as u32).map(|i| i + 1).collect();
                    let ws = windows(&ids, n, stride).unwrap();
                    let mut seen = vec![0usize; len];
                    for (w, win) in ws.iter().enumerate() {
                        let begin = w * stride;
                        for (i, &t) in win.targets.iter().enumerate() {
                            if t != UNUSED {
                                // Target of row i is ids[begin + i + 1].
                                assert_eq!(t, ids[begin + i + 1]);
                                assert_eq!(win.ids[i], ids[begin + i]);
                                seen[begin + i + 1] += 1;
                            }
                        }
                    }
                    assert_eq!(seen[0], 0);
                    assert!(
                        seen[1..].iter().all(|&c| c == 1),
                        "len {len} n {n} stride {stride}: {seen:?}"
                    );
                }
            }
        }
        assert!(windows(&[1, 2, 3], 4, 0).is_err());
        assert!(windows(&[1, 2, 3], 4, 5).is_err());
        assert!(windows(&[1], 4, 4).is_err());
    }
}
