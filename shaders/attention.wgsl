// Causal multi-head self-attention, forward and backward, flash-attention
// style: no N x N matrix anywhere. Shapes: B sequences of N tokens, T = B*N
// rows (token t = b*N + n), H heads of width Dh (spec constant DH4 = Dh/4), D = H*Dh.
// qkv [T, (H + 2 Hkv) Dh] holds the H query heads, then the Hkv key heads,
// then the Hkv value heads; query head h reads kv head h / (H / Hkv) (GQA;
// the dK/dV pass runs per kv head and sums its query heads in order).
// Scores are scaled by `scale` (1/sqrt(Dh) unless the model says
// otherwise); key n' attends to query n when n - W < n' <= n within one
// sequence (W = window; 0: no window).
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
// One workgroup serves WG * RQ consecutive rows of one (sequence, head);
// each invocation owns RQ consecutive rows and keeps their vectors and
// accumulators in registers. The rows on the other side (keys and values
// for the query passes, queries and output gradients for dkv) are staged in
// workgroup memory, TILE rows at a time, and read by every invocation at the
// same address; the causal mask is applied per row inside the staged tile. On GPUs that is the usual
// shared-memory reuse. On CPU adapters (Mesa 22 lavapipe/llvmpipe) a load
// inside a loop costs a per-lane loop whatever its address, so what counts
// is the FMAs each load feeds: RQ rows per invocation make every staged
// vec4 feed RQ of them. The forward keeps an online softmax (running max m,
// sum l) in base 2, rescaling the accumulator only when a max grows.
//
// Why it looks like this (CPU adapters, see shaders/matmul.wgsl): Mesa does
// not unroll naga's loops, and a private array indexed by a loop variable
// lives in per-lane scratch memory. So a row of Dh floats is a Row of vec4s
// touched only through the hand-unrolled helpers below (guarded lines
// `if (DH4 > c)` that constant-fold), and the causal mask is a select, not
// a branch around the tile loads.
//
// Spec constants prepended by the launcher: WG (invocations per workgroup),
// RQ (rows per invocation, 1..4), DH4 (Dh / 4, at most 16), TILE (staged
// rows per step).

struct AttentionParams {
    b: u32,
    n: u32,
    h: u32,
    // D = H * Dh
    d: u32,
    // row blocks per (sequence, head): ceil(N / (WG * RQ))
    blocks: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    // 1 / sqrt(Dh), or the model's own score scale
    scale: f32,
    // key/value heads Hkv
    hkv: u32,
    // vec4s per qkv row: (H + 2 Hkv) Dh / 4
    qs4: u32,
    // sliding window W (0: none): query n sees keys n - W + 1 ..= n
    window: u32,
    _pad0: u32,
    _pad1: u32,
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

// One row of Dh floats (chunks past DH4 are never touched), and the RQ rows
// of an invocation (rows past RQ likewise).
alias Row = array<vec4<f32>, 16>;
alias Rows = array<Row, 4>;

// Per-chunk work on the RQ rows of a lane: chunk c of every row against
// one staged vec4 t (c is a constant once inlined).

fn dot_chunk(x: ptr<function, Rows>, c: u32, t: vec4<f32>) -> vec4<f32> {
    let s0 = dot((*x)[0][c], t);
    var s1 = 0.0;
    var s2 = 0.0;
    var s3 = 0.0;
    if (RQ > 1u) { s1 = dot((*x)[1][c], t); }
    if (RQ > 2u) { s2 = dot((*x)[2][c], t); }
    if (RQ > 3u) { s3 = dot((*x)[3][c], t); }
    return vec4<f32>(s0, s1, s2, s3);
}

fn axpy_chunk(acc: ptr<function, Rows>, c: u32, a: vec4<f32>, t: vec4<f32>) {
    // Components taken outside the constant branches (naga's SPIR-V writer
    // loses an argument's component access made inside one).
    let a0 = vec4(a.x);
    let a1 = vec4(a.y);
    let a2 = vec4(a.z);
    let a3 = vec4(a.w);
    (*acc)[0][c] = fma(a0, t, (*acc)[0][c]);
    if (RQ > 1u) { (*acc)[1][c] = fma(a1, t, (*acc)[1][c]); }
    if (RQ > 2u) { (*acc)[2][c] = fma(a2, t, (*acc)[2][c]); }
    if (RQ > 3u) { (*acc)[3][c] = fma(a3, t, (*acc)[3][c]); }
}

fn scale_chunk(acc: ptr<function, Rows>, c: u32, a: vec4<f32>) {
    let a0 = a.x;
    let a1 = a.y;
    let a2 = a.z;
    let a3 = a.w;
    (*acc)[0][c] *= a0;
    if (RQ > 1u) { (*acc)[1][c] *= a1; }
    if (RQ > 2u) { (*acc)[2][c] *= a2; }
    if (RQ > 3u) { (*acc)[3][c] *= a3; }
}

// Scores (or dot products) of the RQ rows of x with staged row `at`.

fn ta_dot(x: ptr<function, Rows>, at: u32) -> vec4<f32> {
    var s = dot_chunk(x, 0u, tile_a[at]);
    if (DH4 > 1u) { s += dot_chunk(x, 1u, tile_a[at + 1u]); }
    if (DH4 > 2u) { s += dot_chunk(x, 2u, tile_a[at + 2u]); }
    if (DH4 > 3u) { s += dot_chunk(x, 3u, tile_a[at + 3u]); }
    if (DH4 > 4u) { s += dot_chunk(x, 4u, tile_a[at + 4u]); }
    if (DH4 > 5u) { s += dot_chunk(x, 5u, tile_a[at + 5u]); }
    if (DH4 > 6u) { s += dot_chunk(x, 6u, tile_a[at + 6u]); }
    if (DH4 > 7u) { s += dot_chunk(x, 7u, tile_a[at + 7u]); }
    if (DH4 > 8u) { s += dot_chunk(x, 8u, tile_a[at + 8u]); }
    if (DH4 > 9u) { s += dot_chunk(x, 9u, tile_a[at + 9u]); }
    if (DH4 > 10u) { s += dot_chunk(x, 10u, tile_a[at + 10u]); }
    if (DH4 > 11u) { s += dot_chunk(x, 11u, tile_a[at + 11u]); }
    if (DH4 > 12u) { s += dot_chunk(x, 12u, tile_a[at + 12u]); }
    if (DH4 > 13u) { s += dot_chunk(x, 13u, tile_a[at + 13u]); }
    if (DH4 > 14u) { s += dot_chunk(x, 14u, tile_a[at + 14u]); }
    if (DH4 > 15u) { s += dot_chunk(x, 15u, tile_a[at + 15u]); }
    return s;
}

fn tb_dot(x: ptr<function, Rows>, at: u32) -> vec4<f32> {
    var s = dot_chunk(x, 0u, tile_b[at]);
    if (DH4 > 1u) { s += dot_chunk(x, 1u, tile_b[at + 1u]); }
    if (DH4 > 2u) { s += dot_chunk(x, 2u, tile_b[at + 2u]); }
    if (DH4 > 3u) { s += dot_chunk(x, 3u, tile_b[at + 3u]); }
    if (DH4 > 4u) { s += dot_chunk(x, 4u, tile_b[at + 4u]); }
    if (DH4 > 5u) { s += dot_chunk(x, 5u, tile_b[at + 5u]); }
    if (DH4 > 6u) { s += dot_chunk(x, 6u, tile_b[at + 6u]); }
    if (DH4 > 7u) { s += dot_chunk(x, 7u, tile_b[at + 7u]); }
    if (DH4 > 8u) { s += dot_chunk(x, 8u, tile_b[at + 8u]); }
    if (DH4 > 9u) { s += dot_chunk(x, 9u, tile_b[at + 9u]); }
    if (DH4 > 10u) { s += dot_chunk(x, 10u, tile_b[at + 10u]); }
    if (DH4 > 11u) { s += dot_chunk(x, 11u, tile_b[at + 11u]); }
    if (DH4 > 12u) { s += dot_chunk(x, 12u, tile_b[at + 12u]); }
    if (DH4 > 13u) { s += dot_chunk(x, 13u, tile_b[at + 13u]); }
    if (DH4 > 14u) { s += dot_chunk(x, 14u, tile_b[at + 14u]); }
    if (DH4 > 15u) { s += dot_chunk(x, 15u, tile_b[at + 15u]); }
    return s;
}

// acc[r] += a[r] * staged row `at`, for the RQ rows.

fn ta_axpy(acc: ptr<function, Rows>, a: vec4<f32>, at: u32) {
    axpy_chunk(acc, 0u, a, tile_a[at]);
    if (DH4 > 1u) { axpy_chunk(acc, 1u, a, tile_a[at + 1u]); }
    if (DH4 > 2u) { axpy_chunk(acc, 2u, a, tile_a[at + 2u]); }
    if (DH4 > 3u) { axpy_chunk(acc, 3u, a, tile_a[at + 3u]); }
    if (DH4 > 4u) { axpy_chunk(acc, 4u, a, tile_a[at + 4u]); }
    if (DH4 > 5u) { axpy_chunk(acc, 5u, a, tile_a[at + 5u]); }
    if (DH4 > 6u) { axpy_chunk(acc, 6u, a, tile_a[at + 6u]); }
    if (DH4 > 7u) { axpy_chunk(acc, 7u, a, tile_a[at + 7u]); }
    if (DH4 > 8u) { axpy_chunk(acc, 8u, a, tile_a[at + 8u]); }
    if (DH4 > 9u) { axpy_chunk(acc, 9u, a, tile_a[at + 9u]); }
    if (DH4 > 10u) { axpy_chunk(acc, 10u, a, tile_a[at + 10u]); }
    if (DH4 > 11u) { axpy_chunk(acc, 11u, a, tile_a[at + 11u]); }
    if (DH4 > 12u) { axpy_chunk(acc, 12u, a, tile_a[at + 12u]); }
    if (DH4 > 13u) { axpy_chunk(acc, 13u, a, tile_a[at + 13u]); }
    if (DH4 > 14u) { axpy_chunk(acc, 14u, a, tile_a[at + 14u]); }
    if (DH4 > 15u) { axpy_chunk(acc, 15u, a, tile_a[at + 15u]); }
}

fn tb_axpy(acc: ptr<function, Rows>, a: vec4<f32>, at: u32) {
    axpy_chunk(acc, 0u, a, tile_b[at]);
    if (DH4 > 1u) { axpy_chunk(acc, 1u, a, tile_b[at + 1u]); }
    if (DH4 > 2u) { axpy_chunk(acc, 2u, a, tile_b[at + 2u]); }
    if (DH4 > 3u) { axpy_chunk(acc, 3u, a, tile_b[at + 3u]); }
    if (DH4 > 4u) { axpy_chunk(acc, 4u, a, tile_b[at + 4u]); }
    if (DH4 > 5u) { axpy_chunk(acc, 5u, a, tile_b[at + 5u]); }
    if (DH4 > 6u) { axpy_chunk(acc, 6u, a, tile_b[at + 6u]); }
    if (DH4 > 7u) { axpy_chunk(acc, 7u, a, tile_b[at + 7u]); }
    if (DH4 > 8u) { axpy_chunk(acc, 8u, a, tile_b[at + 8u]); }
    if (DH4 > 9u) { axpy_chunk(acc, 9u, a, tile_b[at + 9u]); }
    if (DH4 > 10u) { axpy_chunk(acc, 10u, a, tile_b[at + 10u]); }
    if (DH4 > 11u) { axpy_chunk(acc, 11u, a, tile_b[at + 11u]); }
    if (DH4 > 12u) { axpy_chunk(acc, 12u, a, tile_b[at + 12u]); }
    if (DH4 > 13u) { axpy_chunk(acc, 13u, a, tile_b[at + 13u]); }
    if (DH4 > 14u) { axpy_chunk(acc, 14u, a, tile_b[at + 14u]); }
    if (DH4 > 15u) { axpy_chunk(acc, 15u, a, tile_b[at + 15u]); }
}

fn rows_scale(acc: ptr<function, Rows>, a: vec4<f32>) {
    scale_chunk(acc, 0u, a);
    if (DH4 > 1u) { scale_chunk(acc, 1u, a); }
    if (DH4 > 2u) { scale_chunk(acc, 2u, a); }
    if (DH4 > 3u) { scale_chunk(acc, 3u, a); }
    if (DH4 > 4u) { scale_chunk(acc, 4u, a); }
    if (DH4 > 5u) { scale_chunk(acc, 5u, a); }
    if (DH4 > 6u) { scale_chunk(acc, 6u, a); }
    if (DH4 > 7u) { scale_chunk(acc, 7u, a); }
    if (DH4 > 8u) { scale_chunk(acc, 8u, a); }
    if (DH4 > 9u) { scale_chunk(acc, 9u, a); }
    if (DH4 > 10u) { scale_chunk(acc, 10u, a); }
    if (DH4 > 11u) { scale_chunk(acc, 11u, a); }
    if (DH4 > 12u) { scale_chunk(acc, 12u, a); }
    if (DH4 > 13u) { scale_chunk(acc, 13u, a); }
    if (DH4 > 14u) { scale_chunk(acc, 14u, a); }
    if (DH4 > 15u) { scale_chunk(acc, 15u, a); }
}

// One row's chunks, from or to storage (once per row, outside the loops).

fn row_zero(x: ptr<function, Rows>, r: u32) {
    (*x)[r][0] = vec4<f32>(0.0);
    if (DH4 > 1u) { (*x)[r][1] = vec4<f32>(0.0); }
    if (DH4 > 2u) { (*x)[r][2] = vec4<f32>(0.0); }
    if (DH4 > 3u) { (*x)[r][3] = vec4<f32>(0.0); }
    if (DH4 > 4u) { (*x)[r][4] = vec4<f32>(0.0); }
    if (DH4 > 5u) { (*x)[r][5] = vec4<f32>(0.0); }
    if (DH4 > 6u) { (*x)[r][6] = vec4<f32>(0.0); }
    if (DH4 > 7u) { (*x)[r][7] = vec4<f32>(0.0); }
    if (DH4 > 8u) { (*x)[r][8] = vec4<f32>(0.0); }
    if (DH4 > 9u) { (*x)[r][9] = vec4<f32>(0.0); }
    if (DH4 > 10u) { (*x)[r][10] = vec4<f32>(0.0); }
    if (DH4 > 11u) { (*x)[r][11] = vec4<f32>(0.0); }
    if (DH4 > 12u) { (*x)[r][12] = vec4<f32>(0.0); }
    if (DH4 > 13u) { (*x)[r][13] = vec4<f32>(0.0); }
    if (DH4 > 14u) { (*x)[r][14] = vec4<f32>(0.0); }
    if (DH4 > 15u) { (*x)[r][15] = vec4<f32>(0.0); }
}

fn load_qkv(x: ptr<function, Rows>, r: u32, at: u32, a: f32) {
    (*x)[r][0] = qkv[at] * a;
    if (DH4 > 1u) { (*x)[r][1] = qkv[at + 1u] * a; }
    if (DH4 > 2u) { (*x)[r][2] = qkv[at + 2u] * a; }
    if (DH4 > 3u) { (*x)[r][3] = qkv[at + 3u] * a; }
    if (DH4 > 4u) { (*x)[r][4] = qkv[at + 4u] * a; }
    if (DH4 > 5u) { (*x)[r][5] = qkv[at + 5u] * a; }
    if (DH4 > 6u) { (*x)[r][6] = qkv[at + 6u] * a; }
    if (DH4 > 7u) { (*x)[r][7] = qkv[at + 7u] * a; }
    if (DH4 > 8u) { (*x)[r][8] = qkv[at + 8u] * a; }
    if (DH4 > 9u) { (*x)[r][9] = qkv[at + 9u] * a; }
    if (DH4 > 10u) { (*x)[r][10] = qkv[at + 10u] * a; }
    if (DH4 > 11u) { (*x)[r][11] = qkv[at + 11u] * a; }
    if (DH4 > 12u) { (*x)[r][12] = qkv[at + 12u] * a; }
    if (DH4 > 13u) { (*x)[r][13] = qkv[at + 13u] * a; }
    if (DH4 > 14u) { (*x)[r][14] = qkv[at + 14u] * a; }
    if (DH4 > 15u) { (*x)[r][15] = qkv[at + 15u] * a; }
}

//#if forward
fn store_o(x: ptr<function, Rows>, r: u32, at: u32, a: f32) {
    o[at] = (*x)[r][0] * a;
    if (DH4 > 1u) { o[at + 1u] = (*x)[r][1] * a; }
    if (DH4 > 2u) { o[at + 2u] = (*x)[r][2] * a; }
    if (DH4 > 3u) { o[at + 3u] = (*x)[r][3] * a; }
    if (DH4 > 4u) { o[at + 4u] = (*x)[r][4] * a; }
    if (DH4 > 5u) { o[at + 5u] = (*x)[r][5] * a; }
    if (DH4 > 6u) { o[at + 6u] = (*x)[r][6] * a; }
    if (DH4 > 7u) { o[at + 7u] = (*x)[r][7] * a; }
    if (DH4 > 8u) { o[at + 8u] = (*x)[r][8] * a; }
    if (DH4 > 9u) { o[at + 9u] = (*x)[r][9] * a; }
    if (DH4 > 10u) { o[at + 10u] = (*x)[r][10] * a; }
    if (DH4 > 11u) { o[at + 11u] = (*x)[r][11] * a; }
    if (DH4 > 12u) { o[at + 12u] = (*x)[r][12] * a; }
    if (DH4 > 13u) { o[at + 13u] = (*x)[r][13] * a; }
    if (DH4 > 14u) { o[at + 14u] = (*x)[r][14] * a; }
    if (DH4 > 15u) { o[at + 15u] = (*x)[r][15] * a; }
}
//#else
fn load_dout(x: ptr<function, Rows>, r: u32, at: u32) {
    (*x)[r][0] = dout[at];
    if (DH4 > 1u) { (*x)[r][1] = dout[at + 1u]; }
    if (DH4 > 2u) { (*x)[r][2] = dout[at + 2u]; }
    if (DH4 > 3u) { (*x)[r][3] = dout[at + 3u]; }
    if (DH4 > 4u) { (*x)[r][4] = dout[at + 4u]; }
    if (DH4 > 5u) { (*x)[r][5] = dout[at + 5u]; }
    if (DH4 > 6u) { (*x)[r][6] = dout[at + 6u]; }
    if (DH4 > 7u) { (*x)[r][7] = dout[at + 7u]; }
    if (DH4 > 8u) { (*x)[r][8] = dout[at + 8u]; }
    if (DH4 > 9u) { (*x)[r][9] = dout[at + 9u]; }
    if (DH4 > 10u) { (*x)[r][10] = dout[at + 10u]; }
    if (DH4 > 11u) { (*x)[r][11] = dout[at + 11u]; }
    if (DH4 > 12u) { (*x)[r][12] = dout[at + 12u]; }
    if (DH4 > 13u) { (*x)[r][13] = dout[at + 13u]; }
    if (DH4 > 14u) { (*x)[r][14] = dout[at + 14u]; }
    if (DH4 > 15u) { (*x)[r][15] = dout[at + 15u]; }
}

fn store_dqkv(x: ptr<function, Rows>, r: u32, at: u32, a: f32) {
    dqkv[at] = (*x)[r][0] * a;
    if (DH4 > 1u) { dqkv[at + 1u] = (*x)[r][1] * a; }
    if (DH4 > 2u) { dqkv[at + 2u] = (*x)[r][2] * a; }
    if (DH4 > 3u) { dqkv[at + 3u] = (*x)[r][3] * a; }
    if (DH4 > 4u) { dqkv[at + 4u] = (*x)[r][4] * a; }
    if (DH4 > 5u) { dqkv[at + 5u] = (*x)[r][5] * a; }
    if (DH4 > 6u) { dqkv[at + 6u] = (*x)[r][6] * a; }
    if (DH4 > 7u) { dqkv[at + 7u] = (*x)[r][7] * a; }
    if (DH4 > 8u) { dqkv[at + 8u] = (*x)[r][8] * a; }
    if (DH4 > 9u) { dqkv[at + 9u] = (*x)[r][9] * a; }
    if (DH4 > 10u) { dqkv[at + 10u] = (*x)[r][10] * a; }
    if (DH4 > 11u) { dqkv[at + 11u] = (*x)[r][11] * a; }
    if (DH4 > 12u) { dqkv[at + 12u] = (*x)[r][12] * a; }
    if (DH4 > 13u) { dqkv[at + 13u] = (*x)[r][13] * a; }
    if (DH4 > 14u) { dqkv[at + 14u] = (*x)[r][14] * a; }
    if (DH4 > 15u) { dqkv[at + 15u] = (*x)[r][15] * a; }
}
//#endif

//#if dq
fn dot_o(x: ptr<function, Rows>, r: u32, at: u32) -> f32 {
    var s = dot((*x)[r][0], o[at]);
    if (DH4 > 1u) { s += dot((*x)[r][1], o[at + 1u]); }
    if (DH4 > 2u) { s += dot((*x)[r][2], o[at + 2u]); }
    if (DH4 > 3u) { s += dot((*x)[r][3], o[at + 3u]); }
    if (DH4 > 4u) { s += dot((*x)[r][4], o[at + 4u]); }
    if (DH4 > 5u) { s += dot((*x)[r][5], o[at + 5u]); }
    if (DH4 > 6u) { s += dot((*x)[r][6], o[at + 6u]); }
    if (DH4 > 7u) { s += dot((*x)[r][7], o[at + 7u]); }
    if (DH4 > 8u) { s += dot((*x)[r][8], o[at + 8u]); }
    if (DH4 > 9u) { s += dot((*x)[r][9], o[at + 9u]); }
    if (DH4 > 10u) { s += dot((*x)[r][10], o[at + 10u]); }
    if (DH4 > 11u) { s += dot((*x)[r][11], o[at + 11u]); }
    if (DH4 > 12u) { s += dot((*x)[r][12], o[at + 12u]); }
    if (DH4 > 13u) { s += dot((*x)[r][13], o[at + 13u]); }
    if (DH4 > 14u) { s += dot((*x)[r][14], o[at + 14u]); }
    if (DH4 > 15u) { s += dot((*x)[r][15], o[at + 15u]); }
    return s;
}
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
    return Block(bh / params.h, bh % params.h, blk * WG * RQ);
}

// Rows (of this sequence) of the RQ rows of invocation lid.
fn rows_of(blk: Block, lid: u32) -> vec4<u32> {
    return vec4<u32>(blk.r0 + lid * RQ) + vec4<u32>(0u, 1u, 2u, 3u);
}

//#if dkv
//#else
// Stage keys (tile_a) and values (tile_b) r0 .. r0 + rows of sequence b
// for query head h: kv head h / (H / Hkv), whose k columns follow the H
// query heads and whose v columns follow the Hkv key heads.
fn stage_kv(b: u32, h: u32, r0: u32, rows: u32, lid: u32) {
    let g = h / (params.h / params.hkv);
    let k_off = (params.h + g) * DH4;
    let v_off = k_off + params.hkv * DH4;
    for (var i = lid; i < TILE * DH4; i += WG) {
        let r = i / DH4;
        if r < rows {
            let at = (b * params.n + r0 + r) * params.qs4 + i % DH4;
            tile_a[i] = qkv[at + k_off];
            tile_b[i] = qkv[at + v_off];
        }
    }
}
//#endif

//#if forward
// Row r of the lane's rows: q (pre-scaled to base-2 scores), zero acc.
fn fwd_load(q: ptr<function, Rows>, acc: ptr<function, Rows>, blk: Block, n: vec4<u32>, r: u32) {
    let row = blk.b * params.n + min(n[r], params.n - 1u);
    load_qkv(q, r, row * params.qs4 + blk.h * DH4, params.scale * LOG2E);
    row_zero(acc, r);
}

fn fwd_store(acc: ptr<function, Rows>, m: vec4<f32>, l: vec4<f32>, blk: Block, n: vec4<u32>, r: u32) {
    if n[r] < params.n {
        let row = blk.b * params.n + n[r];
        store_o(acc, r, row * params.d / 4u + blk.h * DH4, 1.0 / l[r]);
        lse[(blk.b * params.h + blk.h) * params.n + n[r]] = (m[r] + log2(l[r])) * LN2;
    }
}

@compute @workgroup_size(WG)
fn attention_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.x + wid.y * params.nx >= params.b * params.h * params.blocks {
        return;
    }
    let blk = block_of(wid);
    let n = rows_of(blk, lid);
    // Row r sees keys lo[r] <= k < lim[r]; rows past N (or past RQ) see none.
    let lim = select(vec4<u32>(0u), n + 1u, (n < vec4<u32>(params.n)) & (vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(RQ)));
    let w = params.window;
    let lo = select(vec4<u32>(0u), n + 1u - vec4<u32>(w), (vec4<u32>(w) > vec4<u32>(0u)) & (n + 1u > vec4<u32>(w)));
    var q: Rows;
    var acc: Rows;
    fwd_load(&q, &acc, blk, n, 0u);
    if (RQ > 1u) { fwd_load(&q, &acc, blk, n, 1u); }
    if (RQ > 2u) { fwd_load(&q, &acc, blk, n, 2u); }
    if (RQ > 3u) { fwd_load(&q, &acc, blk, n, 3u); }
    // Finite start: the first key (always visible) replaces it, and
    // exp2(m - s) flushes to 0 without an inf - inf.
    var m = vec4<f32>(-1.0e30);
    var l = vec4<f32>(0.0);
    // Keys kstart .. kend cover every query of the block.
    let kend = min(blk.r0 + WG * RQ, params.n);
    var kstart = 0u;
    if (w > 0u && blk.r0 + 1u > w) {
        kstart = blk.r0 + 1u - w;
    }
    for (var k0 = kstart; k0 < kend; k0 += TILE) {
        let rows = min(TILE, kend - k0);
        stage_kv(blk.b, blk.h, k0, rows, lid);
        workgroupBarrier();
        for (var j = 0u; j < rows; j++) {
            let s = ta_dot(&q, j * DH4);
            let ok = (vec4<u32>(k0 + j) < lim) & (vec4<u32>(k0 + j) >= lo);
            // Rescale only when a running max grows (rare after the first
            // keys); the branch holds no loads.
            // (m copied to a let first: naga's SPIR-V writer fails on a
            // var read both in the condition and in the branch.)
            let m_old = m;
            let grow = ok & (s > m_old);
            if any(grow) {
                let corr = select(vec4<f32>(1.0), exp2(m_old - s), grow);
                l *= corr;
                rows_scale(&acc, corr);
                m = select(m_old, s, grow);
            }
            let p = select(vec4<f32>(0.0), exp2(s - m), ok);
            l += p;
            tb_axpy(&acc, p, j * DH4);
        }
        workgroupBarrier();
    }
    fwd_store(&acc, m, l, blk, n, 0u);
    if (RQ > 1u) { fwd_store(&acc, m, l, blk, n, 1u); }
    if (RQ > 2u) { fwd_store(&acc, m, l, blk, n, 2u); }
    if (RQ > 3u) { fwd_store(&acc, m, l, blk, n, 3u); }
}
//#endif

//#if dq
struct DqRow {
    // delta = sum_d do*o
    delta: f32,
    // lse in base 2
    lse2: f32,
}

// Row r: q (pre-scaled), do, zero dq; returns its delta and lse.
fn dq_load(q: ptr<function, Rows>, g: ptr<function, Rows>, dq: ptr<function, Rows>, blk: Block, n: vec4<u32>, r: u32) -> DqRow {
    let nr = min(n[r], params.n - 1u);
    let row = blk.b * params.n + nr;
    let d4 = params.d / 4u;
    load_qkv(q, r, row * params.qs4 + blk.h * DH4, params.scale * LOG2E);
    load_dout(g, r, row * d4 + blk.h * DH4);
    row_zero(dq, r);
    let dl = dot_o(g, r, row * d4 + blk.h * DH4);
    return DqRow(dl, lse[(blk.b * params.h + blk.h) * params.n + nr] * LOG2E);
}

fn dq_store(dq: ptr<function, Rows>, dl: vec4<f32>, blk: Block, n: vec4<u32>, r: u32) {
    if n[r] < params.n {
        let row = blk.b * params.n + n[r];
        store_dqkv(dq, r, row * params.qs4 + blk.h * DH4, params.scale);
        delta[(blk.b * params.h + blk.h) * params.n + n[r]] = dl[r];
    }
}

@compute @workgroup_size(WG)
fn attention_backward_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.x + wid.y * params.nx >= params.b * params.h * params.blocks {
        return;
    }
    let blk = block_of(wid);
    let n = rows_of(blk, lid);
    let lim = select(vec4<u32>(0u), n + 1u, (n < vec4<u32>(params.n)) & (vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(RQ)));
    let w = params.window;
    let lo = select(vec4<u32>(0u), n + 1u - vec4<u32>(w), (vec4<u32>(w) > vec4<u32>(0u)) & (n + 1u > vec4<u32>(w)));
    var q: Rows;
    var g: Rows;
    var dq: Rows;
    var dl = vec4<f32>(0.0);
    var lse2 = vec4<f32>(0.0);
    var st = dq_load(&q, &g, &dq, blk, n, 0u);
    dl[0] = st.delta;
    lse2[0] = st.lse2;
    if (RQ > 1u) {
        st = dq_load(&q, &g, &dq, blk, n, 1u);
        dl[1] = st.delta;
        lse2[1] = st.lse2;
    }
    if (RQ > 2u) {
        st = dq_load(&q, &g, &dq, blk, n, 2u);
        dl[2] = st.delta;
        lse2[2] = st.lse2;
    }
    if (RQ > 3u) {
        st = dq_load(&q, &g, &dq, blk, n, 3u);
        dl[3] = st.delta;
        lse2[3] = st.lse2;
    }
    let kend = min(blk.r0 + WG * RQ, params.n);
    var kstart = 0u;
    if (w > 0u && blk.r0 + 1u > w) {
        kstart = blk.r0 + 1u - w;
    }
    for (var k0 = kstart; k0 < kend; k0 += TILE) {
        let rows = min(TILE, kend - k0);
        stage_kv(blk.b, blk.h, k0, rows, lid);
        workgroupBarrier();
        for (var j = 0u; j < rows; j++) {
            let s = ta_dot(&q, j * DH4);
            let dp = tb_dot(&g, j * DH4);
            let p = select(vec4<f32>(0.0), exp2(s - lse2), (vec4<u32>(k0 + j) < lim) & (vec4<u32>(k0 + j) >= lo));
            ta_axpy(&dq, p * (dp - dl), j * DH4);
        }
        workgroupBarrier();
    }
    dq_store(&dq, dl, blk, n, 0u);
    if (RQ > 1u) { dq_store(&dq, dl, blk, n, 1u); }
    if (RQ > 2u) { dq_store(&dq, dl, blk, n, 2u); }
    if (RQ > 3u) { dq_store(&dq, dl, blk, n, 3u); }
}
//#endif

//#if dkv
// Here a workgroup serves one kv head (blk.h is the kv head g) and sums
// the gradients of the H / Hkv query heads that read it.

// Key row r of kv head g: k (pre-scaled to base-2 scores) and v, zero dk
// and dv.
fn dkv_load(k: ptr<function, Rows>, v: ptr<function, Rows>, dk: ptr<function, Rows>, dv: ptr<function, Rows>, blk: Block, m: vec4<u32>, r: u32) {
    let at = (blk.b * params.n + min(m[r], params.n - 1u)) * params.qs4 + (params.h + blk.h) * DH4;
    load_qkv(k, r, at, params.scale * LOG2E);
    load_qkv(v, r, at + params.hkv * DH4, 1.0);
    row_zero(dk, r);
    row_zero(dv, r);
}

fn dkv_store(dk: ptr<function, Rows>, dv: ptr<function, Rows>, blk: Block, m: vec4<u32>, r: u32) {
    if m[r] < params.n {
        let at = (blk.b * params.n + m[r]) * params.qs4 + (params.h + blk.h) * DH4;
        store_dqkv(dk, r, at, params.scale);
        store_dqkv(dv, r, at + params.hkv * DH4, 1.0);
    }
}

// The (sequence, kv head, row block) of a dK/dV workgroup.
fn kv_block_of(wid: vec3<u32>) -> Block {
    let g = wid.x + wid.y * params.nx;
    let blk = g % params.blocks;
    let bh = g / params.blocks;
    return Block(bh / params.hkv, bh % params.hkv, blk * WG * RQ);
}

@compute @workgroup_size(WG)
fn attention_backward_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.x + wid.y * params.nx >= params.b * params.hkv * params.blocks {
        return;
    }
    let blk = kv_block_of(wid);
    // This invocation's key rows.
    let m = rows_of(blk, lid);
    let d4 = params.d / 4u;
    var k: Rows;
    var v: Rows;
    var dk: Rows;
    var dv: Rows;
    dkv_load(&k, &v, &dk, &dv, blk, m, 0u);
    if (RQ > 1u) { dkv_load(&k, &v, &dk, &dv, blk, m, 1u); }
    if (RQ > 2u) { dkv_load(&k, &v, &dk, &dv, blk, m, 2u); }
    if (RQ > 3u) { dkv_load(&k, &v, &dk, &dv, blk, m, 3u); }
    // Key m[r] is seen by queries first[r] <= i < last[r]; rows past N (or
    // RQ) by none.
    let first = select(vec4<u32>(params.n), m, (m < vec4<u32>(params.n)) & (vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(RQ)));
    let w = params.window;
    let last = select(vec4<u32>(params.n), min(m + vec4<u32>(w), vec4<u32>(params.n)), vec4<u32>(w) > vec4<u32>(0u));
    // Queries r0 .. iend see at least one key of the block.
    var iend = params.n;
    if (w > 0u) {
        iend = min(params.n, blk.r0 + WG * RQ + w - 1u);
    }
    let group = params.h / params.hkv;
    // The query heads of this kv head, in order: a fixed summation order.
    for (var hq = blk.h * group; hq < (blk.h + 1u) * group; hq++) {
        let stats = (blk.b * params.h + hq) * params.n;
        for (var i0 = blk.r0; i0 < iend; i0 += TILE) {
            let rows = min(TILE, iend - i0);
            for (var i = lid; i < TILE * DH4; i += WG) {
                let r = i / DH4;
                if r < rows {
                    let t = blk.b * params.n + i0 + r;
                    tile_a[i] = qkv[t * params.qs4 + hq * DH4 + i % DH4];
                    tile_b[i] = dout[t * d4 + hq * DH4 + i % DH4];
                }
            }
            for (var i = lid; i < rows; i += WG) {
                tile_lse[i] = lse[stats + i0 + i] * LOG2E;
                tile_delta[i] = delta[stats + i0 + i];
            }
            workgroupBarrier();
            for (var i = 0u; i < rows; i++) {
                let s = ta_dot(&k, i * DH4);
                let dp = tb_dot(&v, i * DH4);
                let seen = (vec4<u32>(i0 + i) >= first) & (vec4<u32>(i0 + i) < last);
                let p = select(vec4<f32>(0.0), exp2(s - tile_lse[i]), seen);
                tb_axpy(&dv, p, i * DH4);
                ta_axpy(&dk, p * (dp - tile_delta[i]), i * DH4);
            }
            workgroupBarrier();
        }
    }
    dkv_store(&dk, &dv, blk, m, 0u);
    if (RQ > 1u) { dkv_store(&dk, &dv, blk, m, 1u); }
    if (RQ > 2u) { dkv_store(&dk, &dv, blk, m, 2u); }
    if (RQ > 3u) { dkv_store(&dk, &dv, blk, m, 3u); }
}
//#endif
