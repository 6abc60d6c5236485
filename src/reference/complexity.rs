//! CPU twin of `shaders/complexity.wgsl` (`sequence_complexity`).

use crate::kernels::UNUSED;

/// Per sequence of `b` sequences of `n` tokens: the share of its
/// `n (K - 1)` slots past the first that `topk_ids [B N, K]` uses (with
/// K = 2 the fraction of two-expert tokens; 0 when K = 1), as
/// `count / (n max(K - 1, 1))` in f32, exactly as the kernel divides.
pub fn sequence_complexity(topk_ids: &[u32], b: usize, n: usize, k: usize) -> Vec<f32> {
    (0..b)
        .map(|s| {
            let extra = (0..n)
                .flat_map(|i| (1..k).map(move |j| (s * n + i) * k + j))
                .filter(|&x| topk_ids[x] != UNUSED)
                .count();
            extra as f32 / (n * (k - 1).max(1)) as f32
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
        // K = 4: 3 + 1 + 0 of the 9 slots past the first.
        let u = UNUSED;
        let ids = [0, 1, 2, 3, 4, 5, u, u, 6, u, u, u];
        assert_eq!(sequence_complexity(&ids, 1, 3, 4), vec![4.0 / 9.0]);
    }
}
