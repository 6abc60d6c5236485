// RMSNorm (the transformer's pre-norm) and its backward:
//   rmsnorm_forward:  rstd[t] = 1 / sqrt(mean_d x[t, d]^2 + eps),
//                     y[t, d] = x[t, d] * rstd[t] * g[d]
//   rmsnorm_backward: xhat = x * rstd,
//                     dx[t, d] = rstd[t] * (g[d] dy[t, d] - xhat[t, d] * mean_d(g dy xhat))
//   rmsnorm_backward_gain:        partials[c, d] = sum over the rows t of chunk c
//                                 (ascending) of dy[t, d] * xhat[t, d]
//   rmsnorm_backward_gain_finish: dg[d] = sum over c (ascending) of partials[c, d]
// Shapes: T rows, D width, C = ceil(T / ROWS) chunks of ROWS rows.
// Twin: src/reference/rmsnorm.rs (same entry point names; the gain twin is
// one function, rmsnorm_backward_gain).
//
// forward / backward: one workgroup per row, a tree reduction in workgroup
// memory (a fixed order, so the result does not vary run to run). The gain
// gradient sums over rows: two passes over fixed chunks instead of atomics.
//
// Spec constants prepended by the launcher: WG (invocations per workgroup, a
// power of two), ROWS (rows per chunk of the gain gradient).
// Sections `//#if forward`, `//#if backward`, `//#if gain`, `//#if finish`
// pick one entry point's bindings.

struct RmsNormParams {
    t: u32,
    d: u32,
    eps: f32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    // chunks of ROWS rows: ceil(T / ROWS)
    chunks: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: RmsNormParams;
//#if forward
@group(0) @binding(1) var<storage, read> x: array<f32>;            // x [T, D]
@group(0) @binding(2) var<storage, read> g: array<f32>;            // g [D]
@group(0) @binding(3) var<storage, read_write> y: array<f32>;      // y [T, D]
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;   // rstd [T]
//#endif
//#if backward
@group(0) @binding(1) var<storage, read> x: array<f32>;            // x [T, D]
@group(0) @binding(2) var<storage, read> g: array<f32>;            // g [D]
@group(0) @binding(3) var<storage, read> dy: array<f32>;           // dy [T, D]
@group(0) @binding(4) var<storage, read> rstd: array<f32>;         // rstd [T]
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;     // dx [T, D]
//#endif
//#if gain
@group(0) @binding(1) var<storage, read> x: array<f32>;            // x [T, D]
@group(0) @binding(2) var<storage, read> dy: array<f32>;           // dy [T, D]
@group(0) @binding(3) var<storage, read> rstd: array<f32>;         // rstd [T]
@group(0) @binding(4) var<storage, read_write> partials: array<f32>; // partials [C, D]
//#endif
//#if finish
@group(0) @binding(1) var<storage, read> partials: array<f32>;     // partials [C, D]
@group(0) @binding(2) var<storage, read_write> dg: array<f32>;     // dg [D]
//#endif

fn group_index(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * params.nx;
}

var<workgroup> red: array<f32, WG>;

// Sum of `v` over the workgroup, the same tree every time; every invocation
// gets the total.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

//#if forward
@compute @workgroup_size(WG)
fn rmsnorm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = group_index(wid);
    if row >= params.t {
        return;
    }
    let d = params.d;
    let base = row * d;
    var ss = 0.0;
    for (var c = lid; c < d; c += WG) {
        let v = x[base + c];
        ss += v * v;
    }
    let r = 1.0 / sqrt(workgroup_sum(lid, ss) / f32(d) + params.eps);
    if lid == 0u {
        rstd[row] = r;
    }
    for (var c = lid; c < d; c += WG) {
        y[base + c] = x[base + c] * r * g[c];
    }
}
//#endif

//#if backward
@compute @workgroup_size(WG)
fn rmsnorm_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = group_index(wid);
    if row >= params.t {
        return;
    }
    let d = params.d;
    let base = row * d;
    let r = rstd[row];
    var s = 0.0;
    for (var c = lid; c < d; c += WG) {
        s += g[c] * dy[base + c] * (x[base + c] * r);
    }
    let mean = workgroup_sum(lid, s) / f32(d);
    for (var c = lid; c < d; c += WG) {
        let xhat = x[base + c] * r;
        dx[base + c] = r * (g[c] * dy[base + c] - xhat * mean);
    }
}
//#endif

//#if gain
// One invocation per (chunk, column); consecutive invocations take
// consecutive columns.
@compute @workgroup_size(WG)
fn rmsnorm_backward_gain(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let d = params.d;
    let idx = group_index(wid) * WG + lid;
    if idx >= params.chunks * d {
        return;
    }
    let chunk = idx / d;
    let col = idx - chunk * d;
    let end = min(params.t, (chunk + 1u) * ROWS);
    var acc = 0.0;
    for (var t = chunk * ROWS; t < end; t++) {
        acc += dy[t * d + col] * (x[t * d + col] * rstd[t]);
    }
    partials[idx] = acc;
}
//#endif

//#if finish
// One invocation per column.
@compute @workgroup_size(WG)
fn rmsnorm_backward_gain_finish(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let d = params.d;
    let col = group_index(wid) * WG + lid;
    if col >= d {
        return;
    }
    var acc = 0.0;
    for (var c = 0u; c < params.chunks; c++) {
        acc += partials[c * d + col];
    }
    dg[col] = acc;
}
//#endif
