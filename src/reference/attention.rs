//! CPU twins of `shaders/attention.wgsl`: causal multi-head self-attention,
//! forward (`attention_forward`) and backward (`attention_backward`, which the
//! GPU splits into `attention_backward_delta`, `attention_backward_dq` and
//! `attention_backward_dkv`). Naive O(N^2) per head, generic over the float
//! type so the backward can be checked against finite differences in f64.
//!
//! Layout: B sequences of N tokens, T = B*N rows (token t = b*N + n), width
//! D = H * Dh. `qkv [T, 3D]` holds q in columns [0, D), k in [D, 2D), v in
//! [2D, 3D); head h uses columns h*Dh .. (h+1)*Dh of each third.

use num_traits::Float;

/// Shape of one attention call: B sequences of N tokens, H heads of width Dh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub dh: usize,
}

impl AttnShape {
    /// Rows T = B*N.
    pub fn t(&self) -> usize {
        self.b * self.n
    }
    /// Model width D = H*Dh.
    pub fn d(&self) -> usize {
        self.h * self.dh
    }
}

fn cast<F: Float>(x: f64) -> F {
    F::from(x).unwrap_or_else(F::nan)
}

/// Causal attention forward. Returns `o [T, D]` (head h in columns
/// h*Dh..) and `lse [B, H, N]`: the log-sum-exp of each query row's scaled
/// scores, which the backward uses to recompute the probabilities.
pub fn attention_forward<F: Float>(qkv: &[F], s: AttnShape) -> (Vec<F>, Vec<F>) {
    attention_forward_gqa(qkv, GqaShape::mha(s))
}

/// Causal attention backward: from `qkv [T, 3D]`, the forward's `o [T, D]`
/// and `lse [B, H, N]`, and the output gradient `do_ [T, D]`, the gradient
/// `dqkv [T, 3D]` (same column layout as `qkv`).
///
/// With `P = exp(S - lse)` (S the scaled causal scores), `delta_n = sum_d
/// do*o` of row n: `dV = P^T dO`, `dS = P * (dO V^T - delta)`, `dQ = scale dS
/// K`, `dK = scale dS^T Q`.
pub fn attention_backward<F: Float>(
    qkv: &[F],
    o: &[F],
    do_: &[F],
    lse: &[F],
    s: AttnShape,
) -> Vec<F> {
    attention_backward_gqa(qkv, o, do_, lse, GqaShape::mha(s))
}

/// The layout of published models' attention: H query heads over Hkv
/// key/value heads (query head h reads kv head h / (H / Hkv)), qkv
/// `[T, (H + 2 Hkv) Dh]` (q heads, k heads, v heads), a sliding window
/// (query n sees keys n - W < j <= n; 0: none) and a score scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GqaShape {
    pub s: AttnShape,
    pub hkv: usize,
    pub window: usize,
    pub scale: f64,
}

impl GqaShape {
    /// Multi-head attention: every query head has its own k and v, no
    /// window, scale 1 / sqrt(Dh).
    pub fn mha(s: AttnShape) -> GqaShape {
        GqaShape {
            s,
            hkv: s.h,
            window: 0,
            scale: 1.0 / (s.dh as f64).sqrt(),
        }
    }

    fn stride(&self) -> usize {
        (self.s.h + 2 * self.hkv) * self.s.dh
    }

    /// Columns of query head h's kv head's k and v.
    fn kv_cols(&self, h: usize) -> (usize, usize) {
        let g = h / (self.s.h / self.hkv);
        let dh = self.s.dh;
        ((self.s.h + g) * dh, (self.s.h + self.hkv + g) * dh)
    }

    /// Keys query n sees: lo..=n.
    fn lo(&self, n: usize) -> usize {
        if self.window > 0 {
            (n + 1).saturating_sub(self.window)
        } else {
            0
        }
    }
}

/// Scaled scores of query `n` (sequence `b`, head `h`) against its keys.
fn gqa_scores<F: Float>(qkv: &[F], g: GqaShape, b: usize, h: usize, n: usize) -> Vec<F> {
    let (qs, dh, sn) = (g.stride(), g.s.dh, g.s.n);
    let (k_off, _) = g.kv_cols(h);
    let scale = cast::<F>(g.scale);
    let q = &qkv[(b * sn + n) * qs + h * dh..][..dh];
    (g.lo(n)..=n)
        .map(|j| {
            let k = &qkv[(b * sn + j) * qs + k_off..][..dh];
            q.iter().zip(k).fold(F::zero(), |a, (&x, &y)| a + x * y) * scale
        })
        .collect()
}

/// The forward of [`GqaShape`] attention. Returns `o [T, H Dh]` and
/// `lse [B, H, N]`.
pub fn attention_forward_gqa<F: Float>(qkv: &[F], g: GqaShape) -> (Vec<F>, Vec<F>) {
    let s = g.s;
    let (d, dh, qs) = (s.d(), s.dh, g.stride());
    let mut o = vec![F::zero(); s.t() * d];
    let mut lse = vec![F::zero(); s.b * s.h * s.n];
    for b in 0..s.b {
        for h in 0..s.h {
            let (_, v_off) = g.kv_cols(h);
            for n in 0..s.n {
                let sc = gqa_scores(qkv, g, b, h, n);
                let m = sc.iter().fold(F::neg_infinity(), |a, &x| a.max(x));
                let l = sc.iter().fold(F::zero(), |a, &x| a + (x - m).exp());
                lse[(b * s.h + h) * s.n + n] = m + l.ln();
                let out = &mut o[(b * s.n + n) * d + h * dh..][..dh];
                for (j, &x) in (g.lo(n)..=n).zip(&sc) {
                    let p = (x - m).exp() / l;
                    let v = &qkv[(b * s.n + j) * qs + v_off..][..dh];
                    for (a, &vv) in out.iter_mut().zip(v) {
                        *a = *a + p * vv;
                    }
                }
            }
        }
    }
    (o, lse)
}

/// The backward of [`GqaShape`] attention: `dqkv [T, (H + 2 Hkv) Dh]`, a
/// kv head's gradients summed over the query heads that read it.
pub fn attention_backward_gqa<F: Float>(
    qkv: &[F],
    o: &[F],
    do_: &[F],
    lse: &[F],
    g: GqaShape,
) -> Vec<F> {
    let s = g.s;
    let (d, dh, qs) = (s.d(), s.dh, g.stride());
    let scale = cast::<F>(g.scale);
    let mut dqkv = vec![F::zero(); s.t() * qs];
    for b in 0..s.b {
        for h in 0..s.h {
            let (k_off, v_off) = g.kv_cols(h);
            for n in 0..s.n {
                let row = b * s.n + n;
                let dor = &do_[row * d + h * dh..][..dh];
                let or = &o[row * d + h * dh..][..dh];
                let delta = dor.iter().zip(or).fold(F::zero(), |a, (&x, &y)| a + x * y);
                let l = lse[(b * s.h + h) * s.n + n];
                let sc = gqa_scores(qkv, g, b, h, n);
                for (j, &x) in (g.lo(n)..=n).zip(&sc) {
                    let p = (x - l).exp();
                    let krow = (b * s.n + j) * qs;
                    let dp = (0..dh).fold(F::zero(), |a, c| a + dor[c] * qkv[krow + v_off + c]);
                    let ds = p * (dp - delta);
                    for c in 0..dh {
                        let kc = qkv[krow + k_off + c];
                        let qc = qkv[row * qs + h * dh + c];
                        let q_at = row * qs + h * dh + c;
                        dqkv[q_at] = dqkv[q_at] + scale * ds * kc;
                        dqkv[krow + k_off + c] = dqkv[krow + k_off + c] + scale * ds * qc;
                        dqkv[krow + v_off + c] = dqkv[krow + v_off + c] + p * dor[c];
                    }
                }
            }
        }
    }
    dqkv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    fn rand(rng: &mut Rng, n: usize, a: f32) -> Vec<f64> {
        rng.vec_sym(n, a).into_iter().map(f64::from).collect()
    }

    #[test]
    fn gqa_twin_is_the_mha_twin_when_every_head_has_its_kv() {
        let s = AttnShape {
            b: 2,
            n: 6,
            h: 2,
            dh: 4,
        };
        let mut rng = Rng::new(3);
        let qkv = rand(&mut rng, s.t() * 3 * s.d(), 1.0);
        let (o, lse) = attention_forward(&qkv, s);
        let mha = GqaShape {
            s,
            hkv: 2,
            window: 0,
            scale: 0.5,
        };
        let (o2, lse2) = attention_forward_gqa(&qkv, mha);
        for (a, b) in o.iter().zip(&o2).chain(lse.iter().zip(&lse2)) {
            assert!((a - b).abs() < 1e-12);
        }
        let do_ = rand(&mut rng, s.t() * s.d(), 1.0);
        let d1 = attention_backward(&qkv, &o, &do_, &lse, s);
        let d2 = attention_backward_gqa(&qkv, &o, &do_, &lse, mha);
        for (a, b) in d1.iter().zip(&d2) {
            assert!((a - b).abs() < 1e-12);
        }
        // A window of 1: each query sees itself alone.
        let (o1, _) = attention_forward_gqa(&qkv, GqaShape { window: 1, ..mha });
        for row in 0..s.t() {
            for c in 0..s.d() {
                assert!((o1[row * s.d() + c] - qkv[row * 3 * s.d() + 2 * s.d() + c]).abs() < 1e-12);
            }
        }
    }

    /// GQA with a window: the backward is the gradient of the forward.
    #[test]
    fn gqa_backward_matches_finite_differences() {
        use crate::reference::finite_diff::{assert_close, dot, fd};
        let s = AttnShape {
            b: 2,
            n: 5,
            h: 4,
            dh: 2,
        };
        let g = GqaShape {
            s,
            hkv: 2,
            window: 3,
            scale: 0.7,
        };
        let mut rng = Rng::new(21);
        let qkv = rand(&mut rng, s.t() * (s.h + 2 * g.hkv) * s.dh, 1.0);
        let w = rand(&mut rng, s.t() * s.d(), 1.0);
        let (o, lse) = attention_forward_gqa(&qkv, g);
        let got = attention_backward_gqa(&qkv, &o, &w, &lse, g);
        let want = fd(&qkv, |x| dot(&attention_forward_gqa(x, g).0, &w));
        assert_close(&got, &want);
    }

    #[test]
    fn one_token_copies_its_value_row() {
        let s = AttnShape {
            b: 1,
            n: 1,
            h: 2,
            dh: 2,
        };
        let qkv = [
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0,
        ];
        let (o, lse) = attention_forward(&qkv, s);
        assert_eq!(o, vec![9.0, 10.0, 11.0, 12.0]);
        let sc0 = (1.0 * 5.0 + 2.0 * 6.0) / 2f64.sqrt();
        let sc1 = (3.0 * 7.0 + 4.0 * 8.0) / 2f64.sqrt();
        assert!((lse[0] - sc0).abs() < 1e-12 && (lse[1] - sc1).abs() < 1e-12);
    }

    #[test]
    fn later_tokens_never_change_earlier_outputs() {
        let s = AttnShape {
            b: 2,
            n: 5,
            h: 2,
            dh: 4,
        };
        let mut rng = Rng::new(11);
        let qkv = rand(&mut rng, s.t() * 3 * s.d(), 1.0);
        let (o, lse) = attention_forward(&qkv, s);
        let mut qkv2 = qkv.clone();
        // Perturb the last token of each sequence.
        for b in 0..s.b {
            let row = b * s.n + s.n - 1;
            for x in &mut qkv2[row * 3 * s.d()..(row + 1) * 3 * s.d()] {
                *x += 0.5;
            }
        }
        let (o2, lse2) = attention_forward(&qkv2, s);
        for b in 0..s.b {
            for n in 0..s.n - 1 {
                let row = b * s.n + n;
                assert_eq!(
                    o[row * s.d()..(row + 1) * s.d()],
                    o2[row * s.d()..(row + 1) * s.d()]
                );
                for h in 0..s.h {
                    let i = (b * s.h + h) * s.n + n;
                    assert_eq!(lse[i], lse2[i]);
                }
            }
        }
    }

    /// The backward twin against central finite differences of the scalar
    /// loss `sum(o * R)` for random R, in f64.
    #[test]
    fn backward_matches_finite_differences() {
        for (si, s) in [
            AttnShape {
                b: 1,
                n: 1,
                h: 1,
                dh: 3,
            },
            AttnShape {
                b: 2,
                n: 4,
                h: 2,
                dh: 3,
            },
            AttnShape {
                b: 1,
                n: 6,
                h: 1,
                dh: 4,
            },
        ]
        .into_iter()
        .enumerate()
        {
            let mut rng = Rng::new(100 + si as u64);
            let qkv = rand(&mut rng, s.t() * 3 * s.d(), 1.5);
            let r = rand(&mut rng, s.t() * s.d(), 1.0);
            let loss = |x: &[f64]| -> f64 {
                let (o, _) = attention_forward(x, s);
                o.iter().zip(&r).map(|(a, b)| a * b).sum()
            };
            let (o, lse) = attention_forward(&qkv, s);
            let grad = attention_backward(&qkv, &o, &r, &lse, s);
            let eps = 1e-6;
            let mut x = qkv.clone();
            for i in 0..qkv.len() {
                x[i] = qkv[i] + eps;
                let up = loss(&x);
                x[i] = qkv[i] - eps;
                let down = loss(&x);
                x[i] = qkv[i];
                let fd = (up - down) / (2.0 * eps);
                assert!(
                    (fd - grad[i]).abs() <= 1e-8 + 1e-6 * fd.abs(),
                    "{s:?} element {i}: finite difference {fd}, backward {}",
                    grad[i]
                );
            }
        }
    }
}
