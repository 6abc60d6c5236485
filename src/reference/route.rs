//! CPU twin of `shaders/route.wgsl` (`route_count`, `route_scan`,
//! `route_scatter`, recorded together by `kernels::route::Route`): the packed
//! routing words, `token_of_slot` and `slot_of_token`, exactly as the GPU
//! writes them.

use crate::kernels::{RoutingLayout, UNUSED};

/// Route `topk_ids [T, K]` to `E` experts with `tile_m`-row tiles.
///
/// Returns `(routing [RoutingLayout::len()], token_of_slot [max_rows],
/// slot_of_token [T, K])`:
/// - `routing` holds the header (indirect args `(num_tiles, grid_y1, 1)` and
///   `(num_tiles, grid_y2, 1)`, used slots, num_tiles, padded rows; status and
///   reserved words 0), `expert_counts [E]`, `expert_offsets [E+1]` (each
///   expert's segment padded to a multiple of `tile_m`) and
///   `tile_expert [max_tiles]` (`UNUSED` past num_tiles);
/// - `token_of_slot`: the token of each padded row, the slots of one expert
///   in (token, k) order, `UNUSED` for padding rows and for rows past the
///   padded rows (which the GPU leaves as they were);
/// - `slot_of_token`: the padded row of each (t, k), `UNUSED` for unused slots.
///
/// Ids that are `UNUSED`, or not below `E`, take no row. `tile_m` must be at
/// least 1 (`Route::new` checks it); 0 is treated as 1.
pub fn route(
    topk_ids: &[u32],
    t: usize,
    k: usize,
    e: usize,
    tile_m: usize,
    grid_y1: u32,
    grid_y2: u32,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let tile_m = tile_m.max(1);
    let layout = RoutingLayout { t, k, e, tile_m };
    let s = (t * k).min(topk_ids.len());
    let valid = |id: u32| (id as usize) < e;

    let mut counts = vec![0u32; e];
    for &id in &topk_ids[..s] {
        if valid(id) {
            counts[id as usize] += 1;
        }
    }
    let mut offsets = vec![0u32; e + 1];
    for x in 0..e {
        offsets[x + 1] = offsets[x] + (counts[x] as usize).div_ceil(tile_m) as u32 * tile_m as u32;
    }
    let padded_rows = offsets[e];
    let num_tiles = padded_rows / tile_m as u32;

    let mut words = vec![0u32; layout.len()];
    words[RoutingLayout::ARGS1..RoutingLayout::ARGS1 + 3].copy_from_slice(&[num_tiles, grid_y1, 1]);
    words[RoutingLayout::ARGS2..RoutingLayout::ARGS2 + 3].copy_from_slice(&[num_tiles, grid_y2, 1]);
    words[RoutingLayout::USED_SLOTS] = counts.iter().sum();
    words[RoutingLayout::NUM_TILES] = num_tiles;
    words[RoutingLayout::PADDED_ROWS] = padded_rows;
    words[layout.counts()..layout.counts() + e].copy_from_slice(&counts);
    words[layout.offsets()..layout.offsets() + e + 1].copy_from_slice(&offsets);
    let tile_expert = &mut words[layout.tile_expert()..layout.tile_expert() + layout.max_tiles()];
    tile_expert.fill(UNUSED);
    for x in 0..e {
        for tile in offsets[x] / tile_m as u32..offsets[x + 1] / tile_m as u32 {
            tile_expert[tile as usize] = x as u32;
        }
    }

    let mut token_of_slot = vec![UNUSED; layout.max_rows()];
    let mut slot_of_token = vec![UNUSED; t * k];
    let mut next = offsets.clone();
    for (i, &id) in topk_ids[..s].iter().enumerate() {
        if valid(id) {
            let row = next[id as usize];
            next[id as usize] += 1;
            token_of_slot[row as usize] = (i / k) as u32;
            slot_of_token[i] = row;
        }
    }
    (words, token_of_slot, slot_of_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_example() {
        // T = 4, K = 2, E = 3, tile_m = 2.
        // token 0 -> experts 2, 0; token 1 -> 2, unused; token 2 -> 0, 2; token 3 -> 2, unused
        let ids = [2, 0, 2, UNUSED, 0, 2, 2, UNUSED];
        let (w, tos, sot) = route(&ids, 4, 2, 3, 2, 7, 9);
        let l = RoutingLayout {
            t: 4,
            k: 2,
            e: 3,
            tile_m: 2,
        };
        // counts: e0 = 2, e1 = 0, e2 = 4 -> padded 2, 0, 4 -> offsets 0, 2, 2, 6
        assert_eq!(&w[0..10], &[3, 7, 1, 3, 9, 1, 6, 3, 0, 6]);
        assert_eq!(&w[10..16], &[0; 6]);
        assert_eq!(&w[l.counts()..l.counts() + 3], &[2, 0, 4]);
        assert_eq!(&w[l.offsets()..l.offsets() + 4], &[0, 2, 2, 6]);
        // max_tiles = ceil(8 / 2) + 3 = 7
        assert_eq!(l.max_tiles(), 7);
        assert_eq!(
            &w[l.tile_expert()..],
            &[0, 2, 2, UNUSED, UNUSED, UNUSED, UNUSED]
        );
        assert_eq!(w.len(), l.len());
        // expert 0 rows: (t0, k1), (t2, k0); expert 2 rows: t0, t1, t2, t3
        assert_eq!(&tos[..6], &[0, 2, 0, 1, 2, 3]);
        assert!(tos[6..].iter().all(|&x| x == UNUSED));
        assert_eq!(tos.len(), 14);
        assert_eq!(sot, vec![2, 0, 3, UNUSED, 1, 4, 5, UNUSED]);
    }

    #[test]
    fn padding_rows_are_unused_and_empty_experts_take_no_tile() {
        // T = 3, K = 1, E = 4, tile_m = 4: expert 1 gets 3 tokens, others none
        let (w, tos, sot) = route(&[1, 1, 1], 3, 1, 4, 4, 1, 1);
        let l = RoutingLayout {
            t: 3,
            k: 1,
            e: 4,
            tile_m: 4,
        };
        assert_eq!(&w[l.offsets()..l.offsets() + 5], &[0, 0, 4, 4, 4]);
        assert_eq!(w[RoutingLayout::NUM_TILES], 1);
        assert_eq!(w[RoutingLayout::USED_SLOTS], 3);
        assert_eq!(w[l.tile_expert()], 1);
        assert_eq!(&tos[..4], &[0, 1, 2, UNUSED]);
        assert_eq!(sot, vec![0, 1, 2]);
    }

    #[test]
    fn out_of_range_ids_take_no_row() {
        let (w, _, sot) = route(&[0, 9, UNUSED, 1], 2, 2, 2, 1, 1, 1);
        assert_eq!(w[RoutingLayout::USED_SLOTS], 2);
        assert_eq!(sot, vec![0, UNUSED, UNUSED, 1]);
    }

    #[test]
    fn every_used_slot_round_trips() {
        let mut rng = crate::conformance::Rng::new(7);
        let (t, k, e, tile_m) = (50, 2, 5, 8);
        let ids: Vec<u32> = (0..t * k)
            .map(|_| {
                if rng.below(5) == 0 {
                    UNUSED
                } else {
                    rng.below(e) as u32
                }
            })
            .collect();
        let (w, tos, sot) = route(&ids, t, k, e, tile_m, 1, 1);
        let l = RoutingLayout { t, k, e, tile_m };
        for (i, &row) in sot.iter().enumerate() {
            if ids[i] == UNUSED {
                assert_eq!(row, UNUSED);
                continue;
            }
            assert_eq!(tos[row as usize] as usize, i / k);
            let x = ids[i] as usize;
            assert!(w[l.offsets() + x] <= row && row < w[l.offsets() + x + 1]);
            assert_eq!(w[l.tile_expert() + row as usize / tile_m] as usize, x);
        }
        assert!(w[RoutingLayout::NUM_TILES] as usize <= l.max_tiles());
    }
}
