//! Data-parallel training against one process: two ranks (threads of this
//! process over `ThreadTransport`, on one adapter) with global batch B take
//! the steps of one process with batch B, for top-1, top-2 and adaptive
//! gating, the curriculum included; and the ranks' parameters are the same
//! bits. The MPI launch itself is `tests/mpi.rs` (cargo feature `mpi`).

mod common;

use amoe::gpu::GpuContext;
use amoe::kernels::{Gating, SingleWeight};
use amoe::model::HostParams;
use amoe::train::collective::{Comm, ThreadTransport};
use amoe::train::session::{DataSource, Metric, Session, TrainConfig};
use amoe::train::trainer::prepare;
use std::path::PathBuf;

fn tiny(data: PathBuf, gating: Gating) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.d = 32;
    c.model.layers = 2;
    c.model.heads = 2;
    c.model.context = 16;
    c.model.ffn = 32;
    c.model.experts = 4;
    c.model.gate.gating = gating;
    c.model.gate.threshold = 0.5;
    if gating == Gating::Top2 {
        c.model.gate.single_weight = SingleWeight::One;
    }
    c.vocab_size = 300;
    c.batch = 8;
    c.steps = 100;
    c.warmup = 2;
    c.eval_batches = 4;
    c.data = DataSource::Path(data);
    c
}

fn steps(ctx: &GpuContext, s: &mut Session, n: usize) -> Vec<Metric> {
    (0..n)
        .map(|_| pollster::block_on(s.step(ctx)).unwrap())
        .collect()
}

struct Outcome {
    metrics: Vec<Metric>,
    params: HostParams,
    val: Option<f32>,
    order: String,
}

fn outcome(ctx: &GpuContext, s: &mut Session, n: usize) -> Outcome {
    let metrics = steps(ctx, s, n);
    let val = pollster::block_on(s.validate(ctx)).unwrap();
    Outcome {
        metrics,
        params: pollster::block_on(s.model.download(ctx)).unwrap(),
        val,
        order: serde_json::to_string(s.batcher.state()).unwrap(),
    }
}

fn max_abs_diff(a: &HostParams, b: &HostParams) -> (f32, String) {
    let mut worst = (0.0f32, String::new());
    for ((id, x), (_, y)) in a.iter().zip(b.iter()) {
        for (u, v) in x.data.iter().zip(&y.data) {
            let d = (u - v).abs();
            if d > worst.0 {
                worst = (d, id.name());
            }
        }
    }
    worst
}

#[test]
fn two_ranks_take_the_steps_of_one_process() {
    let dir = common::Scratch::new("amoe-data-parallel", "steps");
    let data = common::sonnets(&dir, 40);
    common::on_first_adapter(|ctx| {
        for gating in [Gating::Top1, Gating::Top2, Gating::Adaptive] {
            let mut cfg = tiny(data.clone(), gating);
            let prepared = prepare(&cfg, None).unwrap();
            let tok = prepared.tokenizer.clone();
            cfg.model.vocab = tok.vocab_size();
            let per_epoch = prepared.dataset.train.len() / cfg.batch;
            let n = per_epoch + 2;
            assert!(n <= 12, "{per_epoch} batches per epoch: too slow a test");
            let host = HostParams::init(&cfg.model, cfg.seed);
            let mut one = Session::new(ctx, cfg.clone(), prepared, host.clone()).unwrap();
            let want = outcome(ctx, &mut one, n);

            let on_two = |overlap: bool| -> Vec<Outcome> {
                on_ranks(2, |_, comm| {
                    let h = ctx.handle();
                    let prepared = prepare(&cfg, Some(tok.clone())).unwrap();
                    let mut sess =
                        Session::new_data_parallel(&h, cfg.clone(), prepared, host.clone(), comm)
                            .unwrap();
                    sess.set_overlap(&h, overlap).unwrap();
                    outcome(&h, &mut sess, n)
                })
            };
            // The default: each block's gradients summed while the earlier
            // blocks' backward runs.
            let ranks = on_two(true);
            if gating == Gating::Adaptive {
                // One submit and one all-reduce: the same bits (two ranks'
                // sums do not depend on how the vector is chunked).
                let whole = on_two(false);
                let (d, at) = max_abs_diff(&whole[0].params, &ranks[0].params);
                assert_eq!(d, 0.0, "overlap changed the parameters at {at}");
                for (a, b) in whole[0].metrics.iter().zip(&ranks[0].metrics) {
                    assert_eq!((a.loss, a.grad_norm), (b.loss, b.grad_norm));
                }
            }

            // The ranks hold the same bits.
            let (d01, _) = max_abs_diff(&ranks[0].params, &ranks[1].params);
            assert_eq!(d01, 0.0, "{gating:?}: the ranks' parameters differ");
            let got = &ranks[0];
            assert_eq!(got.order, want.order, "{gating:?}: the data order differs");
            // The same steps as one process, within float reassociation
            // (each rank sums its shard's gradient; the ring sums the ranks).
            for (g, w) in got.metrics.iter().zip(&want.metrics) {
                let rel = |a: f32, b: f32| (a - b).abs() / b.abs().max(1e-6);
                assert!(
                    rel(g.loss, w.loss) <= 1e-4,
                    "{gating:?} step {}: loss {} vs {}",
                    w.step,
                    g.loss,
                    w.loss
                );
                assert!(
                    rel(g.grad_norm.unwrap(), w.grad_norm.unwrap()) <= 1e-3,
                    "{gating:?} step {}: gradient norm {:?} vs {:?}",
                    w.step,
                    g.grad_norm,
                    w.grad_norm
                );
                assert_eq!(
                    g.two_expert_fraction, w.two_expert_fraction,
                    "{gating:?} step {}: two-expert fraction",
                    w.step
                );
                assert_eq!(
                    g.expert_imbalance, w.expert_imbalance,
                    "{gating:?} step {}",
                    w.step
                );
            }
            let (d, at) = max_abs_diff(&got.params, &want.params);
            eprintln!(
                "{gating:?}: {n} steps, 2 ranks vs 1 process: max |param diff| {d:.2e} ({at}); val {:?} vs {:?}",
                got.val, want.val
            );
            assert!(d <= 1e-5, "{gating:?}: parameters differ by {d} at {at}");
            let (gv, wv) = (got.val.unwrap(), want.val.unwrap());
            assert!(
                (gv - wv).abs() <= 1e-3 * wv,
                "{gating:?}: validation {gv} vs {wv}"
            );
        }
    });
}

#[test]
fn ranks_that_disagree_or_an_uneven_batch_are_refused() {
    let dir = common::Scratch::new("amoe-data-parallel", "bad");
    let data = common::sonnets(&dir, 40);
    common::on_first_adapter(|ctx| {
        let mut cfg = tiny(data.clone(), Gating::Adaptive);
        let prepared = prepare(&cfg, None).unwrap();
        let tok = prepared.tokenizer.clone();
        cfg.model.vocab = tok.vocab_size();
        let host = HostParams::init(&cfg.model, cfg.seed);
        let refusal = |cfg: TrainConfig, comm: Comm| {
            let prepared = prepare(&cfg, Some(tok.clone())).unwrap();
            Session::new_data_parallel(ctx, cfg, prepared, host.clone(), comm)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let errs = on_ranks(2, |rank, comm| {
            // Rank 1 was started with another learning rate.
            let mut cfg = cfg.clone();
            if rank == 1 {
                cfg.opt.adamw.lr *= 2.0;
            }
            refusal(cfg, comm)
        });
        for e in &errs {
            assert!(
                e.contains("rank(s) 1 disagree with rank 0 on the training configuration"),
                "{e}"
            );
        }
        // A batch of 8 over 3 ranks.
        let errs = on_ranks(3, |_, comm| refusal(cfg.clone(), comm));
        for e in &errs {
            assert!(e.contains("does not split evenly over 3 ranks"), "{e}");
        }
    });
}

/// `body(rank, comm)` on `n` ranks, a thread each; their results in rank order.
fn on_ranks<R: Send>(n: usize, body: impl Fn(usize, Comm) -> R + Sync) -> Vec<R> {
    use amoe::train::collective::Transport;
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadTransport::group(n)
            .into_iter()
            .map(|t| {
                let body = &body;
                s.spawn(move || body(t.rank(), Comm::new(Box::new(t))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
