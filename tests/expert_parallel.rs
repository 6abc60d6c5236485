//! Expert parallelism, one MoE layer's forward (ranks as threads of one
//! process over channels): each rank routes its own tokens on the GPU, the
//! routed rows go to their experts' ranks (`train::expert_parallel`), each
//! rank runs only its experts (`MoeLayer::plan_rows`) on what it received,
//! the outputs come back into the sender's slot order and the sender's
//! combine runs. The output must be the one-process layer's.

mod common;

use amoe::gpu::GpuContext;
use amoe::kernels::{Activation, AuxConfig, GateConfig, Gating, RoutingLayout};
use amoe::moe::{MoeConfig, MoeLayer, MoeWeights, Path};
use amoe::tol::Tol;
use amoe::train::collective::{Comm, ThreadTransport, Transport};
use amoe::train::expert_parallel::{dispatch, give_back, ExpertSplit, SlotPlan};

/// The layer as a rank of expert parallelism holds it: the router, and
/// experts `owned` alone. Its plans over tokens route and run no expert; its
/// rows plans run the experts it holds.
fn share_layer(
    ctx: &GpuContext,
    cfg: &MoeConfig,
    w: &MoeWeights,
    owned: std::ops::Range<usize>,
) -> MoeLayer {
    let (bcfg, bw) = bank(cfg, w, owned.clone());
    let held = MoeLayer::new(ctx, bcfg, &bw).unwrap();
    let router =
        amoe::gpu::Tensor::from_slice(ctx, "router", &[cfg.d, cfg.e], &w.w_router).unwrap();
    MoeLayer::from_share(*cfg, Some(owned), router, held.w1, held.w3, held.w2).unwrap()
}

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
    let layer = share_layer(ctx, cfg, w, split.owned(comm.rank()));
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
    let rows = layer.plan_rows(ctx, max_rows).unwrap();
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

/// The layer of these tests: D 16, F 24, E experts.
fn layer_config(gating: Gating, activation: Activation, e: usize) -> MoeConfig {
    MoeConfig {
        d: 16,
        f: 24,
        e,
        activation,
        gate: GateConfig::new(gating),
        capacity_factor: None,
    }
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
            let cfg = layer_config(gating, act, e);
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

/// What one rank's layer step gives: y, dx, dw_router of its tokens and
/// its bank's weight gradients (dw1, dw2, dw3 or empty).
struct Grads {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw_router: Vec<f32>,
    bank: [Vec<f32>; 3],
}

fn read(ctx: &GpuContext, t: &amoe::gpu::Tensor<f32>) -> Vec<f32> {
    pollster::block_on(t.read(ctx)).unwrap()
}

fn pass(ctx: &GpuContext, body: impl FnOnce(&mut wgpu::ComputePass<'_>)) {
    ctx.submit_and_wait(encode(ctx, body)).unwrap();
}

/// One rank's training forward and backward of the layer with its experts
/// on the experts' ranks: rows out and back in the forward (inputs, then
/// outputs) and in the backward (output gradients, then input gradients).
fn expert_parallel_step(
    ctx: &GpuContext,
    comm: &Comm,
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &[f32],
    dy: &[f32],
    max_rows: usize,
) -> Grads {
    let (d, e) = (cfg.d, cfg.e);
    let t = x.len() / d;
    let split = ExpertSplit::new(e, comm.size()).unwrap();
    let aux = AuxConfig {
        balance: 0.0,
        z_loss: 0.0,
    };
    // The layer holds this rank's experts alone: its plan over the tokens
    // routes (no expert GEMMs, no expert gradients), its rows plan runs them.
    let layer = share_layer(ctx, cfg, w, split.owned(comm.rank()));
    let tp = layer.plan_train(ctx, t, &aux, 1).unwrap();
    assert!(tp.dw1.is_none() && tp.expert_grads().is_err());
    let bp = layer.plan_rows_train(ctx, max_rows, 1).unwrap();

    // Forward: route here, experts there, combine here.
    tp.fwd.x.write(ctx, x).unwrap();
    let mut clear = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    tp.fwd.clear(&mut clear);
    ctx.submit_and_wait(clear).unwrap();
    pass(ctx, |p| assert!(tp.fwd.record_routing(p)));
    let words = pollster::block_on(tp.fwd.routing.read(ctx)).unwrap();
    let (token_of_slot, y_expert) = tp.fwd.slot_buffers().unwrap();
    let tos = pollster::block_on(token_of_slot.read(ctx)).unwrap();
    let h = RoutingLayout::HEADER;
    let slots = SlotPlan {
        counts: &words[h..h + e],
        offsets: &words[h + e..h + 2 * e + 1],
        token_of_slot: &tos,
    };
    let got = dispatch(comm, &split, &slots, d, |_, tok| &x[tok * d..(tok + 1) * d]).unwrap();
    bp.fwd.write(ctx, &got.rows, &got.local_expert).unwrap();
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    bp.fwd.record(&mut enc);
    ctx.submit_and_wait(enc).unwrap();
    let out = read(ctx, &bp.fwd.y);
    let back = give_back(comm, &split, &slots, &got, &out[..got.len() * d], tos.len()).unwrap();
    y_expert.write(ctx, &back).unwrap();
    pass(ctx, |p| assert!(tp.fwd.record_combine(p)));
    let y = read(ctx, &tp.fwd.y);

    // Backward: each slot's output gradient to its expert's rank, each
    // row's input gradient back, then the router's part here.
    tp.dy.write(ctx, dy).unwrap();
    pass(ctx, |p| {
        tp.backward.record_stats(p);
        tp.backward.record_slots_and_gate(p);
    });
    let dys = read(ctx, &tp.backward.scratch.dys);
    let gotb = dispatch(comm, &split, &slots, d, |slot, _| {
        &dys[slot * d..(slot + 1) * d]
    })
    .unwrap();
    assert_eq!(gotb.local_expert, got.local_expert);
    let mut rows_dy = gotb.rows.clone();
    rows_dy.resize(max_rows * d, 0.0);
    bp.dy.write(ctx, &rows_dy).unwrap();
    pass(ctx, |p| bp.record_backward(p));
    let rows_dx = read(ctx, &bp.dx);
    let dxs = give_back(
        comm,
        &split,
        &slots,
        &gotb,
        &rows_dx[..gotb.len() * d],
        tos.len(),
    )
    .unwrap();
    tp.backward.scratch.dxs.write(ctx, &dxs).unwrap();
    pass(ctx, |p| tp.backward.record_input_grads(p));
    Grads {
        y,
        dx: read(ctx, &tp.dx),
        dw_router: read(ctx, &tp.dw_router),
        bank: [
            read(ctx, &bp.dw1),
            read(ctx, &bp.dw2),
            bp.dw3.as_ref().map(|t| read(ctx, t)).unwrap_or_default(),
        ],
    }
}

#[test]
fn a_training_step_of_a_layer_with_its_experts_on_other_ranks_equals_one_process() {
    let cases = [
        (Gating::Adaptive, Activation::Gelu, 4, 2),
        (Gating::Top2, Activation::SwiGlu, 6, 3),
        (Gating::Top1, Activation::Gelu, 4, 2),
    ];
    common::on_first_adapter(|ctx| {
        for (gating, act, e, n) in cases {
            let cfg = layer_config(gating, act, e);
            let d = cfg.d;
            let w = MoeWeights::random(&cfg, 8);
            let ts: Vec<usize> = (0..n).map(|r| 17 + 5 * r).collect();
            let xs: Vec<Vec<f32>> = (0..n)
                .map(|r| amoe::util::Rng::new(21 + r as u64).vec_sym(ts[r] * d, 1.0))
                .collect();
            let dys: Vec<Vec<f32>> = (0..n)
                .map(|r| amoe::util::Rng::new(31 + r as u64).vec_sym(ts[r] * d, 0.1))
                .collect();
            let max_rows = ts.iter().sum::<usize>() * 2;
            let ranks: Vec<Grads> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadTransport::group(n)
                    .into_iter()
                    .map(|tr| {
                        let (cfg, w, xs, dys) = (&cfg, &w, &xs, &dys);
                        s.spawn(move || {
                            let h = ctx.handle();
                            let r = tr.rank();
                            let comm = Comm::new(Box::new(tr));
                            expert_parallel_step(&h, &comm, cfg, w, &xs[r], &dys[r], max_rows)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });

            // One process, every rank's tokens in one batch (no balancing
            // or z loss: each token's gradient is its own, and the weight
            // gradients are sums over the tokens).
            let t: usize = ts.iter().sum();
            let aux = AuxConfig {
                balance: 0.0,
                z_loss: 0.0,
            };
            let layer = MoeLayer::new(ctx, cfg, &w).unwrap();
            let tp = layer.plan_train(ctx, t, &aux, 1).unwrap();
            tp.fwd.x.write(ctx, &xs.concat()).unwrap();
            tp.dy.write(ctx, &dys.concat()).unwrap();
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            tp.fwd.clear(&mut enc);
            {
                let mut p = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                });
                tp.fwd.record_pass(&mut p);
                tp.record_backward(&mut p);
            }
            ctx.submit_and_wait(enc).unwrap();
            let (y, dx) = (read(ctx, &tp.fwd.y), read(ctx, &tp.dx));
            let dw_router = read(ctx, &tp.dw_router);
            let (dw1, dw2, dw3) = tp.expert_grads().unwrap();
            let full = [
                read(ctx, dw1),
                read(ctx, dw2),
                dw3.map(|t| read(ctx, t)).unwrap_or_default(),
            ];

            let what = format!("{gating:?} {act:?} E={e} over {n} ranks");
            let tol = Tol::reduction(d.max(cfg.f).max(t));
            let check = |name: &str, got: &[f32], want: &[f32]| {
                let c = tol.compare(got, want);
                assert!(c.pass, "{what}: {name}: {c:?}");
            };
            let mut at = 0;
            for (r, g) in ranks.iter().enumerate() {
                let rows = at * d..(at + ts[r]) * d;
                check(&format!("rank {r} y"), &g.y, &y[rows.clone()]);
                check(&format!("rank {r} dx"), &g.dx, &dx[rows]);
                at += ts[r];
                // The bank's gradients: its experts' slice of the whole.
                let per = cfg.d * cfg.f;
                let owned = ExpertSplit::new(e, n).unwrap().owned(r);
                for (i, (b, f)) in g.bank.iter().zip(&full).enumerate() {
                    if !f.is_empty() {
                        check(
                            &format!("rank {r} dw{}", [1, 2, 3][i]),
                            b,
                            &f[owned.start * per..owned.end * per],
                        );
                    }
                }
            }
            // The router's gradient: the ranks' own tokens' parts sum to it.
            let mut sum = vec![0.0f32; dw_router.len()];
            for g in &ranks {
                sum.iter_mut().zip(&g.dw_router).for_each(|(s, v)| *s += v);
            }
            check("dw_router", &sum, &dw_router);
        }
    });
}

/// A model's forward with each MoE layer's experts split over the ranks
/// (each rank's model holding its share, `Model::expert_parallel`): every
/// rank's loss on its shard equals the one-process loss of the same
/// sequences, for training (`TrainStep::forward_expert_parallel`) and for
/// evaluation under another gate (`EvalStep::loss_expert_parallel`, what
/// validation runs).
#[test]
fn a_models_forward_with_its_experts_on_other_ranks_equals_one_process() {
    use amoe::model::{EvalStep, HostParams, Model, OptConfig, StepArgs, TrainStep};
    for (gating, moe_every, n) in [
        (Gating::Adaptive, 1, 2),
        (Gating::Top2, 2, 2),
        (Gating::Top1, 1, 4),
    ] {
        let cfg = amoe::model::ModelConfig {
            moe_every,
            ..common::tiny_model(gating, false)
        };
        let (b, t) = (2, 2 * cfg.context);
        let host = HostParams::init(&cfg, 3);
        let opt = OptConfig::default();
        let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..n)
            .map(|r| {
                let mut rng = amoe::util::Rng::new(40 + r as u64);
                let seq: Vec<u32> = (0..t + 1).map(|_| rng.below(cfg.vocab) as u32).collect();
                (seq[..t].to_vec(), seq[1..].to_vec())
            })
            .collect();
        let args = |r: usize| StepArgs {
            ids: &batches[r].0,
            targets: &batches[r].1,
            lr: 0.0,
            step: 1,
            complexity: false,
        };
        let eval_gate = amoe::kernels::GateConfig {
            gating: Gating::Top1,
            ..cfg.gate
        };
        common::on_first_adapter(|ctx| {
            let got: Vec<(f32, (f64, f64))> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadTransport::group(n)
                    .into_iter()
                    .map(|tr| {
                        let (cfg, host, opt, args) = (&cfg, &host, &opt, &args);
                        s.spawn(move || {
                            let h = ctx.handle();
                            let r = tr.rank();
                            let comm = Comm::new(Box::new(tr));
                            let model = Model::expert_parallel(&h, cfg, host, r, n).unwrap();
                            let step = TrainStep::new(&h, &model, b, opt).unwrap();
                            assert!(step.is_expert_parallel());
                            let eval = EvalStep::new(&h, &model, b, eval_gate).unwrap();
                            let a = args(r);
                            // Whole-model paths refuse a model holding a
                            // share of its experts (typed errors, no run).
                            let share = |e: amoe::Error| {
                                assert!(e.to_string().contains("share of the experts"), "{e}")
                            };
                            share(pollster::block_on(step.step(&h, &model, &a)).unwrap_err());
                            share(
                                pollster::block_on(eval.loss(&h, &model, a.ids, a.targets))
                                    .unwrap_err(),
                            );
                            share(pollster::block_on(model.download(&h)).unwrap_err());
                            let train = pollster::block_on(
                                step.forward_expert_parallel(&h, &model, &a, &comm),
                            )
                            .unwrap();
                            let eval = pollster::block_on(
                                eval.loss_expert_parallel(&h, &model, a.ids, a.targets, &comm),
                            )
                            .unwrap();
                            (train, eval)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let model = Model::new(ctx, &cfg, &host).unwrap();
            let step = TrainStep::new(ctx, &model, b, &opt).unwrap();
            let eval = EvalStep::new(ctx, &model, b, eval_gate).unwrap();
            for (r, (loss, (sum, count))) in got.iter().enumerate() {
                let a = args(r);
                let want = pollster::block_on(step.step(ctx, &model, &a)).unwrap().loss;
                assert!(
                    (loss - want).abs() <= 1e-5 * want,
                    "{gating:?} every {moe_every} over {n} ranks, rank {r}: loss {loss} vs {want}"
                );
                let (ws, wc) =
                    pollster::block_on(eval.loss(ctx, &model, a.ids, a.targets)).unwrap();
                assert_eq!(*count, wc, "rank {r}: counted tokens");
                assert!(
                    (sum - ws).abs() <= 1e-5 * ws,
                    "{gating:?} every {moe_every} over {n} ranks, rank {r}: eval loss sum {sum} vs {ws}"
                );
            }
        });
    }
}

/// Training steps with each MoE layer's experts split over the ranks
/// (`TrainStep::step_expert_parallel`) against one process with the same
/// global batch: the same losses and gradient norms at every step, and the
/// same parameters and AdamW moments after them (each rank holding its
/// experts alone, gathered for the comparison), within float
/// reassociation.
#[test]
fn expert_parallel_training_steps_equal_one_process() {
    use amoe::model::{HostParams, Model, OptConfig, StepArgs, TrainStep};
    let (steps, b_global, n) = (4, 4, 2);
    for (gating, moe_every) in [(Gating::Adaptive, 1), (Gating::Top2, 2), (Gating::Top1, 1)] {
        let cfg = amoe::model::ModelConfig {
            moe_every,
            ..common::tiny_model(gating, false)
        };
        let (b, t) = (b_global / n, b_global / n * cfg.context);
        let host = HostParams::init(&cfg, 5);
        let mut opt = OptConfig::default();
        opt.adamw.lr = 3e-3;
        let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..steps)
            .map(|s| {
                let mut rng = amoe::util::Rng::new(60 + s as u64);
                let seq: Vec<u32> = (0..n * t + 1)
                    .map(|_| rng.below(cfg.vocab) as u32)
                    .collect();
                (seq[..n * t].to_vec(), seq[1..].to_vec())
            })
            .collect();
        let args = |s: usize, rows: std::ops::Range<usize>| StepArgs {
            ids: &batches[s].0[rows.clone()],
            targets: &batches[s].1[rows],
            lr: opt.adamw.lr,
            step: s as u64 + 1,
            complexity: true,
        };
        common::on_first_adapter(|ctx| {
            // One process, the global batch.
            let model = Model::new(ctx, &cfg, &host).unwrap();
            let step = TrainStep::new(ctx, &model, b_global, &opt).unwrap();
            let want: Vec<(f32, f32)> = (0..steps)
                .map(|s| {
                    let st =
                        pollster::block_on(step.step(ctx, &model, &args(s, 0..n * t))).unwrap();
                    (st.loss, st.grad_norm)
                })
                .collect();
            let want_params = pollster::block_on(model.download(ctx)).unwrap();
            let [_, want_m, want_v] =
                pollster::block_on(step.gather_state(ctx, &model, None, true))
                    .unwrap()
                    .unwrap();

            let ranks: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadTransport::group(n)
                    .into_iter()
                    .map(|tr| {
                        let (cfg, host, opt, args) = (&cfg, &host, &opt, &args);
                        s.spawn(move || {
                            let h = ctx.handle();
                            let r = tr.rank();
                            let comm = Comm::new(Box::new(tr));
                            let model = Model::expert_parallel(&h, cfg, host, r, n).unwrap();
                            let step = TrainStep::new(&h, &model, b, opt).unwrap();
                            // Each bank's rows plan starts at one row, so
                            // that the first step grows it (keeping the
                            // model's expert gradients).
                            step.set_expert_rows(&h, &model, 1).unwrap();
                            let got: Vec<(f32, f32)> = (0..steps)
                                .map(|s| {
                                    let st = pollster::block_on(step.step_expert_parallel(
                                        &h,
                                        &model,
                                        &args(s, r * t..(r + 1) * t),
                                        &comm,
                                        &mut Default::default(),
                                    ))
                                    .unwrap();
                                    (st.loss, st.grad_norm)
                                })
                                .collect();
                            let rows = step.expert_rows();
                            for l in cfg.moe_layers() {
                                let max = n * t * cfg.gate.max_k();
                                assert!(
                                    rows[l] > 1 && rows[l] <= max,
                                    "block {l}: {} rows (at most {max})",
                                    rows[l]
                                );
                            }
                            // This rank's share of an expert tensor.
                            let held = model
                                .params
                                .blocks
                                .iter()
                                .map(|b| b.ffn.w1.shape()[0])
                                .collect::<Vec<_>>();
                            // Every rank's experts gathered.
                            let state = pollster::block_on(step.gather_state(
                                &h,
                                &model,
                                Some(&comm),
                                true,
                            ))
                            .unwrap()
                            .unwrap();
                            (got, state, held)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });

            let what = format!("{gating:?} every {moe_every}");
            for (r, (got, [params, m, v], held)) in ranks.iter().enumerate() {
                for (s, (g, w)) in got.iter().zip(&want).enumerate() {
                    let rel = |a: f32, b: f32| (a - b).abs() / b.abs().max(1e-6);
                    assert!(
                        rel(g.0, w.0) <= 1e-5 && rel(g.1, w.1) <= 1e-4,
                        "{what} rank {r} step {}: (loss, norm) {g:?} vs {w:?}",
                        s + 1
                    );
                }
                // Each MoE layer's experts held: E / N of them.
                for (l, &e) in held.iter().enumerate() {
                    let want_e = if cfg.moe_layers().contains(&l) {
                        cfg.experts / n
                    } else {
                        1
                    };
                    assert_eq!(e, want_e, "{what} rank {r} block {l}: experts held");
                }
                let mut worst = (0.0f32, String::new());
                let mut diff = |name: String, a: &[f32], b: &[f32]| {
                    assert_eq!(a.len(), b.len(), "{name}");
                    for (x, y) in a.iter().zip(b) {
                        if (x - y).abs() > worst.0 {
                            worst = ((x - y).abs(), name.clone());
                        }
                    }
                };
                for ((id, p), (_, q)) in params.iter().zip(want_params.iter()) {
                    diff(id.name(), &p.data, &q.data);
                }
                // The moments are what a resumed run continues from.
                for (tag, got, want) in [("m", m, &want_m), ("v", v, &want_v)] {
                    for ((id, p), (_, q)) in got.iter().zip(want.iter()) {
                        diff(format!("{tag}.{id}"), &p.data, &q.data);
                    }
                }
                eprintln!(
                    "{what}: rank {r}: max |param diff| {:.2e} ({})",
                    worst.0, worst.1
                );
                assert!(
                    worst.0 <= 1e-5,
                    "{what} rank {r}: {} differs by {}",
                    worst.1,
                    worst.0
                );
            }
        });
    }
}
