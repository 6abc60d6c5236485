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
fn add_matches_twin() {
    common::conformance_family("add");
}

#[test]
fn embedding_matches_twin() {
    common::conformance_family("embedding");
}

#[test]
fn rmsnorm_matches_twin() {
    common::conformance_family("rmsnorm");
}

#[test]
fn cross_entropy_matches_twin() {
    common::conformance_family("cross_entropy");
}

#[test]
fn adamw_matches_twin() {
    common::conformance_family("adamw");
}

#[test]
fn attention_matches_twin() {
    common::conformance_family("attention");
}

#[test]
fn kv_cache_matches_twin() {
    common::conformance_family("kv_cache");
}

#[test]
fn complexity_matches_twin() {
    common::conformance_family("complexity");
}

#[test]
fn qk_matches_twin() {
    common::conformance_family("qk");
}
