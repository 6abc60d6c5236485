// Cross-entropy of the next-token logits, fused with its gradient:
//   cross_entropy_forward_backward:
//     lse[t] = log sum_v exp(logits[t, v])             (max-subtracted)
//     loss[t] = lse[t] - logits[t, targets[t]]
//     logits[t, v] <- (softmax(logits[t])[v] - (v == targets[t])) * scale
//   cross_entropy_forward: loss only, logits untouched (validation)
//   loss_sum: out = (sum_t loss[t], number of counted targets)
// A target >= V (UNUSED = 0xFFFFFFFF marks an ignored position) gives loss 0
// and a zero gradient row, and is not counted by loss_sum.
// Shapes: T rows (tokens), V vocabulary.
// Twin: src/reference/cross_entropy.rs (same entry point names).
//
// One workgroup per row. Pass 1: each invocation keeps an online (max, sum of
// exp) pair over its columns, and the pairs merge in a fixed tree. Pass 2
// (forward_backward) rewrites the row in place with the gradient, which saves
// a [T, V] buffer. The target's logit is read in pass 1 by the invocation
// that owns its column, before anyone overwrites it.
// loss_sum: one workgroup; strided partial sums, then a tree: a fixed order.
//
// Spec constants prepended by the launcher: WG (invocations per workgroup, a
// power of two). Sections `//#if fb`, `//#if fwd`, `//#if sum` pick one entry
// point's bindings.

struct CrossEntropyParams {
    t: u32,
    v: u32,
    // gradient scale (1 / counted targets of the batch)
    scale: f32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
}

@group(0) @binding(0) var<uniform> params: CrossEntropyParams;
//#if fb
@group(0) @binding(1) var<storage, read_write> logits: array<f32>; // logits [T, V] (becomes dlogits)
@group(0) @binding(2) var<storage, read> targets: array<u32>;      // targets [T]
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;   // loss [T]
//#endif
//#if fwd
@group(0) @binding(1) var<storage, read> logits: array<f32>;       // logits [T, V]
@group(0) @binding(2) var<storage, read> targets: array<u32>;      // targets [T]
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;   // loss [T]
//#endif
//#if sum
@group(0) @binding(1) var<storage, read> loss: array<f32>;         // loss [T]
@group(0) @binding(2) var<storage, read> targets: array<u32>;      // targets [T]
@group(0) @binding(3) var<storage, read_write> out: array<f32>;    // out [2]
//#endif

// Stands for -inf as the max of no element: exp(EMPTY - x) is 0 for any
// finite x, and two empty pairs merge without inf - inf.
const EMPTY: f32 = -3.0e38;

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_s: array<f32, WG>;

// Merge the (max, sum of exp(x - max)) pairs of the workgroup in a fixed
// tree; every invocation gets the row's logsumexp.
fn workgroup_lse(lid: u32, m: f32, s: f32) -> f32 {
    red_m[lid] = m;
    red_s[lid] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            let m1 = red_m[lid];
            let m2 = red_m[lid + k];
            let mm = max(m1, m2);
            red_s[lid] = red_s[lid] * exp(m1 - mm) + red_s[lid + k] * exp(m2 - mm);
            red_m[lid] = mm;
        }
        workgroupBarrier();
    }
    let lse = red_m[0] + log(red_s[0]);
    workgroupBarrier();
    return lse;
}

// Pass 1 of a row: its logsumexp; `tlogit` gets the target's logit in the
// invocation that owns the target column (and returns true there).
struct RowStats {
    lse: f32,
    tlogit: f32,
    owner: bool,
}

//#if sum
//#else
fn row_stats(lid: u32, base: u32, n: u32, tgt: u32) -> RowStats {
    var m = EMPTY;
    var s = 0.0;
    var st = RowStats(0.0, 0.0, false);
    for (var c = lid; c < n; c += WG) {
        let x = logits[base + c];
        if c == tgt {
            st.tlogit = x;
            st.owner = true;
        }
        if x > m {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s += exp(x - m);
        }
    }
    st.lse = workgroup_lse(lid, m, s);
    return st;
}
//#endif

//#if fb
@compute @workgroup_size(WG)
fn cross_entropy_forward_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * params.nx;
    if row >= params.t {
        return;
    }
    let v = params.v;
    let base = row * v;
    let tgt = targets[row];
    let ignored = tgt >= v;
    // An ignored row skips pass 1 (no column is read) but keeps the barriers.
    let st = row_stats(lid, base, select(v, 0u, ignored), tgt);
    if ignored {
        if lid == 0u {
            loss[row] = 0.0;
        }
    } else if st.owner {
        loss[row] = st.lse - st.tlogit;
    }
    let scale = select(params.scale, 0.0, ignored);
    for (var c = lid; c < v; c += WG) {
        let p = exp(logits[base + c] - st.lse);
        let grad = select(p, p - 1.0, c == tgt) * scale;
        logits[base + c] = select(grad, 0.0, ignored);
    }
}
//#endif

//#if fwd
@compute @workgroup_size(WG)
fn cross_entropy_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * params.nx;
    if row >= params.t {
        return;
    }
    let v = params.v;
    let tgt = targets[row];
    let ignored = tgt >= v;
    let st = row_stats(lid, row * v, select(v, 0u, ignored), tgt);
    if ignored {
        if lid == 0u {
            loss[row] = 0.0;
        }
    } else if st.owner {
        loss[row] = st.lse - st.tlogit;
    }
}
//#endif

//#if sum
var<workgroup> red_n: array<u32, WG>;

@compute @workgroup_size(WG)
fn loss_sum(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    var n = 0u;
    for (var i = lid; i < params.t; i += WG) {
        s += loss[i];
        n += select(0u, 1u, targets[i] < params.v);
    }
    red_s[lid] = s;
    red_n[lid] = n;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            red_s[lid] += red_s[lid + k];
            red_n[lid] += red_n[lid + k];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        out[0] = red_s[0];
        out[1] = f32(red_n[0]);
    }
}
//#endif
