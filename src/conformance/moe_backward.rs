//! Conformance of one MoE layer's training forward and backward
//! (`MoeLayer::plan_train`: `expert_gemm1_gelu_train`, the
//! `shaders/moe_backward.wgsl` kernels, the expert backward GEMMs, the
//! router GEMMs) against the slot-plan twins composed in
//! `reference::moe_backward::compose`, which the unit tests check against
//! the per-token backward and finite differences.

use super::CheckResult;
use crate::error::Result;
use crate::gpu::GpuContext;
use crate::kernels::{Activation, AuxConfig, ExpertRule, GateConfig, Gating, RouterScore};
use crate::moe::{MoeConfig, MoeLayer, MoeWeights};
use crate::reference::moe_backward::compose;
use crate::tol::{compare_exact, Tol};
use crate::util::Rng;

#[derive(Clone, Debug)]
pub struct Case {
    pub gating: Gating,
    /// `Gating::TopK`: (k, renormalized, rule, its parameter).
    pub topk: Option<(usize, bool, ExpertRule, f32)>,
    pub t: usize,
    pub split: usize,
    /// Capacity factor of the training plan (None: dropless).
    pub capacity_factor: Option<f32>,
    pub activation: Activation,
    pub seed: u64,
    /// With the kernels of a long run (`GpuContext::set_long_running`:
    /// training's choice, lavapipe's subgroup GEMM cores).
    pub long_run: bool,
}

impl Case {
    fn gate(&self) -> GateConfig {
        match self.topk {
            Some((k, renorm, rule, threshold)) => GateConfig {
                rule,
                threshold,
                ..GateConfig::top_k(k, renorm, RouterScore::Softmax)
            },
            None => GateConfig {
                threshold: 0.4,
                ..GateConfig::new(self.gating)
            },
        }
    }

    pub fn names(&self) -> (String, String) {
        (
            "moe_layer_backward".into(),
            format!(
                "{}{} T={} D=24 F=40 E=6 split-K {}{}",
                match self.topk {
                    Some(_) => format!(
                        "{}{}",
                        self.gate().describe(),
                        if self.gate().renorm {
                            " renorm"
                        } else {
                            " raw"
                        }
                    ),
                    None => self.gating.name().to_string(),
                },
                if self.activation == Activation::SwiGlu {
                    " swiglu"
                } else {
                    ""
                },
                self.t,
                self.split,
                match self.capacity_factor {
                    Some(c) => format!(" capacity factor {c}"),
                    None => String::new(),
                }
            ) + if self.long_run {
                ", long-run kernels"
            } else {
                ""
            },
        )
    }
}

pub fn cases() -> Vec<Case> {
    let c = |gating, t, split, seed| Case {
        gating,
        topk: None,
        t,
        split,
        capacity_factor: None,
        activation: Activation::Gelu,
        seed,
        long_run: false,
    };
    let cap = |gating, t, split, factor, seed| Case {
        gating,
        topk: None,
        t,
        split,
        capacity_factor: Some(factor),
        activation: Activation::Gelu,
        seed,
        long_run: false,
    };
    let topk = |k, renorm, rule, threshold, capacity_factor, seed| Case {
        gating: Gating::TopK,
        topk: Some((k, renorm, rule, threshold)),
        t: 70,
        split: 2,
        capacity_factor,
        activation: Activation::SwiGlu,
        seed,
        long_run: false,
    };
    let swiglu = |gating, t, split, capacity_factor, seed| Case {
        gating,
        topk: None,
        t,
        split,
        capacity_factor,
        activation: Activation::SwiGlu,
        seed,
        long_run: false,
    };
    vec![
        c(Gating::Top1, 50, 1, 1),
        c(Gating::Top2, 50, 1, 2),
        c(Gating::Adaptive, 50, 1, 3),
        c(Gating::Adaptive, 130, 3, 4),
        c(Gating::Top2, 1, 1, 5),
        // Slots past capacity dropped: no expert output, no weight gradient.
        cap(Gating::Top1, 50, 1, 0.5, 6),
        cap(Gating::Top2, 50, 1, 0.75, 7),
        cap(Gating::Adaptive, 130, 3, 0.5, 8),
        // SwiGLU experts: da and da3, dx over K = 2F, dW3.
        swiglu(Gating::Top1, 50, 1, None, 9),
        swiglu(Gating::Adaptive, 130, 3, None, 10),
        swiglu(Gating::Top2, 50, 2, Some(0.75), 11),
        // Top-k routers (training `--gating topk` and `--max-experts K`):
        // every slot, a rule that takes 1..k, raw weights, dropped slots.
        topk(5, true, ExpertRule::Fixed, 0.0, None, 12),
        topk(4, false, ExpertRule::Fixed, 0.0, None, 13),
        topk(6, true, ExpertRule::Gap, 0.1, None, 14),
        topk(4, true, ExpertRule::Mass, 0.7, Some(0.8), 15),
        // Training's kernels where they differ (lavapipe's subgroup cores).
        Case {
            long_run: true,
            ..c(Gating::Adaptive, 130, 3, 16)
        },
        Case {
            long_run: true,
            ..swiglu(Gating::Top2, 50, 2, Some(0.75), 17)
        },
        Case {
            long_run: true,
            ..topk(6, true, ExpertRule::Gap, 0.1, None, 18)
        },
    ]
}

/// Whether a long run's kernels differ from the default ones here.
pub fn long_run_differs(ctx: &GpuContext) -> bool {
    crate::kernels::matmul::subgroups_of_8(ctx)
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let was = ctx.long_running();
    ctx.set_long_running(was || case.long_run);
    let r = run_case(ctx, case).await;
    ctx.set_long_running(was);
    r
}

async fn run_case(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let t = case.t;
    let cfg = MoeConfig {
        d: 24,
        f: 40,
        e: 6,
        activation: case.activation,
        gate: case.gate(),
        capacity_factor: case.capacity_factor,
    };
    let w = MoeWeights::random(&cfg, case.seed);
    let mut rng = Rng::new(case.seed + 100);
    let x = rng.vec_sym(t * cfg.d, 1.0);
    let dy = rng.vec_sym(t * cfg.d, 1.0);
    let aux = AuxConfig {
        balance: 0.2,
        z_loss: 0.01,
    };
    let layer = MoeLayer::new(ctx, cfg, &w)?;
    let plan = layer.plan_train(ctx, t, &aux, case.split)?;
    plan.fwd.x.write(ctx, &x)?;
    plan.dy.write(ctx, &dy)?;
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("moe_layer_backward conformance"),
        });
    plan.fwd.clear(&mut enc);
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("moe_layer_backward conformance"),
            timestamp_writes: None,
        });
        plan.fwd.record_pass(&mut pass);
        plan.record_backward(&mut pass);
    }
    ctx.submit_and_wait(enc)?;
    let (fw, layout) = compose::forward(&cfg, &w, &x, t, plan.backward.shape.layout.tile_m)?;
    let want = compose::backward(&cfg, &w, &x, &fw, &layout, &dy, &aux);
    let ids = plan.fwd.topk_ids.read(ctx).await?;
    let routing = plan.fwd.routing.read(ctx).await?;
    let head = crate::kernels::RoutingLayout::HEADER;
    let y = plan.fwd.y.read(ctx).await?;
    let dx = plan.dx.read(ctx).await?;
    let dwr = plan.dw_router.read(ctx).await?;
    let (dw1, dw2, dw3) = plan.expert_grads()?;
    let dw1 = dw1.read(ctx).await?;
    let dw2 = dw2.read(ctx).await?;
    let dw3 = match dw3 {
        Some(t) => t.read(ctx).await?,
        None => Vec::new(),
    };
    let stats = plan.stats().read(ctx).await?;
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[
            ("topk_ids", compare_exact(&ids, &fw.topk_ids)),
            (
                "routing header",
                compare_exact(&routing[..head], &fw.routing[..head]),
            ),
            ("y", Tol::reduction(cfg.f).compare(&y, &fw.y)),
            ("dx", Tol::reduction(cfg.f).compare(&dx, &want.dx)),
            (
                "dw_router",
                Tol::reduction(t).compare(&dwr, &want.dw_router),
            ),
            ("dw1", Tol::reduction(t).compare(&dw1, &want.dw1)),
            ("dw2", Tol::reduction(t).compare(&dw2, &want.dw2)),
            ("dw3", Tol::reduction(t).compare(&dw3, &want.dw3)),
            ("stats", Tol::reduction(t).compare(&stats, &want.stats)),
        ],
    ))
}
