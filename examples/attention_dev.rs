//! Dev harness for the attention kernels: on every adapter, build the
//! forward and backward of one shape (timing the pipeline builds), check them
//! against the twin, then print the median time of the forward, the backward
//! and both.
//!
//! To run:
//!     cargo run --release --example attention_dev                 # B=8 N=256 H=4 Dh=32
//!     AMOE_BACKEND=vulkan cargo run --example attention_dev -- 2 512 4 64
//! The arguments are B N H Dh.
//!
//! Example output (2-vCPU VM shared with other jobs, load average ~5, Mesa
//! 22.3.6; the first build of the pipelines takes ~15 s per adapter, later
//! runs hit Mesa's shader cache):
//!     vulkan/llvmpipe (LLVM 15.0.6, 256 bits): B=8 N=256 H=4 Dh=32
//!       max abs err: o 8.9e-7 lse 1.4e-6 dqkv 2.1e-6; pass true
//!       forward: 532.36 ms, 0.25 GFLOP/s
//!       backward: 1113.12 ms, 0.30 GFLOP/s
//!       forward+backward: 1686.42 ms, 0.28 GFLOP/s
//!     gl/llvmpipe (LLVM 15.0.6, 256 bits): B=8 N=256 H=4 Dh=32
//!       forward: 548.73 ms, 0.25 GFLOP/s
//!       backward: 1894.38 ms, 0.18 GFLOP/s
//!       forward+backward: 2435.52 ms, 0.19 GFLOP/s

use amoe::bench::time_dispatches;
use amoe::gpu::{AdapterFilter, GpuContext, Tensor};
use amoe::kernels::attention::{
    AttentionBackward, AttentionBackwardBuffers, AttentionConfig, AttentionForward,
    AttentionForwardBuffers,
};
use amoe::reference::attention::{attention_backward, attention_forward, AttnShape};
use amoe::tol::Tol;
use amoe::util::{Rng, Stopwatch};
use amoe::Result;

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let s = match args[..] {
        [b, n, h, dh] => AttnShape { b, n, h, dh },
        _ => AttnShape {
            b: 8,
            n: 256,
            h: 4,
            dh: 32,
        },
    };
    let filter = AdapterFilter::from_args(None, None)?;
    for ctx in pollster::block_on(GpuContext::all(&filter))? {
        pollster::block_on(run_adapter(&ctx, s))?;
    }
    Ok(())
}

async fn run_adapter(ctx: &GpuContext, s: AttnShape) -> Result<()> {
    let (t, d) = (s.t(), s.d());
    println!(
        "{}: B={} N={} H={} Dh={}",
        ctx.adapter_label(),
        s.b,
        s.n,
        s.h,
        s.dh
    );
    let cfg = AttentionConfig::mha(s.b, s.n, s.h);
    let mut rng = Rng::new(7);
    let qkv_h = rng.vec_sym(t * 3 * d, 2.0);
    let do_h = rng.vec_sym(t * d, 1.0);
    let qkv = Tensor::from_slice(ctx, "qkv", &[t, 3 * d], &qkv_h)?;
    let o = Tensor::<f32>::zeros(ctx, "o", &[t, d])?;
    let lse = Tensor::<f32>::zeros(ctx, "lse", &[s.b, s.h, s.n])?;
    let dout = Tensor::from_slice(ctx, "do", &[t, d], &do_h)?;
    let dqkv = Tensor::<f32>::zeros(ctx, "dqkv", &[t, 3 * d])?;
    let sw = Stopwatch::start();
    let fwd = AttentionForward::new(
        ctx,
        cfg,
        &AttentionForwardBuffers {
            qkv: &qkv,
            o: &o,
            lse: &lse,
        },
    )?;
    let bwd = AttentionBackward::new(
        ctx,
        cfg,
        &AttentionBackwardBuffers {
            qkv: &qkv,
            o: &o,
            dout: &dout,
            lse: &lse,
            dqkv: &dqkv,
        },
    )?;
    println!("  pipelines built in {:.2} s", sw.seconds());

    let record = |enc: &mut wgpu::CommandEncoder, f: bool, b: bool| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        if f {
            fwd.record(&mut pass);
        }
        if b {
            bwd.record(&mut pass);
        }
    };
    let sw = Stopwatch::start();
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    record(&mut enc, true, true);
    ctx.submit_and_wait(enc)?;
    println!(
        "  first run (with driver compilation) {:.3} s",
        sw.seconds()
    );

    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let (o_w, lse_w) = attention_forward(&f64s(&qkv_h), s);
    let dqkv_w = attention_backward(&f64s(&qkv_h), &o_w, &f64s(&do_h), &lse_w, s);
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let co = Tol::reduction(s.n).compare(&o.read(ctx).await?, &f32s(&o_w));
    let cl = Tol::reduction(s.dh).compare(&lse.read(ctx).await?, &f32s(&lse_w));
    let cd = Tol::reduction(s.n * s.dh).compare(&dqkv.read(ctx).await?, &f32s(&dqkv_w));
    println!(
        "  max abs err: o {:.1e} lse {:.1e} dqkv {:.1e}; pass {}",
        co.max_abs_err,
        cl.max_abs_err,
        cd.max_abs_err,
        co.pass && cl.pass && cd.pass
    );

    // Causal: half the N x N scores; forward 2 GEMM-like products, backward 5
    // (s, dp, dv, dk, dq) counting the recomputed scores.
    let pairs = (s.b * s.h) as f64 * (s.n * (s.n + 1) / 2) as f64 * s.dh as f64;
    for (what, f, b, products) in [
        ("forward", true, false, 2.0),
        ("backward", false, true, 5.0),
        ("forward+backward", true, true, 7.0),
    ] {
        let sec = time_dispatches(ctx, 2, 3, |enc| {
            record(enc, f, b);
            Ok(())
        })?;
        println!(
            "  {what}: {:.2} ms, {:.2} GFLOP/s",
            sec * 1e3,
            2.0 * products * pairs / sec / 1e9
        );
    }
    Ok(())
}
