// Grouped expert FFN over the routed slot plan (rows = routed slots, padded
// so that each expert's rows start at a multiple of the row tile):
//   expert_gemm1_gelu:   h[r, :] = gelu(x[token_of_slot[r], :] · W1[e])
//   expert_gemm1_gelu_train: the same, also keeping u = x[tok] · W1[e] [R, F]
//   expert_gemm1_swiglu: h[r, :] = silu(x[tok, :] · W1[e]) * (x[tok, :] · W3[e])
//   expert_gemm1_swiglu_train: the same, also keeping u = x[tok] · W1[e] and
//                        u3 = x[tok] · W3[e] [R, F]
//   expert_gemm2:        y_expert[r, :] = h[r, :] · W2[e]
// with e = tile_expert[r / tile_m] from the routing buffer (RoutingLayout).
// Padding rows (token UNUSED) read zeros; what they write is never read.
// Shapes: x [T, D], token_of_slot [R], W1/W3 [Ec, D, F], W2 [Ec, F, D]
// (experts e0 .. e0 + Ec of E: all of them, or one part of a split bank),
// h [R, F], y_expert [R, D], R = max_rows. Grid (indirect, from the routing
// kernels): x = row tile (one expert each), y = column tile.
// Twin: src/reference/expert.rs (`expert_ffn`).
//
// Prepended: shaders/activation.wgsl, then the GEMM core of
// shaders/matmul.wgsl (`//#begin core` .. `//#end core`), which runs the K
// loop and calls the loaders and the epilogue defined here. Sections
// `//#if gemm1`, `//#if swiglu` pick the stage; `//#if b16`: the weights are
// stored as f16 pairs in u32 words (math in f32); `//#if packed`: block-
// quantized (q8 with flag q8, else q4; shaders/quant.wgsl, needs
// shaders/f16.wgsl), dequantized in registers as the tiles load.

struct ExpertParams {
    t: u32,
    e: u32,
    d: u32,
    f: u32,
    // R: rows of token_of_slot, h and y_expert.
    rows: u32,
    // Word offset of tile_expert [max_tiles] in routing.
    tile_expert: u32,
    max_tiles: u32,
    // The experts whose weights are bound: e0 .. e0 + ec (a weight split
    // into parts runs once per part; every part's tiles are the others' no-op).
    e0: u32,
    ec: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: ExpertParams;
//#if gemm1
// x [T, D]
@group(0) @binding(1) var<storage, read> x: array<f32>;
// token_of_slot [R]: the token of each row, UNUSED for padding rows
@group(0) @binding(2) var<storage, read> token_of_slot: array<u32>;
// routing [RoutingLayout::len()]: tile_expert [max_tiles] at p.tile_expert
@group(0) @binding(3) var<storage, read> routing: array<u32>;
//#if words
// w1 [E, D, F] (f16 pairs, or block-quantized, in u32 words)
@group(0) @binding(4) var<storage, read> w1: array<u32>;
//#else
// w1 [E, D, F]
@group(0) @binding(4) var<storage, read> w1: array<f32>;
//#endif
//#if swiglu
//#if words
// w3 [E, D, F] (f16 pairs, or block-quantized, in u32 words)
@group(0) @binding(5) var<storage, read> w3: array<u32>;
//#else
// w3 [E, D, F]
@group(0) @binding(5) var<storage, read> w3: array<f32>;
//#endif
// h [R, F]
@group(0) @binding(6) var<storage, read_write> h: array<f32>;
//#if train
// u, u3 [R, F]: the two products, kept for the backward (training)
@group(0) @binding(7) var<storage, read_write> u: array<f32>;
@group(0) @binding(8) var<storage, read_write> u3: array<f32>;
//#endif
//#else
// h [R, F]
@group(0) @binding(5) var<storage, read_write> h: array<f32>;
//#if train
// u [R, F]: the pre-activation, kept for the backward (training)
@group(0) @binding(6) var<storage, read_write> u: array<f32>;
//#endif
//#endif
//#else
// h [R, F]
@group(0) @binding(1) var<storage, read> h: array<f32>;
// routing [RoutingLayout::len()]: tile_expert [max_tiles] at p.tile_expert
@group(0) @binding(2) var<storage, read> routing: array<u32>;
//#if words
// w2 [E, F, D] (f16 pairs, or block-quantized, in u32 words)
@group(0) @binding(3) var<storage, read> w2: array<u32>;
//#else
// w2 [E, F, D]
@group(0) @binding(3) var<storage, read> w2: array<f32>;
//#endif
// y_expert [R, D]
@group(0) @binding(4) var<storage, read_write> y_expert: array<f32>;
//#endif

// Start of this workgroup's expert in the weights (e * K * N).
var<private> w_base: u32;
// Start in the A source of the row each row group loads; 0 or 1 to zero
// padding rows (gemm1).
var<private> a_row: array<u32, NG>;
var<private> a_live: array<f32, NG>;

//#if gemm1
// GEMM 1: K = D, N = F; A rows gathered through token_of_slot.
fn kdim() -> u32 {
    return p.d;
}

fn ndim() -> u32 {
    return p.f;
}

fn gemm_row_setup(g: u32, m: u32) {
    let tok = token_of_slot[m];
    let live = tok < p.t;
    a_row[g] = select(0u, tok, live) * p.d;
    a_live[g] = select(0.0, 1.0, live);
}

fn a_at(i: u32) -> f32 {
    return x[i];
}

//#if packed
// Block-quantized W_w (shaders/quant.wgsl): value group r (values
// 4r .. 4r + 3) and value i, dequantized in registers.
fn b_group(w: u32, r: u32) -> vec4<f32> {
//#if q8
    let at = q8_group_at(r);
//#if swiglu
    if (w == 1u) {
        return q8_group(w3[at.x], w3[at.y], r);
    }
//#endif
    return q8_group(w1[at.x], w1[at.y], r);
//#else
    let at = q4_group_at(r);
//#if swiglu
    if (w == 1u) {
        return q4_group(w3[at.x], w3[at.y], r);
    }
//#endif
    return q4_group(w1[at.x], w1[at.y], r);
//#endif
}

fn b_at(w: u32, i: u32) -> f32 {
//#if q8
    let at = q8_value_at(i);
//#if swiglu
    if (w == 1u) {
        return q8_value(w3[at.x], w3[at.y], i);
    }
//#endif
    return q8_value(w1[at.x], w1[at.y], i);
//#else
    let at = q4_value_at(i);
//#if swiglu
    if (w == 1u) {
        return q4_value(w3[at.x], w3[at.y], i);
    }
//#endif
    return q4_value(w1[at.x], w1[at.y], i);
//#endif
}
//#else
//#if b16
// Word i of W_w: two f16 weights.
fn b_pair(w: u32, i: u32) -> vec2<f32> {
//#if swiglu
    if (w == 1u) {
        return unpack_f16x2(w3[i]);
    }
//#endif
    return unpack_f16x2(w1[i]);
}

fn b_at(w: u32, i: u32) -> f32 {
    return b_pair(w, i >> 1u)[i & 1u];
}
//#else
fn b_at(w: u32, i: u32) -> f32 {
//#if swiglu
    if (w == 1u) {
        return w3[i];
    }
//#endif
    return w1[i];
}
//#endif
//#endif

fn gemm_store4(m: u32, n: u32, v: vec4<f32>, v2: vec4<f32>) {
    if (m >= p.rows) {
        return;
    }
    let i = m * p.f + n;
//#if swiglu
    let o = vec4<f32>(act_silu(v.x) * v2.x, act_silu(v.y) * v2.y, act_silu(v.z) * v2.z, act_silu(v.w) * v2.w);
//#if train
    if (n < p.f) {
        u[i] = v.x;
        u3[i] = v2.x;
    }
    if (n + 1u < p.f) {
        u[i + 1u] = v.y;
        u3[i + 1u] = v2.y;
    }
    if (n + 2u < p.f) {
        u[i + 2u] = v.z;
        u3[i + 2u] = v2.z;
    }
    if (n + 3u < p.f) {
        u[i + 3u] = v.w;
        u3[i + 3u] = v2.w;
    }
//#endif
//#else
    let o = vec4<f32>(act_gelu(v.x), act_gelu(v.y), act_gelu(v.z), act_gelu(v.w));
//#if train
    if (n < p.f) {
        u[i] = v.x;
    }
    if (n + 1u < p.f) {
        u[i + 1u] = v.y;
    }
    if (n + 2u < p.f) {
        u[i + 2u] = v.z;
    }
    if (n + 3u < p.f) {
        u[i + 3u] = v.w;
    }
//#endif
//#endif
    if (n < p.f) {
        h[i] = o.x;
    }
    if (n + 1u < p.f) {
        h[i + 1u] = o.y;
    }
    if (n + 2u < p.f) {
        h[i + 2u] = o.z;
    }
    if (n + 3u < p.f) {
        h[i + 3u] = o.w;
    }
}
//#else
// GEMM 2: K = F, N = D; A rows are the slots themselves.
fn kdim() -> u32 {
    return p.f;
}

fn ndim() -> u32 {
    return p.d;
}

fn gemm_row_setup(g: u32, m: u32) {
    a_row[g] = m * p.f;
    a_live[g] = 1.0;
}

fn a_at(i: u32) -> f32 {
    return h[i];
}

//#if packed
fn b_group(w: u32, r: u32) -> vec4<f32> {
//#if q8
    let at = q8_group_at(r);
    return q8_group(w2[at.x], w2[at.y], r);
//#else
    let at = q4_group_at(r);
    return q4_group(w2[at.x], w2[at.y], r);
//#endif
}

fn b_at(w: u32, i: u32) -> f32 {
//#if q8
    let at = q8_value_at(i);
    return q8_value(w2[at.x], w2[at.y], i);
//#else
    let at = q4_value_at(i);
    return q4_value(w2[at.x], w2[at.y], i);
//#endif
}
//#else
//#if b16
fn b_pair(w: u32, i: u32) -> vec2<f32> {
    return unpack_f16x2(w2[i]);
}

fn b_at(w: u32, i: u32) -> f32 {
    return b_pair(w, i >> 1u)[i & 1u];
}
//#else
fn b_at(w: u32, i: u32) -> f32 {
    return w2[i];
}
//#endif
//#endif

fn gemm_store4(m: u32, n: u32, v: vec4<f32>, v2: vec4<f32>) {
    if (m >= p.rows) {
        return;
    }
    let i = m * p.d + n;
    if (n < p.d) {
        y_expert[i] = v.x;
    }
    if (n + 1u < p.d) {
        y_expert[i + 1u] = v.y;
    }
    if (n + 2u < p.d) {
        y_expert[i + 2u] = v.z;
    }
    if (n + 3u < p.d) {
        y_expert[i + 3u] = v.w;
    }
}
//#endif

// A(row of group g, k..k+4); zeros past K and for padding rows.
fn gemm_load_a4(g: u32, k: u32) -> vec4<f32> {
    let kd = kdim();
    let ks = vec4<u32>(k) + vec4<u32>(0u, 1u, 2u, 3u);
    let i = vec4<u32>(a_row[g]) + min(ks, vec4<u32>(kd - 1u));
    let v = vec4<f32>(a_at(i.x), a_at(i.y), a_at(i.z), a_at(i.w)) * a_live[g];
    return select(vec4<f32>(0.0), v, ks < vec4<u32>(kd));
}

// W_w[e](k, n..n+4); zeros past K or N.
fn gemm_load_b4(w: u32, k: u32, n: u32) -> vec4<f32> {
    let kd = kdim();
    let nd = ndim();
    let ns = vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u);
    let live = (ns < vec4<u32>(nd)) & vec4<bool>(k < kd);
//#if b16
    // n is a multiple of 4; with N a multiple of 4 every row (and w_base)
    // starts on an even element: the four halves are two whole words.
    if ((nd & 3u) == 0u) {
        let i = (w_base + min(k, kd - 1u) * nd + min(n, nd - 4u)) >> 1u;
        return select(vec4<f32>(0.0), vec4<f32>(b_pair(w, i), b_pair(w, i + 1u)), live);
    }
//#endif
//#if packed
    // Likewise the four values are one group: one word and one scale.
    if ((nd & 3u) == 0u) {
        let r = (w_base + min(k, kd - 1u) * nd + min(n, nd - 4u)) >> 2u;
        return select(vec4<f32>(0.0), b_group(w, r), live);
    }
//#endif
    let i = vec4<u32>(w_base + min(k, kd - 1u) * nd) + min(ns, vec4<u32>(nd - 1u));
    let v = vec4<f32>(b_at(w, i.x), b_at(w, i.y), b_at(w, i.z), b_at(w, i.w));
    return select(vec4<f32>(0.0), v, live);
}

fn expert_main(lid: vec3<u32>, wid: vec3<u32>) {
    let tile = wid.x;
    // Every row tile belongs to one expert (clamped: never index past E).
    let e = min(routing[p.tile_expert + min(tile, p.max_tiles - 1u)], p.e - 1u);
    // Another part's expert: its dispatch computes this tile. (Uniform per
    // workgroup: the tile is the workgroup's.)
    if (e < p.e0 || e >= p.e0 + p.ec) {
        return;
    }
    w_base = (e - p.e0) * kdim() * ndim();
    let ln = GemmLane(tile * GEMM_TILE_M, wid.y * GEMM_TILE_N, lid.x, lid.y);
    gemm_run(ln, p.rows, kdim());
}

//#if gemm1
//#if swiglu
//#if train
@compute @workgroup_size(WX, WY)
fn expert_gemm1_swiglu_train(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    expert_main(lid, wid);
}
//#else
@compute @workgroup_size(WX, WY)
fn expert_gemm1_swiglu(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    expert_main(lid, wid);
}
//#endif
//#else
//#if train
@compute @workgroup_size(WX, WY)
fn expert_gemm1_gelu_train(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    expert_main(lid, wid);
}
//#else
@compute @workgroup_size(WX, WY)
fn expert_gemm1_gelu(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    expert_main(lid, wid);
}
//#endif
//#endif
//#else
@compute @workgroup_size(WX, WY)
fn expert_gemm2(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    expert_main(lid, wid);
}
//#endif
