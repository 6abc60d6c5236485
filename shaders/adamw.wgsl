// AdamW with global gradient-norm clipping.
//   grad_norm_partial: partials[offset + c] = sum of g[i]^2 over chunk c of
//                      CHUNK consecutive elements of one gradient tensor
//   grad_norm_finish:  norm = sqrt(sum of every partial, in order);
//                      clip = (norm, scale), scale = min(1, max_norm / (norm + 1e-6))
//                      (1 without clipping; 0 when norm is not finite)
//   adamw_step:        g_eff = g * clip[1]
//                      m = beta1 m + (1 - beta1) g_eff
//                      v = beta2 v + (1 - beta2) g_eff^2
//                      p -= lr * (m / bc1 / (sqrt(v / bc2) + eps) + weight_decay * p)
//                      with bc1 = 1 - beta1^step, bc2 = 1 - beta2^step (decoupled
//                      weight decay). A scale of 0 (non-finite norm) skips the
//                      step: p, m and v keep their values for the host to inspect.
// Shapes: n elements of one parameter tensor (p, g, m, v [n]); P partials
// (every gradient tensor of the model owns a range of them); clip [2].
// Twin: src/reference/adamw.rs (same entry point names).
//
// The norm is two fixed-order passes (tree within a chunk, chunks in
// order), so the clipping scale, and with it the whole step, is the same bits
// run to run.
//
// Spec constants prepended by the launcher: WG (invocations per workgroup, a
// power of two), CHUNK (elements per partial, a multiple of WG).
// Sections `//#if step`, `//#if partial`, `//#if finish` pick one entry
// point's bindings.

struct AdamWParams {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
    n: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct GradNormParams {
    // elements of the gradient tensor (partial) / partials to sum (finish)
    n: u32,
    // first partial of this tensor's range
    offset: u32,
    // 1: clip to max_norm, 0: scale 1 whatever the norm (unless not finite)
    clip_enabled: u32,
    max_norm: f32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

//#if step
@group(0) @binding(0) var<uniform> params: AdamWParams;
@group(0) @binding(1) var<storage, read_write> p: array<f32>;     // p [n]
@group(0) @binding(2) var<storage, read> g: array<f32>;           // g [n]
@group(0) @binding(3) var<storage, read_write> m: array<f32>;     // m [n]
@group(0) @binding(4) var<storage, read_write> v: array<f32>;     // v [n]
@group(0) @binding(5) var<storage, read> clip: array<f32>;        // clip [2]
//#endif
//#if partial
@group(0) @binding(0) var<uniform> params: GradNormParams;
@group(0) @binding(1) var<storage, read> g: array<f32>;           // g [n]
@group(0) @binding(2) var<storage, read_write> partials: array<f32>; // partials [P]
//#endif
//#if finish
@group(0) @binding(0) var<uniform> params: GradNormParams;
@group(0) @binding(1) var<storage, read> partials: array<f32>;    // partials [P]
@group(0) @binding(2) var<storage, read_write> clip: array<f32>;  // clip [2]
//#endif

var<workgroup> red: array<f32, WG>;

// Sum of `x` over the workgroup, the same tree every time (lid 0 has it).
fn workgroup_sum(lid: u32, x: f32) -> f32 {
    red[lid] = x;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    return red[0];
}

// NaN and +-inf have an all-ones exponent. Tested on the bits: compilers may
// assume floats are never NaN and fold `x != x` away.
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

//#if step
@compute @workgroup_size(WG)
fn adamw_step(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * params.nx) * WG + lid;
    let scale = clip[1];
    if i >= params.n || scale == 0.0 {
        return;
    }
    let ge = g[i] * scale;
    let mi = params.beta1 * m[i] + (1.0 - params.beta1) * ge;
    let vi = params.beta2 * v[i] + (1.0 - params.beta2) * ge * ge;
    m[i] = mi;
    v[i] = vi;
    let update = (mi / params.bc1) / (sqrt(vi / params.bc2) + params.eps);
    let pi = p[i];
    p[i] = pi - params.lr * (update + params.weight_decay * pi);
}
//#endif

//#if partial
// One workgroup per chunk; invocation lid reads elements lid, lid + WG, ...
// of the chunk (coalesced).
@compute @workgroup_size(WG)
fn grad_norm_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let chunk = wid.x + wid.y * params.nx;
    let start = chunk * CHUNK;
    if start >= params.n {
        return;
    }
    let end = min(params.n, start + CHUNK);
    var s = 0.0;
    for (var i = start + lid; i < end; i += WG) {
        let x = g[i];
        s += x * x;
    }
    let total = workgroup_sum(lid, s);
    if lid == 0u {
        partials[params.offset + chunk] = total;
    }
}
//#endif

//#if finish
// One workgroup: invocation lid sums partials lid, lid + WG, ... then a tree.
@compute @workgroup_size(WG)
fn grad_norm_finish(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < params.n; i += WG) {
        s += partials[i];
    }
    let total = workgroup_sum(lid, s);
    if lid == 0u {
        let norm = sqrt(total);
        var scale = 1.0;
        if !is_finite(norm) {
            scale = 0.0;
        } else if params.clip_enabled == 1u {
            scale = min(1.0, params.max_norm / (norm + 1e-6));
        }
        clip[0] = norm;
        clip[1] = scale;
    }
}
//#endif
