// Generation with a KV cache: the kernels that depend on where in the
// sequence a call starts. `step[0]` = pos0, the position of the call's first
// token; the host writes it before each submit, so that one set of bind
// groups serves every decode step.
//   kv_embed:         x[i, :] = wte[ids[i], :] * emb_scale (+ wpe[pos0 + i, :]
//                     when has_wpe; rotary models have none)
//   kv_append:        k_cache[g, pos0 + i, :] = k of row i, kv head g (same for v)
//   kv_attention:     o[i, head h] = softmax_j(scale q_i . k_j) v_j over the
//                     cached positions j of kv head g = h / (H / Hkv), from
//                     max(0, pos0 + i + 1 - W) (W = window; 0: none) to
//                     pos0 + i (causal)
// Shapes: T tokens in this call, H query heads and Hkv key/value heads of
// width Dh, N cache capacity (the context), V vocabulary, D model width.
// qkv [T, (H + 2 Hkv) Dh]: q heads in columns [0, H Dh), then the k heads,
// then the v heads. Caches [Hkv, N, Dh]. Twin: src/reference/kv_cache.rs
// (same entry point names).
//
// kv_attention: one workgroup of KV_WG invocations per (token, head). Keys
// are taken KV_WG at a time: each invocation scores one key into workgroup
// memory, then every invocation folds the chunk into the running max and sum
// (the same values in every invocation, so they stay uniform) and
// invocation e accumulates output columns e, e + KV_WG, ... (< Dh <= 4
// KV_WG). Online softmax: no N-sized buffer, any context.
//
// Spec constants prepended by the launcher: WG (elementwise entry points),
// KV_WG (attention; 4 KV_WG >= Dh).
// Sections: `//#if embed` (with `//#if w16`: wte stored as f16, two to a u32
// word), `//#if append`, `//#if attend`.

struct KvParams {
    t: u32,
    // model width D (kv_embed)
    d: u32,
    h: u32,
    // head width Dh
    dh: u32,
    // cache capacity N (positions)
    n: u32,
    v: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    scale: f32,
    // key/value heads Hkv (H a multiple of it)
    hkv: u32,
    // sliding window W (0: none)
    window: u32,
    // kv_embed: token embedding multiplier, and whether wpe is read
    emb_scale: f32,
    has_wpe: u32,
    // kv_embed: the rows of wte bound, v0 .. v0 + vc of V (a part of a
    // split table writes the tokens whose ids it holds)
    v0: u32,
    vc: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: KvParams;
@group(0) @binding(1) var<storage, read> step: array<u32>;             // step [4]: pos0, -, -, -
//#if embed
@group(0) @binding(2) var<storage, read> ids: array<u32>;              // ids [T]
//#if w16
@group(0) @binding(3) var<storage, read> wte: array<u32>;              // wte [V, D], f16 pairs

fn wte_at(i: u32) -> f32 {
    return unpack_f16x2(wte[i >> 1u])[i & 1u];
}
//#else
@group(0) @binding(3) var<storage, read> wte: array<f32>;              // wte [V, D]

fn wte_at(i: u32) -> f32 {
    return wte[i];
}
//#endif
@group(0) @binding(4) var<storage, read> wpe: array<f32>;              // wpe [N, D] (or wte, unread)
@group(0) @binding(5) var<storage, read_write> x: array<f32>;          // x [T, D]
//#endif
//#if append
@group(0) @binding(2) var<storage, read> qkv: array<f32>;              // qkv [T, (H + 2 Hkv) Dh]
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;    // k_cache [Hkv, N, Dh]
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;    // v_cache [Hkv, N, Dh]
//#endif
//#if attend
@group(0) @binding(2) var<storage, read> qkv: array<f32>;              // qkv [T, (H + 2 Hkv) Dh]
@group(0) @binding(3) var<storage, read> k_cache: array<f32>;          // k_cache [Hkv, N, Dh]
@group(0) @binding(4) var<storage, read> v_cache: array<f32>;          // v_cache [Hkv, N, Dh]
@group(0) @binding(5) var<storage, read_write> o: array<f32>;          // o [T, H Dh]
//#endif

fn linear(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * params.nx;
}

// Columns of one qkv row.
fn qkv_stride() -> u32 {
    return (params.h + 2u * params.hkv) * params.dh;
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
    if (id < params.v0 || id >= params.v0 + params.vc) {
        return;
    }
    let e = wte_at((id - params.v0) * d + c) * params.emb_scale;
    if (params.has_wpe != 0u) {
        x[idx] = e + wpe[pos * d + c];
    } else {
        x[idx] = e;
    }
}
//#endif

//#if append
@compute @workgroup_size(WG)
fn kv_append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // One invocation per (row, k/v column).
    let kw = params.hkv * params.dh;
    let idx = linear(wid) * WG + lid;
    if (idx >= params.t * kw) {
        return;
    }
    let i = idx / kw;
    let c = idx % kw;
    let pos = step[0] + i;
    if (pos >= params.n) {
        return;
    }
    let g = c / params.dh;
    let e = c % params.dh;
    let dst = (g * params.n + pos) * params.dh + e;
    let row = i * qkv_stride() + params.h * params.dh;
    k_cache[dst] = qkv[row + c];
    v_cache[dst] = qkv[row + kw + c];
}
//#endif

//#if attend
var<workgroup> q_s: array<f32, 256>;
var<workgroup> s_s: array<f32, KV_WG>;

@compute @workgroup_size(KV_WG)
fn kv_attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let gid = linear(wid);
    // Uniform per workgroup: every invocation takes the same branch.
    if (gid >= params.t * params.h) {
        return;
    }
    let i = gid / params.h;
    let h = gid % params.h;
    let dh = params.dh;
    let g = h / (params.h / params.hkv);
    let pos = step[0] + i;
    let len = min(pos + 1u, params.n);
    var first = 0u;
    if (params.window != 0u && len > params.window) {
        first = len - params.window;
    }
    for (var e = lid; e < dh; e += KV_WG) {
        q_s[e] = qkv[i * qkv_stride() + h * dh + e];
    }
    workgroupBarrier();
    var m = -3.0e38;
    var l = 0.0;
    // Output columns lid + r KV_WG, r = 0..3.
    var acc = vec4<f32>(0.0);
    let base = g * params.n * dh;
    for (var c0 = first; c0 < len; c0 += KV_WG) {
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
            let row = base + (c0 + jj) * dh;
            if (lid < dh) {
                acc.x += p * v_cache[row + lid];
            }
            if (lid + KV_WG < dh) {
                acc.y += p * v_cache[row + lid + KV_WG];
            }
            if (lid + 2u * KV_WG < dh) {
                acc.z += p * v_cache[row + lid + 2u * KV_WG];
            }
            if (lid + 3u * KV_WG < dh) {
                acc.w += p * v_cache[row + lid + 3u * KV_WG];
            }
        }
        m = cm;
        workgroupBarrier();
    }
    let out = i * params.h * dh + h * dh;
    if (lid < dh) {
        o[out + lid] = acc.x / l;
    }
    if (lid + KV_WG < dh) {
        o[out + lid + KV_WG] = acc.y / l;
    }
    if (lid + 2u * KV_WG < dh) {
        o[out + lid + 2u * KV_WG] = acc.z / l;
    }
    if (lid + 3u * KV_WG < dh) {
        o[out + lid + 3u * KV_WG] = acc.w / l;
    }
}
//#endif
