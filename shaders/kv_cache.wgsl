// Generation with a KV cache: the kernels that depend on where in the
// sequence a call starts. `step[0]` = pos0, the position of the call's first
// token; the host writes it before each submit, so that one set of bind
// groups serves every decode step.
//   kv_embed:         x[i, :] = wte[ids[i], :] + wpe[pos0 + i, :]
//   kv_append:        k_cache[h, pos0 + i, :] = k of row i, head h (same for v)
//   kv_attention:     o[i, head h] = softmax_j(scale q_i . k_j) v_j over the
//                     cached positions j in 0 ..= pos0 + i (causal)
// Shapes: T tokens in this call, D = H * Dh model width, N cache capacity
// (the context), V vocabulary. qkv [T, 3D]: q in columns [0, D), k in
// [D, 2D), v in [2D, 3D), head h at h*Dh of each third. Caches [H, N, Dh].
// Twin: src/reference/kv_cache.rs (same entry point names).
//
// kv_attention: one workgroup of KV_WG invocations per (token, head). Keys
// are taken KV_WG at a time: each invocation scores one key into workgroup
// memory, then every invocation folds the chunk into the running max and sum
// (the same values in every invocation, so they stay uniform) and
// invocation e < Dh accumulates output column e. Online softmax: no N-sized
// buffer, any context.
//
// Spec constants prepended by the launcher: WG (elementwise entry points),
// KV_WG (attention; >= 64 >= Dh).
// Sections: `//#if embed`, `//#if append`, `//#if attend`.

struct KvParams {
    t: u32,
    d: u32,
    h: u32,
    // head width Dh = D / H
    dh: u32,
    // cache capacity N (positions)
    n: u32,
    v: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> params: KvParams;
@group(0) @binding(1) var<storage, read> step: array<u32>;             // step [4]: pos0, -, -, -
//#if embed
@group(0) @binding(2) var<storage, read> ids: array<u32>;              // ids [T]
@group(0) @binding(3) var<storage, read> wte: array<f32>;              // wte [V, D]
@group(0) @binding(4) var<storage, read> wpe: array<f32>;              // wpe [N, D]
@group(0) @binding(5) var<storage, read_write> x: array<f32>;          // x [T, D]
//#endif
//#if append
@group(0) @binding(2) var<storage, read> qkv: array<f32>;              // qkv [T, 3D]
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;    // k_cache [H, N, Dh]
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;    // v_cache [H, N, Dh]
//#endif
//#if attend
@group(0) @binding(2) var<storage, read> qkv: array<f32>;              // qkv [T, 3D]
@group(0) @binding(3) var<storage, read> k_cache: array<f32>;          // k_cache [H, N, Dh]
@group(0) @binding(4) var<storage, read> v_cache: array<f32>;          // v_cache [H, N, Dh]
@group(0) @binding(5) var<storage, read_write> o: array<f32>;          // o [T, D]
//#endif

fn linear(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * params.nx;
}

//#if embed
@compute @workgroup_size(WG)
fn kv_embed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d = params.d;
    let idx = linear(wid) * WG + lid;
    if (idx >= params.t * d) {
        return;
    }
    let i = idx / d;
    let c = idx % d;
    let pos = step[0] + i;
    let id = ids[i];
    // The host validates both; out of range reads nothing.
    if (pos >= params.n || id >= params.v) {
        x[idx] = 0.0;
        return;
    }
    x[idx] = wte[id * d + c] + wpe[pos * d + c];
}
//#endif

//#if append
@compute @workgroup_size(WG)
fn kv_append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let d = params.d;
    let idx = linear(wid) * WG + lid;
    if (idx >= params.t * d) {
        return;
    }
    let i = idx / d;
    let c = idx % d;
    let pos = step[0] + i;
    if (pos >= params.n) {
        return;
    }
    let h = c / params.dh;
    let e = c % params.dh;
    let dst = (h * params.n + pos) * params.dh + e;
    k_cache[dst] = qkv[i * 3u * d + d + c];
    v_cache[dst] = qkv[i * 3u * d + 2u * d + c];
}
//#endif

//#if attend
var<workgroup> q_s: array<f32, KV_WG>;
var<workgroup> s_s: array<f32, KV_WG>;

@compute @workgroup_size(KV_WG)
fn kv_attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = linear(wid);
    // Uniform per workgroup: every invocation takes the same branch.
    if (g >= params.t * params.h) {
        return;
    }
    let i = g / params.h;
    let h = g % params.h;
    let d = params.d;
    let dh = params.dh;
    let len = min(step[0] + i + 1u, params.n);
    if (lid < dh) {
        q_s[lid] = qkv[i * 3u * d + h * dh + lid];
    }
    workgroupBarrier();
    var m = -3.0e38;
    var l = 0.0;
    var acc = 0.0;
    let base = h * params.n * dh;
    for (var c0 = 0u; c0 < len; c0 += KV_WG) {
        let j = c0 + lid;
        var s = -3.0e38;
        if (j < len) {
            var dot = 0.0;
            for (var e = 0u; e < dh; e++) {
                dot += q_s[e] * k_cache[base + j * dh + e];
            }
            s = dot * params.scale;
        }
        s_s[lid] = s;
        workgroupBarrier();
        let cnt = min(KV_WG, len - c0);
        var cm = m;
        for (var jj = 0u; jj < cnt; jj++) {
            cm = max(cm, s_s[jj]);
        }
        let alpha = exp(m - cm);
        l *= alpha;
        acc *= alpha;
        for (var jj = 0u; jj < cnt; jj++) {
            let p = exp(s_s[jj] - cm);
            l += p;
            if (lid < dh) {
                acc += p * v_cache[base + (c0 + jj) * dh + lid];
            }
        }
        m = cm;
        workgroupBarrier();
    }
    if (lid < dh) {
        o[i * d + h * dh + lid] = acc / l;
    }
}
//#endif
