//! Expert parallelism, one MoE layer's forward (ranks as threads of one
//! process over channels): each rank routes its own tokens on the GPU, the
//! routed rows go to their experts' ranks (`train::expert_parallel`), each
//! rank runs only its experts (`MoeLayer::plan_rows`) on what it received,
//! the outputs come back into the sender's slot order and the sender's
//! combine runs. The output must be the one-process layer's.

mod common;

use amoe::gpu::GpuContext;
use amoe::kernels::{Activation, GateConfig, Gating, RoutingLayout};
use amoe::moe::{MoeConfig, MoeLayer, MoeWeights, Path};
use amoe::tol::Tol;
use amoe::train::collective::{Comm, ThreadTransport, Transport};
use amoe::train::expert_parallel::{dispatch, give_back, ExpertSplit, SlotPlan};

/// The bank of experts `owned` of `w`: their w1, w3, w2 (the router is
/// not the bank's: zeros of the bank's shape).
fn bank(cfg: &MoeConfig, w: &MoeWeights, owned: std::ops::Range<usize>) -> (MoeConfig, MoeWeights) {
    let (d, f) = (cfg.d, cfg.f);
    let per = d * f;
    let take = |v: &Vec<f32>| v[owned.start * per..owned.end * per].to_vec();
    let e = owned.len();
    (
        MoeConfig { e, ..*cfg },
        MoeWeights {
            w_router: vec![0.0; d * e],
            w1: take(&w.w1),
            w3: w.w3.as_ref().map(take),
            w2: take(&w.w2),
        },
    )
}

fn encode(ctx: &GpuContext, body: impl FnOnce(&mut wgpu::ComputePass<'_>)) -> wgpu::CommandEncoder {
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        body(&mut pass);
    }
    enc
}

/// One rank's layer forward with its experts on the experts' ranks.
fn expert_parallel_forward(
    ctx: &GpuContext,
    comm: &Comm,
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &[f32],
    max_rows: usize,
) -> Vec<f32> {
    let (d, e) = (cfg.d, cfg.e);
    let t = x.len() / d;
    let split = ExpertSplit::new(e, comm.size()).unwrap();
    // The router, gate and route on this rank's tokens (the sender's layer
    // uses only its router here).
    let layer = MoeLayer::new(ctx, *cfg, w).unwrap();
    let plan = layer.plan(ctx, t, Path::Grouped).unwrap();
    plan.x.write(ctx, x).unwrap();
    let mut clear = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    plan.clear(&mut clear);
    ctx.submit_and_wait(clear).unwrap();
    ctx.submit_and_wait(encode(ctx, |pass| {
        assert!(plan.record_routing(pass));
    }))
    .unwrap();
    let words = pollster::block_on(plan.routing.read(ctx)).unwrap();
    let (token_of_slot, y_expert) = plan.slot_buffers().unwrap();
    let tos = pollster::block_on(token_of_slot.read(ctx)).unwrap();
    let h = RoutingLayout::HEADER;
    let slots = SlotPlan {
        counts: &words[h..h + e],
        offsets: &words[h + e..h + 2 * e + 1],
        token_of_slot: &tos,
    };

    // The rows to their experts' ranks; this rank's experts on what came.
    let got = dispatch(comm, &split, &slots, d, |_, tok| &x[tok * d..(tok + 1) * d]).unwrap();
    let (bcfg, bw) = bank(cfg, w, split.owned(comm.rank()));
    let bank = MoeLayer::new(ctx, bcfg, &bw).unwrap();
    let rows = bank.plan_rows(ctx, max_rows).unwrap();
    rows.write(ctx, &got.rows, &got.local_expert).unwrap();
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    rows.record(&mut enc);
    ctx.submit_and_wait(enc).unwrap();
    let out = pollster::block_on(rows.y.read(ctx)).unwrap();

    // The outputs back into this rank's slot order, then its combine.
    let back = give_back(comm, &split, &slots, &got, &out[..got.len() * d], tos.len()).unwrap();
    y_expert.write(ctx, &back).unwrap();
    ctx.submit_and_wait(encode(ctx, |pass| {
        assert!(plan.record_combine(pass));
    }))
    .unwrap();
    pollster::block_on(plan.output(ctx)).unwrap()
}

#[test]
fn a_layer_with_its_experts_on_other_ranks_equals_one_process() {
    let cases = [
        (Gating::Top2, Activation::Gelu, 4, 2),
        (Gating::Adaptive, Activation::SwiGlu, 4, 2),
        (Gating::Top1, Activation::Gelu, 6, 3),
        (Gating::Adaptive, Activation::Gelu, 4, 1),
    ];
    common::on_first_adapter(|ctx| {
        for (gating, act, e, n) in cases {
            let cfg = MoeConfig {
                d: 16,
                f: 24,
                e,
                activation: act,
                gate: GateConfig::new(gating),
                capacity_factor: None,
            };
            let w = MoeWeights::random(&cfg, 5);
            // Ranks route different token counts.
            let xs: Vec<Vec<f32>> = (0..n)
                .map(|r| amoe::util::Rng::new(11 + r as u64).vec_sym((19 + 6 * r) * cfg.d, 1.0))
                .collect();
            let max_rows = xs.iter().map(|x| x.len() / cfg.d * 2).sum();
            let ys: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadTransport::group(n)
                    .into_iter()
                    .map(|tr| {
                        let (cfg, w, xs) = (&cfg, &w, &xs);
                        s.spawn(move || {
                            let h = ctx.handle();
                            let r = tr.rank();
                            let comm = Comm::new(Box::new(tr));
                            expert_parallel_forward(&h, &comm, cfg, w, &xs[r], max_rows)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let layer = MoeLayer::new(ctx, cfg, &w).unwrap();
            for (r, (x, y)) in xs.iter().zip(&ys).enumerate() {
                let t = x.len() / cfg.d;
                let plan = layer.plan(ctx, t, Path::Grouped).unwrap();
                layer.forward(ctx, &plan, x).unwrap();
                let want = pollster::block_on(plan.output(ctx)).unwrap();
                let c = Tol::reduction(cfg.d.max(cfg.f)).compare(y, &want);
                assert!(
                    c.pass,
                    "{gating:?} {act:?} E={e} over {n} ranks, rank {r}: {c:?}"
                );
            }
        }
    });
}
