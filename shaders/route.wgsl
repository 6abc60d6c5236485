// Route: from the gate's topk_ids, the slot plan of the grouped expert GEMMs,
// deterministic (positions never depend on the order of atomics).
// Shapes: T tokens, K slots per token, S = T*K slots, E experts, C = CHUNK
// slots per chunk, NC = ceil(S / C) chunks. Twin: src/reference/route.rs (route).
//
// Slots are taken in priority order: position i < S is slot
// (i mod T) * K + i / T, so every first choice (by token) comes before every
// second choice. An expert keeps the first `capacity` slots of that order;
// later ones are dropped (slot_of_token = UNUSED, no row).
//
// Three passes, recorded in this order by src/kernels/route.rs:
// 1. route_count (NC workgroups): per chunk, the rank of every slot among the
//    earlier slots of the chunk with the same expert (kept in slot_of_token
//    until pass 3) and the chunk's histogram hist[chunk, e].
// 2. route_scan (one workgroup): hist becomes, per expert, the exclusive
//    prefix over chunks; expert_counts, tile-padded expert_offsets, the header
//    words, tile_expert, and UNUSED in the padding rows of token_of_slot.
// 3. route_scatter (NC workgroups): rank = hist[chunk, e] + chunk rank; a
//    slot below capacity takes row offsets[e] + rank, so the slots of one
//    expert keep the priority order.
// counts are the kept slots; the header's dropped word counts the others.
// Ids that are UNUSED (or not below E) take no row.
//
// Spec constants prepended by the launcher: CHUNK (invocations per workgroup
// = slots per chunk), UNUSED, HEADER, ARGS1, ARGS2, USED_SLOTS, NUM_TILES,
// PADDED_ROWS, DROPPED_SLOTS (word indices of RoutingLayout). Every entry point shares one
// binding table, so one layout serves the three pipelines.

struct RouteParams {
    t: u32,
    k: u32,
    e: u32,
    // S = T * K
    s: u32,
    tile_m: u32,
    num_chunks: u32,
    max_tiles: u32,
    grid_y1: u32,
    grid_y2: u32,
    // workgroups along x of the (possibly folded) grid of passes 1 and 3
    nx: u32,
    // slots an expert takes at most (UNUSED: no limit)
    capacity: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: RouteParams;
@group(0) @binding(1) var<storage, read> topk_ids: array<u32>;          // topk_ids [T, K]
@group(0) @binding(2) var<storage, read_write> slot_of_token: array<u32>; // slot_of_token [T, K]
@group(0) @binding(3) var<storage, read_write> hist: array<u32>;        // hist [NC, E] (scratch)
@group(0) @binding(4) var<storage, read_write> routing: array<u32>;     // routing [RoutingLayout::len()]
@group(0) @binding(5) var<storage, read_write> token_of_slot: array<u32>; // token_of_slot [max_rows]

var<workgroup> ids_wg: array<u32, CHUNK>;
var<workgroup> part_pad: array<u32, CHUNK>;
var<workgroup> part_used: array<u32, CHUNK>;
var<workgroup> part_dropped: array<u32, CHUNK>;
var<workgroup> totals: vec3<u32>;

fn chunk_index(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * params.nx;
}

// The slot at position i of the priority order.
fn slot_at(i: u32) -> u32 {
    let t = i % params.t;
    return t * params.k + i / params.t;
}

fn padded(count: u32) -> u32 {
    return (count + params.tile_m - 1u) / params.tile_m * params.tile_m;
}

@compute @workgroup_size(CHUNK)
fn route_count(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let chunk = chunk_index(wid);
    if chunk >= params.num_chunks {
        return;
    }
    let e_n = params.e;
    let i = chunk * CHUNK + lid;
    var id = UNUSED;
    var slot = 0u;
    if i < params.s {
        slot = slot_at(i);
        let v = topk_ids[slot];
        if v < e_n {
            id = v;
        }
    }
    ids_wg[lid] = id;
    for (var x = lid; x < e_n; x += CHUNK) {
        hist[chunk * e_n + x] = 0u;
    }
    // ids_wg complete and the zeros written before any count lands.
    workgroupBarrier();
    storageBarrier();

    if id != UNUSED {
        var rank = 0u;
        for (var j = 0u; j < lid; j++) {
            rank += select(0u, 1u, ids_wg[j] == id);
        }
        var last = true;
        for (var j = lid + 1u; j < CHUNK; j++) {
            if ids_wg[j] == id {
                last = false;
                break;
            }
        }
        slot_of_token[slot] = rank;
        // The chunk's last slot of an expert knows the chunk's count.
        if last {
            hist[chunk * e_n + id] = rank + 1u;
        }
    }
}

@compute @workgroup_size(CHUNK)
fn route_scan(@builtin(local_invocation_index) lid: u32) {
    let e_n = params.e;
    let nc = params.num_chunks;
    let counts = HEADER;
    let offsets = HEADER + e_n;
    let tile_expert = HEADER + 2u * e_n + 1u;

    // Each invocation owns a contiguous block of experts.
    let per = (e_n + CHUNK - 1u) / CHUNK;
    let e0 = min(lid * per, e_n);
    let e1 = min(e0 + per, e_n);
    var pad_sum = 0u;
    var used = 0u;
    var dropped = 0u;
    for (var x = e0; x < e1; x++) {
        var running = 0u;
        for (var c = 0u; c < nc; c++) {
            let at = c * e_n + x;
            let v = hist[at];
            hist[at] = running;
            running += v;
        }
        let kept = min(running, params.capacity);
        routing[counts + x] = kept;
        used += kept;
        dropped += running - kept;
        pad_sum += padded(kept);
    }
    part_pad[lid] = pad_sum;
    part_used[lid] = used;
    part_dropped[lid] = dropped;
    workgroupBarrier();
    if lid == 0u {
        var acc = 0u;
        var u = 0u;
        var dr = 0u;
        for (var j = 0u; j < CHUNK; j++) {
            let v = part_pad[j];
            part_pad[j] = acc;
            acc += v;
            u += part_used[j];
            dr += part_dropped[j];
        }
        totals = vec3<u32>(acc, u, dr);
    }
    workgroupBarrier();

    var off = part_pad[lid];
    for (var x = e0; x < e1; x++) {
        routing[offsets + x] = off;
        let count = routing[counts + x];
        let end = off + padded(count);
        for (var r = off + count; r < end; r++) {
            token_of_slot[r] = UNUSED;
        }
        off = end;
    }
    let padded_rows = totals.x;
    let num_tiles = padded_rows / params.tile_m;
    if lid == 0u {
        routing[offsets + e_n] = padded_rows;
        routing[ARGS1] = num_tiles;
        routing[ARGS1 + 1u] = params.grid_y1;
        routing[ARGS1 + 2u] = 1u;
        routing[ARGS2] = num_tiles;
        routing[ARGS2 + 1u] = params.grid_y2;
        routing[ARGS2 + 2u] = 1u;
        routing[USED_SLOTS] = totals.y;
        routing[NUM_TILES] = num_tiles;
        routing[PADDED_ROWS] = padded_rows;
        routing[DROPPED_SLOTS] = totals.z;
    }
    // Every offset written before any invocation searches them.
    storageBarrier();

    for (var tile = lid; tile < params.max_tiles; tile += CHUNK) {
        var owner = UNUSED;
        if tile < num_tiles {
            // The last expert whose segment starts at or before the tile's
            // first row: offsets[lo] <= row < offsets[hi], offsets[E] > row.
            let row = tile * params.tile_m;
            var lo = 0u;
            var hi = e_n;
            while hi - lo > 1u {
                let mid = (lo + hi) / 2u;
                if routing[offsets + mid] <= row {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            owner = lo;
        }
        routing[tile_expert + tile] = owner;
    }
}

@compute @workgroup_size(CHUNK)
fn route_scatter(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let chunk = chunk_index(wid);
    let i = chunk * CHUNK + lid;
    if chunk >= params.num_chunks || i >= params.s {
        return;
    }
    let e_n = params.e;
    let slot = slot_at(i);
    let id = topk_ids[slot];
    if id >= e_n {
        slot_of_token[slot] = UNUSED;
        return;
    }
    let rank = hist[chunk * e_n + id] + slot_of_token[slot];
    if rank >= params.capacity {
        slot_of_token[slot] = UNUSED;
        return;
    }
    let row = routing[HEADER + e_n + id] + rank;
    token_of_slot[row] = slot / params.k;
    slot_of_token[slot] = row;
}
