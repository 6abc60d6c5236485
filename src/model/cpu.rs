//! A plain CPU forward of the whole general model, written from the
//! definitions rather than from amoe's kernels: the check that a loaded
//! model (a Hugging Face checkpoint mapped by `checkpoint::hf`, or amoe's
//! own) computes what its source computes. Values are f32, dot products
//! and softmax sums accumulate in f64; no cache, no batching, no speed.
//!
//! Per token sequence `ids` (positions 0..T):
//!
//! ```text
//! x = wte[id] * embedding_multiplier (+ wpe[pos] with learned positions)
//! per block l:
//!   a = rmsnorm(x, norm1)                         x / sqrt(mean(x²) + eps) * g
//!   q, k, v = a wqkv (+ bqkv)                     q: H heads, k and v: Hkv heads of Dh
//!   q, k = qk_norm(q), qk_norm(k)                 per head over Dh, or over the whole projection
//!   q, k = rope(q, pos), rope(k, pos)             rotate-half: pairs i and i + Dh/2
//!   o_h = softmax(q_h k_gᵀ * scale) v_g           g = h / (H / Hkv), keys p-W+1..=p (window W)
//!   x = x + residual_multiplier * (o wo)
//!   m = rmsnorm(x, norm2)
//!   y = sum_j w_j expert_j(m)                     router m w_router -> gate_forward (top-k, weights)
//!     + sigmoid(m w_gate) shared(m)               the shared expert, if the layer has one
//!   x = x + residual_multiplier * y
//! logits = rmsnorm(x, norm_f) w_out (or wteᵀ) / logits_scaling
//! ```
//!
//! An expert is `(act(m w1) [* (m w3)]) w2`: SwiGLU `silu(m w1) * (m w3)`
//! or GELU (tanh form) `gelu(m w1)`; a dense FFN is one expert of weight 1.
//! Each layer routes with its own gate (`ModelConfig::ffn_config`), dropless
//! (a training capacity factor drops nothing here), as evaluation does.

use crate::error::{Error, Result};
use crate::kernels::{Activation, UNUSED};
use crate::model::config::{ModelConfig, QkNorm};
use crate::model::params::{BlockParams, FfnParams};
use crate::model::transformer::HostParams;
use crate::reference::gate::gate_forward;
use crate::reference::moe_train::{gelu, silu};

/// Logits `[T, V]` (row-major) of `ids` at every position.
pub fn logits(cfg: &ModelConfig, p: &HostParams, ids: &[u32]) -> Result<Vec<f32>> {
    cfg.validate()?;
    p.validate(cfg)?;
    let t = ids.len();
    let max_len = match cfg.rope {
        None => cfg.context,
        Some(_) => cfg.max_positions.unwrap_or(cfg.context).max(cfg.context),
    };
    if t == 0 || t > max_len {
        return Err(Error::invalid(
            "cpu forward",
            format!("{t} tokens: must be 1..={max_len}"),
        ));
    }
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab) {
        return Err(Error::invalid(
            "cpu forward",
            format!("token id {bad} >= vocabulary {}", cfg.vocab),
        ));
    }
    let (d, v) = (cfg.d, cfg.vocab);
    let mut x = embed(cfg, p, ids);
    let rope = cfg.rope.map(|r| r.tables(t, cfg.head_dim()));
    for (l, b) in p.blocks.iter().enumerate() {
        let a = rms_norm_rows(&x, &b.norm1.data, cfg.eps);
        let mut qkv = matmul(&a, &b.wqkv.data, t, d, cfg.qkv_width());
        if let Some(bias) = &b.bqkv {
            for row in qkv.chunks_exact_mut(cfg.qkv_width()) {
                for (y, bi) in row.iter_mut().zip(&bias.data) {
                    *y += bi;
                }
            }
        }
        qk_norm(cfg, b, &mut qkv);
        if let Some((cos, sin)) = &rope {
            rotate(cfg, &mut qkv, cos, sin);
        }
        let o = attention(cfg, &qkv, t);
        let proj = matmul(&o, &b.wo.data, t, cfg.q_width(), d);
        residual(&mut x, &proj, cfg.residual_multiplier);
        let m = rms_norm_rows(&x, &b.norm2.data, cfg.eps);
        let y = ffn(cfg, l, b, &m, t)?;
        residual(&mut x, &y, cfg.residual_multiplier);
    }
    let xf = rms_norm_rows(&x, &p.norm_f.data, cfg.eps);
    let mut out = match &p.w_out {
        Some(w) => matmul(&xf, &w.data, t, d, v),
        None => matmul_bt(&xf, &p.wte.data, t, d, v),
    };
    if cfg.logits_scaling != 1.0 {
        for y in &mut out {
            *y /= cfg.logits_scaling;
        }
    }
    Ok(out)
}

/// `wte[id] * embedding_multiplier (+ wpe[pos])`, `[T, D]`.
fn embed(cfg: &ModelConfig, p: &HostParams, ids: &[u32]) -> Vec<f32> {
    let d = cfg.d;
    let mut x = Vec::with_capacity(ids.len() * d);
    for (pos, &id) in ids.iter().enumerate() {
        let row = &p.wte.data[id as usize * d..(id as usize + 1) * d];
        for (c, &e) in row.iter().enumerate() {
            let e = e * cfg.embedding_multiplier;
            x.push(match &p.wpe {
                Some(wpe) => e + wpe.data[pos * d + c],
                None => e,
            });
        }
    }
    x
}

/// RMSNorm of one vector: `x / sqrt(mean(x²) + eps) * g`.
fn rms_norm(x: &mut [f32], g: &[f32], eps: f32) {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    for (v, &gi) in x.iter_mut().zip(g) {
        *v = (*v as f64 * r) as f32 * gi;
    }
}

/// RMSNorm of every row of `x` (rows of `g.len()` values).
fn rms_norm_rows(x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let mut y = x.to_vec();
    for row in y.chunks_exact_mut(g.len()) {
        rms_norm(row, g, eps);
    }
    y
}

/// `a [T, K] w [K, N]`.
fn matmul(a: &[f32], w: &[f32], t: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * n);
    let mut acc = vec![0f64; n];
    for row in a.chunks_exact(k).take(t) {
        acc.fill(0.0);
        for (i, &ai) in row.iter().enumerate() {
            let ai = ai as f64;
            for (s, &wij) in acc.iter_mut().zip(&w[i * n..(i + 1) * n]) {
                *s += ai * wij as f64;
            }
        }
        out.extend(acc.iter().map(|&s| s as f32));
    }
    out
}

/// `a [T, K] bᵀ` for `b [N, K]` (the tied head).
fn matmul_bt(a: &[f32], b: &[f32], t: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * n);
    for row in a.chunks_exact(k).take(t) {
        for col in b.chunks_exact(k).take(n) {
            out.push(dot(row, col) as f32);
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn residual(x: &mut [f32], y: &[f32], mult: f32) {
    for (xi, &yi) in x.iter_mut().zip(y) {
        *xi += mult * yi;
    }
}

/// QK-norm on each row of `qkv [T, (H + 2 Hkv) Dh]`: the q part (H heads)
/// and the k part (Hkv heads), per head or as a whole.
fn qk_norm(cfg: &ModelConfig, b: &BlockParams<crate::model::HostTensor>, qkv: &mut [f32]) {
    let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) else {
        return;
    };
    let (qw, kw, dh) = (
        cfg.q_width(),
        cfg.kv_heads() * cfg.head_dim(),
        cfg.head_dim(),
    );
    for row in qkv.chunks_exact_mut(cfg.qkv_width()) {
        let (q, rest) = row.split_at_mut(qw);
        let k = &mut rest[..kw];
        match cfg.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => {
                for head in q.chunks_exact_mut(dh) {
                    rms_norm(head, &qn.data, cfg.eps);
                }
                for head in k.chunks_exact_mut(dh) {
                    rms_norm(head, &kn.data, cfg.eps);
                }
            }
            QkNorm::Whole => {
                rms_norm(q, &qn.data, cfg.eps);
                rms_norm(k, &kn.data, cfg.eps);
            }
        }
    }
}

/// Rotary embedding of every q and k head of row `pos` (rotate-half: the
/// pair `(i, i + Dh/2)` turns by angle `pos * inv_freq[i]`).
fn rotate(cfg: &ModelConfig, qkv: &mut [f32], cos: &[f32], sin: &[f32]) {
    let dh = cfg.head_dim();
    let half = dh / 2;
    let rotated = cfg.q_width() + cfg.kv_heads() * dh;
    for (pos, row) in qkv.chunks_exact_mut(cfg.qkv_width()).enumerate() {
        let (c, s) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for head in row[..rotated].chunks_exact_mut(dh) {
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * c[i] - x2 * s[i];
                head[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/// Causal attention with GQA and the sliding window: `[T, H Dh]`.
fn attention(cfg: &ModelConfig, qkv: &[f32], t: usize) -> Vec<f32> {
    let (h, hkv, dh) = (cfg.heads, cfg.kv_heads(), cfg.head_dim());
    let (qw, width) = (cfg.q_width(), cfg.qkv_width());
    let kw = hkv * dh;
    let group = h / hkv;
    let scale = cfg.attn_scale() as f64;
    let mut o = vec![0f32; t * qw];
    let mut scores = Vec::with_capacity(t);
    for i in 0..t {
        let first = cfg.sliding_window.map_or(0, |w| (i + 1).saturating_sub(w));
        for hd in 0..h {
            let g = hd / group;
            let q = &qkv[i * width + hd * dh..i * width + (hd + 1) * dh];
            scores.clear();
            for j in first..=i {
                let k = &qkv[j * width + qw + g * dh..j * width + qw + (g + 1) * dh];
                scores.push(dot(q, k) * scale);
            }
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            let mut acc = vec![0f64; dh];
            for (j, &s) in (first..=i).zip(&scores) {
                let vj = &qkv[j * width + qw + kw + g * dh..j * width + qw + kw + (g + 1) * dh];
                for (a, &x) in acc.iter_mut().zip(vj) {
                    *a += s / sum * x as f64;
                }
            }
            for (y, a) in o[i * qw + hd * dh..i * qw + (hd + 1) * dh]
                .iter_mut()
                .zip(acc)
            {
                *y = a as f32;
            }
        }
    }
    o
}

/// One expert `e` of a bank (`f` its width) on one token `x [D]`: `[D]`.
fn expert(
    w: &FfnParams<crate::model::HostTensor>,
    e: usize,
    x: &[f32],
    f: usize,
    act: Activation,
) -> Vec<f32> {
    let d = x.len();
    let bank = |t: &crate::model::HostTensor| t.data[e * d * f..(e + 1) * d * f].to_vec();
    let h1 = matmul(x, &bank(&w.w1), 1, d, f);
    let h: Vec<f32> = match (act, &w.w3) {
        (Activation::SwiGlu, Some(w3)) => {
            let h3 = matmul(x, &bank(w3), 1, d, f);
            h1.iter().zip(&h3).map(|(&a, &b)| silu(a) * b).collect()
        }
        _ => h1.iter().map(|&a| gelu(a)).collect(),
    };
    matmul(&h, &w.w2.data[e * f * d..(e + 1) * f * d], 1, f, d)
}

/// The FFN of layer `l` on `m [T, D]`: the routed experts under the
/// layer's gate, plus the sigmoid-gated shared expert if there is one.
fn ffn(
    cfg: &ModelConfig,
    l: usize,
    b: &BlockParams<crate::model::HostTensor>,
    m: &[f32],
    t: usize,
) -> Result<Vec<f32>> {
    let c = cfg.ffn_config(l);
    let (d, f, e) = (cfg.d, c.f, c.e);
    let router = matmul(m, &b.ffn.w_router.data, t, d, e);
    let gate = gate_forward(&c.gate, &router, t, e)?;
    if gate.status != 0 {
        return Err(Error::NonFinite {
            op: "cpu forward",
            msg: format!("router logits of layer {l}"),
        });
    }
    let k = c.gate.max_k();
    let shared = b.shared.as_ref().zip(cfg.shared_config(l));
    let mut y = Vec::with_capacity(t * d);
    for (tok, x) in m.chunks_exact(d).enumerate() {
        let mut acc = vec![0f64; d];
        for j in 0..k {
            let id = gate.topk_ids[tok * k + j];
            if id == UNUSED {
                continue;
            }
            let w = gate.topk_weights[tok * k + j] as f64;
            for (a, &o) in acc
                .iter_mut()
                .zip(&expert(&b.ffn, id as usize, x, f, c.activation))
            {
                *a += w * o as f64;
            }
        }
        if let Some((sh, sc)) = shared {
            let logit = dot(x, &sh.w_router.data) as f32;
            let w = 1.0 / (1.0 + (-logit as f64).exp());
            for (a, &o) in acc.iter_mut().zip(&expert(sh, 0, x, sc.f, sc.activation)) {
                *a += w * o as f64;
            }
        }
        y.extend(acc.iter().map(|&a| a as f32));
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::GateConfig;
    use crate::model::config::Rope;
    use crate::model::reference::{forward, to_float};

    fn small(activation: Activation, moe_every: usize) -> ModelConfig {
        ModelConfig {
            vocab: 96,
            d: 32,
            layers: 2,
            heads: 2,
            context: 12,
            ffn: 48,
            experts: 4,
            moe_every,
            activation,
            ..ModelConfig::default()
        }
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// amoe's own models (learned positions, adaptive or top-2 gates, GELU
    /// or SwiGLU, dense layers): the same logits as the training twin
    /// `model::reference::forward`. Both are f32 with the same formulas;
    /// they differ in summation order and precision (f64 sums here):
    /// measured at most 4e-7 on logits of size ~0.3, bound 1e-5.
    #[test]
    fn agrees_with_the_training_twin_on_amoe_models() {
        let top2 = ModelConfig {
            gate: GateConfig::new(crate::kernels::Gating::Top2),
            ..small(Activation::Gelu, 1)
        };
        for (i, cfg) in [
            small(Activation::Gelu, 1),
            small(Activation::SwiGlu, 2),
            top2,
        ]
        .into_iter()
        .enumerate()
        {
            let p = HostParams::init(&cfg, 7 + i as u64);
            let ids: Vec<u32> = (0..cfg.context as u32).map(|i| (i * 37 + 5) % 96).collect();
            let targets = vec![UNUSED; cfg.context];
            let tr = forward::<f32>(&cfg, &to_float(&p), &ids, &targets, 1, None).unwrap();
            let ours = logits(&cfg, &p, &ids).unwrap();
            let err = max_abs_diff(&ours, &tr.logits);
            let scale = tr.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                err < 1e-5 * scale.max(1.0),
                "config {i}: {err} (scale {scale})"
            );
            // A prefix gives the same rows (causal).
            let head = logits(&cfg, &p, &ids[..5]).unwrap();
            assert!(max_abs_diff(&head, &ours[..5 * cfg.vocab]) < 1e-6);
        }
    }

    #[test]
    fn rotary_window_and_gqa_follow_their_definitions() {
        // Position 0 is not rotated; with a window of 1 each token attends
        // to itself only, so a token's logits do not depend on the others.
        let cfg = ModelConfig {
            rope: Some(Rope {
                theta: 10000.0,
                scaling: None,
            }),
            kv_heads: Some(1),
            sliding_window: Some(1),
            ..small(Activation::SwiGlu, 1)
        };
        let p = HostParams::init(&cfg, 3);
        let a = logits(&cfg, &p, &[4, 9, 4]).unwrap();
        let v = cfg.vocab;
        let alone = logits(&cfg, &p, &[4]).unwrap();
        assert!(max_abs_diff(&a[..v], &alone) < 1e-6);
        // Same token, other position: rotation leaves q·k of a token with
        // itself unchanged, so with window 1 its logits are the same.
        assert!(max_abs_diff(&a[2 * v..], &alone) < 1e-5);
        let bad = logits(&cfg, &p, &[96]).unwrap_err();
        assert!(matches!(bad, Error::InvalidArgument { .. }), "{bad}");
        assert!(logits(&cfg, &p, &[]).is_err());
    }
}
