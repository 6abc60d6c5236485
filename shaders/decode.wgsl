// Decode FFN for few tokens (T up to ~16): no permutation, a mat-vec per
// selected expert, then the weighted sum over the token's slots.
//   decode_up_gelu:   h[t, j, :] = gelu(x[t] · W1[e])
//   decode_up_swiglu: h[t, j, :] = silu(x[t] · W1[e]) * (x[t] · W3[e])
//   decode_down:      y[t, :] = sum_j w[t, j] * (h[t, j, :] · W2[e])
// with e = topk_ids[t, j]; unused slots (UNUSED, or an id not below E) give
// h = 0 and add nothing. A bank split into parts (experts e0 .. e0 + ec per
// part) runs both kernels once per part: each part computes its own slots,
// and every part after the first adds its sum to y. The sum over j is inside decode_down (no atomics).
// Shapes: T tokens, K slots per token, E experts, D model width, F expert
// hidden width; W1, W3 [E, D, F] and W2 [E, F, D], as in the grouped path.
// Twin: src/reference/decode.rs (decode_up, decode_down, decode_ffn).
//
// Each invocation owns 4 output columns of one (t, j) (decode_up) or one t
// (decode_down) and runs the whole reduction for them, in the twin's order.
// The read-only inputs are declared as vec4 arrays. With VEC4 = 1 (D and F
// multiples of 4) an invocation owns 4 consecutive columns and each step of
// the reduction reads a weight row with one vec4 load per invocation,
// contiguous across the workgroup: software adapters (llvmpipe) are bound by
// load instructions, not FLOPs. With VEC4 = 0 the columns are
// lid + c * WG and the loads scalar (a vec4 element, then a component).
//
// Spec constants prepended by the launcher: WG, VEC4 (0 or 1), UNUSED.
// Section `//#if w16`: the weights are stored as f16 (two to a u32 word;
// math in f32), read through the same accessors (w1v, w1s, ...). Section
// `//#if packed`: block-quantized, q8 (flag q8) or q4 (shaders/quant.wgsl),
// dequantized in registers by the same accessors.
// Needs shaders/activation.wgsl before it. Every entry point shares one
// binding table.

struct DecodeParams {
    t: u32,
    k: u32,
    e: u32,
    d: u32,
    f: u32,
    // The weights bound hold experts e0 .. e0 + ec of e (all of them, or
    // one part of a split bank). accumulate = 1: add to y (later parts).
    e0: u32,
    ec: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> params: DecodeParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;       // x [T, D]
@group(0) @binding(2) var<storage, read> topk_ids: array<u32>;      // topk_ids [T, K]
@group(0) @binding(3) var<storage, read> topk_weights: array<f32>;  // topk_weights [T, K]
//#if packed
// Block-quantized weights (shaders/quant.wgsl), packed u32 words.
@group(0) @binding(4) var<storage, read> w1: array<u32>;            // w1 [E, D, F]
@group(0) @binding(5) var<storage, read> w3: array<u32>;            // w3 [E, D, F] (SwiGLU; W1 again for GELU)
@group(0) @binding(6) var<storage, read> w2: array<u32>;            // w2 [E, F, D]
//#else
//#if w16
// The weights as f16: four halves (two u32 words) per vec4 group.
@group(0) @binding(4) var<storage, read> w1: array<vec2<u32>>;      // w1 [E, D, F]
@group(0) @binding(5) var<storage, read> w3: array<vec2<u32>>;      // w3 [E, D, F] (SwiGLU; W1 again for GELU)
@group(0) @binding(6) var<storage, read> w2: array<vec2<u32>>;      // w2 [E, F, D]
//#else
@group(0) @binding(4) var<storage, read> w1: array<vec4<f32>>;      // w1 [E, D, F]
@group(0) @binding(5) var<storage, read> w3: array<vec4<f32>>;      // w3 [E, D, F] (SwiGLU; W1 again for GELU)
@group(0) @binding(6) var<storage, read> w2: array<vec4<f32>>;      // w2 [E, F, D]
//#endif
//#endif
@group(0) @binding(7) var<storage, read_write> h: array<f32>;       // h [T, K, F]
@group(0) @binding(8) var<storage, read_write> y: array<f32>;       // y [T, D]

// Scalar element i of the vec4 arrays (VEC4 = 0 path).
fn x_at(i: u32) -> f32 {
    return x[i >> 2u][i & 3u];
}

//#if packed
// Group r of four weights (VEC4 path), and element i (scalar path),
// dequantized in registers.
//#if q8
fn w1v(r: u32) -> vec4<f32> {
    let at = q8_group_at(r);
    return q8_group(w1[at.x], w1[at.y], r);
}

fn w3v(r: u32) -> vec4<f32> {
    let at = q8_group_at(r);
    return q8_group(w3[at.x], w3[at.y], r);
}

fn w2v(r: u32) -> vec4<f32> {
    let at = q8_group_at(r);
    return q8_group(w2[at.x], w2[at.y], r);
}

fn w1s(i: u32) -> f32 {
    let at = q8_value_at(i);
    return q8_value(w1[at.x], w1[at.y], i);
}

fn w3s(i: u32) -> f32 {
    let at = q8_value_at(i);
    return q8_value(w3[at.x], w3[at.y], i);
}

fn w2s(i: u32) -> f32 {
    let at = q8_value_at(i);
    return q8_value(w2[at.x], w2[at.y], i);
}
//#else
fn w1v(r: u32) -> vec4<f32> {
    let at = q4_group_at(r);
    return q4_group(w1[at.x], w1[at.y], r);
}

fn w3v(r: u32) -> vec4<f32> {
    let at = q4_group_at(r);
    return q4_group(w3[at.x], w3[at.y], r);
}

fn w2v(r: u32) -> vec4<f32> {
    let at = q4_group_at(r);
    return q4_group(w2[at.x], w2[at.y], r);
}

fn w1s(i: u32) -> f32 {
    let at = q4_value_at(i);
    return q4_value(w1[at.x], w1[at.y], i);
}

fn w3s(i: u32) -> f32 {
    let at = q4_value_at(i);
    return q4_value(w3[at.x], w3[at.y], i);
}

fn w2s(i: u32) -> f32 {
    let at = q4_value_at(i);
    return q4_value(w2[at.x], w2[at.y], i);
}
//#endif
//#else
//#if w16
// Group r of four weights (VEC4 path), and element i (scalar path).
fn w1v(r: u32) -> vec4<f32> {
    let q = w1[r];
    return vec4<f32>(unpack_f16x2(q.x), unpack_f16x2(q.y));
}

fn w3v(r: u32) -> vec4<f32> {
    let q = w3[r];
    return vec4<f32>(unpack_f16x2(q.x), unpack_f16x2(q.y));
}

fn w2v(r: u32) -> vec4<f32> {
    let q = w2[r];
    return vec4<f32>(unpack_f16x2(q.x), unpack_f16x2(q.y));
}

fn w1s(i: u32) -> f32 {
    return unpack_f16x2(w1[i >> 2u][(i >> 1u) & 1u])[i & 1u];
}

fn w3s(i: u32) -> f32 {
    return unpack_f16x2(w3[i >> 2u][(i >> 1u) & 1u])[i & 1u];
}

fn w2s(i: u32) -> f32 {
    return unpack_f16x2(w2[i >> 2u][(i >> 1u) & 1u])[i & 1u];
}
//#else
fn w1v(r: u32) -> vec4<f32> {
    return w1[r];
}

fn w3v(r: u32) -> vec4<f32> {
    return w3[r];
}

fn w2v(r: u32) -> vec4<f32> {
    return w2[r];
}

fn w1s(i: u32) -> f32 {
    return w1[i >> 2u][i & 3u];
}

fn w3s(i: u32) -> f32 {
    return w3[i >> 2u][i & 3u];
}

fn w2s(i: u32) -> f32 {
    return w2[i >> 2u][i & 3u];
}
//#endif
//#endif

fn w1_4(at: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(w1s(at.x), w1s(at.y), w1s(at.z), w1s(at.w));
}

fn w3_4(at: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(w3s(at.x), w3s(at.y), w3s(at.z), w3s(at.w));
}

fn w2_4(at: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(w2s(at.x), w2s(at.y), w2s(at.z), w2s(at.w));
}

// Output columns of this invocation: 4 consecutive (VEC4) or 4 strided by WG.
fn my_cols(wid_x: u32, lid: u32) -> vec4<u32> {
    let base = wid_x * (WG * 4u);
    if VEC4 == 1u {
        return base + lid * 4u + vec4<u32>(0u, 1u, 2u, 3u);
    }
    return base + lid + vec4<u32>(0u, WG, 2u * WG, 3u * WG);
}

fn store_h(row: u32, cols: vec4<u32>, n: u32, v: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if cols[c] < n {
            h[row + cols[c]] = v[c];
        }
    }
}

// decode_up's grid is (K, column blocks, T), and workgroup w of a token
// works on slot slot_at(w): the slots in bit-reversed order, those past K
// skipped (for K = 8: 0 4 2 6 1 5 3 7). A driver may hand each of its
// threads one contiguous run of workgroups (lavapipe does), and a rule
// leaves a token's last slots unused (UNUSED): in rank order one thread got
// every used slot and the others only zeros to write, so 4 of 8 slots took
// 0.85x the time of 8. Bit-reversed, any run of 2^n workgroups holds ranks
// spread over 0 .. K (4 of 8: 0.50x, measured on lavapipe, 2 threads).
fn slot_at(w: u32, k: u32) -> u32 {
    var bits = 0u;
    while (1u << bits) < k {
        bits++;
    }
    var n = 0u;
    for (var i = 0u; i < (1u << bits); i++) {
        let r = select(reverseBits(i) >> (32u - bits), 0u, bits == 0u);
        if r < k {
            if n == w {
                return r;
            }
            n++;
        }
    }
    return w;
}

fn decode_up(wid: vec3<u32>, lid: u32, swiglu: bool) {
    let t = wid.z;
    let tj = t * params.k + slot_at(wid.x, params.k);
    let d_n = params.d;
    let f_n = params.f;
    let cols = my_cols(wid.y, lid);
    let gid = topk_ids[tj];
    if cols.x >= f_n {
        return;
    }
    // This part's slot, or an unused one (zeroed by the part at e0 = 0);
    // another part's slot is left to that part.
    let mine = gid >= params.e0 && gid < params.e0 + params.ec;
    if !mine && !(gid >= params.e && params.e0 == 0u) {
        return;
    }
    let id = gid - params.e0;
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    if mine {
        if VEC4 == 1u {
            let f4 = f_n / 4u;
            let g = cols.x / 4u;
            let xrow = t * d_n / 4u;
            var r = id * d_n * f4 + g;
            for (var d4 = 0u; d4 < d_n / 4u; d4++) {
                let xv = x[xrow + d4];
                a += xv.x * w1v(r);
                a += xv.y * w1v(r + f4);
                a += xv.z * w1v(r + 2u * f4);
                a += xv.w * w1v(r + 3u * f4);
                if swiglu {
                    b += xv.x * w3v(r);
                    b += xv.y * w3v(r + f4);
                    b += xv.z * w3v(r + 2u * f4);
                    b += xv.w * w3v(r + 3u * f4);
                }
                r += 4u * f4;
            }
        } else {
            let at = min(cols, vec4<u32>(f_n - 1u)) + id * d_n * f_n;
            for (var dd = 0u; dd < d_n; dd++) {
                let xv = x_at(t * d_n + dd);
                let row = vec4<u32>(dd * f_n);
                a += xv * w1_4(at + row);
                if swiglu {
                    b += xv * w3_4(at + row);
                }
            }
        }
    }
    var v = vec4<f32>(0.0);
    if mine {
        if swiglu {
            v = vec4<f32>(act_silu(a.x), act_silu(a.y), act_silu(a.z), act_silu(a.w)) * b;
        } else {
            v = vec4<f32>(act_gelu(a.x), act_gelu(a.y), act_gelu(a.z), act_gelu(a.w));
        }
    }
    store_h(tj * f_n, cols, f_n, v);
}

@compute @workgroup_size(WG)
fn decode_up_gelu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    decode_up(wid, lid, false);
}

@compute @workgroup_size(WG)
fn decode_up_swiglu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    decode_up(wid, lid, true);
}

@compute @workgroup_size(WG)
fn decode_down(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = wid.y;
    let d_n = params.d;
    let f_n = params.f;
    let cols = my_cols(wid.x, lid);
    if cols.x >= d_n {
        return;
    }
    var out = vec4<f32>(0.0);
    for (var j = 0u; j < params.k; j++) {
        let tj = t * params.k + j;
        let gid = topk_ids[tj];
        if gid >= params.e0 && gid < params.e0 + params.ec {
            let id = gid - params.e0;
            var acc = vec4<f32>(0.0);
            let hrow = tj * f_n;
            if VEC4 == 1u {
                let d4 = d_n / 4u;
                var r = id * f_n * d4 + cols.x / 4u;
                for (var ff = 0u; ff < f_n; ff += 4u) {
                    let h0 = h[hrow + ff];
                    let h1 = h[hrow + ff + 1u];
                    let h2 = h[hrow + ff + 2u];
                    let h3 = h[hrow + ff + 3u];
                    acc += h0 * w2v(r);
                    acc += h1 * w2v(r + d4);
                    acc += h2 * w2v(r + 2u * d4);
                    acc += h3 * w2v(r + 3u * d4);
                    r += 4u * d4;
                }
            } else {
                let at = min(cols, vec4<u32>(d_n - 1u)) + id * f_n * d_n;
                for (var ff = 0u; ff < f_n; ff++) {
                    acc += h[hrow + ff] * w2_4(at + vec4<u32>(ff * d_n));
                }
            }
            out += topk_weights[tj] * acc;
        }
    }
    for (var c = 0u; c < 4u; c++) {
        if cols[c] < d_n {
            if params.accumulate != 0u {
                y[t * d_n + cols[c]] += out[c];
            } else {
                y[t * d_n + cols[c]] = out[c];
            }
        }
    }
}
