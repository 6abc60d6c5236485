// Curriculum complexity of one MoE layer: for each sequence of the batch, the
// share of its N (K - 1) slots past the first that the gate used (with K = 2
// the fraction of tokens sent to two experts; the router's decision, before
// any capacity drop), written into one column of
// complexity [B, COLS] (one column per MoE layer). A training step then reads
// back B * COLS floats instead of every layer's topk_ids.
// Twin: src/reference/complexity.rs (sequence_complexity).
//
// Spec constants prepended by the launcher: WG, UNUSED.

struct ComplexityParams {
    // sequences B
    b: u32,
    // tokens per sequence N
    n: u32,
    // slots per token K (1..=8)
    k: u32,
    // the column this layer writes, and the columns of `complexity`
    col: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: ComplexityParams;
@group(0) @binding(1) var<storage, read> topk_ids: array<u32>;        // topk_ids [B N, K]
@group(0) @binding(2) var<storage, read_write> complexity: array<f32>; // complexity [B, COLS]

@compute @workgroup_size(WG)
fn sequence_complexity(@builtin(global_invocation_id) gid: vec3<u32>) {
    let s = gid.x;
    if s >= params.b {
        return;
    }
    var two = 0u;
    let base = s * params.n;
    for (var i = 0u; i < params.n; i++) {
        for (var j = 1u; j < params.k; j++) {
            two += select(0u, 1u, topk_ids[(base + i) * params.k + j] != UNUSED);
        }
    }
    complexity[s * params.cols + params.col] = f32(two) / f32(params.n * max(params.k - 1u, 1u));
}
