//! CPU twins of the MoE backward kernels over the slot plan
//! (`shaders/moe_backward.wgsl`, `shaders/expert_backward.wgsl`), same names
//! and argument order. The tests compose them into a layer backward and check
//! it against the per-token twin `reference::moe_train::moe_layer_backward`.

// Index loops mirror the kernels' (and the math's) subscripts.
#![allow(clippy::needless_range_loop)]

use crate::kernels::moe_backward::TopKWeights;
use crate::kernels::{RoutingLayout, UNUSED};
use crate::reference::moe_train::{gelu_grad, silu, silu_grad};

/// `dys[r] = w[t, j] * dy[t]` for the slot r of (t, j); zeros elsewhere.
/// Returns dys [R, D], R = `layout.max_rows()`.
pub fn combine_backward_slots(
    dy: &[f32],
    topk_weights: &[f32],
    slot_of_token: &[u32],
    layout: &RoutingLayout,
    d: usize,
) -> Vec<f32> {
    let k = layout.k;
    let mut dys = vec![0.0f32; layout.max_rows() * d];
    for t in 0..layout.t {
        for j in 0..k {
            let r = slot_of_token[t * k + j];
            if r == UNUSED {
                continue;
            }
            let w = topk_weights[t * k + j];
            let r = r as usize;
            for c in 0..d {
                dys[r * d + c] = w * dy[t * d + c];
            }
        }
    }
    dys
}

/// `dw[t, j] = <dy[t], y_expert[slot_of_token[t, j]]>`, 0 for unused slots.
pub fn combine_backward_weights(
    dy: &[f32],
    slot_of_token: &[u32],
    y_expert: &[f32],
    t: usize,
    k: usize,
    d: usize,
) -> Vec<f32> {
    let mut dw = vec![0.0f32; t * k];
    for tok in 0..t {
        for j in 0..k {
            let r = slot_of_token[tok * k + j];
            if r == UNUSED {
                continue;
            }
            let r = r as usize;
            dw[tok * k + j] = (0..d).fold(0.0f32, |a, c| {
                dy[tok * d + c].mul_add(y_expert[r * d + c], a)
            });
        }
    }
    dw
}

/// `[f [E], P [E], balance_loss, z_loss]` (coefficients applied).
#[allow(clippy::too_many_arguments)]
pub fn gate_stats(
    probs: &[f32],
    topk_ids: &[u32],
    lse: &[f32],
    t: usize,
    k: usize,
    e: usize,
    balance: f32,
    z_loss: f32,
) -> Vec<f32> {
    let mut s = vec![0.0f32; 2 * e + 2];
    let tf = t as f32;
    for ex in 0..e {
        let mut first = 0.0f32;
        let mut psum = 0.0f32;
        for tok in 0..t {
            if topk_ids[tok * k] == ex as u32 {
                first += 1.0;
            }
            psum += probs[tok * e + ex];
        }
        s[ex] = first / tf;
        s[e + ex] = psum / tf;
    }
    let bal = (0..e).fold(0.0f32, |a, i| s[i].mul_add(s[e + i], a));
    let z: f32 = lse.iter().map(|l| l * l).sum();
    s[2 * e] = bal * balance * e as f32;
    s[2 * e + 1] = z / tf * z_loss;
    s
}

/// Router-logit gradient `dz [T, E]` (see `moe_train` for the rules).
#[allow(clippy::too_many_arguments)]
pub fn gate_backward(
    probs: &[f32],
    topk_ids: &[u32],
    topk_weights: &[f32],
    dw: &[f32],
    lse: &[f32],
    stats: &[f32],
    t: usize,
    k: usize,
    e: usize,
    raw_single: bool,
    topk: Option<TopKWeights>,
    balance: f32,
    z_loss: f32,
) -> Vec<f32> {
    let mut dz = vec![0.0f32; t * e];
    let tf = t as f32;
    let bal = balance * e as f32 / tf;
    for tok in 0..t {
        let p = &probs[tok * e..(tok + 1) * e];
        let zs = 2.0 * z_loss * lse[tok] / tf;
        let dot = (0..e).fold(0.0f32, |a, i| stats[i].mul_add(p[i], a));
        if let Some(mode) = topk {
            // The shader's gate_backward_topk.
            let ids = &topk_ids[tok * k..(tok + 1) * k];
            let ws = &topk_weights[tok * k..(tok + 1) * k];
            let gs = &dw[tok * k..(tok + 1) * k];
            let mean = (0..k)
                .filter(|&j| ids[j] != UNUSED)
                .fold(0.0f32, |a, j| ws[j].mul_add(gs[j], a));
            for i in 0..e {
                let slot = ids.iter().rposition(|&x| x == i as u32);
                let (w, g) = slot.map(|j| (ws[j], gs[j])).unwrap_or((0.0, 0.0));
                let mut v = match mode {
                    TopKWeights::Renorm if slot.is_some() => w * (g - mean),
                    TopKWeights::Renorm => 0.0,
                    TopKWeights::Raw => p[i] * (g - mean),
                };
                v += bal * p[i] * (stats[i] - dot) + zs * p[i];
                dz[tok * e + i] = v;
            }
            continue;
        }
        let e1 = topk_ids[tok * k];
        let e2 = if k > 1 { topk_ids[tok * k + 1] } else { UNUSED };
        let (w1, g1) = (topk_weights[tok * k], dw[tok * k]);
        let (w2, g2) = if e2 != UNUSED {
            (topk_weights[tok * k + 1], dw[tok * k + 1])
        } else {
            (0.0, 0.0)
        };
        let mean = w1 * g1 + w2 * g2;
        let pe1 = p[(e1 as usize).min(e - 1)];
        for i in 0..e {
            let mut v = 0.0f32;
            if e2 != UNUSED {
                if i as u32 == e1 {
                    v = w1 * (g1 - mean);
                } else if i as u32 == e2 {
                    v = w2 * (g2 - mean);
                }
            } else if raw_single {
                v = p[i] * ((i as u32 == e1) as u32 as f32 - pe1) * g1;
            }
            v += bal * p[i] * (stats[i] - dot) + zs * p[i];
            dz[tok * e + i] = v;
        }
    }
    dz
}

fn tiles(routing: &[u32], layout: &RoutingLayout) -> Vec<(usize, usize)> {
    let num = (routing[RoutingLayout::NUM_TILES] as usize).min(layout.max_tiles());
    (0..num)
        .map(|tile| {
            let e = routing[layout.tile_expert() + tile] as usize;
            (tile, e.min(layout.e - 1))
        })
        .collect()
}

/// `da[r] = (dys[r] · W2[e]^T) * gelu'(u[r])` on the routed row tiles.
pub fn expert_gemm2_backward_gelu(
    dys: &[f32],
    routing: &[u32],
    layout: &RoutingLayout,
    w2: &[f32],
    u: &[f32],
    d: usize,
    f: usize,
) -> Vec<f32> {
    let tm = layout.tile_m;
    let mut da = vec![0.0f32; layout.max_rows() * f];
    for (tile, e) in tiles(routing, layout) {
        for r in tile * tm..(tile + 1) * tm {
            for n in 0..f {
                let acc = (0..d).fold(0.0f32, |a, o| {
                    dys[r * d + o].mul_add(w2[(e * f + n) * d + o], a)
                });
                da[r * f + n] = acc * gelu_grad(u[r * f + n]);
            }
        }
    }
    da
}

/// SwiGLU: with `dh = dys[r] · W2[e]^T`, `da = dh * u3 * silu'(u)` and
/// `da3 = dh * silu(u)` on the routed row tiles. Returns (da, da3), [R, F] each.
#[allow(clippy::too_many_arguments)]
pub fn expert_gemm2_backward_swiglu(
    dys: &[f32],
    routing: &[u32],
    layout: &RoutingLayout,
    w2: &[f32],
    u: &[f32],
    u3: &[f32],
    d: usize,
    f: usize,
) -> (Vec<f32>, Vec<f32>) {
    let tm = layout.tile_m;
    let mut da = vec![0.0f32; layout.max_rows() * f];
    let mut da3 = vec![0.0f32; layout.max_rows() * f];
    for (tile, e) in tiles(routing, layout) {
        for r in tile * tm..(tile + 1) * tm {
            for n in 0..f {
                let dh = (0..d).fold(0.0f32, |a, o| {
                    dys[r * d + o].mul_add(w2[(e * f + n) * d + o], a)
                });
                let i = r * f + n;
                da[i] = dh * u3[i] * silu_grad(u[i]);
                da3[i] = dh * silu(u[i]);
            }
        }
    }
    (da, da3)
}

/// SwiGLU: `dxs[r] = da[r] · W1[e]^T + da3[r] · W3[e]^T` (one sum over
/// K = 2F, the W1 half first) on the routed row tiles.
#[allow(clippy::too_many_arguments)]
pub fn expert_gemm1_backward_swiglu(
    da: &[f32],
    da3: &[f32],
    routing: &[u32],
    layout: &RoutingLayout,
    w1: &[f32],
    w3: &[f32],
    d: usize,
    f: usize,
) -> Vec<f32> {
    let tm = layout.tile_m;
    let mut dxs = vec![0.0f32; layout.max_rows() * d];
    for (tile, e) in tiles(routing, layout) {
        for r in tile * tm..(tile + 1) * tm {
            for i in 0..d {
                let w = |n: usize| (e * d + i) * f + n;
                let a = (0..f).fold(0.0f32, |a, n| da[r * f + n].mul_add(w1[w(n)], a));
                dxs[r * d + i] = (0..f).fold(a, |a, n| da3[r * f + n].mul_add(w3[w(n)], a));
            }
        }
    }
    dxs
}

/// `dxs[r] = da[r] · W1[e]^T` on the routed row tiles.
pub fn expert_gemm1_backward(
    da: &[f32],
    routing: &[u32],
    layout: &RoutingLayout,
    w1: &[f32],
    d: usize,
    f: usize,
) -> Vec<f32> {
    let tm = layout.tile_m;
    let mut dxs = vec![0.0f32; layout.max_rows() * d];
    for (tile, e) in tiles(routing, layout) {
        for r in tile * tm..(tile + 1) * tm {
            for i in 0..d {
                dxs[r * d + i] = (0..f).fold(0.0f32, |a, n| {
                    da[r * f + n].mul_add(w1[(e * d + i) * f + n], a)
                });
            }
        }
    }
    dxs
}

/// Rows `[offsets[e], offsets[e + 1])` of each expert.
fn expert_rows(routing: &[u32], layout: &RoutingLayout, e: usize) -> std::ops::Range<usize> {
    let o = layout.offsets();
    let start = routing[o + e] as usize;
    start..(routing[o + e + 1] as usize).max(start)
}

/// `dW1[e] = sum_r x[tok(r)]^T da[r]` over the expert's rows: [E, D, F].
pub fn expert_weight_grad_w1(
    x: &[f32],
    token_of_slot: &[u32],
    routing: &[u32],
    layout: &RoutingLayout,
    da: &[f32],
    d: usize,
    f: usize,
) -> Vec<f32> {
    let mut dw = vec![0.0f32; layout.e * d * f];
    for e in 0..layout.e {
        for r in expert_rows(routing, layout, e) {
            let tok = token_of_slot[r];
            if tok == UNUSED || tok as usize >= layout.t {
                continue;
            }
            let xr = &x[tok as usize * d..(tok as usize + 1) * d];
            for i in 0..d {
                for n in 0..f {
                    let o = (e * d + i) * f + n;
                    dw[o] = xr[i].mul_add(da[r * f + n], dw[o]);
                }
            }
        }
    }
    dw
}

/// `dW2[e] = sum_r h[r]^T dys[r]` over the expert's rows: [E, F, D].
pub fn expert_weight_grad_w2(
    h: &[f32],
    routing: &[u32],
    layout: &RoutingLayout,
    dys: &[f32],
    d: usize,
    f: usize,
) -> Vec<f32> {
    let mut dw = vec![0.0f32; layout.e * f * d];
    for e in 0..layout.e {
        for r in expert_rows(routing, layout, e) {
            for n in 0..f {
                for o in 0..d {
                    let i = (e * f + n) * d + o;
                    dw[i] = h[r * f + n].mul_add(dys[r * d + o], dw[i]);
                }
            }
        }
    }
    dw
}

/// The whole layer backward composed from the twins above (and the forward
/// twins), as `MoeBackward::record` runs it on the GPU. Returns
/// `(dx, dw_router, dw1, dw2, stats)`.
pub mod compose {
    use super::*;
    use crate::kernels::matmul::Trans;
    use crate::kernels::moe_config::{MoeConfig, MoeWeights};
    use crate::kernels::route::RouteConfig;
    use crate::kernels::AuxConfig;
    use crate::reference::combine::combine_forward;
    use crate::reference::matmul::matmul;
    use crate::reference::route::route;

    /// What the training forward of the twins produced.
    pub struct Forward {
        pub probs: Vec<f32>,
        pub topk_ids: Vec<u32>,
        pub topk_weights: Vec<f32>,
        pub lse: Vec<f32>,
        pub routing: Vec<u32>,
        pub token_of_slot: Vec<u32>,
        pub slot_of_token: Vec<u32>,
        pub u: Vec<f32>,
        /// SwiGLU's `x W3` [R, F] (empty for GELU)
        pub u3: Vec<f32>,
        pub h: Vec<f32>,
        pub y_expert: Vec<f32>,
        pub y: Vec<f32>,
    }

    pub struct Grads {
        pub dx: Vec<f32>,
        pub dw_router: Vec<f32>,
        pub dw1: Vec<f32>,
        pub dw2: Vec<f32>,
        /// SwiGLU's dW3 (empty for GELU)
        pub dw3: Vec<f32>,
        pub stats: Vec<f32>,
    }

    /// Forward over the slot plan (GELU or SwiGLU), keeping `u` (and `u3`);
    /// a training plan, so slots past the config's capacity are dropped.
    pub fn forward(
        cfg: &MoeConfig,
        w: &MoeWeights,
        x: &[f32],
        t: usize,
        tile_m: usize,
    ) -> crate::Result<(Forward, RoutingLayout)> {
        let (d, f, e, k) = (cfg.d, cfg.f, cfg.e, cfg.k());
        let logits = matmul(x, &w.w_router, t, e, d, Trans::NN, 1.0, 0.0, None);
        let g = crate::reference::gate::gate_forward(&cfg.gate, &logits, t, e)?;
        let layout = RoutingLayout { t, k, e, tile_m };
        let config = RouteConfig {
            capacity: cfg.capacity(t),
            ..RouteConfig::new(layout)
        };
        let (routing, token_of_slot, slot_of_token) = route(&g.topk_ids, &config);
        let rows = layout.max_rows();
        let swiglu = cfg.activation == crate::kernels::Activation::SwiGlu;
        let w3: &[f32] = w.w3.as_deref().unwrap_or(&[]);
        let mut u = vec![0.0f32; rows * f];
        let mut u3 = vec![0.0f32; if swiglu { rows * f } else { 0 }];
        let mut h = vec![0.0f32; rows * f];
        let mut ye = vec![0.0f32; rows * d];
        for (tile, ex) in tiles(&routing, &layout) {
            for r in tile * tile_m..(tile + 1) * tile_m {
                let tok = token_of_slot[r];
                if tok == UNUSED {
                    continue;
                }
                let xr = &x[tok as usize * d..(tok as usize + 1) * d];
                for n in 0..f {
                    let a =
                        (0..d).fold(0.0f32, |a, i| xr[i].mul_add(w.w1[(ex * d + i) * f + n], a));
                    u[r * f + n] = a;
                    h[r * f + n] = if swiglu {
                        let b =
                            (0..d).fold(0.0f32, |b, i| xr[i].mul_add(w3[(ex * d + i) * f + n], b));
                        u3[r * f + n] = b;
                        crate::reference::activation::act_silu(a) * b
                    } else {
                        crate::reference::activation::act_gelu(a)
                    };
                }
                for o in 0..d {
                    ye[r * d + o] = (0..f).fold(0.0f32, |a, n| {
                        h[r * f + n].mul_add(w.w2[(ex * f + n) * d + o], a)
                    });
                }
            }
        }
        let y = combine_forward(&g.topk_weights, &slot_of_token, &ye, t, k, d);
        Ok((
            Forward {
                probs: g.probs,
                topk_ids: g.topk_ids,
                topk_weights: g.topk_weights,
                lse: g.lse,
                routing,
                token_of_slot,
                slot_of_token,
                u,
                u3,
                h,
                y_expert: ye,
                y,
            },
            layout,
        ))
    }

    pub fn backward(
        cfg: &MoeConfig,
        w: &MoeWeights,
        x: &[f32],
        fw: &Forward,
        layout: &RoutingLayout,
        dy: &[f32],
        aux: &AuxConfig,
    ) -> Grads {
        let (d, f, e, k, t) = (cfg.d, cfg.f, cfg.e, cfg.k(), layout.t);
        let raw = cfg.gate.single_weight == crate::kernels::SingleWeight::RawP1;
        let dys = combine_backward_slots(dy, &fw.topk_weights, &fw.slot_of_token, layout, d);
        let dw = combine_backward_weights(dy, &fw.slot_of_token, &fw.y_expert, t, k, d);
        let stats = gate_stats(
            &fw.probs,
            &fw.topk_ids,
            &fw.lse,
            t,
            k,
            e,
            aux.balance,
            aux.z_loss,
        );
        let dz = gate_backward(
            &fw.probs,
            &fw.topk_ids,
            &fw.topk_weights,
            &dw,
            &fw.lse,
            &stats,
            t,
            k,
            e,
            raw,
            TopKWeights::of(&cfg.gate),
            aux.balance,
            aux.z_loss,
        );
        let (da, da3, dxs) = match w.w3.as_deref() {
            Some(w3) => {
                let (da, da3) = expert_gemm2_backward_swiglu(
                    &dys,
                    &fw.routing,
                    layout,
                    &w.w2,
                    &fw.u,
                    &fw.u3,
                    d,
                    f,
                );
                let dxs =
                    expert_gemm1_backward_swiglu(&da, &da3, &fw.routing, layout, &w.w1, w3, d, f);
                (da, da3, dxs)
            }
            None => {
                let da = expert_gemm2_backward_gelu(&dys, &fw.routing, layout, &w.w2, &fw.u, d, f);
                let dxs = expert_gemm1_backward(&da, &fw.routing, layout, &w.w1, d, f);
                (da, Vec::new(), dxs)
            }
        };
        let ones = vec![1.0f32; t * k];
        let dx0 = combine_forward(&ones, &fw.slot_of_token, &dxs, t, k, d);
        let dx = matmul(&dz, &w.w_router, t, d, e, Trans::NT, 1.0, 1.0, Some(&dx0));
        let dw_router = matmul(x, &dz, d, e, t, Trans::TN, 1.0, 0.0, None);
        let dw1 = expert_weight_grad_w1(x, &fw.token_of_slot, &fw.routing, layout, &da, d, f);
        let dw2 = expert_weight_grad_w2(&fw.h, &fw.routing, layout, &dys, d, f);
        let dw3 = if da3.is_empty() {
            Vec::new()
        } else {
            expert_weight_grad_w1(x, &fw.token_of_slot, &fw.routing, layout, &da3, d, f)
        };
        Grads {
            dx,
            dw_router,
            dw1,
            dw2,
            dw3,
            stats,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compose;
    use crate::kernels::moe_config::{MoeConfig, MoeWeights};
    use crate::kernels::{Activation, GateConfig, Gating};
    use crate::reference::moe_train::{
        aux_losses, moe_layer_backward, moe_layer_forward, AuxConfig, MoeParams,
    };
    use crate::tol::Tol;
    use crate::util::Rng;

    #[test]
    fn slot_twins_compose_to_the_per_token_backward() {
        for (gating, seed, capacity_factor, activation) in [
            (Gating::Top1, 1, None),
            (Gating::Top2, 2, None),
            (Gating::Adaptive, 3, None),
            (Gating::Top1, 4, Some(0.6)),
            (Gating::Top2, 5, Some(0.6)),
            (Gating::Adaptive, 6, Some(0.5)),
        ]
        .into_iter()
        .map(|(g, s, c)| (g, s, c, Activation::Gelu))
        .chain([
            (Gating::Top2, 7, None, Activation::SwiGlu),
            (Gating::Adaptive, 8, Some(0.5), Activation::SwiGlu),
            (Gating::TopK, 9, None, Activation::Gelu),
            (Gating::TopK, 10, Some(0.6), Activation::SwiGlu),
            (Gating::TopK, 11, None, Activation::SwiGlu),
        ]) {
            // Top-k: k = 4 of 5, renormalized (odd seeds) or raw, the ratio
            // rule on one case.
            let gate = match gating {
                Gating::TopK => GateConfig {
                    threshold: 0.5,
                    rule: if seed == 11 {
                        crate::kernels::ExpertRule::Ratio
                    } else {
                        crate::kernels::ExpertRule::Fixed
                    },
                    ..GateConfig::top_k(4, seed % 2 == 1, crate::kernels::RouterScore::Softmax)
                },
                _ => GateConfig {
                    threshold: 0.4,
                    ..GateConfig::new(gating)
                },
            };
            let cfg = MoeConfig {
                d: 12,
                f: 20,
                e: 5,
                activation,
                gate,
                capacity_factor,
            };
            let t = 23;
            let w = MoeWeights::random(&cfg, seed);
            let mut rng = Rng::new(seed + 10);
            let x = rng.vec_sym(t * cfg.d, 1.0);
            let dy = rng.vec_sym(t * cfg.d, 1.0);
            let aux = AuxConfig {
                balance: 0.2,
                z_loss: 0.01,
            };
            let (fw, layout) = compose::forward(&cfg, &w, &x, t, 8).unwrap();
            let dropped = fw.routing[crate::kernels::RoutingLayout::DROPPED_SLOTS];
            assert_eq!(
                dropped > 0,
                capacity_factor.is_some(),
                "{gating:?}: {dropped} dropped"
            );
            let g = compose::backward(&cfg, &w, &x, &fw, &layout, &dy, &aux);
            let p = MoeParams {
                w_router: w.w_router.clone(),
                w1: w.w1.clone(),
                w3: w.w3.clone().unwrap_or_default(),
                w2: w.w2.clone(),
            };
            let cache = moe_layer_forward(&cfg, &p, &x, t).unwrap();
            let want = moe_layer_backward(&cfg, &p, &x, &cache, &dy, &aux);
            let (_, _, bal, z) = aux_losses(&cache, cfg.e, cfg.k(), &aux);
            let tol = Tol::reduction(cfg.f);
            for (name, got, want) in [
                ("y", &fw.y, &cache.y),
                ("dx", &g.dx, &want.dx),
                ("dw_router", &g.dw_router, &want.dw_router),
                ("dw1", &g.dw1, &want.dw1),
                ("dw2", &g.dw2, &want.dw2),
                ("dw3", &g.dw3, &want.dw3),
            ] {
                let c = tol.compare(got, want);
                assert!(c.pass, "{gating:?} {name}: {c:?}");
            }
            let e = cfg.e;
            assert!((g.stats[2 * e] - bal).abs() < 1e-5 && (g.stats[2 * e + 1] - z).abs() < 1e-5);
        }
    }
}
