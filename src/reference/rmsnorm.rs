//! CPU twins of `shaders/rmsnorm.wgsl`: `rmsnorm_forward`,
//! `rmsnorm_backward` and `rmsnorm_backward_gain` (the GPU's two gain passes,
//! `rmsnorm_backward_gain` + `_finish`, in one function: same sums, here in
//! plain row order). Generic over the float type; the backward twins are
//! checked against finite differences of the forward in f64 (tests below).

use num_traits::Float;

/// `rstd[t] = 1 / sqrt(mean_d x[t, d]^2 + eps)`, `y = x * rstd * g`.
/// Returns (y [T, D], rstd [T]).
pub fn rmsnorm_forward<F: Float>(x: &[F], g: &[F], eps: F, t: usize, d: usize) -> (Vec<F>, Vec<F>) {
    let mut y = vec![F::zero(); t * d];
    let mut rstd = vec![F::zero(); t];
    let df = F::from(d).unwrap_or_else(F::one);
    for row in 0..t {
        let xr = &x[row * d..(row + 1) * d];
        let ss = xr.iter().fold(F::zero(), |a, &v| a + v * v);
        let r = F::one() / (ss / df + eps).sqrt();
        rstd[row] = r;
        for c in 0..d {
            y[row * d + c] = xr[c] * r * g[c];
        }
    }
    (y, rstd)
}

/// `dx = rstd * (g dy - xhat * mean_d(g dy xhat))`, `xhat = x * rstd`, with
/// the forward's saved `rstd`. Returns dx [T, D].
pub fn rmsnorm_backward<F: Float>(
    x: &[F],
    g: &[F],
    dy: &[F],
    rstd: &[F],
    t: usize,
    d: usize,
) -> Vec<F> {
    let mut dx = vec![F::zero(); t * d];
    let df = F::from(d).unwrap_or_else(F::one);
    for (row, &r) in rstd.iter().enumerate().take(t) {
        let base = row * d;
        let mut s = F::zero();
        for c in 0..d {
            s = s + g[c] * dy[base + c] * (x[base + c] * r);
        }
        let mean = s / df;
        for c in 0..d {
            let xhat = x[base + c] * r;
            dx[base + c] = r * (g[c] * dy[base + c] - xhat * mean);
        }
    }
    dx
}

/// `dg[d] = sum_t dy[t, d] * xhat[t, d]`, ascending t. Returns dg [D].
pub fn rmsnorm_backward_gain<F: Float>(
    x: &[F],
    dy: &[F],
    rstd: &[F],
    t: usize,
    d: usize,
) -> Vec<F> {
    let mut dg = vec![F::zero(); d];
    for (row, &r) in rstd.iter().enumerate().take(t) {
        for (c, o) in dg.iter_mut().enumerate() {
            let i = row * d + c;
            *o = *o + dy[i] * (x[i] * r);
        }
    }
    dg
}

#[cfg(test)]
mod tests {
    use super::super::finite_diff::{assert_close, dot, fd, rand64};
    use super::*;
    use crate::util::Rng;

    #[test]
    fn backward_twins_match_finite_differences() {
        let (t, d, eps) = (3, 5, 1e-5);
        let mut rng = Rng::new(21);
        let x = rand64(&mut rng, t * d);
        let g: Vec<f64> = (0..d).map(|_| 0.5 + rng.uniform() as f64).collect();
        // L = <y, dy>, so dL/dy = dy.
        let dy = rand64(&mut rng, t * d);
        let (_, rstd) = rmsnorm_forward(&x, &g, eps, t, d);
        let dx = rmsnorm_backward(&x, &g, &dy, &rstd, t, d);
        let dg = rmsnorm_backward_gain(&x, &dy, &rstd, t, d);
        let fd_x = fd(&x, |x| dot(&rmsnorm_forward(x, &g, eps, t, d).0, &dy));
        let fd_g = fd(&g, |g| dot(&rmsnorm_forward(&x, g, eps, t, d).0, &dy));
        assert_close(&dx, &fd_x);
        assert_close(&dg, &fd_g);
    }

    #[test]
    fn forward_normalizes_to_unit_rms() {
        let (y, rstd) = rmsnorm_forward(&[3.0f64, 4.0], &[1.0, 2.0], 0.0, 1, 2);
        let r = 1.0 / 12.5f64.sqrt();
        assert!((rstd[0] - r).abs() < 1e-15);
        assert!((y[0] - 3.0 * r).abs() < 1e-15 && (y[1] - 8.0 * r).abs() < 1e-15);
    }
}
