//! CPU twin of `shaders/complexity.wgsl` (`sequence_complexity`).

use crate::kernels::UNUSED;

/// Per sequence of `b` sequences of `n` tokens: the fraction of its tokens
/// whose second slot in `topk_ids [B N, K]` is used (0 when K = 1), as
/// `count / n` in f32, exactly as the kernel divides.
pub fn sequence_complexity(topk_ids: &[u32], b: usize, n: usize, k: usize) -> Vec<f32> {
    (0..b)
        .map(|s| {
            let two = if k == 2 {
                (0..n)
                    .filter(|&i| topk_ids[(s * n + i) * 2 + 1] != UNUSED)
                    .count()
            } else {
                0
            };
            two as f32 / n as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_second_slots_per_sequence() {
        // B = 2, N = 3, K = 2: sequence 0 has one two-expert token, sequence 1 all three.
        let ids = [0, UNUSED, 1, 2, 3, UNUSED, 1, 0, 2, 3, 0, 1];
        assert_eq!(sequence_complexity(&ids, 2, 3, 2), vec![1.0 / 3.0, 1.0]);
        assert_eq!(sequence_complexity(&[0, 1, 2], 1, 3, 1), vec![0.0]);
    }
}
