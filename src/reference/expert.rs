//! CPU twin of `shaders/expert.wgsl` (`expert_gemm1_gelu`,
//! `expert_gemm1_swiglu`, `expert_gemm2`, recorded together by
//! `kernels::expert::ExpertFfn`): the grouped expert FFN over the routed slot
//! plan, accumulated like the GPU (f32, one fused multiply-add per K step in
//! K order). Checked in the tests below against a slow composed reference
//! (gather the rows, then a dense matmul per expert).
//!
//! The slot plan itself (routing words, `token_of_slot`) comes from the
//! route twin, `reference::route::route`.

use crate::kernels::{Activation, RoutingLayout, UNUSED};
use crate::reference::activation::{act_gelu, act_silu};

/// The weights of the E experts (row-major).
#[derive(Clone, Copy, Debug)]
pub struct ExpertWeights<'a> {
    /// w1 [E, D, F]
    pub w1: &'a [f32],
    /// w3 [E, D, F], SwiGLU only
    pub w3: Option<&'a [f32]>,
    /// w2 [E, F, D]
    pub w2: &'a [f32],
}

/// Grouped expert FFN. `x [T, D]`; `token_of_slot [R]` and `routing
/// [layout.len()]` as the route writes them (`R = layout.max_rows()`).
/// Returns `(h [R, F], y_expert [R, D])`: row r of a tile of expert
/// `e = tile_expert[r / tile_m]` is `act(x[token_of_slot[r]] · W1[e])` and
/// `h[r] · W2[e]`; padding rows (token UNUSED) use a zero row of x, and rows
/// past the routed tiles stay zero.
#[allow(clippy::too_many_arguments)]
pub fn expert_ffn(
    x: &[f32],
    token_of_slot: &[u32],
    routing: &[u32],
    layout: &RoutingLayout,
    w: &ExpertWeights<'_>,
    d: usize,
    f: usize,
    act: Activation,
) -> (Vec<f32>, Vec<f32>) {
    let rows = layout.max_rows();
    let tile_m = layout.tile_m.max(1);
    let num_tiles = (routing[RoutingLayout::NUM_TILES] as usize).min(layout.max_tiles());
    let tile_expert = &routing[layout.tile_expert()..layout.tile_expert() + layout.max_tiles()];
    let mut h = vec![0.0f32; rows * f];
    let mut y = vec![0.0f32; rows * d];
    let zero = vec![0.0f32; d];
    for (tile, &e) in tile_expert.iter().enumerate().take(num_tiles) {
        let e = (e as usize).min(layout.e - 1);
        let w1 = &w.w1[e * d * f..(e + 1) * d * f];
        let w3 = w.w3.map(|w3| &w3[e * d * f..(e + 1) * d * f]);
        let w2 = &w.w2[e * f * d..(e + 1) * f * d];
        for r in tile * tile_m..(tile + 1) * tile_m {
            let tok = token_of_slot[r];
            let xr = if tok != UNUSED && (tok as usize) < layout.t {
                &x[tok as usize * d..(tok as usize + 1) * d]
            } else {
                &zero[..]
            };
            for n in 0..f {
                let mut g = 0.0f32;
                let mut u = 0.0f32;
                for k in 0..d {
                    g = xr[k].mul_add(w1[k * f + n], g);
                    if let Some(w3) = w3 {
                        u = xr[k].mul_add(w3[k * f + n], u);
                    }
                }
                h[r * f + n] = match act {
                    Activation::Gelu => act_gelu(g),
                    Activation::SwiGlu => act_silu(g) * u,
                };
            }
            for n in 0..d {
                let mut acc = 0.0f32;
                for k in 0..f {
                    acc = h[r * f + k].mul_add(w2[k * d + n], acc);
                }
                y[r * d + n] = acc;
            }
        }
    }
    (h, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::Trans;
    use crate::kernels::route::RouteConfig;
    use crate::reference::matmul::matmul;
    use crate::reference::route::route;

    /// Slow composed reference: for each expert, gather its tokens' rows in
    /// (token, k) order, run a dense matmul per GEMM, then scatter the rows
    /// back to their padded slots.
    #[allow(clippy::too_many_arguments)]
    fn composed(
        x: &[f32],
        topk_ids: &[u32],
        t: usize,
        k: usize,
        layout: &RoutingLayout,
        w: &ExpertWeights<'_>,
        d: usize,
        f: usize,
        act: Activation,
    ) -> (Vec<f32>, Vec<f32>) {
        let rows = layout.max_rows();
        let mut h = vec![0.0f32; rows * f];
        let mut y = vec![0.0f32; rows * d];
        let mut start = 0usize;
        for e in 0..layout.e {
            // The route's priority order: first choices, then second choices.
            let toks: Vec<usize> = (0..t * k)
                .map(|i| crate::reference::route::slot_at(i, t, k))
                .filter(|&s| topk_ids[s] == e as u32)
                .map(|s| s / k)
                .collect();
            let xs: Vec<f32> = toks
                .iter()
                .flat_map(|&tok| x[tok * d..(tok + 1) * d].to_vec())
                .collect();
            let n = toks.len();
            let g = matmul(
                &xs,
                &w.w1[e * d * f..(e + 1) * d * f],
                n,
                f,
                d,
                Trans::NN,
                1.0,
                0.0,
                None,
            );
            let he: Vec<f32> = match (act, w.w3) {
                (Activation::SwiGlu, Some(w3)) => {
                    let u = matmul(
                        &xs,
                        &w3[e * d * f..(e + 1) * d * f],
                        n,
                        f,
                        d,
                        Trans::NN,
                        1.0,
                        0.0,
                        None,
                    );
                    g.iter().zip(&u).map(|(g, u)| act_silu(*g) * u).collect()
                }
                _ => g.iter().map(|g| act_gelu(*g)).collect(),
            };
            let ye = matmul(
                &he,
                &w.w2[e * f * d..(e + 1) * f * d],
                n,
                d,
                f,
                Trans::NN,
                1.0,
                0.0,
                None,
            );
            h[start * f..(start + n) * f].copy_from_slice(&he);
            y[start * d..(start + n) * d].copy_from_slice(&ye);
            start += n.div_ceil(layout.tile_m) * layout.tile_m;
        }
        (h, y)
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        t: usize,
        k: usize,
        e: usize,
        d: usize,
        f: usize,
        tile_m: usize,
        act: Activation,
        ids: Vec<u32>,
    ) {
        let mut rng = crate::util::Rng::new(3);
        let x = rng.vec_sym(t * d, 1.0);
        let w1 = rng.vec_sym(e * d * f, 0.5);
        let w3 = rng.vec_sym(e * d * f, 0.5);
        let w2 = rng.vec_sym(e * f * d, 0.5);
        let w = ExpertWeights {
            w1: &w1,
            w3: (act == Activation::SwiGlu).then_some(&w3[..]),
            w2: &w2,
        };
        let layout = RoutingLayout { t, k, e, tile_m };
        let (words, tos, _) = route(&ids, &RouteConfig::new(layout));
        let (h, y) = expert_ffn(&x, &tos, &words, &layout, &w, d, f, act);
        let (hc, yc) = composed(&x, &ids, t, k, &layout, &w, d, f, act);
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
        };
        assert!(
            close(&h, &hc),
            "h: T={t} K={k} E={e} tile_m={tile_m} {act:?}"
        );
        assert!(
            close(&y, &yc),
            "y_expert: T={t} K={k} E={e} tile_m={tile_m} {act:?}"
        );
    }

    #[test]
    fn grouped_twin_matches_per_expert_matmuls() {
        // Two experts per token, one token alone, an empty expert (3).
        let ids = vec![0, 2, 2, 1, 0, 4, 1, 0, 2, UNUSED];
        for act in [Activation::Gelu, Activation::SwiGlu] {
            check(5, 2, 5, 7, 6, 4, act, ids.clone());
            check(5, 2, 5, 7, 6, 1, act, ids.clone());
        }
        // All tokens on one expert, tile larger than T.
        check(9, 1, 3, 4, 5, 16, Activation::Gelu, vec![1; 9]);
    }

    #[test]
    fn padding_rows_and_untouched_rows_are_zero() {
        let (t, k, e, d, f, tile_m) = (3, 1, 2, 4, 3, 4);
        let x = vec![1.0; t * d];
        let w1 = vec![0.5; e * d * f];
        let w2 = vec![0.25; e * f * d];
        let w = ExpertWeights {
            w1: &w1,
            w3: None,
            w2: &w2,
        };
        let layout = RoutingLayout { t, k, e, tile_m };
        let (words, tos, _) = route(&[1, 1, 1], &RouteConfig::new(layout));
        let (h, y) = expert_ffn(&x, &tos, &words, &layout, &w, d, f, Activation::Gelu);
        // Rows 0..3 are expert 1's three tokens, row 3 pads the tile.
        assert!(h[..3 * f].iter().all(|&v| (v - act_gelu(2.0)).abs() < 1e-6));
        assert!(h[3 * f..].iter().all(|&v| v == 0.0));
        assert!(y[3 * d..].iter().all(|&v| v == 0.0));
    }
}
