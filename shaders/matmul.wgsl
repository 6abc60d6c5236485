// Dense matmul, f32 in (B also as f16 pairs in u32 words: `//#if b16`, or
// block-quantized q8/q4: `//#if packed`, needs shaders/quant.wgsl) / f32
// accumulate, row-major:
//   C[M, N] = alpha * op(A) · op(B) + beta * C
// nn: A [M, K], B [K, N]; nt: B given as [N, K] (A · Bᵀ); tn: A given as
// [K, M] (Aᵀ · B). The transpose is a pair of strides in the params, so one
// entry point, `matmul`, serves all three. Any M, N, K (K = 0 gives beta * C;
// specializations with BETA = 0 never read C). Twin: src/reference/matmul.rs
// (`matmul`, same arguments as the launcher `kernels::matmul::Matmul`).
//
// The file has two parts. The GEMM core (between `//#begin core` and
// `//#end core`) is shared with shaders/expert.wgsl: it runs the K loop and
// the register-level micro-kernel and walks the outputs, and calls three
// functions the including kernel defines (late binding, WGSL resolves
// module-scope names in any order):
//   gemm_row_setup(g, m)                once per row group g, before the K loop:
//                                       the A row m this lane loads for it
//   gemm_load_a4(g, k) -> vec4<f32>     A(that row, k..k+4), zeros past K
//   gemm_load_b4(w, k, n) -> vec4<f32>  B_w(k, n..n+4), zeros past K or N
//   gemm_store4(m, n, v, v2)            epilogue for C(m, n..n+4)
// (`w` selects the B operand: 0, or 1 for the second one when DUAL = 1).
// The row setup is where a kernel resolves indirections such as the token
// gather of the expert GEMM, once per lane instead of once per K step.
//
// Spec constants (prepended by the launcher):
//   WX, WY   workgroup size; lanes along x own column chunks, along y row groups
//   NG       row groups per lane, 1..32; RPG rows per group (8 with
//            subgroups, else 1); at most 128 rows per lane
//   CV       vec4 column chunks per lane (1..4)
//   DUAL     1: two B operands and two accumulators (SwiGLU), else 0
//   BETA     (matmul only) 1: C is read (beta != 0), else 0
// Sections `//#if subgroup` / `//#if tiled` .. `//#else` .. `//#endif` pick the
// variant (kept or dropped by the launcher, so that a module without subgroups
// never mentions them): register-blocked (neither), subgroup (A rows shared by
// subgroupBroadcast within the 8 invocations along x, a subgroup of 8), tiled
// (workgroup-memory tiles, for GPUs).
//
// Why this shape: on CPU adapters (lavapipe/llvmpipe) every storage-buffer
// load of a lane-varying address costs a per-lane loop (~20 cycles per float
// on the 2-core test machine) while FMAs are cheap and spilled accumulators
// cost ordinary stack loads/stores. So each loaded value must feed as many
// FMAs as possible: big per-lane output blocks (up to 128 rows x 16 columns),
// and with subgroups each A value is loaded once per subgroup and broadcast.
// naga bounds every loop with a counter, which stops Mesa from unrolling even
// constant-trip loops, so the hot code is unrolled by hand: guarded lines
// (`if (NG > g)`) that constant-fold away, and pointer-taking helpers that get
// inlined. Loops appear only where indices stay out of the accumulators.

//#begin core
// One accumulator row: up to 4 vec4 column chunks (chunks past CV are never
// touched; the array keeps its 4 so that `[3]` stays a valid constant index).
alias GemmRow = array<vec4<f32>, 4>;
// B values of one 4-deep K step: [kk][chunk].
alias GemmBTile = array<GemmRow, 4>;

//#if subgroup
// Subgroup builtins without an `enable subgroups;` directive: naga 30 rejects
// the directive and gates the builtins on the device's SUBGROUP capability.
const RPG: u32 = 8u;
//#else
const RPG: u32 = 1u;
//#endif
// Outputs of one workgroup: GEMM_TILE_M rows x GEMM_TILE_N columns.
const GEMM_TILE_M: u32 = WY * NG * RPG;
const GEMM_TILE_N: u32 = WX * 4u * CV;
// A lane's accumulators: [row][chunk], NG * RPG <= 128 rows.
alias GemmAcc = array<GemmRow, NG * RPG>;

// acc += a.x * b[0] + a.y * b[1] + a.z * b[2] + a.w * b[3], chunk by chunk
// (four FMAs per accumulator in a row, so a spilled accumulator is loaded
// and stored once per K step).
fn gemm_row(acc: ptr<function, GemmAcc>, r: u32, a: vec4<f32>, b: ptr<function, GemmBTile>) {
    (*acc)[r][0] = fma(vec4(a.w), (*b)[3][0], fma(vec4(a.z), (*b)[2][0], fma(vec4(a.y), (*b)[1][0], fma(vec4(a.x), (*b)[0][0], (*acc)[r][0]))));
    if (CV > 1u) {
        (*acc)[r][1] = fma(vec4(a.w), (*b)[3][1], fma(vec4(a.z), (*b)[2][1], fma(vec4(a.y), (*b)[1][1], fma(vec4(a.x), (*b)[0][1], (*acc)[r][1]))));
    }
    if (CV > 2u) {
        (*acc)[r][2] = fma(vec4(a.w), (*b)[3][2], fma(vec4(a.z), (*b)[2][2], fma(vec4(a.y), (*b)[1][2], fma(vec4(a.x), (*b)[0][2], (*acc)[r][2]))));
    }
    if (CV > 3u) {
        (*acc)[r][3] = fma(vec4(a.w), (*b)[3][3], fma(vec4(a.z), (*b)[2][3], fma(vec4(a.y), (*b)[1][3], fma(vec4(a.x), (*b)[0][3], (*acc)[r][3]))));
    }
}

// Row group g of one K step. `a` holds this lane's A values (4 K steps) of
// the row it loaded for the group.
//#if subgroup
fn gemm_group(acc: ptr<function, GemmAcc>, g: u32, a: vec4<f32>, b: ptr<function, GemmBTile>) {
    // Lane l loaded row 8g + l: every lane gets all eight rows by broadcast.
    let r = g * 8u;
    gemm_row(acc, r, subgroupBroadcast(a, 0u), b);
    gemm_row(acc, r + 1u, subgroupBroadcast(a, 1u), b);
    gemm_row(acc, r + 2u, subgroupBroadcast(a, 2u), b);
    gemm_row(acc, r + 3u, subgroupBroadcast(a, 3u), b);
    gemm_row(acc, r + 4u, subgroupBroadcast(a, 4u), b);
    gemm_row(acc, r + 5u, subgroupBroadcast(a, 5u), b);
    gemm_row(acc, r + 6u, subgroupBroadcast(a, 6u), b);
    gemm_row(acc, r + 7u, subgroupBroadcast(a, 7u), b);
}
//#else
fn gemm_group(acc: ptr<function, GemmAcc>, g: u32, a: vec4<f32>, b: ptr<function, GemmBTile>) {
    gemm_row(acc, g, a, b);
}
//#endif

// Where a lane's rows and columns are. Row l of group g of lane (lx, ly):
// rows of groups interleave across the WY lanes along y, so that a tiled
// workgroup reads its A tile row-contiguously.
struct GemmLane {
    m0: u32,
    n0: u32,
    lx: u32,
    ly: u32,
}

fn gemm_row_of(ln: GemmLane, g: u32, l: u32) -> u32 {
    return ln.m0 + (ln.ly + WY * g) * RPG + l;
}

fn gemm_col_of(ln: GemmLane, j: u32) -> u32 {
    return ln.n0 + 4u * (ln.lx + WX * j);
}

// The row this lane loads for group g (with subgroups: one of the 8, by lane).
fn gemm_load_row(ln: GemmLane, g: u32, m: u32) -> u32 {
    return min(gemm_row_of(ln, g, select(0u, ln.lx, RPG > 1u)), m - 1u);
}

fn gemm_load_brow(b: ptr<function, GemmBTile>, kk: u32, w: u32, ln: GemmLane, k: u32) {
    (*b)[kk][0] = gemm_load_b4(w, k, gemm_col_of(ln, 0u));
    if (CV > 1u) {
        (*b)[kk][1] = gemm_load_b4(w, k, gemm_col_of(ln, 1u));
    }
    if (CV > 2u) {
        (*b)[kk][2] = gemm_load_b4(w, k, gemm_col_of(ln, 2u));
    }
    if (CV > 3u) {
        (*b)[kk][3] = gemm_load_b4(w, k, gemm_col_of(ln, 3u));
    }
}

fn gemm_load_btile(b: ptr<function, GemmBTile>, w: u32, ln: GemmLane, k: u32) {
    gemm_load_brow(b, 0u, w, ln, k);
    gemm_load_brow(b, 1u, w, ln, k + 1u);
    gemm_load_brow(b, 2u, w, ln, k + 2u);
    gemm_load_brow(b, 3u, w, ln, k + 3u);
}

fn gemm_step(acc: ptr<function, GemmAcc>, acc2: ptr<function, GemmAcc>, g: u32, a: vec4<f32>, b: ptr<function, GemmBTile>, b2: ptr<function, GemmBTile>) {
    gemm_group(acc, g, a, b);
    if (DUAL == 1u) {
        gemm_group(acc2, g, a, b2);
    }
}

//#if tiled
// Workgroup-memory tiles (for GPUs): WX = WY = 16, NG = 4, CV = 1: a 64 x 64
// output tile, 4 x 4 outputs per invocation, K in steps of 16.
const GEMM_TK: u32 = 16u;
// A tile [64 rows][4 k-quads], B tiles [16 k][16 column chunks].
var<workgroup> gemm_ta: array<vec4<f32>, 256>;
var<workgroup> gemm_tb: array<vec4<f32>, 256>;
var<workgroup> gemm_tb2: array<vec4<f32>, 256>;

fn gemm_mainloop(acc: ptr<function, GemmAcc>, acc2: ptr<function, GemmAcc>, ln: GemmLane, m: u32, kd: u32) {
    let t = ln.lx + 16u * ln.ly;
    // What this invocation loads: A row t / 4, k-quad t % 4; B k t / 16, chunk t % 16.
    gemm_row_setup(0u, min(ln.m0 + t / 4u, m - 1u));
    let ak = 4u * (t % 4u);
    let bk = t / 16u;
    let bn = ln.n0 + 4u * (t % 16u);
    for (var k0 = 0u; k0 < kd; k0 += GEMM_TK) {
        gemm_ta[t] = gemm_load_a4(0u, k0 + ak);
        gemm_tb[t] = gemm_load_b4(0u, k0 + bk, bn);
        if (DUAL == 1u) {
            gemm_tb2[t] = gemm_load_b4(1u, k0 + bk, bn);
        }
        workgroupBarrier();
        for (var q = 0u; q < 4u; q++) {
            var b: GemmBTile;
            var b2: GemmBTile;
            let i = 64u * q + ln.lx;
            b[0][0] = gemm_tb[i];
            b[1][0] = gemm_tb[i + 16u];
            b[2][0] = gemm_tb[i + 32u];
            b[3][0] = gemm_tb[i + 48u];
            if (DUAL == 1u) {
                b2[0][0] = gemm_tb2[i];
                b2[1][0] = gemm_tb2[i + 16u];
                b2[2][0] = gemm_tb2[i + 32u];
                b2[3][0] = gemm_tb2[i + 48u];
            }
            // Rows ly + 16 g of the tile, g = 0..3.
            gemm_step(acc, acc2, 0u, gemm_ta[ln.ly * 4u + q], &b, &b2);
            gemm_step(acc, acc2, 1u, gemm_ta[(ln.ly + 16u) * 4u + q], &b, &b2);
            gemm_step(acc, acc2, 2u, gemm_ta[(ln.ly + 32u) * 4u + q], &b, &b2);
            gemm_step(acc, acc2, 3u, gemm_ta[(ln.ly + 48u) * 4u + q], &b, &b2);
        }
        workgroupBarrier();
    }
}
//#else
// Register-blocked K loop (no workgroup memory): m = rows of A (loads clamp
// to it), kd = K.
fn gemm_mainloop(acc: ptr<function, GemmAcc>, acc2: ptr<function, GemmAcc>, ln: GemmLane, m: u32, kd: u32) {
    gemm_row_setup(0u, gemm_load_row(ln, 0u, m));
    if (NG > 1u) { gemm_row_setup(1u, gemm_load_row(ln, 1u, m)); }
    if (NG > 2u) { gemm_row_setup(2u, gemm_load_row(ln, 2u, m)); }
    if (NG > 3u) { gemm_row_setup(3u, gemm_load_row(ln, 3u, m)); }
    if (NG > 4u) { gemm_row_setup(4u, gemm_load_row(ln, 4u, m)); }
    if (NG > 5u) { gemm_row_setup(5u, gemm_load_row(ln, 5u, m)); }
    if (NG > 6u) { gemm_row_setup(6u, gemm_load_row(ln, 6u, m)); }
    if (NG > 7u) { gemm_row_setup(7u, gemm_load_row(ln, 7u, m)); }
    if (NG > 8u) { gemm_row_setup(8u, gemm_load_row(ln, 8u, m)); }
    if (NG > 9u) { gemm_row_setup(9u, gemm_load_row(ln, 9u, m)); }
    if (NG > 10u) { gemm_row_setup(10u, gemm_load_row(ln, 10u, m)); }
    if (NG > 11u) { gemm_row_setup(11u, gemm_load_row(ln, 11u, m)); }
    if (NG > 12u) { gemm_row_setup(12u, gemm_load_row(ln, 12u, m)); }
    if (NG > 13u) { gemm_row_setup(13u, gemm_load_row(ln, 13u, m)); }
    if (NG > 14u) { gemm_row_setup(14u, gemm_load_row(ln, 14u, m)); }
    if (NG > 15u) { gemm_row_setup(15u, gemm_load_row(ln, 15u, m)); }
    if (NG > 16u) { gemm_row_setup(16u, gemm_load_row(ln, 16u, m)); }
    if (NG > 17u) { gemm_row_setup(17u, gemm_load_row(ln, 17u, m)); }
    if (NG > 18u) { gemm_row_setup(18u, gemm_load_row(ln, 18u, m)); }
    if (NG > 19u) { gemm_row_setup(19u, gemm_load_row(ln, 19u, m)); }
    if (NG > 20u) { gemm_row_setup(20u, gemm_load_row(ln, 20u, m)); }
    if (NG > 21u) { gemm_row_setup(21u, gemm_load_row(ln, 21u, m)); }
    if (NG > 22u) { gemm_row_setup(22u, gemm_load_row(ln, 22u, m)); }
    if (NG > 23u) { gemm_row_setup(23u, gemm_load_row(ln, 23u, m)); }
    if (NG > 24u) { gemm_row_setup(24u, gemm_load_row(ln, 24u, m)); }
    if (NG > 25u) { gemm_row_setup(25u, gemm_load_row(ln, 25u, m)); }
    if (NG > 26u) { gemm_row_setup(26u, gemm_load_row(ln, 26u, m)); }
    if (NG > 27u) { gemm_row_setup(27u, gemm_load_row(ln, 27u, m)); }
    if (NG > 28u) { gemm_row_setup(28u, gemm_load_row(ln, 28u, m)); }
    if (NG > 29u) { gemm_row_setup(29u, gemm_load_row(ln, 29u, m)); }
    if (NG > 30u) { gemm_row_setup(30u, gemm_load_row(ln, 30u, m)); }
    if (NG > 31u) { gemm_row_setup(31u, gemm_load_row(ln, 31u, m)); }
    for (var k = 0u; k < kd; k += 4u) {
        var b: GemmBTile;
        var b2: GemmBTile;
        gemm_load_btile(&b, 0u, ln, k);
        if (DUAL == 1u) {
            gemm_load_btile(&b2, 1u, ln, k);
        }
        gemm_step(acc, acc2, 0u, gemm_load_a4(0u, k), &b, &b2);
        if (NG > 1u) { gemm_step(acc, acc2, 1u, gemm_load_a4(1u, k), &b, &b2); }
        if (NG > 2u) { gemm_step(acc, acc2, 2u, gemm_load_a4(2u, k), &b, &b2); }
        if (NG > 3u) { gemm_step(acc, acc2, 3u, gemm_load_a4(3u, k), &b, &b2); }
        if (NG > 4u) { gemm_step(acc, acc2, 4u, gemm_load_a4(4u, k), &b, &b2); }
        if (NG > 5u) { gemm_step(acc, acc2, 5u, gemm_load_a4(5u, k), &b, &b2); }
        if (NG > 6u) { gemm_step(acc, acc2, 6u, gemm_load_a4(6u, k), &b, &b2); }
        if (NG > 7u) { gemm_step(acc, acc2, 7u, gemm_load_a4(7u, k), &b, &b2); }
        if (NG > 8u) { gemm_step(acc, acc2, 8u, gemm_load_a4(8u, k), &b, &b2); }
        if (NG > 9u) { gemm_step(acc, acc2, 9u, gemm_load_a4(9u, k), &b, &b2); }
        if (NG > 10u) { gemm_step(acc, acc2, 10u, gemm_load_a4(10u, k), &b, &b2); }
        if (NG > 11u) { gemm_step(acc, acc2, 11u, gemm_load_a4(11u, k), &b, &b2); }
        if (NG > 12u) { gemm_step(acc, acc2, 12u, gemm_load_a4(12u, k), &b, &b2); }
        if (NG > 13u) { gemm_step(acc, acc2, 13u, gemm_load_a4(13u, k), &b, &b2); }
        if (NG > 14u) { gemm_step(acc, acc2, 14u, gemm_load_a4(14u, k), &b, &b2); }
        if (NG > 15u) { gemm_step(acc, acc2, 15u, gemm_load_a4(15u, k), &b, &b2); }
        if (NG > 16u) { gemm_step(acc, acc2, 16u, gemm_load_a4(16u, k), &b, &b2); }
        if (NG > 17u) { gemm_step(acc, acc2, 17u, gemm_load_a4(17u, k), &b, &b2); }
        if (NG > 18u) { gemm_step(acc, acc2, 18u, gemm_load_a4(18u, k), &b, &b2); }
        if (NG > 19u) { gemm_step(acc, acc2, 19u, gemm_load_a4(19u, k), &b, &b2); }
        if (NG > 20u) { gemm_step(acc, acc2, 20u, gemm_load_a4(20u, k), &b, &b2); }
        if (NG > 21u) { gemm_step(acc, acc2, 21u, gemm_load_a4(21u, k), &b, &b2); }
        if (NG > 22u) { gemm_step(acc, acc2, 22u, gemm_load_a4(22u, k), &b, &b2); }
        if (NG > 23u) { gemm_step(acc, acc2, 23u, gemm_load_a4(23u, k), &b, &b2); }
        if (NG > 24u) { gemm_step(acc, acc2, 24u, gemm_load_a4(24u, k), &b, &b2); }
        if (NG > 25u) { gemm_step(acc, acc2, 25u, gemm_load_a4(25u, k), &b, &b2); }
        if (NG > 26u) { gemm_step(acc, acc2, 26u, gemm_load_a4(26u, k), &b, &b2); }
        if (NG > 27u) { gemm_step(acc, acc2, 27u, gemm_load_a4(27u, k), &b, &b2); }
        if (NG > 28u) { gemm_step(acc, acc2, 28u, gemm_load_a4(28u, k), &b, &b2); }
        if (NG > 29u) { gemm_step(acc, acc2, 29u, gemm_load_a4(29u, k), &b, &b2); }
        if (NG > 30u) { gemm_step(acc, acc2, 30u, gemm_load_a4(30u, k), &b, &b2); }
        if (NG > 31u) { gemm_step(acc, acc2, 31u, gemm_load_a4(31u, k), &b, &b2); }
    }
}

//#endif

fn gemm_store_row(acc: ptr<function, GemmAcc>, acc2: ptr<function, GemmAcc>, ln: GemmLane, g: u32, l: u32) {
    let r = g * RPG + l;
    let m = gemm_row_of(ln, g, l);
    gemm_store4(m, gemm_col_of(ln, 0u), (*acc)[r][0], (*acc2)[r][0]);
    if (CV > 1u) {
        gemm_store4(m, gemm_col_of(ln, 1u), (*acc)[r][1], (*acc2)[r][1]);
    }
    if (CV > 2u) {
        gemm_store4(m, gemm_col_of(ln, 2u), (*acc)[r][2], (*acc2)[r][2]);
    }
    if (CV > 3u) {
        gemm_store4(m, gemm_col_of(ln, 3u), (*acc)[r][3], (*acc2)[r][3]);
    }
}

//#if subgroup
fn gemm_store_group(acc: ptr<function, GemmAcc>, acc2: ptr<function, GemmAcc>, ln: GemmLane, g: u32) {
    gemm_store_row(acc, acc2, ln, g, 0u);
    gemm_store_row(acc, acc2, ln, g, 1u);
    gemm_store_row(acc, acc2, ln, g, 2u);
    gemm_store_row(acc, acc2, ln, g, 3u);
    gemm_store_row(acc, acc2, ln, g, 4u);
    gemm_store_row(acc, acc2, ln, g, 5u);
    gemm_store_row(acc, acc2, ln, g, 6u);
    gemm_store_row(acc, acc2, ln, g, 7u);
}
//#else
fn gemm_store_group(acc: ptr<function, GemmAcc>, acc2: ptr<function, GemmAcc>, ln: GemmLane, g: u32) {
    gemm_store_row(acc, acc2, ln, g, 0u);
}
//#endif

// Run the whole GEMM of one workgroup tile and call gemm_store4 for every
// output chunk this lane owns (rows may lie past M: the epilogue checks).
fn gemm_run(ln: GemmLane, m: u32, kd: u32) {
    var acc: GemmAcc;
    var acc2: GemmAcc;
    gemm_mainloop(&acc, &acc2, ln, m, kd);
    gemm_store_group(&acc, &acc2, ln, 0u);
    if (NG > 1u) { gemm_store_group(&acc, &acc2, ln, 1u); }
    if (NG > 2u) { gemm_store_group(&acc, &acc2, ln, 2u); }
    if (NG > 3u) { gemm_store_group(&acc, &acc2, ln, 3u); }
    if (NG > 4u) { gemm_store_group(&acc, &acc2, ln, 4u); }
    if (NG > 5u) { gemm_store_group(&acc, &acc2, ln, 5u); }
    if (NG > 6u) { gemm_store_group(&acc, &acc2, ln, 6u); }
    if (NG > 7u) { gemm_store_group(&acc, &acc2, ln, 7u); }
    if (NG > 8u) { gemm_store_group(&acc, &acc2, ln, 8u); }
    if (NG > 9u) { gemm_store_group(&acc, &acc2, ln, 9u); }
    if (NG > 10u) { gemm_store_group(&acc, &acc2, ln, 10u); }
    if (NG > 11u) { gemm_store_group(&acc, &acc2, ln, 11u); }
    if (NG > 12u) { gemm_store_group(&acc, &acc2, ln, 12u); }
    if (NG > 13u) { gemm_store_group(&acc, &acc2, ln, 13u); }
    if (NG > 14u) { gemm_store_group(&acc, &acc2, ln, 14u); }
    if (NG > 15u) { gemm_store_group(&acc, &acc2, ln, 15u); }
    if (NG > 16u) { gemm_store_group(&acc, &acc2, ln, 16u); }
    if (NG > 17u) { gemm_store_group(&acc, &acc2, ln, 17u); }
    if (NG > 18u) { gemm_store_group(&acc, &acc2, ln, 18u); }
    if (NG > 19u) { gemm_store_group(&acc, &acc2, ln, 19u); }
    if (NG > 20u) { gemm_store_group(&acc, &acc2, ln, 20u); }
    if (NG > 21u) { gemm_store_group(&acc, &acc2, ln, 21u); }
    if (NG > 22u) { gemm_store_group(&acc, &acc2, ln, 22u); }
    if (NG > 23u) { gemm_store_group(&acc, &acc2, ln, 23u); }
    if (NG > 24u) { gemm_store_group(&acc, &acc2, ln, 24u); }
    if (NG > 25u) { gemm_store_group(&acc, &acc2, ln, 25u); }
    if (NG > 26u) { gemm_store_group(&acc, &acc2, ln, 26u); }
    if (NG > 27u) { gemm_store_group(&acc, &acc2, ln, 27u); }
    if (NG > 28u) { gemm_store_group(&acc, &acc2, ln, 28u); }
    if (NG > 29u) { gemm_store_group(&acc, &acc2, ln, 29u); }
    if (NG > 30u) { gemm_store_group(&acc, &acc2, ln, 30u); }
    if (NG > 31u) { gemm_store_group(&acc, &acc2, ln, 31u); }
}
//#end core

// ---------------------------------------------------------------------------
// Dense matmul kernels.

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    // Row tiles per x-row of the grid (grids past the per-dimension limit
    // fold row tiles into z).
    grid_x: u32,
    alpha: f32,
    beta: f32,
    // Element strides: A(m, k) = a[m * a_sm + k * a_sk], B(k, n) = b[k * b_sk + n * b_sn].
    // They encode the transpose (nn, nt, tn), so one pipeline serves all three.
    a_sm: u32,
    a_sk: u32,
    b_sk: u32,
    b_sn: u32,
    // C(m, n) = c[c0 + m * ldc + n]: C is columns c0 .. c0 + N of a wider
    // row-major matrix of ldc columns (ldc = N, c0 = 0 for all of it).
    ldc: u32,
    c0: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
// a [M, K] (nn, nt) or [K, M] (tn)
@group(0) @binding(1) var<storage, read> a: array<f32>;
//#if packed
// b [K, N] (nn, tn) or [N, K] (nt), block-quantized (q8 with flag q8, else
// q4; shaders/quant.wgsl): packed u32 words, dequantized in registers
@group(0) @binding(2) var<storage, read> b: array<u32>;

fn b_at(i: u32) -> f32 {
//#if q8
    let at = q8_value_at(i);
    return q8_value(b[at.x], b[at.y], i);
//#else
    let at = q4_value_at(i);
    return q4_value(b[at.x], b[at.y], i);
//#endif
}

// Values 4r .. 4r + 3 of b (one block: one codes word and one scale).
fn b_group(r: u32) -> vec4<f32> {
//#if q8
    let at = q8_group_at(r);
    return q8_group(b[at.x], b[at.y], r);
//#else
    let at = q4_group_at(r);
    return q4_group(b[at.x], b[at.y], r);
//#endif
}
//#else
//#if b16
// b [K, N] (nn, tn) or [N, K] (nt), f16 pairs packed in u32 words
@group(0) @binding(2) var<storage, read> b: array<u32>;

fn b_at(i: u32) -> f32 {
    return unpack_f16x2(b[i >> 1u])[i & 1u];
}
//#else
// b [K, N] (nn, tn) or [N, K] (nt)
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn b_at(i: u32) -> f32 {
    return b[i];
}
//#endif
//#endif
// c [M, N]
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// Start in `a` of the row each row group loads (set before the K loop).
var<private> a_row: array<u32, NG>;

fn gemm_row_setup(g: u32, m: u32) {
    a_row[g] = m * p.a_sm;
}

// A(row of group g, k..k+4); zeros past K.
fn gemm_load_a4(g: u32, k: u32) -> vec4<f32> {
    let ks = vec4<u32>(k) + vec4<u32>(0u, 1u, 2u, 3u);
    let i = vec4<u32>(a_row[g]) + min(ks, vec4<u32>(p.k - 1u)) * p.a_sk;
    let v = vec4<f32>(a[i.x], a[i.y], a[i.z], a[i.w]);
    return select(vec4<f32>(0.0), v, ks < vec4<u32>(p.k));
}

// B(k, n..n+4); zeros past K or N.
fn gemm_load_b4(w: u32, k: u32, n: u32) -> vec4<f32> {
    let ns = vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u);
    let live = (ns < vec4<u32>(p.n)) & vec4<bool>(k < p.k);
//#if b16
    // n is a multiple of 4: with B's rows contiguous, N a multiple of 4
    // (so every row starts on an even element) the four halves are two
    // whole words, and columns n..n+4 are all inside N or all past it.
    if (p.b_sn == 1u && (p.n & 3u) == 0u && (p.b_sk & 1u) == 0u) {
        let i = (min(k, p.k - 1u) * p.b_sk + min(n, p.n - 4u)) >> 1u;
        let v = vec4<f32>(unpack_f16x2(b[i]), unpack_f16x2(b[i + 1u]));
        return select(vec4<f32>(0.0), v, live);
    }
//#endif
//#if packed
    // Likewise (row length a multiple of 4) the four values are one group
    // of one block: one codes word and one scale word.
    if (p.b_sn == 1u && (p.n & 3u) == 0u && (p.b_sk & 3u) == 0u) {
        let r = (min(k, p.k - 1u) * p.b_sk + min(n, p.n - 4u)) >> 2u;
        return select(vec4<f32>(0.0), b_group(r), live);
    }
//#endif
    let i = vec4<u32>(min(k, p.k - 1u) * p.b_sk) + min(ns, vec4<u32>(p.n - 1u)) * p.b_sn;
    let v = vec4<f32>(b_at(i.x), b_at(i.y), b_at(i.z), b_at(i.w));
    return select(vec4<f32>(0.0), v, live);
}

fn store_c(i: u32, v: f32) {
    // BETA = 0 never reads C (it may hold anything, NaN included).
    if (BETA == 1u) {
        c[i] = p.alpha * v + p.beta * c[i];
    } else {
        c[i] = p.alpha * v;
    }
}

// C(m, n..n+4) = alpha * v (+ beta * C): the part inside [M, N].
fn gemm_store4(m: u32, n: u32, v: vec4<f32>, v2: vec4<f32>) {
    if (m >= p.m) {
        return;
    }
    let i = p.c0 + m * p.ldc + n;
    if (n < p.n) {
        store_c(i, v.x);
    }
    if (n + 1u < p.n) {
        store_c(i + 1u, v.y);
    }
    if (n + 2u < p.n) {
        store_c(i + 2u, v.z);
    }
    if (n + 3u < p.n) {
        store_c(i + 3u, v.w);
    }
}

@compute @workgroup_size(WX, WY)
fn matmul(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tile_m = wid.x + wid.z * p.grid_x;
    let ln = GemmLane(tile_m * GEMM_TILE_M, wid.y * GEMM_TILE_N, lid.x, lid.y);
    gemm_run(ln, p.m, p.k);
}
