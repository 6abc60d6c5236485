//! One MoE layer forward on random data: prints the adapter, then for
//! top-1, top-2 and adaptive gating the routing histogram (tokens per
//! expert) and the share of tokens that took two experts.
//! See README.md in this folder.

use amoe::gpu::{AdapterFilter, GpuContext};
use amoe::kernels::{Activation, GateConfig, Gating};
use amoe::moe::{MoeConfig, MoeLayer, MoeWeights, Path};

fn main() -> amoe::Result<()> {
    let filter = AdapterFilter::from_args(None, None)?;
    let ctx = pollster::block_on(GpuContext::new(&filter))?;
    println!("adapter: {}", ctx.adapter_label());
    let (t, d, f, e) = (512, 64, 128, 8);
    // Random tokens: a deterministic generator, so every run routes alike.
    let mut rng = amoe::util::Rng::new(1);
    let x = rng.vec_sym(t * d, 1.0);
    for gating in [Gating::Top1, Gating::Top2, Gating::Adaptive] {
        let cfg = MoeConfig {
            d,
            f,
            e,
            activation: Activation::Gelu,
            gate: GateConfig {
                threshold: 0.2,
                ..GateConfig::new(gating)
            },
            capacity_factor: None,
        };
        let layer = MoeLayer::new(&ctx, cfg, &MoeWeights::random(&cfg, 7))?;
        let plan = layer.plan(&ctx, t, Path::Grouped)?;
        layer.forward(&ctx, &plan, &x)?;
        let y = pollster::block_on(plan.output(&ctx))?;
        let s = pollster::block_on(plan.routing_summary(&ctx, e))?;
        println!(
            "\n{gating:?}: {t} tokens, {} routed (token, expert) pairs, {:.1}% of tokens on two experts, |y| mean {:.4}",
            s.used_slots,
            100.0 * s.two_expert_fraction,
            y.iter().map(|v| v.abs()).sum::<f32>() / y.len() as f32
        );
        let most = *s.expert_counts.iter().max().unwrap_or(&1) as f64;
        for (i, &c) in s.expert_counts.iter().enumerate() {
            let bar = "#".repeat((40.0 * c as f64 / most).round() as usize);
            println!("  expert {i:>2} {c:>4} {bar}");
        }
    }
    Ok(())
}
