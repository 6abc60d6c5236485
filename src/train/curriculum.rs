//! The adaptive-gating curriculum (Li et al., EMNLP 2023, section 3.2).
//!
//! Every training sequence gets a complexity vector `C = [r_1 .. r_L]`, `r_l` the fraction of
//! its tokens that MoE layer `l` sent to two experts, recorded while the epoch runs. Before
//! the next epoch, [`Curriculum::order`] finds the simplest sequence (smallest `sum(C)`, ties
//! to the lower index) and orders all sequences by the cosine similarity of their vector to
//! its vector, most similar first (the simplest itself first), ties to the lower index.
//! Consecutive sequences of that order form the batches ([`super::data::Batcher`]).
//!
//! All-zero guard: if the simplest vector is all zero (e.g. a layer that never routes to two
//! experts, or a sequence not recorded yet: unrecorded sequences count as all-zero), the
//! cosine is undefined; the order is then `sum(C)` ascending, ties to the lower index.
//!
//! Sums and cosines are computed in f64 over the f32 records, in a fixed order, so the
//! order is the same on every machine. Serde, so that a resumed run reorders identically.
//! No twin: host code.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Complexity vectors of all training sequences.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Curriculum {
    layers: usize,
    /// `[sequences * layers]`, row `i` is sequence `i`'s `C`.
    vectors: Vec<f32>,
}

impl Curriculum {
    /// All-zero vectors for `num_sequences` sequences and `layers` MoE layers.
    pub fn new(num_sequences: usize, layers: usize) -> Result<Curriculum> {
        if layers == 0 {
            return Err(Error::invalid("curriculum", "needs at least one MoE layer"));
        }
        Ok(Curriculum {
            layers,
            vectors: vec![0.0; num_sequences * layers],
        })
    }

    pub fn num_sequences(&self) -> usize {
        self.vectors.len() / self.layers
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Records sequence `seq_index`'s two-expert fractions, one per MoE layer, each in
    /// `[0, 1]`. A later record of the same sequence replaces the earlier one.
    pub fn record(&mut self, seq_index: usize, fractions: &[f32]) -> Result<()> {
        if fractions.len() != self.layers {
            return Err(Error::shape(
                "curriculum record",
                format!("{} layer fractions", self.layers),
                fractions.len(),
            ));
        }
        if seq_index >= self.num_sequences() {
            return Err(Error::invalid(
                "curriculum record",
                format!(
                    "sequence {seq_index} out of range ({} sequences)",
                    self.num_sequences()
                ),
            ));
        }
        if let Some(bad) = fractions.iter().find(|r| !(0.0..=1.0).contains(*r)) {
            return Err(Error::invalid(
                "curriculum record",
                format!("fraction {bad} of sequence {seq_index} outside [0, 1]"),
            ));
        }
        let l = self.layers;
        self.vectors[seq_index * l..(seq_index + 1) * l].copy_from_slice(fractions);
        Ok(())
    }

    /// Sequence `i`'s vector `C`.
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.layers..(i + 1) * self.layers]
    }

    /// Forgets all records (every vector back to zero).
    pub fn clear(&mut self) {
        self.vectors.fill(0.0);
    }

    /// The next epoch's order of all sequence indices (see the module docs).
    pub fn order(&self) -> Vec<usize> {
        let n = self.num_sequences();
        if n == 0 {
            return Vec::new();
        }
        let sums: Vec<f64> = (0..n)
            .map(|i| self.vector(i).iter().map(|&r| r as f64).sum())
            .collect();
        // Simplest: smallest sum, first index among equals.
        let mut simplest = 0;
        for (i, &s) in sums.iter().enumerate() {
            if s < sums[simplest] {
                simplest = i;
            }
        }
        let reference = self.vector(simplest);
        let ref_norm = norm(reference);
        let mut order: Vec<usize> = (0..n).collect();
        if ref_norm == 0.0 {
            order.sort_by(|&a, &b| sums[a].total_cmp(&sums[b]).then(a.cmp(&b)));
            return order;
        }
        let cos: Vec<f64> = (0..n)
            .map(|i| {
                let v = self.vector(i);
                let nv = norm(v);
                if nv == 0.0 {
                    // Unreachable with fractions >= 0 (every sum >= the simplest's > 0);
                    // "no similarity" if it ever happens.
                    return 0.0;
                }
                let dot: f64 = v
                    .iter()
                    .zip(reference)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                dot / (nv * ref_norm)
            })
            .collect();
        order.sort_by(|&a, &b| {
            // The simplest sequence leads even if rounding gives a parallel vector a cosine
            // a hair above its own 1.0.
            (b == simplest)
                .cmp(&(a == simplest))
                .then(cos[b].total_cmp(&cos[a]))
                .then(a.cmp(&b))
        });
        order
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vectors: &[&[f32]]) -> Curriculum {
        let mut c = Curriculum::new(vectors.len(), vectors[0].len()).unwrap();
        for (i, v) in vectors.iter().enumerate() {
            c.record(i, v).unwrap();
        }
        c
    }

    #[test]
    fn cosine_order() {
        // Simplest is 2 (sum 0.2); cosines to [0.1, 0.1] in the comments.
        let c = with(&[
            &[0.6, 0.0], // cos = 0.7071
            &[0.5, 0.5], // cos = 1 (parallel), sum 1.0
            &[0.1, 0.1], // simplest
            &[0.3, 0.4], // cos = 0.9899
            &[0.0, 0.6], // cos = 0.7071, ties with 0 -> index order
        ]);
        assert_eq!(c.order(), vec![2, 1, 3, 0, 4]);
    }

    #[test]
    fn ties_in_sum_pick_lower_index() {
        // 1 and 3 both have the smallest sum; 1 is the reference.
        let c = with(&[&[0.5, 0.5], &[0.2, 0.0], &[0.0, 0.9], &[0.0, 0.2]]);
        // cos to [1, 0]: 0 -> 0.707, 2 -> 0, 3 -> 0.
        assert_eq!(c.order(), vec![1, 0, 2, 3]);
    }

    #[test]
    fn all_zero_reference_falls_back_to_sum() {
        // Sequence 3 was never recorded: all zero, so the reference is undefined.
        let mut c = Curriculum::new(5, 3).unwrap();
        c.record(0, &[0.3, 0.3, 0.3]).unwrap();
        c.record(1, &[0.1, 0.0, 0.0]).unwrap();
        c.record(2, &[0.0, 0.0, 0.0]).unwrap();
        c.record(4, &[0.05, 0.05, 0.0]).unwrap();
        // Sums: 0.9, 0.1, 0, 0, 0.1 -> zeros by index, then 0.1 ties by index.
        assert_eq!(c.order(), vec![2, 3, 1, 4, 0]);
    }

    #[test]
    fn fresh_and_cleared_are_identity() {
        let c = Curriculum::new(4, 2).unwrap();
        assert_eq!(c.order(), vec![0, 1, 2, 3]);
        let mut c = with(&[&[0.4, 0.1], &[0.2, 0.2]]);
        assert_eq!(c.order(), vec![1, 0]);
        c.clear();
        assert_eq!(c.order(), vec![0, 1]);
        assert!(Curriculum::new(0, 2).unwrap().order().is_empty());
    }

    #[test]
    fn mixed_zero_layers() {
        // A layer that never routes to two experts (always 0) does not break the cosine.
        let c = with(&[&[0.0, 0.8], &[0.0, 0.2], &[0.5, 0.5], &[0.0, 0.4]]);
        // Reference 1 = [0, 0.2]: cos 0 -> 1, 3 -> 1, 2 -> 0.707.
        assert_eq!(c.order(), vec![1, 0, 3, 2]);
    }

    #[test]
    fn single_layer_orders_by_index_after_reference() {
        // L = 1: every non-zero vector is parallel (cos 1), so the order is by index after
        // the simplest.
        let c = with(&[&[0.5], &[0.3], &[0.1], &[0.3]]);
        assert_eq!(c.order(), vec![2, 0, 1, 3]);
    }

    #[test]
    fn record_errors_and_serde() {
        let mut c = Curriculum::new(2, 2).unwrap();
        assert!(matches!(c.record(0, &[0.1]), Err(Error::Shape { .. })));
        assert!(c.record(2, &[0.1, 0.1]).is_err());
        assert!(c.record(0, &[0.1, 1.5]).is_err());
        assert!(c.record(0, &[f32::NAN, 0.0]).is_err());
        assert!(Curriculum::new(3, 0).is_err());
        c.record(1, &[0.25, 0.5]).unwrap();
        let back: Curriculum = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.vector(1), &[0.25, 0.5]);
    }
}
