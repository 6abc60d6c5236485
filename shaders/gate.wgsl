// Gate: softmax of the router logits and the expert selection of each token
// (top-1, top-2 or adaptive, Li et al. 2023; or a pretrained model's fixed
// top-k, k <= 8, softmax or sigmoid scores, weights raw or renormalized).
// One invocation per token. Shapes: T tokens, E experts, K slots per token
// (1 for top1, 2 for top2 and adaptive, k for topk). Twin:
// src/reference/gate.rs (gate_forward).
//
// Spec constants prepended by the launcher (src/kernels/gate.rs): WG
// (invocations per workgroup), UNUSED, STATUS_WORD, STATUS_NONFINITE.
//
// The top two experts are chosen on the logits (exact compares; ties go to
// the lower expert index), so the selection itself never depends on rounding.
// Only the adaptive decision reads probabilities; an exact logit tie gives
// p1 = p2 and so gap = 0 exactly.
// A token with a NaN or infinite logit gets no expert (ids UNUSED, weights,
// probs and lse 0) and sets STATUS_NONFINITE in routing[STATUS_WORD].

struct GateParams {
    t: u32,
    e: u32,
    k: u32,
    // 0: gap = p1 - p2 (softmax), 1: gap = (p1 - p2) / (p1 + p2) (top2)
    gap_mode: u32,
    // 0: a one-expert token gets raw p1, 1: it gets 1.0
    single_one: u32,
    threshold: f32,
    // workgroups along x of the (possibly folded) grid
    nx: u32,
    // topk: bit 0 renormalize the weights, bit 1 sigmoid scores, bits 2-3
    // how many of the k a token takes (0 all, 1 gap, 2 ratio, 3 mass; the
    // parameter is threshold)
    flags: u32,
}

@group(0) @binding(0) var<uniform> params: GateParams;
@group(0) @binding(1) var<storage, read> router_logits: array<f32>;        // router_logits [T, E]
@group(0) @binding(2) var<storage, read_write> probs: array<f32>;          // probs [T, E]
@group(0) @binding(3) var<storage, read_write> topk_ids: array<u32>;       // topk_ids [T, K]
@group(0) @binding(4) var<storage, read_write> topk_weights: array<f32>;   // topk_weights [T, K]
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;            // lse [T]
@group(0) @binding(6) var<storage, read_write> routing: array<atomic<u32>>; // routing [RoutingLayout::len()]

const MODE_TOP1: u32 = 0u;
const MODE_TOP2: u32 = 1u;
const MODE_ADAPTIVE: u32 = 2u;

// NaN and +-inf have an all-ones exponent. Tested on the bits: compilers may
// assume floats are never NaN and fold `x != x` away.
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn write_slots(tok: u32, id0: u32, w0: f32, id1: u32, w1: f32) {
    let k = params.k;
    topk_ids[tok * k] = id0;
    topk_weights[tok * k] = w0;
    if k > 1u {
        topk_ids[tok * k + 1u] = id1;
        topk_weights[tok * k + 1u] = w1;
    }
}

// A token with a NaN or infinite logit: no expert (every slot UNUSED,
// weights, probs and lse 0), and the status bit.
fn no_expert(tok: u32) {
    let e = params.e;
    let k = params.k;
    for (var i = 0u; i < e; i++) {
        probs[tok * e + i] = 0.0;
    }
    lse[tok] = 0.0;
    for (var j = 0u; j < k; j++) {
        topk_ids[tok * k + j] = UNUSED;
        topk_weights[tok * k + j] = 0.0;
    }
    atomicOr(&routing[STATUS_WORD], STATUS_NONFINITE);
}

fn gate_token(tok: u32, mode: u32) {
    let e = params.e;
    let base = tok * e;

    // Top two logits; strict `>` keeps the lower index on ties.
    var finite = true;
    var i1 = 0u;
    var l1 = router_logits[base];
    var i2 = UNUSED;
    var l2 = l1;
    finite = is_finite(l1);
    for (var i = 1u; i < e; i++) {
        let v = router_logits[base + i];
        finite = finite && is_finite(v);
        if v > l1 {
            i2 = i1;
            l2 = l1;
            i1 = i;
            l1 = v;
        } else if i2 == UNUSED || v > l2 {
            i2 = i;
            l2 = v;
        }
    }

    if !finite {
        no_expert(tok);
        return;
    }

    // Stable softmax: subtract the max (l1).
    var s = 0.0;
    for (var i = 0u; i < e; i++) {
        s += exp(router_logits[base + i] - l1);
    }
    for (var i = 0u; i < e; i++) {
        probs[base + i] = exp(router_logits[base + i] - l1) / s;
    }
    lse[tok] = l1 + log(s);

    // exp(0) is written as 1 and an exact tie as p2 = p1, whatever the
    // accuracy of this device's exp: then a tie gives gap = 0 exactly.
    let p1 = 1.0 / s;
    // E = 1 has no second expert (top2 and adaptive are rejected by the launcher).
    var p2 = 0.0;
    if i2 != UNUSED {
        p2 = select(exp(l2 - l1), 1.0, l2 == l1) / s;
    }
    let single = select(p1, 1.0, params.single_one != 0u);

    var two = mode == MODE_TOP2;
    if mode == MODE_ADAPTIVE {
        var gap = p1 - p2;
        if params.gap_mode != 0u {
            gap = (p1 - p2) / (p1 + p2);
        }
        // Mathematically in [0, 1]; clamped so that threshold 1 always means two experts.
        gap = clamp(gap, 0.0, 1.0);
        two = gap <= params.threshold;
    }

    if two {
        let denom = p1 + p2;
        write_slots(tok, i1, p1 / denom, i2, p2 / denom);
    } else {
        write_slots(tok, i1, single, UNUSED, 0.0);
    }
}

// A pretrained model's top-k: the k largest logits in order (ties to the
// lower index; each pick is the largest (value, -index) below the previous
// one), weights = their scores, renormalized over the k if asked.
fn gate_topk_token(tok: u32) {
    let e = params.e;
    let k = params.k;
    let base = tok * e;
    var finite = true;
    var l1 = router_logits[base];
    for (var i = 0u; i < e; i++) {
        let v = router_logits[base + i];
        finite = finite && is_finite(v);
        l1 = max(l1, v);
    }
    if !finite {
        no_expert(tok);
        return;
    }
    let sigmoid = (params.flags & 2u) != 0u;
    var s = 0.0;
    for (var i = 0u; i < e; i++) {
        s += exp(router_logits[base + i] - l1);
    }
    for (var i = 0u; i < e; i++) {
        let v = router_logits[base + i];
        if sigmoid {
            probs[base + i] = 1.0 / (1.0 + exp(-v));
        } else {
            probs[base + i] = exp(v - l1) / s;
        }
    }
    lse[tok] = l1 + log(s);
    var pv = 0.0;
    var pi = UNUSED;
    var sum = 0.0;
    for (var j = 0u; j < k; j++) {
        var best = UNUSED;
        var bv = 0.0;
        for (var i = 0u; i < e; i++) {
            let v = router_logits[base + i];
            let after = pi == UNUSED || v < pv || (v == pv && i > pi);
            if after && (best == UNUSED || v > bv) {
                best = i;
                bv = v;
            }
        }
        let w = probs[base + best];
        topk_ids[tok * k + j] = best;
        topk_weights[tok * k + j] = w;
        sum += w;
        pv = bv;
        pi = best;
    }
    // How many of the k: the first always, then expert j joins while the
    // rule holds (ExpertRule in src/kernels/common.rs).
    let rule = (params.flags >> 2u) & 3u;
    var c = k;
    if rule != 0u {
        let p1 = topk_weights[tok * k];
        var taken = p1;
        c = 1u;
        for (var j = 1u; j < k; j++) {
            let prev = topk_weights[tok * k + j - 1u];
            let cur = topk_weights[tok * k + j];
            var join = false;
            if rule == 1u {
                var g = prev - cur;
                if params.gap_mode != 0u {
                    g = g / sum;
                }
                join = clamp(g, 0.0, 1.0) <= params.threshold;
            } else if rule == 2u {
                join = cur >= params.threshold * p1;
            } else {
                join = params.threshold >= 1.0 || taken < params.threshold;
            }
            if !join {
                break;
            }
            taken += cur;
            c += 1u;
        }
        for (var j = c; j < k; j++) {
            topk_ids[tok * k + j] = UNUSED;
            topk_weights[tok * k + j] = 0.0;
        }
    }
    if (params.flags & 1u) != 0u {
        // Renormalized over the experts taken (all k: the sum above).
        var chosen = sum;
        if c < k {
            chosen = 0.0;
            for (var j = 0u; j < c; j++) {
                chosen += topk_weights[tok * k + j];
            }
        }
        for (var j = 0u; j < c; j++) {
            topk_weights[tok * k + j] = topk_weights[tok * k + j] / chosen;
        }
    }
}

fn token_index(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * params.nx) * WG + lid;
}

@compute @workgroup_size(WG)
fn gate_top1_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tok = token_index(wid, lid);
    if tok < params.t {
        gate_token(tok, MODE_TOP1);
    }
}

@compute @workgroup_size(WG)
fn gate_top2_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tok = token_index(wid, lid);
    if tok < params.t {
        gate_token(tok, MODE_TOP2);
    }
}

@compute @workgroup_size(WG)
fn gate_adaptive_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tok = token_index(wid, lid);
    if tok < params.t {
        gate_token(tok, MODE_ADAPTIVE);
    }
}

@compute @workgroup_size(WG)
fn gate_topk_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tok = token_index(wid, lid);
    if tok < params.t {
        gate_topk_token(tok);
    }
}
