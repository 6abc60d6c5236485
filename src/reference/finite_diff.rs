//! Test helpers for the gradient checks of the backward twins: central finite
//! differences of a scalar loss in f64, and the comparison they pass.

use crate::util::Rng;

/// `n` values uniform in [-1, 1), as f64.
pub fn rand64(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.sym(1.0) as f64).collect()
}

/// `sum_i a[i] * b[i]`: the loss `<y, dy>` whose gradient wrt `y` is `dy`.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences (h = 1e-6) of `loss` at `p`, element by element.
pub fn fd(p: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    let mut q = p.to_vec();
    (0..p.len())
        .map(|i| {
            q[i] = p[i] + h;
            let up = loss(&q);
            q[i] = p[i] - h;
            let down = loss(&q);
            q[i] = p[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Panic unless `|got - want| <= 1e-6 * (1 + |want|)` everywhere.
pub fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
            "element {i}: analytic {g} vs finite difference {w}"
        );
    }
}
