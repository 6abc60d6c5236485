//! Float comparison with one tolerance type: `|gpu - ref| <= atol + rtol * |ref|`.
//!
//! Presets per kind of operation. Reductions get an absolute tolerance that
//! grows with the square root of the reduction length, which is how rounding
//! error of an f32 dot product grows in practice.

use serde::Serialize;

/// A mixed absolute / relative tolerance.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Tol {
    pub atol: f32,
    pub rtol: f32,
}

/// What a comparison found: the worst errors and whether all elements passed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Comparison {
    pub max_abs_err: f64,
    pub max_rel_err: f64,
    /// Index of the first element outside tolerance, if any.
    pub first_bad: Option<usize>,
    pub pass: bool,
}

impl Tol {
    /// Element-wise ops (activation, scaling, combine with few terms).
    pub const ELEMENTWISE: Tol = Tol {
        atol: 1e-6,
        rtol: 1e-5,
    };
    /// Softmax, logsumexp and the gate's weights.
    pub const SOFTMAX: Tol = Tol {
        atol: 1e-6,
        rtol: 1e-5,
    };

    /// Dot products of length `k` with f32 accumulation and inputs of order 1.
    pub fn reduction(k: usize) -> Tol {
        let k = k.max(1) as f32;
        Tol {
            atol: 1e-5 * k.sqrt(),
            rtol: 1e-4,
        }
    }

    /// Compare `got` against the reference `want`. Lengths must match; a length
    /// mismatch, or any NaN where the reference is finite, fails.
    pub fn compare(&self, got: &[f32], want: &[f32]) -> Comparison {
        let mut c = Comparison {
            pass: got.len() == want.len(),
            ..Default::default()
        };
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let abs = (g as f64 - w as f64).abs();
            let rel = if w != 0.0 {
                abs / (w as f64).abs()
            } else {
                abs
            };
            let ok = if g.is_nan() || w.is_nan() {
                g.is_nan() && w.is_nan()
            } else {
                abs <= self.atol as f64 + self.rtol as f64 * (w as f64).abs()
            };
            if abs.is_finite() {
                c.max_abs_err = c.max_abs_err.max(abs);
                c.max_rel_err = c.max_rel_err.max(rel);
            } else if !(g.is_nan() && w.is_nan()) {
                c.max_abs_err = f64::INFINITY;
                c.max_rel_err = f64::INFINITY;
            }
            if !ok {
                c.pass = false;
                c.first_bad.get_or_insert(i);
            }
        }
        c
    }
}

/// Exact comparison for discrete outputs (ids, counts, offsets, permutations).
pub fn compare_exact<T: PartialEq>(got: &[T], want: &[T]) -> Comparison {
    let first_bad = if got.len() != want.len() {
        Some(got.len().min(want.len()))
    } else {
        got.iter().zip(want).position(|(g, w)| g != w)
    };
    Comparison {
        max_abs_err: if first_bad.is_some() { 1.0 } else { 0.0 },
        max_rel_err: 0.0,
        first_bad,
        pass: first_bad.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_scales_with_magnitude() {
        let t = Tol {
            atol: 1e-6,
            rtol: 1e-3,
        };
        assert!(t.compare(&[1000.5], &[1000.0]).pass);
        assert!(!t.compare(&[1.5], &[1.0]).pass);
        assert!(!t.compare(&[f32::NAN], &[1.0]).pass);
        assert!(!t.compare(&[1.0, 2.0], &[1.0]).pass);
        assert_eq!(t.compare(&[1.0, 3.0], &[1.0, 2.0]).first_bad, Some(1));
    }

    #[test]
    fn exact_compare_finds_first_difference() {
        assert!(compare_exact(&[1u32, 2, 3], &[1, 2, 3]).pass);
        assert_eq!(compare_exact(&[1u32, 5, 3], &[1, 2, 3]).first_bad, Some(1));
        assert!(!compare_exact(&[1u32], &[1, 2]).pass);
    }
}
