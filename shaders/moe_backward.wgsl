// Backward of the MoE layer's routing side, all gathers in a fixed order
// (no float atomics). Shapes: T tokens, K slots per token, E experts, D model
// width, R padded slot rows (RoutingLayout::max_rows).
//   combine_backward_slots:   dys[r, :] = w[t, j] * dy[t, :] for the slot r of
//                             (t, j); zeros on padding rows
//   combine_backward_weights: dw[t, j] = <dy[t, :], y_expert[slot_of_token[t, j], :]>
//   gate_stats:               f_e (first choices / T), P_e (mean probability),
//                             the load-balancing and z losses (one workgroup)
//   gate_backward:            dz[t, :] = router-logit gradient from dw, the
//                             load-balancing and the z-loss terms
//   expert_weight_grad_reduce: out[i] = sum_z partial[z, i] (split-K partials)
// Twins: src/reference/combine.rs, gate.rs, expert.rs (same names).
//
// Spec constants prepended by the launcher: WG, UNUSED.

struct MoeBackParams {
    t: u32,
    k: u32,
    e: u32,
    d: u32,
    // R: rows of the slot tensors
    rows: u32,
    // workgroups along x of a folded grid
    nx: u32,
    // 1: a one-expert token's weight is the raw p1 (so it has a gradient)
    raw_single: u32,
    // reduce: elements of one gradient; split: partials to sum
    n: u32,
    split: u32,
    balance: f32,
    z_loss: f32,
    // word of routing holding the padded row count
    padded_rows_word: u32,
    // gate_backward of a top-k router (K up to 8): 0 no (top1, top2,
    // adaptive), 1 weights renormalized over the experts taken, 2 raw
    topk: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: MoeBackParams;

fn linear(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * p.nx) * WG + lid;
}

//#if slots
// dy [T, D]
@group(0) @binding(1) var<storage, read> dy: array<f32>;
// topk_weights [T, K]
@group(0) @binding(2) var<storage, read> topk_weights: array<f32>;
// slot_of_token [T, K]
@group(0) @binding(3) var<storage, read> slot_of_token: array<u32>;
// token_of_slot [R]
@group(0) @binding(4) var<storage, read> token_of_slot: array<u32>;
// routing [RoutingLayout::len()]
@group(0) @binding(5) var<storage, read> routing: array<u32>;
// dys [R, D]
@group(0) @binding(6) var<storage, read_write> dys: array<f32>;

@compute @workgroup_size(WG)
fn combine_backward_slots(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let idx = linear(wid, lid);
    let r = idx / p.d;
    let col = idx - r * p.d;
    if (r >= min(routing[p.padded_rows_word], p.rows)) {
        return;
    }
    let tok = token_of_slot[r];
    var v = 0.0;
    if (tok < p.t) {
        for (var j = 0u; j < p.k; j++) {
            if (slot_of_token[tok * p.k + j] == r) {
                v = topk_weights[tok * p.k + j] * dy[tok * p.d + col];
            }
        }
    }
    dys[r * p.d + col] = v;
}
//#endif

//#if weights
// dy [T, D]
@group(0) @binding(1) var<storage, read> dy: array<f32>;
// slot_of_token [T, K]
@group(0) @binding(2) var<storage, read> slot_of_token: array<u32>;
// y_expert [R, D]
@group(0) @binding(3) var<storage, read> y_expert: array<f32>;
// dw [T, K]
@group(0) @binding(4) var<storage, read_write> dw: array<f32>;

@compute @workgroup_size(WG)
fn combine_backward_weights(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear(wid, lid);
    if (i >= p.t * p.k) {
        return;
    }
    let t = i / p.k;
    let r = slot_of_token[i];
    var acc = 0.0;
    if (r != UNUSED && r < p.rows) {
        for (var c = 0u; c < p.d; c++) {
            acc = fma(dy[t * p.d + c], y_expert[r * p.d + c], acc);
        }
    }
    dw[i] = acc;
}
//#endif

//#if stats
// probs [T, E]
@group(0) @binding(1) var<storage, read> probs: array<f32>;
// topk_ids [T, K]
@group(0) @binding(2) var<storage, read> topk_ids: array<u32>;
// lse [T]
@group(0) @binding(3) var<storage, read> lse: array<f32>;
// stats [2E + 2]: f [E], P [E], balance loss, z loss (coefficients applied)
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;

var<workgroup> zpart: array<f32, WG>;

@compute @workgroup_size(WG)
fn gate_stats(@builtin(local_invocation_index) lid: u32) {
    let tf = f32(p.t);
    for (var e = lid; e < p.e; e += WG) {
        var first = 0.0;
        var psum = 0.0;
        for (var t = 0u; t < p.t; t++) {
            first += select(0.0, 1.0, topk_ids[t * p.k] == e);
            psum += probs[t * p.e + e];
        }
        stats[e] = first / tf;
        stats[p.e + e] = psum / tf;
    }
    var z = 0.0;
    for (var t = lid; t < p.t; t += WG) {
        z = fma(lse[t], lse[t], z);
    }
    zpart[lid] = z;
    storageBarrier();
    workgroupBarrier();
    if (lid == 0u) {
        var bal = 0.0;
        for (var e = 0u; e < p.e; e++) {
            bal = fma(stats[e], stats[p.e + e], bal);
        }
        var zs = 0.0;
        for (var i = 0u; i < WG; i++) {
            zs += zpart[i];
        }
        stats[2u * p.e] = bal * p.balance * f32(p.e);
        stats[2u * p.e + 1u] = zs / tf * p.z_loss;
    }
}
//#endif

//#if gate
// probs [T, E]
@group(0) @binding(1) var<storage, read> probs: array<f32>;
// topk_ids [T, K]
@group(0) @binding(2) var<storage, read> topk_ids: array<u32>;
// topk_weights [T, K]
@group(0) @binding(3) var<storage, read> topk_weights: array<f32>;
// dw [T, K]: gradient of the combine weights
@group(0) @binding(4) var<storage, read> dw: array<f32>;
// lse [T]
@group(0) @binding(5) var<storage, read> lse: array<f32>;
// stats [2E + 2] from gate_stats
@group(0) @binding(6) var<storage, read> stats: array<f32>;
// dz [T, E]
@group(0) @binding(7) var<storage, read_write> dz: array<f32>;

// A top-k router's token: S = its used slots (weights w_j, gradients g_j).
// Renormalized over S: dz_e = w_e (g_e - sum_j w_j g_j) for e in S (one
// expert weighs 1: no gradient); raw scores (w_j = p_j):
// dz_e = p_e ([e in S] g_e - sum_j w_j g_j). Then the auxiliary terms.
fn gate_backward_topk(t: u32, row: u32, bal: f32, zs: f32, dot: f32) {
    var mean = 0.0;
    for (var j = 0u; j < p.k; j++) {
        if (topk_ids[t * p.k + j] != UNUSED) {
            mean = fma(topk_weights[t * p.k + j], dw[t * p.k + j], mean);
        }
    }
    for (var e = 0u; e < p.e; e++) {
        let pe = probs[row + e];
        var taken = false;
        var w = 0.0;
        var g = 0.0;
        for (var j = 0u; j < p.k; j++) {
            if (topk_ids[t * p.k + j] == e) {
                taken = true;
                w = topk_weights[t * p.k + j];
                g = dw[t * p.k + j];
            }
        }
        var v = 0.0;
        if (p.topk == 1u) {
            if (taken) {
                v = w * (g - mean);
            }
        } else {
            v = pe * (g - mean);
        }
        v += bal * pe * (stats[e] - dot) + zs * pe;
        dz[row + e] = v;
    }
}

@compute @workgroup_size(WG)
fn gate_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = linear(wid, lid);
    if (t >= p.t) {
        return;
    }
    let tf = f32(p.t);
    let row = t * p.e;
    let bal = p.balance * f32(p.e) / tf;
    let zs = 2.0 * p.z_loss * lse[t] / tf;
    // <f, p_t>: the softmax's centering of the load-balancing gradient.
    var dot = 0.0;
    for (var e = 0u; e < p.e; e++) {
        dot = fma(stats[e], probs[row + e], dot);
    }
    if (p.topk != 0u) {
        gate_backward_topk(t, row, bal, zs, dot);
        return;
    }
    let e1 = topk_ids[t * p.k];
    var e2 = UNUSED;
    if (p.k > 1u) {
        e2 = topk_ids[t * p.k + 1u];
    }
    let w1 = topk_weights[t * p.k];
    let g1 = dw[t * p.k];
    var w2 = 0.0;
    var g2 = 0.0;
    if (e2 != UNUSED) {
        w2 = topk_weights[t * p.k + 1u];
        g2 = dw[t * p.k + 1u];
    }
    let mean = w1 * g1 + w2 * g2;
    let pe1 = probs[row + min(e1, p.e - 1u)];
    for (var e = 0u; e < p.e; e++) {
        let pe = probs[row + e];
        var v = 0.0;
        if (e2 != UNUSED) {
            // Renormalized over the two: a softmax over the selected logits.
            if (e == e1) {
                v = w1 * (g1 - mean);
            } else if (e == e2) {
                v = w2 * (g2 - mean);
            }
        } else if (p.raw_single == 1u) {
            v = pe * (select(0.0, 1.0, e == e1) - pe1) * g1;
        }
        v += bal * pe * (stats[e] - dot) + zs * pe;
        dz[row + e] = v;
    }
}
//#endif

//#if reduce
// partial [SPLIT, N]
@group(0) @binding(1) var<storage, read> partial: array<f32>;
// out [N]
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn expert_weight_grad_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear(wid, lid);
    if (i >= p.n) {
        return;
    }
    var acc = 0.0;
    for (var z = 0u; z < p.split; z++) {
        acc += partial[z * p.n + i];
    }
    out[i] = acc;
}
//#endif
