//! CPU twin of `shaders/matmul.wgsl` (`matmul`, launcher
//! `kernels::matmul::Matmul`): `C[M, N] = alpha * op(A) · op(B) + beta * C`,
//! row-major, accumulated in f32 with one fused multiply-add per K step in K
//! order, as the kernel does. Generic over the float type so that the model
//! twin (`model::reference`) can run in f64 for its gradient check.

use crate::kernels::matmul::Trans;
use num_traits::Float;

/// `alpha * op(A) · op(B) + beta * C`. `a` is `[M, K]` (`[K, M]` for TN), `b`
/// is `[K, N]` (`[N, K]` for NT), `c` the initial `C [M, N]`: read only when
/// beta != 0 (None counts as zeros). K = 0 gives `beta * C`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<F: Float>(
    a: &[F],
    b: &[F],
    m: usize,
    n: usize,
    k: usize,
    trans: Trans,
    alpha: F,
    beta: F,
    c: Option<&[F]>,
) -> Vec<F> {
    let (a_sm, a_sk, b_sk, b_sn) = trans.strides(m, n, k);
    let mut out = vec![F::zero(); m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = F::zero();
            for p in 0..k {
                acc = a[i * a_sm + p * a_sk].mul_add(b[p * b_sk + j * b_sn], acc);
            }
            let mut v = alpha * acc;
            if beta != F::zero() {
                v = v + beta * c.map_or(F::zero(), |c| c[i * n + j]);
            }
            out[i * n + j] = v;
        }
    }
    out
}

/// Transpose a row-major `[rows, cols]` matrix.
pub fn transpose<F: Float>(x: &[F], rows: usize, cols: usize) -> Vec<F> {
    let mut t = vec![F::zero(); rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slow composed reference: f64 triple loop on explicitly transposed inputs.
    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
            }
        }
        c
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::util::Rng::new(seed);
        rng.vec_sym(n, 1.0)
    }

    #[test]
    fn transposes_agree_with_the_naive_product() {
        let (m, n, k) = (7, 5, 9);
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let want = naive(&a, &b, m, n, k);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (trans, a_, b_) in [
            (Trans::NN, &a, &b),
            (Trans::NT, &a, &bt),
            (Trans::TN, &at, &b),
        ] {
            let got = matmul(a_, b_, m, n, k, trans, 1.0, 0.0, None);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{trans}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn alpha_beta_and_empty_k() {
        let c0 = vec![1.0, -2.0, 3.0, 0.5];
        // K = 0: beta * C.
        let got = matmul(&[], &[], 2, 2, 0, Trans::NN, 2.0, 0.5, Some(&c0));
        assert_eq!(got, vec![0.5, -1.0, 1.5, 0.25]);
        // beta = 0 never reads C, even NaN.
        let nan = vec![f32::NAN; 4];
        let got = matmul(
            &[1.0, 2.0],
            &[3.0, 4.0],
            2,
            2,
            1,
            Trans::NN,
            1.0,
            0.0,
            Some(&nan),
        );
        assert_eq!(got, vec![3.0, 4.0, 6.0, 8.0]);
        let got = matmul(
            &[1.0, 2.0],
            &[3.0, 4.0],
            2,
            2,
            1,
            Trans::NN,
            -1.0,
            1.0,
            Some(&c0),
        );
        assert_eq!(got, vec![-2.0, -6.0, -3.0, -7.5]);
    }
}
