//! CPU twin of `shaders/combine.wgsl` (`combine_forward`).

use crate::kernels::UNUSED;

/// `y[t, :] = sum_j topk_weights[t, j] * y_expert[slot_of_token[t, j], :]`
/// over the used slots (`slot_of_token != UNUSED`), j in increasing order.
/// `y_expert` is `[R, D]`; returns `y [T, D]`.
pub fn combine_forward(
    topk_weights: &[f32],
    slot_of_token: &[u32],
    y_expert: &[f32],
    t: usize,
    k: usize,
    d: usize,
) -> Vec<f32> {
    let mut y = vec![0.0f32; t * d];
    for tok in 0..t {
        let out = &mut y[tok * d..(tok + 1) * d];
        for j in 0..k {
            let row = slot_of_token[tok * k + j];
            if row == UNUSED {
                continue;
            }
            let w = topk_weights[tok * k + j];
            let src = &y_expert[row as usize * d..(row as usize + 1) * d];
            for (o, &v) in out.iter_mut().zip(src) {
                *o += w * v;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_and_weights_the_used_rows() {
        // T = 2, K = 2, D = 2; rows: 0 -> [1, 2], 1 -> [10, 20], 2 -> [100, 200]
        let y_expert = [1.0, 2.0, 10.0, 20.0, 100.0, 200.0];
        let slots = [2, 0, 1, UNUSED];
        let w = [0.5, 0.25, 2.0, 9.0];
        let y = combine_forward(&w, &slots, &y_expert, 2, 2, 2);
        assert_eq!(y, vec![50.25, 100.5, 20.0, 40.0]);
    }
}
