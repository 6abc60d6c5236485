// Backward of the grouped expert FFN (GELU or SwiGLU) over the forward's
// slot plan. Rows r are the padded routed slots of the routing buffer
// (RoutingLayout); padding rows carry zeros in dys / da, so they add nothing
// to any sum.
//   expert_gemm2_backward_gelu: da[r, :]  = (dys[r, :] · W2[e]^T) * gelu'(u[r, :])
//   expert_gemm2_backward_swiglu: with dh = dys[r, :] · W2[e]^T,
//                               da[r, :]  = dh * u3[r, :] * silu'(u[r, :]),
//                               da3[r, :] = dh * silu(u[r, :])
//   expert_gemm1_backward:      dxs[r, :] = da[r, :] · W1[e]^T
//   expert_gemm1_backward_swiglu: dxs[r, :] = da[r, :] · W1[e]^T + da3[r, :] · W3[e]^T
//                               (one GEMM over K = 2F)
//   expert_weight_grad_w1:      dw1[z, e] = sum_{r in chunk z of e} x[tok(r)]^T da[r]
//                               (with da3 bound as da: SwiGLU's dw3)
//   expert_weight_grad_w2:      dw2[z, e] = sum_{r in chunk z of e} h[r]^T dys[r]
// with e = tile_expert[r / tile_m] for the row GEMMs (indirect grid, like the
// forward), and for the weight GEMMs a direct grid x = (expert, row tile of
// the weight), y = column tile, z = split-K chunk of the expert's rows. With
// SPLIT > 1 the partials [SPLIT, E, M, N] are summed in order by
// `expert_weight_grad_reduce` (shaders/moe_backward.wgsl): no float atomics.
// Shapes: x [T, D], token_of_slot [R], W1 [E, D, F], W2 [E, F, D],
// u/u3/h/da/da3 [R, F], dys/dxs [R, D]. Twins: src/reference/moe_backward.rs.
//
// Prepended: shaders/activation.wgsl and the GEMM core of shaders/matmul.wgsl;
// the section flag (dh, dx, dw1, dw2; swiglu) picks the stage.

struct ExpertBackParams {
    t: u32,
    e: u32,
    d: u32,
    f: u32,
    // R: rows of token_of_slot and of the slot tensors.
    rows: u32,
    // Word offsets in routing of tile_expert [max_tiles] and expert_offsets [E+1].
    tile_expert: u32,
    max_tiles: u32,
    offsets: u32,
    // Weight GEMMs: row tiles per expert, and K chunks per expert.
    m_tiles: u32,
    split: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: ExpertBackParams;

// Expert base of the weights (row GEMMs), or K start row (weight GEMMs).
var<private> base: u32;
var<private> kd_: u32;
var<private> a_row: array<u32, NG>;

//#if dh
// dys [R, D]
@group(0) @binding(1) var<storage, read> dys: array<f32>;
// routing [RoutingLayout::len()]
@group(0) @binding(2) var<storage, read> routing: array<u32>;
// w2 [E, F, D]
@group(0) @binding(3) var<storage, read> w2: array<f32>;
// u [R, F]: GEMM 1's pre-activation (x · W1)
@group(0) @binding(4) var<storage, read> u: array<f32>;
// da [R, F]
@group(0) @binding(5) var<storage, read_write> da: array<f32>;
//#if swiglu
// u3 [R, F]: x · W3
@group(0) @binding(6) var<storage, read> u3: array<f32>;
// da3 [R, F]
@group(0) @binding(7) var<storage, read_write> da3: array<f32>;
//#endif

fn kdim() -> u32 { return p.d; }
fn ndim() -> u32 { return p.f; }
fn gemm_row_setup(g: u32, m: u32) { a_row[g] = m * p.d; }
fn a_load(g: u32, k: u32) -> f32 { return dys[a_row[g] + k]; }
// B(k, n) = W2[e](n, k)
fn b_load(k: u32, n: u32) -> f32 { return w2[base + n * p.d + k]; }
// One element of da (and da3) from dh = g.
fn dh_store(i: u32, g: f32) {
//#if swiglu
    let a = u[i];
    da[i] = g * u3[i] * act_silu_grad(a);
    da3[i] = g * act_silu(a);
//#else
    da[i] = g * act_gelu_grad(u[i]);
//#endif
}
fn gemm_store4(m: u32, n: u32, v: vec4<f32>, v2: vec4<f32>) {
    if (m >= p.rows) {
        return;
    }
    let i = m * p.f + n;
    if (n < p.f) { dh_store(i, v.x); }
    if (n + 1u < p.f) { dh_store(i + 1u, v.y); }
    if (n + 2u < p.f) { dh_store(i + 2u, v.z); }
    if (n + 3u < p.f) { dh_store(i + 3u, v.w); }
}
//#endif

//#if dx
// da [R, F]
@group(0) @binding(1) var<storage, read> da: array<f32>;
// routing [RoutingLayout::len()]
@group(0) @binding(2) var<storage, read> routing: array<u32>;
// w1 [E, D, F]
@group(0) @binding(3) var<storage, read> w1: array<f32>;
// dxs [R, D]
@group(0) @binding(4) var<storage, read_write> dxs: array<f32>;
//#if swiglu
// da3 [R, F]
@group(0) @binding(5) var<storage, read> da3: array<f32>;
// w3 [E, D, F]
@group(0) @binding(6) var<storage, read> w3: array<f32>;

// K = 2F: columns [0, F) of A are da (with W1), [F, 2F) da3 (with W3).
fn kdim() -> u32 { return 2u * p.f; }
// Branch-free: both halves are loaded at an index valid in each, and one is
// selected (branches in the unrolled GEMM core cost CPU drivers minutes of
// shader compilation).
fn a_load(g: u32, k: u32) -> f32 {
    let first = k < p.f;
    let i = a_row[g] + select(k - p.f, k, first);
    return select(da3[i], da[i], first);
}
// B(k, n) = W1[e](n, k), then W3[e](n, k - F)
fn b_load(k: u32, n: u32) -> f32 {
    let first = k < p.f;
    let i = base + n * p.f + select(k - p.f, k, first);
    return select(w3[i], w1[i], first);
}
//#else
fn kdim() -> u32 { return p.f; }
fn a_load(g: u32, k: u32) -> f32 { return da[a_row[g] + k]; }
// B(k, n) = W1[e](n, k)
fn b_load(k: u32, n: u32) -> f32 { return w1[base + n * p.f + k]; }
//#endif
fn ndim() -> u32 { return p.d; }
fn gemm_row_setup(g: u32, m: u32) { a_row[g] = m * p.f; }
fn gemm_store4(m: u32, n: u32, v: vec4<f32>, v2: vec4<f32>) {
    if (m >= p.rows) {
        return;
    }
    let i = m * p.d + n;
    if (n < p.d) { dxs[i] = v.x; }
    if (n + 1u < p.d) { dxs[i + 1u] = v.y; }
    if (n + 2u < p.d) { dxs[i + 2u] = v.z; }
    if (n + 3u < p.d) { dxs[i + 3u] = v.w; }
}
//#endif

//#if rowgemm
// A(row of group g, k..k+4), the slot rows themselves; zeros past K.
fn gemm_load_a4(g: u32, k: u32) -> vec4<f32> {
    let kd = kdim();
    let ks = vec4<u32>(k) + vec4<u32>(0u, 1u, 2u, 3u);
    let kc = min(ks, vec4<u32>(kd - 1u));
    let v = vec4<f32>(a_load(g, kc.x), a_load(g, kc.y), a_load(g, kc.z), a_load(g, kc.w));
    return select(vec4<f32>(0.0), v, ks < vec4<u32>(kd));
}

// B(k, n..n+4) of the transposed weight; zeros past K or N.
fn gemm_load_b4(w: u32, k: u32, n: u32) -> vec4<f32> {
    let kd = kdim();
    let nd = ndim();
    let kc = min(k, kd - 1u);
    let ns = min(vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(nd - 1u));
    let v = vec4<f32>(b_load(kc, ns.x), b_load(kc, ns.y), b_load(kc, ns.z), b_load(kc, ns.w));
    let live = (vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(nd)) & vec4<bool>(k < kd);
    return select(vec4<f32>(0.0), v, live);
}

fn row_main(lid: vec3<u32>, wid: vec3<u32>) {
    let tile = wid.x;
    let e = min(routing[p.tile_expert + min(tile, p.max_tiles - 1u)], p.e - 1u);
    base = e * p.d * p.f;
    let ln = GemmLane(tile * GEMM_TILE_M, wid.y * GEMM_TILE_N, lid.x, lid.y);
    gemm_run(ln, p.rows, kdim());
}
//#endif

//#if dh
//#if swiglu
@compute @workgroup_size(WX, WY)
fn expert_gemm2_backward_swiglu(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    row_main(lid, wid);
}
//#else
@compute @workgroup_size(WX, WY)
fn expert_gemm2_backward_gelu(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    row_main(lid, wid);
}
//#endif
//#endif
//#if dx
//#if swiglu
@compute @workgroup_size(WX, WY)
fn expert_gemm1_backward_swiglu(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    row_main(lid, wid);
}
//#else
@compute @workgroup_size(WX, WY)
fn expert_gemm1_backward(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    row_main(lid, wid);
}
//#endif
//#endif

//#if wgrad
// Weight GEMMs: C[e](m, n) = sum_k A(m, k) B(k, n) over this chunk's rows,
// A(m, k) = src[row k](m) (transposed), B(k, n) = right[row k](n).
var<private> tok_k: u32;
var<private> tok4: vec4<u32>;
var<private> out_base: u32;
//#endif

//#if dw1
// x [T, D]
@group(0) @binding(1) var<storage, read> x: array<f32>;
// token_of_slot [R]
@group(0) @binding(2) var<storage, read> token_of_slot: array<u32>;
// routing [RoutingLayout::len()]
@group(0) @binding(3) var<storage, read> routing: array<u32>;
// da [R, F]
@group(0) @binding(4) var<storage, read> da: array<f32>;
// dw1 [SPLIT, E, D, F] (SPLIT = 1: the gradient itself)
@group(0) @binding(5) var<storage, read_write> dw: array<f32>;

fn mdim() -> u32 { return p.d; }
fn ndim() -> u32 { return p.f; }
fn right_at(r: u32, n: u32) -> f32 { return da[r * p.f + n]; }
// The tokens of rows k..k+4 of the chunk, looked up once per K step.
fn a4_at(col: u32, k: u32) -> vec4<f32> {
    if (k != tok_k) {
        tok_k = k;
        let r = vec4<u32>(base + k) + vec4<u32>(0u, 1u, 2u, 3u);
        let rc = min(r, vec4<u32>(base + kd_ - 1u));
        tok4 = vec4<u32>(token_of_slot[rc.x], token_of_slot[rc.y], token_of_slot[rc.z], token_of_slot[rc.w]);
        tok4 = select(vec4<u32>(0xFFFFFFFFu), tok4, r < vec4<u32>(base + kd_));
    }
    let live = tok4 < vec4<u32>(p.t);
    let tc = select(vec4<u32>(0u), tok4, live) * p.d + col;
    let v = vec4<f32>(x[tc.x], x[tc.y], x[tc.z], x[tc.w]);
    return select(vec4<f32>(0.0), v, live);
}
//#endif

//#if dw2
// h [R, F]
@group(0) @binding(1) var<storage, read> h: array<f32>;
// routing [RoutingLayout::len()]
@group(0) @binding(2) var<storage, read> routing: array<u32>;
// dys [R, D]
@group(0) @binding(3) var<storage, read> dys: array<f32>;
// dw2 [SPLIT, E, F, D] (SPLIT = 1: the gradient itself)
@group(0) @binding(4) var<storage, read_write> dw: array<f32>;

fn mdim() -> u32 { return p.f; }
fn ndim() -> u32 { return p.d; }
fn right_at(r: u32, n: u32) -> f32 { return dys[r * p.d + n]; }
fn a4_at(col: u32, k: u32) -> vec4<f32> {
    let ks = vec4<u32>(k) + vec4<u32>(0u, 1u, 2u, 3u);
    let r = vec4<u32>(base) + min(ks, vec4<u32>(kd_ - 1u));
    let i = r * p.f + col;
    let v = vec4<f32>(h[i.x], h[i.y], h[i.z], h[i.w]);
    return select(vec4<f32>(0.0), v, ks < vec4<u32>(kd_));
}
//#endif

//#if wgrad
fn kdim() -> u32 { return kd_; }
fn gemm_row_setup(g: u32, m: u32) { a_row[g] = m; }
fn gemm_load_a4(g: u32, k: u32) -> vec4<f32> {
    return a4_at(a_row[g], k);
}
fn gemm_load_b4(w: u32, k: u32, n: u32) -> vec4<f32> {
    let nd = ndim();
    let r = base + min(k, kd_ - 1u);
    let ns = min(vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(nd - 1u));
    let v = vec4<f32>(right_at(r, ns.x), right_at(r, ns.y), right_at(r, ns.z), right_at(r, ns.w));
    let live = (vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(nd)) & vec4<bool>(k < kd_);
    return select(vec4<f32>(0.0), v, live);
}
fn gemm_store4(m: u32, n: u32, v: vec4<f32>, v2: vec4<f32>) {
    let md = mdim();
    let nd = ndim();
    if (m >= md) {
        return;
    }
    let i = out_base + m * nd + n;
    if (n < nd) { dw[i] = v.x; }
    if (n + 1u < nd) { dw[i + 1u] = v.y; }
    if (n + 2u < nd) { dw[i + 2u] = v.z; }
    if (n + 3u < nd) { dw[i + 3u] = v.w; }
}

fn wgrad_main(lid: vec3<u32>, wid: vec3<u32>) {
    let e = wid.x / p.m_tiles;
    let mt = wid.x - e * p.m_tiles;
    let z = wid.z;
    let start = routing[p.offsets + e];
    let end = max(routing[p.offsets + e + 1u], start);
    // Chunks of a multiple of 4 rows, so that K steps never straddle two.
    let chunk = (((end - start + p.split - 1u) / p.split) + 3u) / 4u * 4u;
    let k0 = min(start + z * chunk, end);
    let k1 = min(k0 + chunk, end);
    base = k0;
    kd_ = k1 - k0;
    tok_k = 0xFFFFFFFFu;
    out_base = (z * p.e + e) * mdim() * ndim();
    let ln = GemmLane(mt * GEMM_TILE_M, wid.y * GEMM_TILE_N, lid.x, lid.y);
    gemm_run(ln, mdim(), kd_);
}
//#endif

//#if dw1
@compute @workgroup_size(WX, WY)
fn expert_weight_grad_w1(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    wgrad_main(lid, wid);
}
//#endif
//#if dw2
@compute @workgroup_size(WX, WY)
fn expert_weight_grad_w2(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    wgrad_main(lid, wid);
}
//#endif
