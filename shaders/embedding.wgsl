// Embedding: token + position lookup and its two backward gathers.
//   embedding_forward:      x[t, :] = wte[ids[t], :] * scale (+ wpe[t % N, :]
//                           when has_wpe; rotary models have no wpe)
//   embedding_backward_wte: dwte[v, :] = sum over the tokens t with ids[t] == v,
//                           in ascending t, of dx[t, :] (zeros for unseen v)
//   embedding_backward_wpe: dwpe[n, :] = sum over t = n, n + N, n + 2N, ... of dx[t, :]
// Shapes: T tokens (T = B*N in training; any T >= 1 works), V vocabulary,
// N positions (context), D model width.
// Twin: src/reference/embedding.rs (same entry point names).
//
// One invocation per output element; consecutive invocations take
// consecutive columns, so every row access is coalesced. The wte backward is
// a gather over the host's counting sort of the ids (offsets [V+1], order [T],
// see kernels::embedding::token_order): no atomics, a fixed summation order.
//
// Spec constants prepended by the launcher: WG (invocations per workgroup).
// Sections: `//#if forward` (with `//#if w16`: wte stored as f16, two to a
// u32 word), `//#if wte`, `//#if wpe` pick one entry point's
// bindings (binding slots are reused between entry points).

struct EmbeddingParams {
    t: u32,
    v: u32,
    n: u32,
    d: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    // token embedding multiplier (1 but for Granite) and whether wpe is read
    scale: f32,
    has_wpe: u32,
    // The rows of wte bound: v0 .. v0 + vc of V (all, or one part of a
    // split table; the forward runs once per part and each token's row is
    // written by the part holding its id).
    v0: u32,
    vc: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: EmbeddingParams;
//#if forward
@group(0) @binding(1) var<storage, read> ids: array<u32>;        // ids [T]
//#if w16
@group(0) @binding(2) var<storage, read> wte: array<u32>;        // wte [V, D], f16 pairs

fn wte_at(i: u32) -> f32 {
    return unpack_f16x2(wte[i >> 1u])[i & 1u];
}
//#else
@group(0) @binding(2) var<storage, read> wte: array<f32>;        // wte [V, D]

fn wte_at(i: u32) -> f32 {
    return wte[i];
}
//#endif
@group(0) @binding(3) var<storage, read> wpe: array<f32>;        // wpe [N, D]
@group(0) @binding(4) var<storage, read_write> x: array<f32>;    // x [T, D]
//#endif
//#if wte
@group(0) @binding(1) var<storage, read> dx: array<f32>;         // dx [T, D]
@group(0) @binding(2) var<storage, read> offsets: array<u32>;    // offsets [V + 1]
@group(0) @binding(3) var<storage, read> order: array<u32>;      // order [T]
@group(0) @binding(4) var<storage, read_write> dwte: array<f32>; // dwte [V, D]
//#endif
//#if wpe
@group(0) @binding(1) var<storage, read> dx: array<f32>;         // dx [T, D]
@group(0) @binding(2) var<storage, read_write> dwpe: array<f32>; // dwpe [N, D]
//#endif

fn element(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * params.nx) * WG + lid;
}

//#if forward
@compute @workgroup_size(WG)
fn embedding_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let d = params.d;
    let idx = element(wid, lid);
    if idx >= params.t * d {
        return;
    }
    let t = idx / d;
    let col = idx - t * d;
    // The host validates ids (kernels::embedding::check_ids); clamping only
    // keeps a bad id from reading out of bounds.
    let id = min(ids[t], params.v - 1u);
    if id < params.v0 || id >= params.v0 + params.vc {
        return;
    }
    let pos = t % params.n;
    let e = wte_at((id - params.v0) * d + col) * params.scale;
    if params.has_wpe != 0u {
        x[idx] = e + wpe[pos * d + col];
    } else {
        x[idx] = e;
    }
}
//#endif

//#if wte
@compute @workgroup_size(WG)
fn embedding_backward_wte(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let d = params.d;
    let idx = element(wid, lid);
    if idx >= params.v * d {
        return;
    }
    let row = idx / d;
    let col = idx - row * d;
    var acc = 0.0;
    // order lists the tokens of each id in ascending t (a stable sort).
    let end = offsets[row + 1u];
    for (var i = offsets[row]; i < end; i++) {
        acc += dx[order[i] * d + col];
    }
    dwte[idx] = acc;
}
//#endif

//#if wpe
@compute @workgroup_size(WG)
fn embedding_backward_wpe(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let d = params.d;
    let idx = element(wid, lid);
    if idx >= params.n * d {
        return;
    }
    let pos = idx / d;
    let col = idx - pos * d;
    var acc = 0.0;
    for (var t = pos; t < params.t; t += params.n) {
        acc += dx[t * d + col];
    }
    dwpe[idx] = acc;
}
//#endif
