//! CPU twin of `shaders/decode.wgsl` (`decode_up_gelu`, `decode_up_swiglu`,
//! `decode_down`, recorded together by `kernels::decode::DecodeFfn`): every
//! dot product summed in the shader's order.

use super::activation::{act_gelu, act_silu};
use crate::kernels::decode::DecodeShape;
use crate::kernels::Activation;

/// `h [T, K, F]`: `act(x[t] · W1[e])`, or `silu(x[t] · W1[e]) * (x[t] · W3[e])`
/// for SwiGLU (`w3` required), with `e = topk_ids[t, j]`; 0 for unused slots
/// (`UNUSED`, or an id not below E).
pub fn decode_up(
    s: &DecodeShape,
    activation: Activation,
    x: &[f32],
    topk_ids: &[u32],
    w1: &[f32],
    w3: Option<&[f32]>,
) -> Vec<f32> {
    let DecodeShape { t, k, e, d, f } = *s;
    let mut h = vec![0.0f32; t * k * f];
    for tj in 0..t * k {
        let id = topk_ids[tj] as usize;
        if id >= e {
            continue;
        }
        let xt = &x[(tj / k) * d..(tj / k + 1) * d];
        let mut a = vec![0.0f32; f];
        let mut b = vec![0.0f32; f];
        for (dd, &xv) in xt.iter().enumerate() {
            let row = (id * d + dd) * f;
            for (acc, &w) in a.iter_mut().zip(&w1[row..row + f]) {
                *acc += xv * w;
            }
            if let Some(w3) = w3 {
                for (acc, &w) in b.iter_mut().zip(&w3[row..row + f]) {
                    *acc += xv * w;
                }
            }
        }
        for (c, out) in h[tj * f..(tj + 1) * f].iter_mut().enumerate() {
            *out = match activation {
                Activation::Gelu => act_gelu(a[c]),
                Activation::SwiGlu => act_silu(a[c]) * b[c],
            };
        }
    }
    h
}

/// `y [T, D]`: `sum_j topk_weights[t, j] * (h[t, j, :] · W2[e])` over the used
/// slots, j in increasing order.
pub fn decode_down(
    s: &DecodeShape,
    topk_ids: &[u32],
    topk_weights: &[f32],
    w2: &[f32],
    h: &[f32],
) -> Vec<f32> {
    let DecodeShape { t, k, e, d, f } = *s;
    let mut y = vec![0.0f32; t * d];
    for tok in 0..t {
        for j in 0..k {
            let tj = tok * k + j;
            let id = topk_ids[tj] as usize;
            if id >= e {
                continue;
            }
            let mut acc = vec![0.0f32; d];
            for (ff, &hv) in h[tj * f..(tj + 1) * f].iter().enumerate() {
                let row = (id * f + ff) * d;
                for (a, &w) in acc.iter_mut().zip(&w2[row..row + d]) {
                    *a += hv * w;
                }
            }
            let w = topk_weights[tj];
            for (out, a) in y[tok * d..(tok + 1) * d].iter_mut().zip(acc) {
                *out += w * a;
            }
        }
    }
    y
}

/// The decode FFN: `decode_down(decode_up(...))`. Returns `(h, y)`.
#[allow(clippy::too_many_arguments)]
pub fn decode_ffn(
    s: &DecodeShape,
    activation: Activation,
    x: &[f32],
    topk_ids: &[u32],
    topk_weights: &[f32],
    w1: &[f32],
    w3: Option<&[f32]>,
    w2: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let h = decode_up(s, activation, x, topk_ids, w1, w3);
    let y = decode_down(s, topk_ids, topk_weights, w2, &h);
    (h, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::UNUSED;

    #[test]
    fn matches_a_dense_ffn_per_selected_expert() {
        // T = 1, K = 2, E = 2, D = 2, F = 1. Expert e: W1 = [[e+1], [1]],
        // W2 = [[1, -1]]; x = [1, 2].
        let s = DecodeShape {
            t: 1,
            k: 2,
            e: 2,
            d: 2,
            f: 1,
        };
        let w1 = [1.0, 1.0, 2.0, 1.0];
        let w2 = [1.0, -1.0, 1.0, -1.0];
        let x = [1.0, 2.0];
        let (h, y) = decode_ffn(
            &s,
            Activation::Gelu,
            &x,
            &[1, 0],
            &[0.25, 0.75],
            &w1,
            None,
            &w2,
        );
        // h for expert 1: gelu(1*2 + 2*1) = gelu(4); expert 0: gelu(3)
        assert_eq!(h, vec![act_gelu(4.0), act_gelu(3.0)]);
        let want = 0.25 * act_gelu(4.0) + 0.75 * act_gelu(3.0);
        assert!((y[0] - want).abs() < 1e-6 && (y[1] + want).abs() < 1e-6);

        let w3 = [0.5, 0.0, 0.5, 0.0];
        let (h, _) = decode_ffn(
            &s,
            Activation::SwiGlu,
            &x,
            &[1, UNUSED],
            &[1.0, 7.0],
            &w1,
            Some(&w3),
            &w2,
        );
        assert_eq!(h, vec![act_silu(4.0) * 0.5, 0.0]);
    }
}
