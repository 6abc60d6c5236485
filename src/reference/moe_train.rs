//! Training twin of one MoE layer, per token (no slot plan): forward with
//! what backward needs, the auxiliary losses, and the exact backward. Generic
//! over the float type so that the tests check the backward against central
//! finite differences in f64; the GPU training step (grouped kernels over the
//! slot plan) is checked against it in f32.
//!
//! Gradient rules (the MoE backward of ARCHITECTURE.md):
//! - two selected experts, weights renormalized over them:
//!   `dz_e = w_e (g_e - sum_j w_j g_j)` for the selected e, 0 elsewhere;
//! - one expert with the raw `p1` weight: `dz_i = p_i (delta_{i,e1} - p_e1) g_1`;
//! - one expert with weight 1: no gradient;
//! - load balancing `a E sum_e f_e P_e` (f_e: first choices, no gradient) and
//!   the optional z-loss `b mean_t lse_t^2`, through the softmax.
//!
//! With a capacity factor, slots past their expert's capacity are dropped
//! as the route drops them (`reference::route::kept_slots`): a dropped slot
//! adds nothing to `y`, and its weight gets no gradient (the other slot's
//! weight still depends on both probabilities).
//!
//! Experts use GELU (`h = gelu(u)`, `u = x W1`) or SwiGLU
//! (`h = silu(u) u3`, `u = x W1`, `u3 = x W3`); the SwiGLU backward is
//! `du = dh u3 silu'(u)`, `du3 = dh silu(u)`, `dx = du W1^T + du3 W3^T`
//! (the kernels' `da` and `da3`).

// Index loops mirror the kernels' (and the math's) subscripts.
#![allow(clippy::needless_range_loop)]

use crate::error::{Error, Result};
use crate::kernels::moe_config::MoeConfig;
pub use crate::kernels::AuxConfig;
use crate::kernels::{Activation, ExpertRule, GapMode, Gating, SingleWeight, UNUSED};
use num_traits::Float;

/// A layer's parameters in any float type (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeParams<F> {
    /// w_router [D, E]
    pub w_router: Vec<F>,
    /// w1 [E, D, F]
    pub w1: Vec<F>,
    /// w3 [E, D, F]: SwiGLU's up projection (empty for GELU)
    pub w3: Vec<F>,
    /// w2 [E, F, D]
    pub w2: Vec<F>,
}

/// Gradients of one layer: parameters and input.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeGrads<F> {
    /// dx [T, D]
    pub dx: Vec<F>,
    /// dw_router [D, E]
    pub dw_router: Vec<F>,
    /// dw1 [E, D, F]
    pub dw1: Vec<F>,
    /// dw3 [E, D, F] (empty for GELU)
    pub dw3: Vec<F>,
    /// dw2 [E, F, D]
    pub dw2: Vec<F>,
}

/// What the forward keeps for the backward.
#[derive(Clone, Debug)]
pub struct MoeCache<F> {
    pub t: usize,
    /// probs [T, E]
    pub probs: Vec<F>,
    /// lse [T]
    pub lse: Vec<F>,
    /// topk_ids [T, K]
    pub topk_ids: Vec<u32>,
    /// topk_weights [T, K]
    pub topk_weights: Vec<F>,
    /// kept [T, K]: the slot is used and within its expert's capacity
    pub kept: Vec<bool>,
    /// u [T, K, F]: pre-activation `x W1` of each used (token, slot)
    pub u: Vec<F>,
    /// u3 [T, K, F]: SwiGLU's `x W3` (empty for GELU)
    pub u3: Vec<F>,
    /// h [T, K, F]
    pub h: Vec<F>,
    /// y_expert [T, K, D]
    pub y_expert: Vec<F>,
    /// y [T, D]
    pub y: Vec<F>,
}

fn c<F: Float>(v: f64) -> F {
    F::from(v).unwrap_or_else(F::zero)
}

/// GELU, tanh approximation, and its derivative.
pub fn gelu<F: Float>(x: F) -> F {
    let k = c::<F>(0.797_884_560_802_865_4);
    let half = c::<F>(0.5);
    half * x * (F::one() + (k * (x + c::<F>(0.044715) * x * x * x)).tanh())
}

/// SiLU `x sigma(x)` and its derivative `sigma(x) (1 + x (1 - sigma(x)))`.
pub fn silu<F: Float>(x: F) -> F {
    x / (F::one() + (-x).exp())
}

pub fn silu_grad<F: Float>(x: F) -> F {
    let s = F::one() / (F::one() + (-x).exp());
    s * (F::one() + x * (F::one() - s))
}

pub fn gelu_grad<F: Float>(x: F) -> F {
    let k = c::<F>(0.797_884_560_802_865_4);
    let half = c::<F>(0.5);
    let a = c::<F>(0.044715);
    let th = (k * (x + a * x * x * x)).tanh();
    half * (F::one() + th)
        + half * x * (F::one() - th * th) * k * (F::one() + c::<F>(3.0) * a * x * x)
}

/// The selection of one token from its router logits: ids and weights of
/// its K slots (`UNUSED` / 0 past the experts taken), with the gate
/// kernel's rules (ties to the lower index, gap mode, threshold,
/// single-expert weight policy; a top-k router's `ExpertRule`).
pub fn select<F: Float>(cfg: &MoeConfig, row: &[F], probs: &[F]) -> (Vec<u32>, Vec<F>) {
    if cfg.gate.gating == Gating::TopK {
        return select_topk(cfg, row, probs);
    }
    let (ids, ws) = select_pair(cfg, row, probs);
    let k = cfg.k();
    (ids[..k].to_vec(), ws[..k].to_vec())
}

/// A top-k router (softmax scores): rank by logit, take the first, then
/// expert j while the rule holds (`reference::gate::rule_count` in F);
/// weights renormalized over the experts taken, or raw.
fn select_topk<F: Float>(cfg: &MoeConfig, row: &[F], probs: &[F]) -> (Vec<u32>, Vec<F>) {
    let g = &cfg.gate;
    let k = g.k.min(row.len());
    let mut order: Vec<usize> = (0..row.len()).collect();
    // Stable: equal logits keep the lower index first.
    order.sort_by(|&a, &b| {
        row[b]
            .partial_cmp(&row[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let w: Vec<F> = order[..k].iter().map(|&i| probs[i]).collect();
    let sum = w.iter().fold(F::zero(), |a, &b| a + b);
    let t = c::<F>(g.threshold as f64);
    let mut count = k;
    if g.rule != ExpertRule::Fixed {
        let mut taken = w[0];
        count = 1;
        for j in 1..k {
            let join = match g.rule {
                ExpertRule::Gap => {
                    let mut gap = w[j - 1] - w[j];
                    if g.gap == GapMode::Top2 {
                        gap = gap / sum;
                    }
                    gap.max(F::zero()).min(F::one()) <= t
                }
                ExpertRule::Ratio => w[j] >= t * w[0],
                ExpertRule::Mass => g.threshold >= 1.0 || taken < t,
                ExpertRule::Fixed => true,
            };
            if !join {
                break;
            }
            taken = taken + w[j];
            count += 1;
        }
    }
    let chosen = w[..count].iter().fold(F::zero(), |a, &b| a + b);
    let mut ids = vec![UNUSED; g.k];
    let mut ws = vec![F::zero(); g.k];
    for j in 0..count {
        ids[j] = order[j] as u32;
        ws[j] = if g.renorm { w[j] / chosen } else { w[j] };
    }
    (ids, ws)
}

fn select_pair<F: Float>(cfg: &MoeConfig, row: &[F], probs: &[F]) -> ([u32; 2], [F; 2]) {
    let mut i1 = 0usize;
    let mut i2 = usize::MAX;
    for i in 1..row.len() {
        if row[i] > row[i1] {
            i2 = i1;
            i1 = i;
        } else if i2 == usize::MAX || row[i] > row[i2] {
            i2 = i;
        }
    }
    let p1 = probs[i1];
    let p2 = if i2 == usize::MAX {
        F::zero()
    } else {
        probs[i2]
    };
    let g = &cfg.gate;
    let two = i2 != usize::MAX
        && match g.gating {
            Gating::Top1 => false,
            Gating::Top2 => true,
            // `select_topk`.
            Gating::TopK => g.k >= 2,
            Gating::Adaptive => {
                let gap = match g.gap {
                    GapMode::Softmax => p1 - p2,
                    GapMode::Top2 => (p1 - p2) / (p1 + p2),
                };
                gap.max(F::zero()).min(F::one()) <= c::<F>(g.threshold as f64)
            }
        };
    if two {
        let s = p1 + p2;
        ([i1 as u32, i2 as u32], [p1 / s, p2 / s])
    } else {
        let w = match g.single_weight {
            SingleWeight::RawP1 => p1,
            SingleWeight::One => F::one(),
        };
        ([i1 as u32, UNUSED], [w, F::zero()])
    }
}

fn check<F>(cfg: &MoeConfig, w: &MoeParams<F>) -> Result<()> {
    cfg.validate()?;
    let (d, f, e) = (cfg.d, cfg.f, cfg.e);
    let w3 = if cfg.activation == Activation::SwiGlu {
        e * d * f
    } else {
        0
    };
    for (name, got, want) in [
        ("w_router", w.w_router.len(), d * e),
        ("w1", w.w1.len(), e * d * f),
        ("w3", w.w3.len(), w3),
        ("w2", w.w2.len(), e * f * d),
    ] {
        if got != want {
            return Err(Error::shape(
                "moe_train",
                format!("{name}: {want} elements"),
                got,
            ));
        }
    }
    Ok(())
}

/// Forward of one layer on `x [T, D]`, keeping what backward needs.
pub fn moe_layer_forward<F: Float>(
    cfg: &MoeConfig,
    w: &MoeParams<F>,
    x: &[F],
    t: usize,
) -> Result<MoeCache<F>> {
    check(cfg, w)?;
    let (d, f, e, k) = (cfg.d, cfg.f, cfg.e, cfg.k());
    let swiglu = cfg.activation == Activation::SwiGlu;
    if x.len() != t * d {
        return Err(Error::shape("moe_train", format!("x [{t}, {d}]"), x.len()));
    }
    let mut cache = MoeCache {
        t,
        probs: vec![F::zero(); t * e],
        lse: vec![F::zero(); t],
        topk_ids: vec![UNUSED; t * k],
        topk_weights: vec![F::zero(); t * k],
        kept: Vec::new(),
        u: vec![F::zero(); t * k * f],
        u3: vec![F::zero(); if swiglu { t * k * f } else { 0 }],
        h: vec![F::zero(); t * k * f],
        y_expert: vec![F::zero(); t * k * d],
        y: vec![F::zero(); t * d],
    };
    for tok in 0..t {
        let xr = &x[tok * d..(tok + 1) * d];
        let logits: Vec<F> = (0..e)
            .map(|j| (0..d).fold(F::zero(), |a, i| a + xr[i] * w.w_router[i * e + j]))
            .collect();
        let m = logits.iter().fold(F::neg_infinity(), |a, &b| a.max(b));
        let s = logits.iter().fold(F::zero(), |a, &l| a + (l - m).exp());
        cache.lse[tok] = m + s.ln();
        for j in 0..e {
            cache.probs[tok * e + j] = (logits[j] - m).exp() / s;
        }
        let (ids, ws) = select(cfg, &logits, &cache.probs[tok * e..(tok + 1) * e]);
        for j in 0..k {
            cache.topk_ids[tok * k + j] = ids[j];
            cache.topk_weights[tok * k + j] = ws[j];
        }
    }
    cache.kept = crate::reference::route::kept_slots(&cache.topk_ids, t, k, e, cfg.capacity(t));
    for tok in 0..t {
        let xr = &x[tok * d..(tok + 1) * d];
        for j in 0..k {
            let slot = tok * k + j;
            if !cache.kept[slot] {
                continue;
            }
            let ex = cache.topk_ids[slot] as usize;
            let wj = cache.topk_weights[slot];
            for n in 0..f {
                let mut acc = F::zero();
                for i in 0..d {
                    acc = acc + xr[i] * w.w1[(ex * d + i) * f + n];
                }
                cache.u[slot * f + n] = acc;
                cache.h[slot * f + n] = if swiglu {
                    let mut up = F::zero();
                    for i in 0..d {
                        up = up + xr[i] * w.w3[(ex * d + i) * f + n];
                    }
                    cache.u3[slot * f + n] = up;
                    silu(acc) * up
                } else {
                    gelu(acc)
                };
            }
            for o in 0..d {
                let mut acc = F::zero();
                for n in 0..f {
                    acc = acc + cache.h[slot * f + n] * w.w2[(ex * f + n) * d + o];
                }
                cache.y_expert[slot * d + o] = acc;
                cache.y[tok * d + o] = cache.y[tok * d + o] + wj * acc;
            }
        }
    }
    Ok(cache)
}

/// Router statistics of one forward: `(f [E], p_mean [E], balance_loss,
/// z_loss)`, the losses already multiplied by their coefficients.
pub fn aux_losses<F: Float>(
    cache: &MoeCache<F>,
    e: usize,
    k: usize,
    aux: &AuxConfig,
) -> (Vec<F>, Vec<F>, F, F) {
    let t = cache.t;
    let tf = c::<F>(t as f64);
    let mut frac = vec![F::zero(); e];
    let mut pmean = vec![F::zero(); e];
    for tok in 0..t {
        let first = cache.topk_ids[tok * k] as usize;
        if first < e {
            frac[first] = frac[first] + F::one();
        }
        for j in 0..e {
            pmean[j] = pmean[j] + cache.probs[tok * e + j];
        }
    }
    let mut bal = F::zero();
    for j in 0..e {
        frac[j] = frac[j] / tf;
        pmean[j] = pmean[j] / tf;
        bal = bal + frac[j] * pmean[j];
    }
    let bal = bal * c::<F>(aux.balance as f64 * e as f64);
    let z = cache.lse.iter().fold(F::zero(), |a, &l| a + l * l) / tf * c::<F>(aux.z_loss as f64);
    (frac, pmean, bal, z)
}

/// Gradient of `dot(y, dy) + balance_loss + z_loss` with respect to the
/// layer's input and parameters.
pub fn moe_layer_backward<F: Float>(
    cfg: &MoeConfig,
    w: &MoeParams<F>,
    x: &[F],
    cache: &MoeCache<F>,
    dy: &[F],
    aux: &AuxConfig,
) -> MoeGrads<F> {
    let (d, f, e, k) = (cfg.d, cfg.f, cfg.e, cfg.k());
    let swiglu = cfg.activation == Activation::SwiGlu;
    let t = cache.t;
    let tf = c::<F>(t as f64);
    let mut g = MoeGrads {
        dx: vec![F::zero(); t * d],
        dw_router: vec![F::zero(); d * e],
        dw1: vec![F::zero(); e * d * f],
        dw3: vec![F::zero(); if swiglu { e * d * f } else { 0 }],
        dw2: vec![F::zero(); e * f * d],
    };
    let (frac, _, _, _) = aux_losses(cache, e, k, aux);
    let bal_scale = c::<F>(aux.balance as f64 * e as f64) / tf;
    let z_scale = c::<F>(2.0 * aux.z_loss as f64) / tf;
    for tok in 0..t {
        let xr = &x[tok * d..(tok + 1) * d];
        let dyr = &dy[tok * d..(tok + 1) * d];
        let p = &cache.probs[tok * e..(tok + 1) * e];
        let mut dz = vec![F::zero(); e];
        // Gradient of each used slot's weight, and the expert backward.
        let mut dws = vec![F::zero(); k];
        for j in 0..k {
            let slot = tok * k + j;
            if !cache.kept[slot] {
                continue;
            }
            let ex = cache.topk_ids[slot] as usize;
            let wj = cache.topk_weights[slot];
            let ye = &cache.y_expert[slot * d..(slot + 1) * d];
            dws[j] = (0..d).fold(F::zero(), |a, o| a + dyr[o] * ye[o]);
            let mut du = vec![F::zero(); f];
            let mut du3 = vec![F::zero(); if swiglu { f } else { 0 }];
            for n in 0..f {
                let mut dh = F::zero();
                for o in 0..d {
                    let dye = wj * dyr[o];
                    dh = dh + dye * w.w2[(ex * f + n) * d + o];
                    let i2 = (ex * f + n) * d + o;
                    g.dw2[i2] = g.dw2[i2] + cache.h[slot * f + n] * dye;
                }
                let u = cache.u[slot * f + n];
                if swiglu {
                    du[n] = dh * cache.u3[slot * f + n] * silu_grad(u);
                    du3[n] = dh * silu(u);
                } else {
                    du[n] = dh * gelu_grad(u);
                }
            }
            for i in 0..d {
                let mut acc = F::zero();
                for n in 0..f {
                    let i1 = (ex * d + i) * f + n;
                    acc = acc + du[n] * w.w1[i1];
                    g.dw1[i1] = g.dw1[i1] + xr[i] * du[n];
                    if swiglu {
                        acc = acc + du3[n] * w.w3[i1];
                        g.dw3[i1] = g.dw3[i1] + xr[i] * du3[n];
                    }
                }
                g.dx[tok * d + i] = g.dx[tok * d + i] + acc;
            }
        }
        // Router: through the combine weights.
        let ids = &cache.topk_ids[tok * k..(tok + 1) * k];
        let ws = &cache.topk_weights[tok * k..(tok + 1) * k];
        if cfg.gate.gating == Gating::TopK {
            // Over the experts taken S: renormalized, the softmax over S's
            // logits; raw, w_j = p_j.
            let mut mean = F::zero();
            for j in 0..k {
                if ids[j] != UNUSED {
                    mean = mean + ws[j] * dws[j];
                }
            }
            for j in 0..k {
                if ids[j] != UNUSED && cfg.gate.renorm {
                    let ex = ids[j] as usize;
                    dz[ex] = dz[ex] + ws[j] * (dws[j] - mean);
                }
            }
            if !cfg.gate.renorm {
                for i in 0..e {
                    let g = (0..k)
                        .find(|&j| ids[j] == i as u32)
                        .map_or(F::zero(), |j| dws[j]);
                    dz[i] = dz[i] + p[i] * (g - mean);
                }
            }
        } else if k == 2 && ids[1] != UNUSED {
            let mean = ws[0] * dws[0] + ws[1] * dws[1];
            for j in 0..2 {
                let ex = ids[j] as usize;
                dz[ex] = dz[ex] + ws[j] * (dws[j] - mean);
            }
        } else if cfg.gate.single_weight == SingleWeight::RawP1 {
            let e1 = ids[0] as usize;
            for i in 0..e {
                let delta = if i == e1 { F::one() } else { F::zero() };
                dz[i] = dz[i] + p[i] * (delta - p[e1]) * dws[0];
            }
        }
        // Load balancing and z-loss, through the softmax.
        let dot = (0..e).fold(F::zero(), |a, i| a + frac[i] * p[i]);
        for i in 0..e {
            dz[i] = dz[i] + bal_scale * p[i] * (frac[i] - dot) + z_scale * cache.lse[tok] * p[i];
        }
        for i in 0..d {
            let mut acc = F::zero();
            for j in 0..e {
                acc = acc + dz[j] * w.w_router[i * e + j];
                g.dw_router[i * e + j] = g.dw_router[i * e + j] + xr[i] * dz[j];
            }
            g.dx[tok * d + i] = g.dx[tok * d + i] + acc;
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::GateConfig;
    use crate::util::Rng;

    fn config(gating: Gating, single: SingleWeight, threshold: f32) -> MoeConfig {
        MoeConfig {
            d: 5,
            f: 6,
            e: 4,
            activation: Activation::Gelu,
            gate: GateConfig {
                gating,
                threshold,
                gap: GapMode::Top2,
                single_weight: single,
                ..GateConfig::default()
            },
            capacity_factor: None,
        }
    }

    fn loss(
        cfg: &MoeConfig,
        w: &MoeParams<f64>,
        x: &[f64],
        t: usize,
        r: &[f64],
        aux: &AuxConfig,
    ) -> f64 {
        let cache = moe_layer_forward(cfg, w, x, t).unwrap();
        let (_, _, bal, z) = aux_losses(&cache, cfg.e, cfg.k(), aux);
        cache.y.iter().zip(r).map(|(a, b)| a * b).sum::<f64>() + bal + z
    }

    /// Central differences of every input and parameter, on a layer whose
    /// routing does not change under the perturbation. Returns the used
    /// and the kept slots of the forward.
    fn check_fd(cfg: &MoeConfig, seed: u64) -> (usize, usize) {
        let t = 7;
        let aux = AuxConfig {
            balance: 0.3,
            z_loss: 0.05,
        };
        let mut rng = Rng::new(seed);
        let mut v = |n: usize, a: f32| -> Vec<f64> {
            rng.vec_sym(n, a).into_iter().map(f64::from).collect()
        };
        let (d, f, e) = (cfg.d, cfg.f, cfg.e);
        let swiglu = cfg.activation == Activation::SwiGlu;
        let mut w = MoeParams {
            w_router: v(d * e, 1.5),
            w1: v(e * d * f, 0.7),
            w3: if swiglu {
                v(e * d * f, 0.7)
            } else {
                Vec::new()
            },
            w2: v(e * f * d, 0.7),
        };
        let mut x = v(t * d, 1.0);
        let r = v(t * d, 1.0);
        let cache = moe_layer_forward(cfg, &w, &x, t).unwrap();
        let grads = moe_layer_backward(cfg, &w, &x, &cache, &r, &aux);
        let h = 1e-6;
        let fd = |vals: &mut Vec<f64>, i: usize, eval: &dyn Fn(&[f64]) -> f64| -> f64 {
            let keep = vals[i];
            vals[i] = keep + h;
            let up = eval(vals);
            vals[i] = keep - h;
            let down = eval(vals);
            vals[i] = keep;
            (up - down) / (2.0 * h)
        };
        let close = |a: f64, b: f64, what: &str| {
            assert!(
                (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
                "{what}: analytic {a} vs fd {b}"
            );
        };
        for i in 0..x.len() {
            let wc = w.clone();
            let num = fd(&mut x, i, &|xx| loss(cfg, &wc, xx, t, &r, &aux));
            close(grads.dx[i], num, &format!("dx[{i}]"));
        }
        for i in 0..w.w_router.len() {
            let mut p = w.w_router.clone();
            let num = fd(&mut p, i, &|pp| {
                let ww = MoeParams {
                    w_router: pp.to_vec(),
                    ..w.clone()
                };
                loss(cfg, &ww, &x, t, &r, &aux)
            });
            close(grads.dw_router[i], num, &format!("dw_router[{i}]"));
        }
        for i in (0..w.w1.len()).step_by(7) {
            let mut p = w.w1.clone();
            let num = fd(&mut p, i, &|pp| {
                let ww = MoeParams {
                    w1: pp.to_vec(),
                    ..w.clone()
                };
                loss(cfg, &ww, &x, t, &r, &aux)
            });
            close(grads.dw1[i], num, &format!("dw1[{i}]"));
        }
        for i in (0..w.w3.len()).step_by(7) {
            let mut p = w.w3.clone();
            let num = fd(&mut p, i, &|pp| {
                let ww = MoeParams {
                    w3: pp.to_vec(),
                    ..w.clone()
                };
                loss(cfg, &ww, &x, t, &r, &aux)
            });
            close(grads.dw3[i], num, &format!("dw3[{i}]"));
        }
        for i in (0..w.w2.len()).step_by(5) {
            let keep = w.w2[i];
            w.w2[i] = keep + h;
            let up = loss(cfg, &w, &x, t, &r, &aux);
            w.w2[i] = keep - h;
            let down = loss(cfg, &w, &x, t, &r, &aux);
            w.w2[i] = keep;
            close(grads.dw2[i], (up - down) / (2.0 * h), &format!("dw2[{i}]"));
        }
        let used = cache.topk_ids.iter().filter(|&&i| i != UNUSED).count();
        (used, cache.kept.iter().filter(|&&k| k).count())
    }

    #[test]
    fn backward_matches_finite_differences_top1() {
        check_fd(&config(Gating::Top1, SingleWeight::RawP1, 0.1), 11);
    }

    #[test]
    fn backward_matches_finite_differences_top2() {
        check_fd(&config(Gating::Top2, SingleWeight::RawP1, 0.1), 12);
    }

    #[test]
    fn backward_matches_finite_differences_adaptive() {
        // A threshold between 0 and 1 that mixes one- and two-expert tokens.
        check_fd(&config(Gating::Adaptive, SingleWeight::RawP1, 0.3), 13);
    }

    /// A top-`k` router over 6 experts, renormalized or raw, under `rule`.
    fn topk_config(k: usize, renorm: bool, rule: ExpertRule, threshold: f32) -> MoeConfig {
        let mut cfg = config(Gating::TopK, SingleWeight::One, threshold);
        cfg.e = 6;
        cfg.gate.k = k;
        cfg.gate.renorm = renorm;
        cfg.gate.rule = rule;
        cfg
    }

    #[test]
    fn backward_matches_finite_differences_top_k() {
        for (k, renorm, rule, threshold, seed) in [
            (4, true, ExpertRule::Fixed, 0.0, 21),
            (4, false, ExpertRule::Fixed, 0.0, 22),
            (5, true, ExpertRule::Ratio, 0.5, 23),
            (5, false, ExpertRule::Mass, 0.6, 24),
            (3, true, ExpertRule::Gap, 0.1, 25),
        ] {
            let cfg = topk_config(k, renorm, rule, threshold);
            let (used, _) = check_fd(&cfg, seed);
            let t = 7;
            if rule == ExpertRule::Fixed {
                assert_eq!(used, t * k);
            } else {
                // The rule takes fewer than k for some tokens, more than one for others.
                assert!(used > t && used < t * k, "{rule:?}: {used} used slots");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_single_weight_one() {
        check_fd(&config(Gating::Adaptive, SingleWeight::One, 0.3), 14);
    }

    #[test]
    fn backward_matches_finite_differences_with_capacity() {
        // T = 7, K = 2, E = 4: ceil(0.6 * 14 / 4) = 3 slots per expert, so
        // some first and second choices are dropped.
        for (gating, seed) in [
            (Gating::Top2, 15),
            (Gating::Top1, 16),
            (Gating::Adaptive, 17),
        ] {
            let mut cfg = config(gating, SingleWeight::RawP1, 0.3);
            cfg.capacity_factor = Some(if gating == Gating::Top1 { 0.5 } else { 0.6 });
            let (used, kept) = check_fd(&cfg, seed);
            assert!(
                kept < used,
                "{gating:?}: nothing dropped ({kept} of {used})"
            );
        }
    }

    #[test]
    fn adaptive_mixes_one_and_two_expert_tokens() {
        let cfg = config(Gating::Adaptive, SingleWeight::RawP1, 0.3);
        let mut rng = Rng::new(13);
        let w = MoeParams {
            w_router: rng.vec_sym(20, 1.5).into_iter().map(f64::from).collect(),
            w1: vec![0.1; 4 * 5 * 6],
            w3: Vec::new(),
            w2: vec![0.1; 4 * 6 * 5],
        };
        let x: Vec<f64> = rng.vec_sym(7 * 5, 1.0).into_iter().map(f64::from).collect();
        let cache = moe_layer_forward(&cfg, &w, &x, 7).unwrap();
        let two = cache.topk_ids.chunks(2).filter(|r| r[1] != UNUSED).count();
        assert!(two > 0 && two < 7, "two-expert tokens: {two} of 7");
    }

    #[test]
    fn backward_matches_finite_differences_swiglu() {
        for (gating, seed) in [(Gating::Top2, 18), (Gating::Adaptive, 19)] {
            let mut cfg = config(gating, SingleWeight::RawP1, 0.3);
            cfg.activation = Activation::SwiGlu;
            check_fd(&cfg, seed);
        }
        // With a capacity that drops slots as well.
        let mut cfg = config(Gating::Top2, SingleWeight::RawP1, 0.3);
        cfg.activation = Activation::SwiGlu;
        cfg.capacity_factor = Some(0.6);
        let (used, kept) = check_fd(&cfg, 20);
        assert!(kept < used);
    }

    #[test]
    fn a_missing_or_extra_w3_is_a_shape_error() {
        let mut cfg = config(Gating::Top1, SingleWeight::RawP1, 0.1);
        let mut w = MoeParams::<f32> {
            w_router: vec![0.0; 20],
            w1: vec![0.0; 120],
            w3: vec![0.0; 120],
            w2: vec![0.0; 120],
        };
        // GELU takes no w3.
        assert!(matches!(
            moe_layer_forward(&cfg, &w, &[0.0; 5], 1),
            Err(Error::Shape { .. })
        ));
        cfg.activation = Activation::SwiGlu;
        assert!(moe_layer_forward(&cfg, &w, &[0.0; 5], 1).is_ok());
        w.w3.clear();
        assert!(matches!(
            moe_layer_forward(&cfg, &w, &[0.0; 5], 1),
            Err(Error::Shape { .. })
        ));
    }
}
