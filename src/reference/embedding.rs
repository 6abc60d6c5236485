//! CPU twins of `shaders/embedding.wgsl`: `embedding_forward`,
//! `embedding_backward_wte`, `embedding_backward_wpe`. Generic over the float
//! type so that the backward twins are checked against finite differences of
//! the forward in f64 (tests below).

use num_traits::Float;

/// `x[t, :] = wte[ids[t], :] * scale + wpe[t % N, :]` (no wpe: rotary
/// models); ids past V are clamped to V - 1 as in the shader. Returns x [T, D].
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward<F: Float>(
    ids: &[u32],
    wte: &[F],
    wpe: Option<&[F]>,
    scale: F,
    t: usize,
    v: usize,
    n: usize,
    d: usize,
) -> Vec<F> {
    let mut x = vec![F::zero(); t * d];
    for (tok, row) in x.chunks_exact_mut(d).enumerate() {
        let id = (ids[tok] as usize).min(v - 1);
        let pos = tok % n;
        for (c, o) in row.iter_mut().enumerate() {
            let e = wte[id * d + c] * scale;
            *o = match wpe {
                Some(wpe) => e + wpe[pos * d + c],
                None => e,
            };
        }
    }
    x
}

/// `dwte[v, :] = sum of dx[order[i], :]` for `i` in `offsets[v] ..
/// offsets[v + 1]` (the counting sort of `kernels::embedding::token_order`),
/// in that order. Returns dwte [V, D].
pub fn embedding_backward_wte<F: Float>(
    dx: &[F],
    offsets: &[u32],
    order: &[u32],
    v: usize,
    d: usize,
) -> Vec<F> {
    let mut dwte = vec![F::zero(); v * d];
    for (row, out) in dwte.chunks_exact_mut(d).enumerate() {
        for &tok in &order[offsets[row] as usize..offsets[row + 1] as usize] {
            let src = &dx[tok as usize * d..(tok as usize + 1) * d];
            for (o, &g) in out.iter_mut().zip(src) {
                *o = *o + g;
            }
        }
    }
    dwte
}

/// `dwpe[n, :] = sum over t = n, n + N, ... < T of dx[t, :]`, ascending t.
/// Returns dwpe [N, D].
pub fn embedding_backward_wpe<F: Float>(dx: &[F], t: usize, n: usize, d: usize) -> Vec<F> {
    let mut dwpe = vec![F::zero(); n * d];
    for tok in 0..t {
        let pos = tok % n;
        for c in 0..d {
            dwpe[pos * d + c] = dwpe[pos * d + c] + dx[tok * d + c];
        }
    }
    dwpe
}

#[cfg(test)]
mod tests {
    use super::super::finite_diff::{assert_close, dot, fd, rand64};
    use super::*;
    use crate::kernels::embedding::token_order;
    use crate::util::Rng;

    #[test]
    fn backward_twins_match_finite_differences() {
        // T = 7 (not a multiple of N = 3), V = 5 with ids 1 and 4 unused.
        let (t, v, n, d) = (7, 5, 3, 4);
        let ids = [0u32, 2, 3, 0, 2, 2, 0];
        let mut rng = Rng::new(11);
        let wte = rand64(&mut rng, v * d);
        let wpe = rand64(&mut rng, n * d);
        // L = <x, dx>, so dL/dx = dx.
        let dx = rand64(&mut rng, t * d);
        let (offsets, order) = token_order(&ids, v).unwrap();
        let dwte = embedding_backward_wte(&dx, &offsets, &order, v, d);
        let dwpe = embedding_backward_wpe(&dx, t, n, d);
        let fd_wte = fd(&wte, |w| {
            dot(
                &embedding_forward(&ids, w, Some(&wpe), 1.0, t, v, n, d),
                &dx,
            )
        });
        let fd_wpe = fd(&wpe, |w| {
            dot(
                &embedding_forward(&ids, &wte, Some(w), 1.0, t, v, n, d),
                &dx,
            )
        });
        assert_close(&dwte, &fd_wte);
        assert_close(&dwpe, &fd_wpe);
        // Unused ids get exact zeros.
        assert!(dwte[d..2 * d].iter().all(|&g| g == 0.0));
        assert!(dwte[4 * d..].iter().all(|&g| g == 0.0));
    }

    #[test]
    fn forward_adds_token_and_position_rows() {
        // V = 2, N = 2, D = 1.
        let x = embedding_forward(
            &[1, 0, 1],
            &[10.0, 20.0],
            Some(&[1.0, 2.0]),
            1.0,
            3,
            2,
            2,
            1,
        );
        assert_eq!(x, vec![21.0, 12.0, 21.0]);
    }
}
