// Causal multi-head self-attention, forward and backward, flash-attention
// style: no N x N matrix anywhere. Shapes: B sequences of N tokens, T = B*N
// rows (token t = b*N + n), H heads of width Dh (spec constant DH), D = H*Dh.
// qkv [T, 3D] holds q, k, v in column thirds; head h uses columns
// h*Dh .. (h+1)*Dh of each third. Scores are scaled by 1/sqrt(Dh); key n'
// attends to query n when n' <= n within one sequence.
// Twins: src/reference/attention.rs (attention_forward, attention_backward).
//
// Entry points (one per pass, each module keeps only its own bindings):
// - attention_forward: o [T, D] and lse [B, H, N] (log-sum-exp of each query
//   row's scaled scores, kept for the backward).
// - attention_backward_dq: delta [B, H, N] = sum_d do*o (the backward's
//   preprocess, fused here) and the q columns of dqkv, per query row over
//   its keys.
// - attention_backward_dkv: the k and v columns of dqkv, per key row over
//   the queries that see it (reads delta). Every element of dqkv is written
//   by exactly one invocation: no atomics, fixed summation order.
//
// One workgroup serves WG consecutive rows of one (sequence, head); each
// invocation keeps its row's vectors and accumulators in registers. The rows
// on the other side (keys and values for the query passes, queries and output
// gradients for dkv) are staged in workgroup memory, TILE rows at a time, and
// read by every invocation at the same address: on CPU adapters one
// broadcast load instead of WG lane-varying storage loads, on GPUs the usual
// shared-memory reuse. The forward keeps an online softmax (running max m,
// sum l) in base 2, rescaling the accumulator only when the max grows.
//
// Spec constants prepended by the launcher: WG (rows per workgroup), DH4
// (Dh / 4), TILE (staged rows per step).

struct AttentionParams {
    b: u32,
    n: u32,
    h: u32,
    // D = H * Dh
    d: u32,
    // row blocks per (sequence, head): ceil(N / WG)
    blocks: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    // 1 / sqrt(Dh)
    scale: f32,
    _pad0: u32,
}

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

@group(0) @binding(0) var<uniform> params: AttentionParams;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;           // qkv [T, 3D]
//#if forward
@group(0) @binding(2) var<storage, read_write> o: array<vec4<f32>>;       // o [T, D]
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;           // lse [B, H, N]
//#endif
//#if dq
@group(0) @binding(2) var<storage, read> o: array<vec4<f32>>;             // o [T, D]
@group(0) @binding(3) var<storage, read> dout: array<vec4<f32>>;          // do [T, D]
@group(0) @binding(4) var<storage, read> lse: array<f32>;                 // lse [B, H, N]
@group(0) @binding(5) var<storage, read_write> dqkv: array<vec4<f32>>;    // dqkv [T, 3D]
@group(0) @binding(6) var<storage, read_write> delta: array<f32>;         // delta [B, H, N]
//#endif
//#if dkv
@group(0) @binding(2) var<storage, read> dout: array<vec4<f32>>;          // do [T, D]
@group(0) @binding(3) var<storage, read> lse: array<f32>;                 // lse [B, H, N]
@group(0) @binding(4) var<storage, read> delta: array<f32>;               // delta [B, H, N]
@group(0) @binding(5) var<storage, read_write> dqkv: array<vec4<f32>>;    // dqkv [T, 3D]
//#endif

//#if dkv
// Staged queries and output gradients: TILE rows of Dh, plus their lse (in
// base 2) and delta.
var<workgroup> tile_a: array<vec4<f32>, TILE * DH4>;
var<workgroup> tile_b: array<vec4<f32>, TILE * DH4>;
var<workgroup> tile_lse: array<f32, TILE>;
var<workgroup> tile_delta: array<f32, TILE>;
//#else
// Staged keys (tile_a) and values (tile_b): TILE rows of Dh.
var<workgroup> tile_a: array<vec4<f32>, TILE * DH4>;
var<workgroup> tile_b: array<vec4<f32>, TILE * DH4>;
//#endif

// The (sequence, head, row block) a workgroup serves.
struct Block {
    b: u32,
    h: u32,
    // first row of the block
    r0: u32,
}

fn block_of(wid: vec3<u32>) -> Block {
    let g = wid.x + wid.y * params.nx;
    let blk = g % params.blocks;
    let bh = g / params.blocks;
    return Block(bh / params.h, bh % params.h, blk * WG);
}

// Stage rows r0 .. r0 + rows of sequence b into tile_a / tile_b: keys and
// values (the query passes) read the k and v thirds of qkv.
//#if dkv
//#else
fn stage_kv(b: u32, h: u32, r0: u32, rows: u32, lid: u32) {
    let d4 = params.d / 4u;
    for (var i = lid; i < TILE * DH4; i += WG) {
        let r = i / DH4;
        if r < rows {
            let at = (b * params.n + r0 + r) * 3u * d4 + h * DH4 + i % DH4;
            tile_a[i] = qkv[at + d4];
            tile_b[i] = qkv[at + 2u * d4];
        }
    }
}
//#endif

//#if forward
@compute @workgroup_size(WG)
fn attention_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.x + wid.y * params.nx >= params.b * params.h * params.blocks {
        return;
    }
    let blk = block_of(wid);
    let n = blk.r0 + lid;
    let live = n < params.n;
    // Dead rows (past N) load a valid row and attend to nothing.
    let lim = select(0u, n + 1u, live);
    let d4 = params.d / 4u;
    let row = blk.b * params.n + min(n, params.n - 1u);
    // Scores in base 2: exp2(q.k * scale * log2 e) = exp(q.k * scale).
    let c2 = params.scale * LOG2E;
    var q: array<vec4<f32>, DH4>;
    var acc: array<vec4<f32>, DH4>;
    for (var c = 0u; c < DH4; c++) {
        q[c] = qkv[row * 3u * d4 + blk.h * DH4 + c] * c2;
        acc[c] = vec4<f32>(0.0);
    }
    // Finite start: the first key (always visible) replaces it, and
    // exp2(m - s) flushes to 0 without an inf - inf.
    var m = -1.0e30;
    var l = 0.0;
    // Keys 0 .. kend cover every query of the block.
    let kend = min(blk.r0 + WG, params.n);
    for (var k0 = 0u; k0 < kend; k0 += TILE) {
        let rows = min(TILE, kend - k0);
        stage_kv(blk.b, blk.h, k0, rows, lid);
        workgroupBarrier();
        for (var j = 0u; j < rows; j++) {
            if k0 + j < lim {
                var s = 0.0;
                for (var c = 0u; c < DH4; c++) {
                    s += dot(q[c], tile_a[j * DH4 + c]);
                }
                if s > m {
                    let corr = exp2(m - s);
                    l *= corr;
                    for (var c = 0u; c < DH4; c++) {
                        acc[c] *= corr;
                    }
                    m = s;
                }
                let p = exp2(s - m);
                l += p;
                for (var c = 0u; c < DH4; c++) {
                    acc[c] += p * tile_b[j * DH4 + c];
                }
            }
        }
        workgroupBarrier();
    }
    if live {
        let inv = 1.0 / l;
        for (var c = 0u; c < DH4; c++) {
            o[row * d4 + blk.h * DH4 + c] = acc[c] * inv;
        }
        lse[(blk.b * params.h + blk.h) * params.n + n] = (m + log2(l)) * LN2;
    }
}
//#endif

//#if dq
@compute @workgroup_size(WG)
fn attention_backward_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.x + wid.y * params.nx >= params.b * params.h * params.blocks {
        return;
    }
    let blk = block_of(wid);
    let n = blk.r0 + lid;
    let live = n < params.n;
    let lim = select(0u, n + 1u, live);
    let d4 = params.d / 4u;
    let row = blk.b * params.n + min(n, params.n - 1u);
    let c2 = params.scale * LOG2E;
    var q: array<vec4<f32>, DH4>;
    var g: array<vec4<f32>, DH4>;
    var dq: array<vec4<f32>, DH4>;
    var dl = 0.0;
    for (var c = 0u; c < DH4; c++) {
        q[c] = qkv[row * 3u * d4 + blk.h * DH4 + c] * c2;
        g[c] = dout[row * d4 + blk.h * DH4 + c];
        dl += dot(g[c], o[row * d4 + blk.h * DH4 + c]);
        dq[c] = vec4<f32>(0.0);
    }
    let stat = (blk.b * params.h + blk.h) * params.n + min(n, params.n - 1u);
    let lse2 = lse[stat] * LOG2E;
    let kend = min(blk.r0 + WG, params.n);
    for (var k0 = 0u; k0 < kend; k0 += TILE) {
        let rows = min(TILE, kend - k0);
        stage_kv(blk.b, blk.h, k0, rows, lid);
        workgroupBarrier();
        for (var j = 0u; j < rows; j++) {
            if k0 + j < lim {
                var s = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < DH4; c++) {
                    s += dot(q[c], tile_a[j * DH4 + c]);
                    dp += dot(g[c], tile_b[j * DH4 + c]);
                }
                let ds = exp2(s - lse2) * (dp - dl);
                for (var c = 0u; c < DH4; c++) {
                    dq[c] += ds * tile_a[j * DH4 + c];
                }
            }
        }
        workgroupBarrier();
    }
    if live {
        for (var c = 0u; c < DH4; c++) {
            dqkv[row * 3u * d4 + blk.h * DH4 + c] = dq[c] * params.scale;
        }
        delta[stat] = dl;
    }
}
//#endif

//#if dkv
@compute @workgroup_size(WG)
fn attention_backward_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.x + wid.y * params.nx >= params.b * params.h * params.blocks {
        return;
    }
    let blk = block_of(wid);
    // This invocation's key row.
    let m = blk.r0 + lid;
    let live = m < params.n;
    let d4 = params.d / 4u;
    let row = blk.b * params.n + min(m, params.n - 1u);
    let c2 = params.scale * LOG2E;
    var k: array<vec4<f32>, DH4>;
    var v: array<vec4<f32>, DH4>;
    var dk: array<vec4<f32>, DH4>;
    var dv: array<vec4<f32>, DH4>;
    for (var c = 0u; c < DH4; c++) {
        let at = row * 3u * d4 + blk.h * DH4 + c;
        k[c] = qkv[at + d4] * c2;
        v[c] = qkv[at + 2u * d4];
        dk[c] = vec4<f32>(0.0);
        dv[c] = vec4<f32>(0.0);
    }
    let stats = (blk.b * params.h + blk.h) * params.n;
    // Queries r0 .. N see at least one key of the block; dead rows see none.
    let first = select(params.n, m, live);
    for (var i0 = blk.r0; i0 < params.n; i0 += TILE) {
        let rows = min(TILE, params.n - i0);
        for (var i = lid; i < TILE * DH4; i += WG) {
            let r = i / DH4;
            if r < rows {
                let t = blk.b * params.n + i0 + r;
                tile_a[i] = qkv[t * 3u * d4 + blk.h * DH4 + i % DH4];
                tile_b[i] = dout[t * d4 + blk.h * DH4 + i % DH4];
            }
        }
        for (var i = lid; i < rows; i += WG) {
            tile_lse[i] = lse[stats + i0 + i] * LOG2E;
            tile_delta[i] = delta[stats + i0 + i];
        }
        workgroupBarrier();
        for (var i = 0u; i < rows; i++) {
            if i0 + i >= first {
                var s = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < DH4; c++) {
                    s += dot(tile_a[i * DH4 + c], k[c]);
                    dp += dot(tile_b[i * DH4 + c], v[c]);
                }
                let p = exp2(s - tile_lse[i]);
                let ds = p * (dp - tile_delta[i]);
                for (var c = 0u; c < DH4; c++) {
                    dv[c] += p * tile_b[i * DH4 + c];
                    dk[c] += ds * tile_a[i * DH4 + c];
                }
            }
        }
        workgroupBarrier();
    }
    if live {
        for (var c = 0u; c < DH4; c++) {
            let at = row * 3u * d4 + blk.h * DH4 + c;
            dqkv[at + d4] = dk[c] * params.scale;
            dqkv[at + 2u * d4] = dv[c];
        }
    }
}
//#endif
