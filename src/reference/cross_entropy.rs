//! CPU twins of `shaders/cross_entropy.wgsl`: `cross_entropy_forward_backward`
//! (loss, and the gradient written over the logits), `cross_entropy_forward`
//! and `loss_sum`. Generic over the float type; the gradient is checked
//! against finite differences of the loss in f64 (tests below).

use num_traits::Float;

/// `(lse, logit of the target)` of one row, max-subtracted.
fn row_lse<F: Float>(row: &[F]) -> F {
    let m = row.iter().fold(F::neg_infinity(), |a, &x| a.max(x));
    let s = row.iter().fold(F::zero(), |a, &x| a + (x - m).exp());
    m + s.ln()
}

/// `loss[t] = logsumexp(logits[t]) - logits[t, targets[t]]`; a target `>= v`
/// (such as `UNUSED`) gives 0. Returns loss [T]; logits [T, V] untouched.
pub fn cross_entropy_forward<F: Float>(
    logits: &[F],
    targets: &[u32],
    t: usize,
    v: usize,
) -> Vec<F> {
    (0..t)
        .map(|r| {
            let tgt = targets[r] as usize;
            if tgt >= v {
                return F::zero();
            }
            let row = &logits[r * v..(r + 1) * v];
            row_lse(row) - row[tgt]
        })
        .collect()
}

/// The loss as `cross_entropy_forward`, and the logits overwritten with
/// `(softmax - onehot) * scale` (zeros in the rows of ignored targets).
/// Returns loss [T].
pub fn cross_entropy_forward_backward<F: Float>(
    logits: &mut [F],
    targets: &[u32],
    t: usize,
    v: usize,
    scale: F,
) -> Vec<F> {
    let loss = cross_entropy_forward(logits, targets, t, v);
    for r in 0..t {
        let tgt = targets[r] as usize;
        let row = &mut logits[r * v..(r + 1) * v];
        if tgt >= v {
            row.fill(F::zero());
            continue;
        }
        let lse = row_lse(row);
        for (c, x) in row.iter_mut().enumerate() {
            let p = (*x - lse).exp();
            let onehot = if c == tgt { F::one() } else { F::zero() };
            *x = (p - onehot) * scale;
        }
    }
    loss
}

/// `(sum_t loss[t], number of targets < v)`, summed in f64.
pub fn loss_sum(loss: &[f32], targets: &[u32], v: usize) -> [f32; 2] {
    let sum: f64 = loss.iter().map(|&l| l as f64).sum();
    let count = targets.iter().filter(|&&t| (t as usize) < v).count();
    [sum as f32, count as f32]
}

#[cfg(test)]
mod tests {
    use super::super::finite_diff::{assert_close, fd, rand64};
    use super::*;
    use crate::kernels::UNUSED;
    use crate::util::Rng;

    #[test]
    fn gradient_matches_finite_differences() {
        let (t, v) = (4, 6);
        let targets = [2, UNUSED, 0, 5];
        let mut rng = Rng::new(31);
        let logits: Vec<f64> = rand64(&mut rng, t * v).iter().map(|x| 3.0 * x).collect();
        let scale = 1.0 / 3.0;
        let mut grad = logits.clone();
        let loss = cross_entropy_forward_backward(&mut grad, &targets, t, v, scale);
        assert_eq!(loss, cross_entropy_forward(&logits, &targets, t, v));
        assert_eq!(loss[1], 0.0);
        let want = fd(&logits, |l| {
            scale * cross_entropy_forward(l, &targets, t, v).iter().sum::<f64>()
        });
        assert_close(&grad, &want);
        assert!(grad[v..2 * v].iter().all(|&g| g == 0.0));
    }

    #[test]
    fn loss_is_stable_for_large_logits() {
        // Without the max subtracted, exp(1000) overflows.
        let loss = cross_entropy_forward(&[1000.0f32, 1000.0], &[0], 1, 2);
        assert!((loss[0] - 2f32.ln()).abs() < 1e-4, "{loss:?}");
        assert_eq!(loss_sum(&[1.5, 0.0, 2.0], &[1, UNUSED, 0], 4), [3.5, 2.0]);
    }
}
