//! CPU twins of `shaders/adamw.wgsl`: `adamw_step`, `grad_norm_partial`,
//! `grad_norm_finish`. Generic over the float type (the tests run several
//! steps in f64 against numbers worked out by hand).

use num_traits::Float;

/// The per-step constants of `adamw_step` (`kernels::adamw::AdamWParams`
/// without the sizes): `bc1 = 1 - beta1^step`, `bc2 = 1 - beta2^step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep<F> {
    pub lr: F,
    pub beta1: F,
    pub beta2: F,
    pub eps: F,
    pub weight_decay: F,
    pub bc1: F,
    pub bc2: F,
}

/// One AdamW step in place: `g_eff = g * clip[1]`, moments, then
/// `p -= lr * (m / bc1 / (sqrt(v / bc2) + eps) + weight_decay * p)`.
/// A scale `clip[1] == 0` (non-finite norm) leaves p, m, v untouched.
pub fn adamw_step<F: Float>(
    p: &mut [F],
    g: &[F],
    m: &mut [F],
    v: &mut [F],
    clip: &[F],
    s: &AdamWStep<F>,
) {
    let scale = clip[1];
    if scale == F::zero() {
        return;
    }
    let one = F::one();
    for i in 0..p.len() {
        let ge = g[i] * scale;
        let mi = s.beta1 * m[i] + (one - s.beta1) * ge;
        let vi = s.beta2 * v[i] + (one - s.beta2) * ge * ge;
        m[i] = mi;
        v[i] = vi;
        let update = (mi / s.bc1) / ((vi / s.bc2).sqrt() + s.eps);
        p[i] = p[i] - s.lr * (update + s.weight_decay * p[i]);
    }
}

/// Sums of squares of consecutive chunks of `chunk` elements of `g`.
pub fn grad_norm_partial<F: Float>(g: &[F], chunk: usize) -> Vec<F> {
    g.chunks(chunk)
        .map(|c| c.iter().fold(F::zero(), |a, &x| a + x * x))
        .collect()
}

/// `(norm, scale)`: `norm = sqrt(sum of partials)`, `scale = min(1,
/// max_norm / (norm + 1e-6))` (1 when `max_norm` is `None`), 0 when the norm
/// is not finite.
pub fn grad_norm_finish<F: Float>(partials: &[F], max_norm: Option<F>) -> [F; 2] {
    let norm = partials.iter().fold(F::zero(), |a, &x| a + x).sqrt();
    let scale = if !norm.is_finite() {
        F::zero()
    } else if let Some(mx) = max_norm {
        F::one().min(mx / (norm + F::from(1e-6).unwrap_or_else(F::zero)))
    } else {
        F::one()
    };
    [norm, scale]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(lr: f64, t: i32) -> AdamWStep<f64> {
        AdamWStep {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            bc1: 1.0 - 0.9f64.powi(t),
            bc2: 1.0 - 0.999f64.powi(t),
        }
    }

    #[test]
    fn three_steps_match_a_hand_computation() {
        let (mut p, mut m, mut v) = ([1.0f64], [0.0], [0.0]);
        // Step 1, g = 0.5: m = 0.05, v = 0.00025, mhat = 0.5, vhat = 0.25,
        // p = 1 - 0.1 * (0.5 / (0.5 + 1e-8) + 0.01 * 1) = 0.899000002.
        adamw_step(&mut p, &[0.5], &mut m, &mut v, &[0.0, 1.0], &step(0.1, 1));
        assert!((m[0] - 0.05).abs() < 1e-15 && (v[0] - 0.00025).abs() < 1e-15);
        assert!((p[0] - 0.899000002).abs() < 1e-12, "{p:?}");
        // Step 2, g = -0.25, lr 0.05: m = 0.045 - 0.025 = 0.02,
        // v = 0.00024975 + 0.0000625 = 0.00031225, bc1 = 0.19, bc2 = 0.001999;
        // mhat / sqrt(vhat) = 0.1052632 / 0.3952247 = 0.2663376,
        // p = 0.899000002 - 0.05 * (0.2663376 + 0.00899) = 0.8852337.
        adamw_step(
            &mut p,
            &[-0.25],
            &mut m,
            &mut v,
            &[0.0, 1.0],
            &step(0.05, 2),
        );
        assert!((m[0] - 0.02).abs() < 1e-15 && (v[0] - 0.00031225).abs() < 1e-15);
        assert!((p[0] - 0.8852336503529231).abs() < 1e-12, "{p:?}");
        // Step 3, g = 2 clipped by 0.5 to 1: m = 0.018 + 0.1 = 0.118,
        // v = 0.00031193775 + 0.001 = 0.00131193775, bc1 = 0.271,
        // bc2 = 0.002997001; 0.4354244 / 0.6616282 = 0.6581164,
        // p = 0.8852337 - 0.1 * (0.6581164 + 0.0088523) = 0.8185373.
        adamw_step(&mut p, &[2.0], &mut m, &mut v, &[0.0, 0.5], &step(0.1, 3));
        assert!((m[0] - 0.118).abs() < 1e-15 && (v[0] - 0.00131193775).abs() < 1e-15);
        assert!((p[0] - 0.8185372576718137).abs() < 1e-12, "{p:?}");
        // A scale of 0 (non-finite norm) skips the step.
        let before = (p, m, v);
        adamw_step(
            &mut p,
            &[f64::NAN],
            &mut m,
            &mut v,
            &[f64::NAN, 0.0],
            &step(0.1, 4),
        );
        assert_eq!((p, m, v), before);
    }

    #[test]
    fn grad_norm_clips_to_max_norm() {
        // |(3, 4, 0, 12)| = 13; chunks of 3: 9 + 16 + 0, 144.
        let partials = grad_norm_partial(&[3.0f64, 4.0, 0.0, 12.0], 3);
        assert_eq!(partials, vec![25.0, 144.0]);
        let [norm, scale] = grad_norm_finish(&partials, Some(1.0));
        assert_eq!(norm, 13.0);
        assert!((scale - 1.0 / (13.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(grad_norm_finish(&partials, Some(100.0))[1], 1.0);
        assert_eq!(grad_norm_finish(&partials, None)[1], 1.0);
        let bad = grad_norm_finish(&[1.0, f64::INFINITY], Some(1.0));
        assert_eq!(bad[1], 0.0);
        assert!(grad_norm_finish(&[f64::NAN], None)[0].is_nan());
    }
}
