// Combine: y[t, :] = sum_j topk_weights[t, j] * y_expert[slot_of_token[t, j], :]
// over the used slots of each token; a gather, so no float atomics and a fixed
// summation order (j = 0, 1, ...). Shapes: T tokens, K slots per token, D
// model width, R rows of y_expert (the padded slot rows, max_rows).
// Twin: src/reference/combine.rs (combine_forward).
//
// One invocation per 4 consecutive columns of one token, so that the slot
// and weight loads are shared by 4 outputs. y_expert is declared as a vec4
// array: with VEC4 = 1 (D a multiple of 4) each row chunk is one vec4 load;
// with VEC4 = 0, four scalar loads (a vec4 element, then a component).
//
// Spec constants prepended by the launcher: WG (invocations per workgroup),
// VEC4 (0 or 1), UNUSED.

struct CombineParams {
    t: u32,
    k: u32,
    d: u32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
}

@group(0) @binding(0) var<uniform> params: CombineParams;
@group(0) @binding(1) var<storage, read> topk_weights: array<f32>;   // topk_weights [T, K]
@group(0) @binding(2) var<storage, read> slot_of_token: array<u32>;  // slot_of_token [T, K]
@group(0) @binding(3) var<storage, read> y_expert: array<vec4<f32>>; // y_expert [R, D]
@group(0) @binding(4) var<storage, read_write> y: array<f32>;        // y [T, D]

fn ye(i: u32) -> f32 {
    return y_expert[i >> 2u][i & 3u];
}

@compute @workgroup_size(WG)
fn combine_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let d = params.d;
    let quads = (d + 3u) / 4u;
    let idx = (wid.x + wid.y * params.nx) * WG + lid;
    if idx >= params.t * quads {
        return;
    }
    let t = idx / quads;
    let col = (idx - t * quads) * 4u;
    // Columns past D (last quad of a row when D % 4 != 0) read a valid
    // element and are not stored.
    let last = d - 1u;
    var acc = vec4<f32>(0.0);
    for (var j = 0u; j < params.k; j++) {
        let row = slot_of_token[t * params.k + j];
        // An unused slot contributes nothing, whatever its weight holds.
        if row != UNUSED {
            let w = topk_weights[t * params.k + j];
            let base = row * d;
            if VEC4 == 1u {
                acc += w * y_expert[(base + col) / 4u];
            } else {
                let v = vec4<f32>(
                    ye(base + col),
                    ye(base + min(col + 1u, last)),
                    ye(base + min(col + 2u, last)),
                    ye(base + min(col + 3u, last)),
                );
                acc += w * v;
            }
        }
    }
    let out = t * d + col;
    y[out] = acc.x;
    if col + 1u < d {
        y[out + 1u] = acc.y;
    }
    if col + 2u < d {
        y[out + 2u] = acc.z;
    }
    if col + 3u < d {
        y[out + 3u] = acc.w;
    }
}
