//! One MoE layer's training forward and backward on the GPU against the
//! slot-plan twins, on every adapter (the `moe_backward` conformance family).

mod common;

#[test]
fn moe_backward_matches_twin() {
    common::conformance_family("moe_backward");
}
