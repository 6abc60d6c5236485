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

/// f16 and block-quantized weights never get the register-blocked GEMM
/// core (its dispatches reading them never complete on Chromium's
/// SwiftShader), on any adapter and shape; f32 weights keep the choice they
/// had, and the stored formats keep every other core.
#[test]
fn stored_weights_never_take_the_blocked_core() {
    use amoe::gpu::Dtype;
    use amoe::kernels::matmul::{MatmulSpec, MatmulVariant, Trans};
    common::for_each_adapter(|ctx| {
        for (m, n, k) in [
            (1, 64, 64),
            (4, 512, 64),
            (7, 13, 5),
            (64, 16, 64),
            (256, 256, 256),
        ] {
            for trans in [Trans::NN, Trans::NT] {
                let f32 = MatmulSpec::choose(ctx, m, n, k, trans);
                assert_eq!(f32.b, Dtype::F32);
                for b in [Dtype::F16, Dtype::Q8, Dtype::Q4] {
                    let stored = MatmulSpec::choose_for(ctx, m, n, k, trans, b);
                    assert_eq!(stored.b, b, "{m}x{n}x{k}");
                    assert_ne!(
                        stored.variant,
                        MatmulVariant::Blocked,
                        "{m}x{n}x{k}: {}",
                        stored.label()
                    );
                    if f32.variant != MatmulVariant::Blocked {
                        assert_eq!(stored, f32.with_b(b), "{m}x{n}x{k}");
                    }
                }
                assert_eq!(MatmulSpec::choose_for(ctx, m, n, k, trans, Dtype::F32), f32);
            }
        }
    });
}
