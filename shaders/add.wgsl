// Elementwise sum of two tensors of N elements: out = a + scale * b. The
// residual stream of the transformer (x + attention(x), x + ffn(x); scale is
// 1 but for Granite's residual multiplier, and a + 1 * b is a + b exactly)
// and the sum of a gradient's two paths in the backward. Twin:
// src/reference/add.rs (add_forward, add_scaled).
//
// Spec constant prepended by the launcher: WG.

struct AddParams {
    n: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    scale: f32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: AddParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;         // a [N]
@group(0) @binding(2) var<storage, read> b: array<f32>;         // b [N]
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // out [N]

@compute @workgroup_size(WG)
fn add_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * params.nx) * WG + lid;
    if (i < params.n) {
        out[i] = a[i] + params.scale * b[i];
    }
}
