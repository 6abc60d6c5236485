// What a block does to q and k between the QKV projection and attention, in
// place on qkv [T, (H + 2 Hkv) Dh] (q heads, then k heads, then v heads):
//   qkv_bias: qkv[t, c] += bias[c]                     (Qwen2 families)
//   qk_norm:  RMSNorm of segments of q (seg columns) and of k (segk
//             columns), each with its gain: Dh per head (Qwen3, gains [Dh])
//             or the whole projection (OLMoE, gains [H Dh] and [Hkv Dh]):
//             x * inverseSqrt(mean(x^2) + eps) * g
//   rope:     the rotary embedding of every q and k head (rotate-half: the
//             pair (i, i + Dh/2) of a head at position p turns by the angle
//             of table row p: x1' = x1 c - x2 s, x2' = x2 c + x1 s; `sign`
//             -1 turns back, the backward of the same rotation).
//             Position of row t: step[0] + t % period (period N for a batch
//             of sequences from 0, T for a call at the cache's step).
// Twins: src/reference/qk.rs (same entry point names).
//
// Spec constant prepended by the launcher: WG. Sections `//#if bias`,
// `//#if norm`, `//#if rope` pick one entry point's bindings.

struct QkParams {
    t: u32,
    h: u32,
    hkv: u32,
    dh: u32,
    // qk_norm: columns per normalized segment
    seg: u32,
    // rope: rows per sequence
    period: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    eps: f32,
    // rope: +1 forward, -1 backward
    sign: f32,
    // rope: positions in the cos/sin tables
    n: u32,
    // qk_norm: columns per normalized k segment
    segk: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: QkParams;
//#if bias
@group(0) @binding(1) var<storage, read> bias: array<f32>;             // bias [(H + 2 Hkv) Dh]
@group(0) @binding(2) var<storage, read_write> qkv: array<f32>;        // qkv [T, (H + 2 Hkv) Dh]
//#endif
//#if norm
@group(0) @binding(1) var<storage, read> gq: array<f32>;               // q gain [SEG]
@group(0) @binding(2) var<storage, read> gk: array<f32>;               // k gain [SEG']
@group(0) @binding(3) var<storage, read_write> qkv: array<f32>;        // qkv [T, (H + 2 Hkv) Dh]
//#endif
//#if rope
@group(0) @binding(1) var<storage, read> step: array<u32>;             // step [4]: pos0
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;            // cos [N, Dh / 2]
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;            // sin [N, Dh / 2]
@group(0) @binding(4) var<storage, read_write> qkv: array<f32>;        // qkv [T, (H + 2 Hkv) Dh]
//#endif

fn index(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * params.nx) * WG + lid;
}

fn width() -> u32 {
    return (params.h + 2u * params.hkv) * params.dh;
}

//#if bias
@compute @workgroup_size(WG)
fn qkv_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let idx = index(wid, lid);
    let w = width();
    if (idx >= params.t * w) {
        return;
    }
    qkv[idx] = qkv[idx] + bias[idx % w];
}
//#endif

//#if norm
@compute @workgroup_size(WG)
fn qk_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // One invocation per (row, segment): the q segments, then the k ones.
    let idx = index(wid, lid);
    let nq = params.h * params.dh / params.seg;
    let nk = params.hkv * params.dh / params.segk;
    if (idx >= params.t * (nq + nk)) {
        return;
    }
    let t = idx / (nq + nk);
    let s = idx % (nq + nk);
    // q segments from column 0, k segments from column H Dh.
    let is_q = s < nq;
    var seg = params.seg;
    var start = t * width() + s * seg;
    if (!is_q) {
        seg = params.segk;
        start = t * width() + params.h * params.dh + (s - nq) * seg;
    }
    var ss = 0.0;
    for (var c = 0u; c < seg; c++) {
        let x = qkv[start + c];
        ss += x * x;
    }
    let r = inverseSqrt(ss / f32(seg) + params.eps);
    if (is_q) {
        for (var c = 0u; c < seg; c++) {
            qkv[start + c] = qkv[start + c] * r * gq[c];
        }
    } else {
        for (var c = 0u; c < seg; c++) {
            qkv[start + c] = qkv[start + c] * r * gk[c];
        }
    }
}
//#endif

//#if rope
@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // One invocation per (row, q or k head, pair).
    let idx = index(wid, lid);
    let half = params.dh / 2u;
    let heads = params.h + params.hkv;
    if (idx >= params.t * heads * half) {
        return;
    }
    let t = idx / (heads * half);
    let rest = idx % (heads * half);
    let hh = rest / half;
    let i = rest % half;
    let pos = min(step[0] + t % params.period, params.n - 1u);
    let c = cos_t[pos * half + i];
    let s = sin_t[pos * half + i] * params.sign;
    // q heads and k heads are contiguous: head hh starts at column hh Dh.
    let at = t * width() + hh * params.dh + i;
    let x1 = qkv[at];
    let x2 = qkv[at + half];
    qkv[at] = x1 * c - x2 * s;
    qkv[at + half] = x2 * c + x1 * s;
}
//#endif
