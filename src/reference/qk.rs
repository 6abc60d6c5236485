//! CPU twins of `shaders/qk.wgsl` (same names): the q/k/v bias, QK-norm and
//! the rotary embedding, in place on `qkv [T, (H + 2 Hkv) Dh]`, in the
//! shader's order of operations.

use num_traits::Float;

/// `qkv[t, :] += bias`.
pub fn qkv_bias(qkv: &mut [f32], bias: &[f32]) {
    for row in qkv.chunks_exact_mut(bias.len()) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += b;
        }
    }
}

/// RMSNorm of each q segment (gain `gq`, width = its length) and each k
/// segment (gain `gk`) of every row: `x * (1 / sqrt(mean(x^2) + eps)) * g`.
pub fn qk_norm(
    qkv: &mut [f32],
    width: usize,
    q_cols: usize,
    kv_cols: usize,
    gq: &[f32],
    gk: &[f32],
    eps: f32,
) {
    for row in qkv.chunks_exact_mut(width) {
        let (q, rest) = row.split_at_mut(q_cols);
        for (part, g) in [(q, gq), (&mut rest[..kv_cols], gk)] {
            for seg in part.chunks_exact_mut(g.len()) {
                let ss: f32 = seg.iter().map(|x| x * x).sum();
                let r = 1.0 / (ss / g.len() as f32 + eps).sqrt();
                for (x, &gi) in seg.iter_mut().zip(g) {
                    *x = *x * r * gi;
                }
            }
        }
    }
}

/// The rotary embedding of the H + Hkv q and k heads of every row (row t at
/// position `pos0 + t % period`; tables `[N, Dh / 2]`); `sign` -1 turns
/// back (the transpose of the rotation: its backward). Generic over the
/// float type for the model twin's gradient check.
#[allow(clippy::too_many_arguments)]
pub fn rope<F: Float>(
    qkv: &mut [F],
    heads: (usize, usize),
    dh: usize,
    cos: &[f32],
    sin: &[f32],
    pos0: usize,
    period: usize,
    sign: f32,
) {
    let (h, hkv) = heads;
    let (width, half) = ((h + 2 * hkv) * dh, dh / 2);
    let n = cos.len() / half;
    let f = |x: f32| F::from(x).unwrap_or_else(F::nan);
    for (t, row) in qkv.chunks_exact_mut(width).enumerate() {
        let pos = (pos0 + t % period).min(n - 1);
        for hh in 0..h + hkv {
            for i in 0..half {
                let (c, s) = (f(cos[pos * half + i]), f(sin[pos * half + i] * sign));
                let at = hh * dh + i;
                let (x1, x2) = (row[at], row[at + half]);
                row[at] = x1 * c - x2 * s;
                row[at + half] = x2 * c + x1 * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Rope;

    #[test]
    fn rope_turns_pairs_and_back() {
        let (h, hkv, dh, n) = (2, 1, 4, 5);
        let width = (h + 2 * hkv) * dh;
        let rope_cfg = Rope {
            theta: 10000.0,
            scaling: None,
        };
        let (cos, sin) = rope_cfg.tables(n, dh);
        let mut rng = crate::util::Rng::new(2);
        let x = rng.vec_sym(3 * width, 1.0);
        let mut y = x.clone();
        rope(&mut y, (h, hkv), dh, &cos, &sin, 1, 3, 1.0);
        // Position 0 of the first table row is the identity; row 0 is at 1.
        assert!((y[0] - x[0]).abs() > 1e-6);
        // v is untouched; norms of pairs are kept.
        assert_eq!(&y[(h + hkv) * dh..width], &x[(h + hkv) * dh..width]);
        let n2 = |v: &[f32], a: usize| v[a] * v[a] + v[a + 2] * v[a + 2];
        assert!((n2(&y, 1) - n2(&x, 1)).abs() < 1e-5);
        rope(&mut y, (h, hkv), dh, &cos, &sin, 1, 3, -1.0);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    /// The rotation is orthogonal, so turning back is its transpose: the
    /// backward (`<R x, y> = <x, Rᵀ y>`).
    #[test]
    fn rope_backward_is_the_transpose() {
        let (h, hkv, dh, n) = (2, 2, 8, 6);
        let width = (h + 2 * hkv) * dh;
        let (cos, sin) = Rope {
            theta: 500.0,
            scaling: None,
        }
        .tables(n, dh);
        let mut rng = crate::util::Rng::new(9);
        let x: Vec<f64> = rng
            .vec_sym(n * width, 1.0)
            .into_iter()
            .map(f64::from)
            .collect();
        let y: Vec<f64> = rng
            .vec_sym(n * width, 1.0)
            .into_iter()
            .map(f64::from)
            .collect();
        let (mut rx, mut ry) = (x.clone(), y.clone());
        rope(&mut rx, (h, hkv), dh, &cos, &sin, 0, n, 1.0);
        rope(&mut ry, (h, hkv), dh, &cos, &sin, 0, n, -1.0);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        assert!((dot(&rx, &y) - dot(&x, &ry)).abs() < 1e-9);
    }

    #[test]
    fn qk_norm_per_head_gives_unit_rms_times_gain() {
        let (h, hkv, dh) = (2, 1, 4);
        let width = (h + 2 * hkv) * dh;
        let mut rng = crate::util::Rng::new(3);
        let mut x = rng.vec_sym(2 * width, 3.0);
        let v = x[(h + hkv) * dh..width].to_vec();
        qk_norm(&mut x, width, h * dh, hkv * dh, &[1.0; 4], &[2.0; 4], 1e-9);
        for seg in 0..h {
            let ms: f32 = x[seg * dh..(seg + 1) * dh]
                .iter()
                .map(|a| a * a)
                .sum::<f32>()
                / 4.0;
            assert!((ms - 1.0).abs() < 1e-4);
        }
        let ms: f32 = x[h * dh..(h + 1) * dh].iter().map(|a| a * a).sum::<f32>() / 4.0;
        assert!((ms - 4.0).abs() < 1e-3);
        assert_eq!(&x[(h + hkv) * dh..width], &v[..]);
    }
}
