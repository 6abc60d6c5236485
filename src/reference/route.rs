//! CPU twin of `shaders/route.wgsl` (`route_count`, `route_scan`,
//! `route_scatter`, recorded together by `kernels::route::Route`): the packed
//! routing words, `token_of_slot` and `slot_of_token`, exactly as the GPU
//! writes them.

use crate::kernels::route::RouteConfig;
use crate::kernels::{RoutingLayout, UNUSED};

/// The slot index `t * K + k` at position `i` of the priority order: every
/// token's first choice (in token order), then every second choice.
pub fn slot_at(i: usize, t: usize, k: usize) -> usize {
    (i % t) * k + i / t
}

/// Whether each slot of `topk_ids [T, K]` keeps its expert under
/// `capacity` (None: every valid slot does). An expert takes the first
/// `capacity` of its slots in the priority order of `slot_at`, so a token's
/// first choice is dropped only when `capacity` other first choices came
/// before it. Unused and out-of-range ids are never kept.
pub fn kept_slots(
    topk_ids: &[u32],
    t: usize,
    k: usize,
    e: usize,
    capacity: Option<u32>,
) -> Vec<bool> {
    let cap = capacity.unwrap_or(u32::MAX);
    let mut taken = vec![0u32; e];
    let mut kept = vec![false; t * k];
    for i in 0..t * k {
        let slot = slot_at(i, t, k);
        let Some(&id) = topk_ids.get(slot) else {
            continue;
        };
        if (id as usize) < e && taken[id as usize] < cap {
            taken[id as usize] += 1;
            kept[slot] = true;
        }
    }
    kept
}

/// Route `topk_ids [T, K]` as `config` says (layout, the y grids of the
/// indirect args, the capacity).
///
/// Returns `(routing [RoutingLayout::len()], token_of_slot [max_rows],
/// slot_of_token [T, K])`:
/// - `routing` holds the header (indirect args `(num_tiles, grid_y1, 1)` and
///   `(num_tiles, grid_y2, 1)`, used slots, num_tiles, padded rows, dropped
///   slots; status and reserved words 0), `expert_counts [E]` (kept slots),
///   `expert_offsets [E+1]` (each expert's segment padded to a multiple of
///   `tile_m`) and `tile_expert [max_tiles]` (`UNUSED` past num_tiles);
/// - `token_of_slot`: the token of each padded row, the slots of one expert
///   in priority order (first choices by token, then second choices by
///   token), `UNUSED` for padding rows and for rows past the padded rows
///   (which the GPU leaves as they were);
/// - `slot_of_token`: the padded row of each (t, k), `UNUSED` for unused
///   and dropped slots.
///
/// Ids that are `UNUSED`, or not below `E`, take no row; past its capacity
/// an expert takes no more (`kept_slots`). `tile_m` must be at least 1
/// (`Route::new` checks it); 0 is treated as 1.
pub fn route(topk_ids: &[u32], config: &RouteConfig) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let l = config.layout;
    let (t, k, e) = (l.t, l.k, l.e);
    let tile_m = l.tile_m.max(1);
    let layout = RoutingLayout { tile_m, ..l };
    let kept = kept_slots(topk_ids, t, k, e, config.capacity);

    let mut counts = vec![0u32; e];
    let mut routed = 0u32;
    for (slot, &id) in topk_ids.iter().enumerate().take(t * k) {
        if (id as usize) < e {
            routed += 1;
            counts[id as usize] += kept[slot] as u32;
        }
    }
    let mut offsets = vec![0u32; e + 1];
    for x in 0..e {
        offsets[x + 1] = offsets[x] + (counts[x] as usize).div_ceil(tile_m) as u32 * tile_m as u32;
    }
    let padded_rows = offsets[e];
    let num_tiles = padded_rows / tile_m as u32;
    let used: u32 = counts.iter().sum();

    let mut words = vec![0u32; layout.len()];
    let (y1, y2) = (config.grid_y1, config.grid_y2);
    words[RoutingLayout::ARGS1..RoutingLayout::ARGS1 + 3].copy_from_slice(&[num_tiles, y1, 1]);
    words[RoutingLayout::ARGS2..RoutingLayout::ARGS2 + 3].copy_from_slice(&[num_tiles, y2, 1]);
    words[RoutingLayout::USED_SLOTS] = used;
    words[RoutingLayout::NUM_TILES] = num_tiles;
    words[RoutingLayout::PADDED_ROWS] = padded_rows;
    words[RoutingLayout::DROPPED_SLOTS] = routed - used;
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
    let mut next = offsets;
    for i in 0..t * k {
        let slot = slot_at(i, t, k);
        if kept[slot] {
            let id = topk_ids[slot] as usize;
            let row = next[id];
            next[id] += 1;
            token_of_slot[row as usize] = (slot / k) as u32;
            slot_of_token[slot] = row;
        }
    }
    (words, token_of_slot, slot_of_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: usize, k: usize, e: usize, tile_m: usize) -> RouteConfig {
        RouteConfig::new(RoutingLayout { t, k, e, tile_m })
    }

    #[test]
    fn hand_made_example() {
        // T = 4, K = 2, E = 3, tile_m = 2.
        // token 0 -> experts 2, 0; token 1 -> 2, unused; token 2 -> 0, 2; token 3 -> 2, unused
        let ids = [2, 0, 2, UNUSED, 0, 2, 2, UNUSED];
        let config = RouteConfig {
            grid_y1: 7,
            grid_y2: 9,
            ..cfg(4, 2, 3, 2)
        };
        let (w, tos, sot) = route(&ids, &config);
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
        // First choices before second choices: expert 0 rows (t2, k0),
        // (t0, k1); expert 2 rows (t0, k0), (t1, k0), (t3, k0), (t2, k1).
        assert_eq!(&tos[..6], &[2, 0, 0, 1, 3, 2]);
        assert!(tos[6..].iter().all(|&x| x == UNUSED));
        assert_eq!(tos.len(), 14);
        assert_eq!(sot, vec![2, 1, 3, UNUSED, 0, 5, 4, UNUSED]);
    }

    #[test]
    fn capacity_drops_second_choices_first_then_later_tokens() {
        // The ids of hand_made_example with at most 2 slots per expert:
        // expert 2 keeps (t0, k0), (t1, k0) and drops (t3, k0), (t2, k1).
        let ids = [2, 0, 2, UNUSED, 0, 2, 2, UNUSED];
        let config = RouteConfig {
            capacity: Some(2),
            ..cfg(4, 2, 3, 2)
        };
        let (w, tos, sot) = route(&ids, &config);
        let l = config.layout;
        assert_eq!(&w[0..11], &[2, 1, 1, 2, 1, 1, 4, 2, 0, 4, 2]);
        assert_eq!(&w[l.counts()..l.counts() + 3], &[2, 0, 2]);
        assert_eq!(&w[l.offsets()..l.offsets() + 4], &[0, 2, 2, 4]);
        assert_eq!(&tos[..4], &[2, 0, 0, 1]);
        assert_eq!(sot, vec![2, 1, 3, UNUSED, 0, UNUSED, UNUSED, UNUSED]);
        let kept = kept_slots(&ids, 4, 2, 3, Some(2));
        let from_route: Vec<bool> = sot.iter().map(|&r| r != UNUSED).collect();
        assert_eq!(kept, from_route);
        // A capacity nobody reaches changes nothing.
        let roomy = RouteConfig {
            capacity: Some(4),
            ..config
        };
        assert_eq!(route(&ids, &roomy), route(&ids, &cfg(4, 2, 3, 2)));
    }

    #[test]
    fn capacity_keeps_the_first_tokens_under_top1() {
        // Six tokens on expert 1, capacity 4: tokens 4 and 5 are dropped.
        let (w, tos, sot) = route(
            &[1; 6],
            &RouteConfig {
                capacity: Some(4),
                ..cfg(6, 1, 2, 4)
            },
        );
        assert_eq!(w[RoutingLayout::USED_SLOTS], 4);
        assert_eq!(w[RoutingLayout::DROPPED_SLOTS], 2);
        assert_eq!(&tos[..4], &[0, 1, 2, 3]);
        assert_eq!(sot, vec![0, 1, 2, 3, UNUSED, UNUSED]);
    }

    #[test]
    fn padding_rows_are_unused_and_empty_experts_take_no_tile() {
        // T = 3, K = 1, E = 4, tile_m = 4: expert 1 gets 3 tokens, others none
        let (w, tos, sot) = route(&[1, 1, 1], &cfg(3, 1, 4, 4));
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
        let (w, _, sot) = route(&[0, 9, UNUSED, 1], &cfg(2, 2, 2, 1));
        assert_eq!(w[RoutingLayout::USED_SLOTS], 2);
        assert_eq!(sot, vec![0, UNUSED, UNUSED, 1]);
    }

    #[test]
    fn every_used_slot_round_trips() {
        let mut rng = crate::util::Rng::new(7);
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
        let l = RoutingLayout { t, k, e, tile_m };
        let (w, tos, sot) = route(&ids, &RouteConfig::new(l));
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
