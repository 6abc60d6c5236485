//! Every GPU kernel against its CPU twin, on every adapter (conformance cases).

mod common;

#[test]
fn matmul_matches_twin() {
    common::conformance_family("matmul");
}

#[test]
fn gate_matches_twin() {
    common::conformance_family("gate");
}

#[test]
fn route_matches_twin() {
    common::conformance_family("route");
}

#[test]
fn expert_matches_twin() {
    common::conformance_family("expert");
}

#[test]
fn combine_matches_twin() {
    common::conformance_family("combine");
}

#[test]
fn decode_matches_twin() {
    common::conformance_family("decode");
}

#[test]
fn attention_matches_twin() {
    common::conformance_family("attention");
}
