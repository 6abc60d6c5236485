//! Expert parallelism's exchange of token rows (ARCHITECTURE.md, "Expert
//! parallelism"): E experts split over N ranks, rank r owning experts
//! r · E/N ..; each rank routes its own tokens, sends each routed slot's row
//! to its expert's rank, which runs its experts on the rows it received and
//! sends the results back into the sender's slot order.
//!
//! The route kernel already sorts a rank's slots by expert (the routing
//! words' per-expert counts and padded offsets, `token_of_slot`), so the
//! rows for one rank are its experts' slot ranges, in expert order. The
//! receiver gets, from each rank in rank order, the counts of each of its
//! experts and then the rows; the rows go back the same way, so both
//! directions are one `Comm::all_to_all_v` of the counts and one of the rows.
//! The forward sends each slot's input row (`x[token_of_slot[slot]]`) and
//! receives its expert's output; the backward sends each slot's output
//! gradient and receives the gradient of its input.
//!
//! This is the host's part; the GPU's (the rows read back after the route,
//! the received rows' expert GEMMs, the results written where the combine
//! reads them) are `model::transformer`'s expert-parallel step.

use crate::error::{Error, Result};
use crate::train::collective::Comm;

/// Experts split evenly over ranks: rank r owns experts r · E/N .. (r+1) · E/N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertSplit {
    pub experts: usize,
    pub ranks: usize,
}

impl ExpertSplit {
    /// E experts over N ranks; E must be a multiple of N.
    pub fn new(experts: usize, ranks: usize) -> Result<ExpertSplit> {
        if ranks == 0 || experts == 0 || !experts.is_multiple_of(ranks) {
            return Err(Error::invalid(
                "expert parallel",
                format!(
                    "{experts} experts do not split evenly over {ranks} ranks: use a rank count that divides the experts"
                ),
            ));
        }
        Ok(ExpertSplit { experts, ranks })
    }

    /// Experts each rank owns.
    pub fn per_rank(&self) -> usize {
        self.experts / self.ranks
    }

    /// The rank that owns expert `e`.
    pub fn owner(&self, e: usize) -> usize {
        e / self.per_rank()
    }

    /// The experts rank `rank` owns.
    pub fn owned(&self, rank: usize) -> std::ops::Range<usize> {
        rank * self.per_rank()..(rank + 1) * self.per_rank()
    }
}

/// One rank's routed slots of one MoE layer, as the route kernel left them:
/// the per-expert counts `[E]` (within capacity) and padded start rows
/// `[E + 1]` of the routing words, and `token_of_slot`.
#[derive(Clone, Copy, Debug)]
pub struct SlotPlan<'a> {
    pub counts: &'a [u32],
    pub offsets: &'a [u32],
    pub token_of_slot: &'a [u32],
}

impl SlotPlan<'_> {
    fn check(&self, split: &ExpertSplit) -> Result<()> {
        let e = split.experts;
        if self.counts.len() != e || self.offsets.len() < e {
            return Err(Error::shape(
                "expert parallel",
                format!("counts [{e}] and offsets [{}]", e + 1),
                format!(
                    "counts [{}], offsets [{}]",
                    self.counts.len(),
                    self.offsets.len()
                ),
            ));
        }
        for x in 0..e {
            let end = self.offsets[x] as usize + self.counts[x] as usize;
            if end > self.token_of_slot.len() {
                return Err(Error::invalid(
                    "expert parallel",
                    format!(
                        "expert {x}'s slots end at row {end}, past the {} slot rows",
                        self.token_of_slot.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The slot rows of expert `x`.
    fn slots(&self, x: usize) -> std::ops::Range<usize> {
        let start = self.offsets[x] as usize;
        start..start + self.counts[x] as usize
    }
}

/// What one rank received for its experts in one exchange: the rows
/// (`[R, D]`: from rank 0's slots of this rank's first expert, its second,
/// ..., then rank 1's), the owned expert of each row (0-based within the
/// rank), and how many rows came from each rank (to send the results back).
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    pub d: usize,
    pub rows: Vec<f32>,
    pub local_expert: Vec<u32>,
    pub from: Vec<usize>,
}

impl Received {
    /// Rows received.
    pub fn len(&self) -> usize {
        self.local_expert.len()
    }

    pub fn is_empty(&self) -> bool {
        self.local_expert.is_empty()
    }
}

/// Send each routed slot's row to its expert's rank: `row(slot, token)`
/// gives the row of D floats (the forward: the token's input row; the
/// backward: the slot's output gradient).
pub fn dispatch<'a>(
    comm: &Comm,
    split: &ExpertSplit,
    plan: &SlotPlan<'_>,
    d: usize,
    row: impl Fn(usize, usize) -> &'a [f32],
) -> Result<Received> {
    plan.check(split)?;
    if comm.size() != split.ranks {
        return Err(Error::invalid(
            "expert parallel",
            format!(
                "experts split over {} ranks in a job of {}",
                split.ranks,
                comm.size()
            ),
        ));
    }
    let mut counts: Vec<Vec<u32>> = Vec::with_capacity(split.ranks);
    let mut rows: Vec<Vec<f32>> = Vec::with_capacity(split.ranks);
    for j in 0..split.ranks {
        let owned = split.owned(j);
        counts.push(plan.counts[owned.clone()].to_vec());
        let n: usize = plan.counts[owned.clone()].iter().map(|&c| c as usize).sum();
        let mut v = Vec::with_capacity(n * d);
        for x in owned {
            for slot in plan.slots(x) {
                let r = row(slot, plan.token_of_slot[slot] as usize);
                if r.len() != d {
                    return Err(Error::shape(
                        "expert parallel",
                        format!("rows of {d} floats"),
                        r.len(),
                    ));
                }
                v.extend_from_slice(r);
            }
        }
        rows.push(v);
    }
    let counts = comm.all_to_all_v(&counts)?;
    let rows = comm.all_to_all_v(&rows)?;
    let mut out = Received {
        d,
        rows: Vec::new(),
        local_expert: Vec::new(),
        from: Vec::with_capacity(split.ranks),
    };
    for (c, r) in counts.iter().zip(rows) {
        let n: usize = c.iter().map(|&k| k as usize).sum();
        if c.len() != split.per_rank() || r.len() != n * d {
            return Err(Error::invalid(
                "expert parallel",
                format!(
                    "a rank sent {} counts and {} floats, expected {} counts and {} floats",
                    c.len(),
                    r.len(),
                    split.per_rank(),
                    n * d
                ),
            ));
        }
        for (x, &k) in c.iter().enumerate() {
            out.local_expert
                .extend(std::iter::repeat_n(x as u32, k as usize));
        }
        out.rows.extend(r);
        out.from.push(n);
    }
    Ok(out)
}

/// Send the results of `received`'s rows (`results [R, D]`, in its order)
/// back to the ranks they came from; returns this rank's slot rows
/// `[slots, D]` (`slots`: the slot buffer's rows), each routed slot's
/// row holding its expert's result, padding rows zero.
pub fn give_back(
    comm: &Comm,
    split: &ExpertSplit,
    plan: &SlotPlan<'_>,
    received: &Received,
    results: &[f32],
    slots: usize,
) -> Result<Vec<f32>> {
    plan.check(split)?;
    let d = received.d;
    if results.len() != received.len() * d {
        return Err(Error::shape(
            "expert parallel",
            format!("results [{}, {d}]", received.len()),
            results.len(),
        ));
    }
    let mut parts = Vec::with_capacity(split.ranks);
    let mut at = 0;
    for &n in &received.from {
        parts.push(results[at * d..(at + n) * d].to_vec());
        at += n;
    }
    let back = comm.all_to_all_v(&parts)?;
    let mut out = vec![0.0f32; slots * d];
    for (j, rows) in back.iter().enumerate() {
        let mut at = 0;
        for x in split.owned(j) {
            for slot in plan.slots(x) {
                let src = rows.get(at * d..(at + 1) * d).ok_or_else(|| {
                    Error::invalid(
                        "expert parallel",
                        format!("rank {j} sent back fewer rows than it was sent"),
                    )
                })?;
                out.get_mut(slot * d..(slot + 1) * d)
                    .ok_or_else(|| {
                        Error::invalid(
                            "expert parallel",
                            format!("slot {slot} past the {slots} slot rows"),
                        )
                    })?
                    .copy_from_slice(src);
                at += 1;
            }
        }
        if at * d != rows.len() {
            return Err(Error::invalid(
                "expert parallel",
                format!("rank {j} sent back more rows than it was sent"),
            ));
        }
    }
    Ok(out)
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::train::collective::ThreadTransport;
    use crate::util::Rng;

    /// A route's slot plan of `t` tokens, each taking 1 or 2 distinct
    /// experts of `e`, padded to `tile` rows per expert: counts, offsets,
    /// token_of_slot (padding rows hold a token that must not be read).
    fn route(t: usize, e: usize, tile: usize, seed: u64) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let mut rng = Rng::new(seed);
        let mut by_expert: Vec<Vec<u32>> = vec![Vec::new(); e];
        for tok in 0..t {
            let a = rng.below(e);
            by_expert[a].push(tok as u32);
            if rng.below(2) == 1 {
                let b = (a + 1 + rng.below(e - 1)) % e;
                by_expert[b].push(tok as u32);
            }
        }
        let (mut counts, mut offsets, mut tos) = (Vec::new(), vec![0u32], Vec::new());
        for toks in &by_expert {
            counts.push(toks.len() as u32);
            tos.extend(toks);
            let pad = toks.len().next_multiple_of(tile) - toks.len();
            tos.extend(std::iter::repeat_n(u32::MAX, pad));
            offsets.push(tos.len() as u32);
        }
        (counts, offsets, tos)
    }

    /// Expert x's stand-in: row * (x + 1) + x.
    fn expert(x: usize, row: &[f32]) -> Vec<f32> {
        row.iter().map(|v| v * (x + 1) as f32 + x as f32).collect()
    }

    #[test]
    fn rows_reach_their_experts_rank_and_come_back_to_their_slots() {
        let (e, d, tile) = (6, 3, 4);
        for n in [1, 2, 3] {
            let split = ExpertSplit::new(e, n).unwrap();
            let handles: Vec<_> = ThreadTransport::group(n)
                .into_iter()
                .map(|tr| {
                    std::thread::spawn(move || {
                        let comm = Comm::new(Box::new(tr));
                        let r = comm.rank();
                        let t = 5 + 3 * r; // ranks route different token counts
                        let (counts, offsets, tos) = route(t, e, tile, 7 + r as u64);
                        let x: Vec<f32> = (0..t * d).map(|i| (100 * r + i) as f32 * 0.5).collect();
                        let plan = SlotPlan {
                            counts: &counts,
                            offsets: &offsets,
                            token_of_slot: &tos,
                        };
                        let got =
                            dispatch(&comm, &split, &plan, d, |_, tok| &x[tok * d..(tok + 1) * d])
                                .unwrap();
                        // Every row is for an owned expert; run it.
                        let owned = split.owned(r);
                        let mut results = Vec::with_capacity(got.rows.len());
                        for (i, &lx) in got.local_expert.iter().enumerate() {
                            assert!((lx as usize) < split.per_rank());
                            results.extend(expert(
                                owned.start + lx as usize,
                                &got.rows[i * d..(i + 1) * d],
                            ));
                        }
                        let slots = tos.len();
                        let back = give_back(&comm, &split, &plan, &got, &results, slots).unwrap();
                        // Each routed slot holds its expert's result on its token's row.
                        for xe in 0..e {
                            let s0 = offsets[xe] as usize;
                            for slot in s0..slots.min(offsets[xe + 1] as usize) {
                                let row = &back[slot * d..(slot + 1) * d];
                                if slot < s0 + counts[xe] as usize {
                                    let tok = tos[slot] as usize;
                                    assert_eq!(row, expert(xe, &x[tok * d..(tok + 1) * d]));
                                } else {
                                    assert!(row.iter().all(|&v| v == 0.0), "padding row {slot}");
                                }
                            }
                        }
                        (got.len(), counts)
                    })
                })
                .collect();
            let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            // Rank j received every rank's slots of its experts.
            for j in 0..n {
                let want: u32 = out
                    .iter()
                    .map(|(_, c)| c[split.owned(j)].iter().sum::<u32>())
                    .sum();
                assert_eq!(out[j].0, want as usize, "n {n}: rank {j}");
            }
        }
    }

    #[test]
    fn uneven_splits_and_bad_plans_are_refused() {
        let e = ExpertSplit::new(6, 4).unwrap_err().to_string();
        assert!(e.contains("do not split evenly over 4 ranks"), "{e}");
        let split = ExpertSplit::new(4, 1).unwrap();
        let comm = Comm::new(Box::new(ThreadTransport::group(1).pop().unwrap()));
        let tos = [0u32; 4];
        let plan = SlotPlan {
            counts: &[1, 1, 1, 2],
            offsets: &[0, 1, 2, 3, 5],
            token_of_slot: &tos,
        };
        let x = [0.0f32; 2];
        let err = dispatch(&comm, &split, &plan, 2, |_, _| &x[..])
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the 4 slot rows"), "{err}");
    }
}
