//! `amoe bench kernels`: numbers, not asserts. The adapter's roofline (FMA
//! peak, copy bandwidth), dense matmul GFLOP/s as a fraction of that peak, the
//! MoE layer forward for each gating rule, and the grouped expert GEMM's
//! throughput over the dense matmul's at equal FLOPs.
//!
//! Timing: wall clock around `submit` + wait, `reps` dispatches per
//! submission, median of several samples after a warm-up, so that per-submit
//! overhead is amortized the same way for every kernel.

use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::matmul::{Matmul, MatmulShape, MatmulSpec, Trans};
use crate::kernels::roofline::{fma_expected, Roofline};
use crate::kernels::{Activation, GateConfig, Gating};
use crate::moe::{MoeConfig, MoeLayer, MoeWeights, Path};
use crate::util::Stopwatch;
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
    /// The one-token decode path (mat-vec per expert): mean ms per token
    /// over `DECODE_TOKENS` tokens, and their experts per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_ms_per_token: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_slots_per_token: Option<f64>,
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
    /// A top-8 layer (E = 32, renormalized): fixed top-8 and top-4, then
    /// each per-token rule at a threshold giving about 4 experts per token.
    pub moe_layer_topk: Vec<MoeFigure>,
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

/// Dense matmul GFLOP/s for one shape and spec.
pub fn matmul_gflops(
    ctx: &GpuContext,
    m: usize,
    n: usize,
    k: usize,
    spec: MatmulSpec,
) -> Result<f64> {
    let mut rng = crate::util::Rng::new(7);
    let a = Tensor::from_slice(ctx, "a", &[m, k], &rng.vec_sym(m * k, 1.0))?;
    let b = Tensor::from_slice(ctx, "b", &[k, n], &rng.vec_sym(k * n, 1.0))?;
    let c = Tensor::<f32>::zeros(ctx, "c", &[m, n])?;
    let mm = Matmul::new(ctx, &MatmulShape::nn(m, n, k), spec, &a, &b, &c)?;
    let flops = 2.0 * (m * n * k) as f64;
    // Aim for ~0.5 s per sample whatever the adapter's speed.
    let probe = time_dispatches(ctx, 1, 1, |enc| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        mm.record(&mut pass);
        Ok(())
    })?;
    let reps = ((0.5 / probe.max(1e-6)) as usize).clamp(1, 200);
    let s = time_dispatches(ctx, reps, 3, |enc| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        mm.record(&mut pass);
        Ok(())
    })?;
    Ok(flops / s / 1e9)
}

/// The MoE layer the benchmark runs: T=4096, D=512, F=2048, E=16 (quick: T=512, D=256, F=512).
pub fn bench_layer_config(gating: Gating, quick: bool) -> (usize, MoeConfig) {
    let (t, d, f) = if quick {
        (512, 256, 512)
    } else {
        (4096, 512, 2048)
    };
    (
        t,
        MoeConfig {
            d,
            f,
            e: 16,
            activation: Activation::Gelu,
            gate: GateConfig::new(gating),
            capacity_factor: None,
        },
    )
}

/// Router weights are scaled so that logits spread like a trained router's
/// (std about 2) instead of a fresh init's near-uniform softmax, under which
/// adaptive gating would send almost every token to two experts.
const ROUTER_SCALE: f32 = 6.0;

/// One MoE layer forward, tokens/s, plus the expert GEMMs alone (GFLOP/s).
pub async fn moe_layer_figure(
    ctx: &GpuContext,
    gating: Gating,
    quick: bool,
) -> Result<(MoeFigure, f64, usize)> {
    let (t, cfg) = bench_layer_config(gating, quick);
    let mut w = MoeWeights::random(&cfg, 11);
    w.w_router.iter_mut().for_each(|v| *v *= ROUTER_SCALE);
    let layer = MoeLayer::new(ctx, cfg, &w)?;
    let plan = layer.plan(ctx, t, Path::Grouped)?;
    let mut rng = crate::util::Rng::new(5);
    let x = rng.vec_sym(t * cfg.d, 1.0);
    layer.forward(ctx, &plan, &x)?;
    let summary = plan.routing_summary(ctx, cfg.e).await?;
    let s = time_dispatches(ctx, 1, 3, |enc| {
        layer.record(&plan, enc);
        Ok(())
    })?;
    let se = time_dispatches(ctx, 1, 3, |enc| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        plan.record_expert_gemms(&mut pass);
        Ok(())
    })?;
    let expert_gflops = summary.used_slots as f64 * cfg.flops_per_slot() / se / 1e9;
    Ok((
        MoeFigure {
            gating: gating.name().into(),
            tokens_per_s: t as f64 / s,
            two_expert_fraction: summary.two_expert_fraction,
            slots_per_token: summary.used_slots as f64 / t as f64,
            ms_per_forward: s * 1e3,
            decode_ms_per_token: None,
            decode_slots_per_token: None,
        },
        expert_gflops,
        summary.used_slots,
    ))
}

/// The top-k layer of `moe_layer_topk`: E = 32, k = 8 renormalized, SwiGLU
/// (Granite's router, scaled down), T = 4096, D = 512, F = 256 (quick:
/// T = 512, D = 256, F = 128).
pub fn bench_topk_config(quick: bool) -> (usize, MoeConfig) {
    let (t, d, f) = if quick {
        (512, 256, 128)
    } else {
        (4096, 512, 256)
    };
    (
        t,
        MoeConfig {
            d,
            f,
            e: 32,
            activation: Activation::SwiGlu,
            gate: GateConfig::top_k(8, true, crate::kernels::RouterScore::Softmax),
            capacity_factor: None,
        },
    )
}

/// Tokens timed one at a time through a top-k layer's decode path.
const DECODE_TOKENS: usize = 64;

/// One top-k MoE layer forward under fixed top-8, fixed top-4 and each
/// per-token rule at the threshold (found from the router's ranked scores
/// of the same tokens) that gives 4 experts per token on average: what a
/// rule saves in the layer itself. The decode path runs the first
/// `DECODE_TOKENS` tokens one at a time, each rule at the threshold that
/// gives those tokens 4 experts on average.
pub async fn moe_layer_topk_figures(
    ctx: &GpuContext,
    quick: bool,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<MoeFigure>> {
    use crate::kernels::ExpertRule;
    let (t, cfg) = bench_topk_config(quick);
    let mut w = MoeWeights::random(&cfg, 13);
    w.w_router.iter_mut().for_each(|v| *v *= ROUTER_SCALE);
    let mut rng = crate::util::Rng::new(7);
    let x = rng.vec_sym(t * cfg.d, 1.0);
    let (e, k) = (cfg.e, cfg.gate.k);
    // The router's ranked scores under the fixed top-8.
    let layer = MoeLayer::new(ctx, cfg, &w)?;
    let plan = layer.plan(ctx, t, Path::Grouped)?;
    layer.forward(ctx, &plan, &x)?;
    let probs = plan.probs.read(ctx).await?;
    let mut ranked = Vec::with_capacity(t * k);
    for row in probs.chunks_exact(e) {
        ranked.extend(crate::infer::eval::highest(row, k));
    }
    // Each rule's threshold for k/2 experts per token on average: over all
    // T tokens for the grouped forward, over the decoded tokens alone for
    // the decode path (their own mean differs from the whole batch's).
    let decoded = &ranked[..DECODE_TOKENS.min(t) * k];
    let mut gates = vec![
        (cfg.gate, cfg.gate),
        (
            GateConfig {
                k: k / 2,
                ..cfg.gate
            },
            GateConfig {
                k: k / 2,
                ..cfg.gate
            },
        ),
    ];
    for rule in [ExpertRule::Gap, ExpertRule::Ratio, ExpertRule::Mass] {
        let g = GateConfig { rule, ..cfg.gate };
        let at_half = |scores: &[f32]| {
            g.with_threshold(crate::infer::sweep::threshold_for(
                &[scores],
                k,
                g,
                (k / 2) as f64,
            ))
        };
        gates.push((at_half(&ranked), at_half(decoded)));
    }
    let mut out = Vec::new();
    for (gate, decode_gate) in gates {
        let c = MoeConfig { gate, ..cfg };
        let layer = MoeLayer::new(ctx, c, &w)?;
        let plan = layer.plan(ctx, t, Path::Grouped)?;
        layer.forward(ctx, &plan, &x)?;
        let summary = plan.routing_summary(ctx, e).await?;
        let s = time_dispatches(ctx, 1, 3, |enc| {
            layer.record(&plan, enc);
            Ok(())
        })?;
        // Decode: one token at a time through the mat-vec path.
        let layer = if decode_gate == gate {
            layer
        } else {
            MoeLayer::new(
                ctx,
                MoeConfig {
                    gate: decode_gate,
                    ..cfg
                },
                &w,
            )?
        };
        let one = layer.plan(ctx, 1, Path::Decode)?;
        let (mut decode_s, mut decode_slots) = (0.0, 0usize);
        for row in x.chunks_exact(cfg.d).take(DECODE_TOKENS) {
            layer.forward(ctx, &one, row)?;
            decode_slots += one.routing_summary(ctx, e).await?.used_slots;
            decode_s += time_dispatches(ctx, 1, 3, |enc| {
                layer.record(&one, enc);
                Ok(())
            })?;
        }
        let fig = MoeFigure {
            gating: gate.describe(),
            tokens_per_s: t as f64 / s,
            two_expert_fraction: summary.two_expert_fraction,
            slots_per_token: summary.used_slots as f64 / t as f64,
            ms_per_forward: s * 1e3,
            decode_ms_per_token: Some(decode_s * 1e3 / DECODE_TOKENS as f64),
            decode_slots_per_token: Some(decode_slots as f64 / DECODE_TOKENS as f64),
        };
        let (base, base_decode) = out.first().map_or(
            (fig.ms_per_forward, fig.decode_ms_per_token),
            |f: &MoeFigure| (f.ms_per_forward, f.decode_ms_per_token),
        );
        let decode_ratio = fig
            .decode_ms_per_token
            .zip(base_decode)
            .map_or(f64::NAN, |(a, b)| a / b);
        log(&format!(
            "moe layer {}: {:.2} experts per token, {:.1} ms ({:.2}x top-{k}); decode {:.2} experts, {:.3} ms per token ({:.2}x)",
            fig.gating,
            fig.slots_per_token,
            fig.ms_per_forward,
            fig.ms_per_forward / base,
            fig.decode_slots_per_token.unwrap_or(0.0),
            fig.decode_ms_per_token.unwrap_or(0.0),
            decode_ratio
        ));
        out.push(fig);
    }
    Ok(out)
}

/// The dense GEMMs with the FLOPs of the expert FFN over `slots` rows, as if
/// all slots went to one expert: [S,D]x[D,F] then [S,F]x[F,D]. GFLOP/s.
pub fn dense_equal_flops_gflops(ctx: &GpuContext, slots: usize, d: usize, f: usize) -> Result<f64> {
    let mut rng = crate::util::Rng::new(3);
    let x = Tensor::from_slice(ctx, "x", &[slots, d], &rng.vec_sym(slots * d, 1.0))?;
    let w1 = Tensor::from_slice(ctx, "w1", &[d, f], &rng.vec_sym(d * f, 0.05))?;
    let w2 = Tensor::from_slice(ctx, "w2", &[f, d], &rng.vec_sym(f * d, 0.05))?;
    let h = Tensor::<f32>::zeros(ctx, "h", &[slots, f])?;
    let y = Tensor::<f32>::zeros(ctx, "y", &[slots, d])?;
    let up = MatmulShape::nn(slots, f, d);
    let down = MatmulShape::nn(slots, d, f);
    let mm1 = Matmul::new(
        ctx,
        &up,
        MatmulSpec::choose(ctx, slots, f, d, Trans::NN),
        &x,
        &w1,
        &h,
    )?;
    let mm2 = Matmul::new(
        ctx,
        &down,
        MatmulSpec::choose(ctx, slots, d, f, Trans::NN),
        &h,
        &w2,
        &y,
    )?;
    let s = time_dispatches(ctx, 1, 3, |enc| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        mm1.record(&mut pass);
        mm2.record(&mut pass);
        Ok(())
    })?;
    Ok(4.0 * (slots * d * f) as f64 / s / 1e9)
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
    let shapes: &[(usize, usize, usize)] = if quick {
        &[(256, 256, 256), (512, 512, 512)]
    } else {
        &[
            (1024, 1024, 1024),
            (4096, 4096, 1024),
            (4096, 16, 512),
            (2048, 2048, 512),
        ]
    };
    let mut matmul = Vec::new();
    for &(m, n, k) in shapes {
        let chosen = MatmulSpec::choose(ctx, m, n, k, Trans::NN);
        // The chosen spec for every shape.
        let mut specs = vec![chosen];
        // Every other variant too, at the first (1024^3) shape only: the slow
        // ones would take minutes at the bigger shapes on a CPU adapter.
        if !quick && (m, n, k) == shapes[0] {
            specs.extend(
                MatmulSpec::configs()
                    .into_iter()
                    .filter(|s| *s != chosen && s.available(ctx)),
            );
        }
        for spec in specs {
            let gflops = matmul_gflops(ctx, m, n, k, spec)?;
            let variant = format!(
                "{}{}",
                spec.label(),
                if spec == chosen { " (chosen)" } else { "" }
            );
            log(&format!(
                "matmul {m}x{n}x{k} {variant}: {gflops:.1} GFLOP/s"
            ));
            matmul.push(MatmulFigure {
                m,
                n,
                k,
                variant,
                gflops,
                pct_of_peak: 100.0 * gflops / peak,
            });
        }
    }
    let mut moe_layer = Vec::new();
    let mut grouped = (f64::NAN, 0usize);
    for gating in [Gating::Top1, Gating::Top2, Gating::Adaptive] {
        let (fig, expert_gflops, slots) = moe_layer_figure(ctx, gating, quick).await?;
        log(&format!(
            "moe layer {}: {:.0} tokens/s, {:.1} ms, two-expert fraction {:.3}, expert GEMMs {expert_gflops:.1} GFLOP/s",
            fig.gating, fig.tokens_per_s, fig.ms_per_forward, fig.two_expert_fraction
        ));
        if gating == Gating::Top2 {
            grouped = (expert_gflops, slots);
        }
        moe_layer.push(fig);
    }
    let moe_layer_topk = moe_layer_topk_figures(ctx, quick, &mut log).await?;
    let (_, cfg) = bench_layer_config(Gating::Top2, quick);
    let dense = dense_equal_flops_gflops(ctx, grouped.1, cfg.d, cfg.f)?;
    log(&format!(
        "grouped expert GEMMs {:.1} GFLOP/s vs dense at equal FLOPs {dense:.1}: ratio {:.2}",
        grouped.0,
        grouped.0 / dense
    ));
    Ok(KernelBench {
        adapter: ctx.info.name.clone(),
        backend: ctx.backend(),
        quick,
        peak_gflops: peak,
        bandwidth_gbs: bw,
        copy_buffer_gbs: copy_bw,
        matmul,
        moe_layer,
        moe_layer_topk,
        grouped_over_dense: grouped.0 / dense,
        grouped_gflops: grouped.0,
        dense_equal_flops_gflops: dense,
    })
}

/// One gating rule's inference figures (`amoe bench infer`).
#[derive(Clone, Debug, Serialize)]
pub struct InferFigure {
    pub gating: String,
    pub threshold: f32,
    /// The gate in words (a top-k rule, per-layer thresholds).
    pub gate: String,
    /// Prompt tokens per second of one prefill call (median of `samples`).
    pub prefill_tps: f64,
    /// Tokens per second of the decode loop (one submit and readback per
    /// token; host-side sampling included), median of `samples` loops.
    pub decode_tps: f64,
    /// Parameters plus K/V caches on the GPU.
    pub gpu_bytes: u64,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// Fraction of (token, MoE layer) routes that used two experts during decode.
    pub two_expert_fraction: f64,
    /// Experts per (token, MoE layer) route during decode.
    pub mean_experts_per_token: f64,
}

/// What `amoe bench infer` prints.
#[derive(Clone, Debug, Serialize)]
pub struct InferBench {
    pub adapter: String,
    pub backend: String,
    pub checkpoint: String,
    /// How the matmul weights were stored (f32 or f16).
    pub dtype: String,
    /// How the expert banks were stored (`dtype`, or q8 / q4).
    pub experts_dtype: String,
    /// How the attention projections and an untied unembedding were stored
    /// (`dtype`, or q8 / q4 with `--quantize all`).
    pub projections_dtype: String,
    /// Seconds from the start of the model's upload to the first token's
    /// logits under the first gate: the upload, every pipeline the prefill
    /// and the first decode need, and one prefill of the prompt (what a
    /// user waits for before the first token; pipelines compiled earlier in
    /// this process, or kept in the driver's disk cache, shorten it).
    pub time_to_first_token_s: f64,
    /// The pipelines built within that time and where their builds spent
    /// it (amoe's naga validation, wgpu's translation, the driver).
    pub first_token_pipelines: crate::gpu::BuildTimes,
    pub results: Vec<InferFigure>,
}

/// Prefill `prompt` and decode `decode_tokens` greedy tokens under each
/// gate of `gates`, after a warm-up that builds every pipeline; and the
/// time to the first token before it.
pub async fn bench_infer(
    ctx: &GpuContext,
    ck: &crate::infer::InferCheckpoint,
    prompt: &[u32],
    decode_tokens: usize,
    gates: &[crate::kernels::Gates],
    storage: impl Into<crate::model::StorageChoice>,
    mut log: impl FnMut(&str),
) -> Result<InferBench> {
    use crate::infer::sampling::argmax;
    use crate::infer::Engine;
    let samples = 3;
    let n = ck.cfg.context;
    let decode_tokens = decode_tokens.min(n.saturating_sub(prompt.len())).max(1);
    let Some(first) = gates.first() else {
        return Err(crate::Error::invalid("bench infer", "no gate to measure"));
    };
    let before = ctx.pipeline_build_times();
    let sw = Stopwatch::start();
    let mut engine = Engine::with_dtype(ctx, ck, first.clone(), storage)?;
    let out = engine.prefill(ctx, prompt, false).await?;
    argmax(out.last())?;
    let time_to_first_token_s = sw.seconds();
    let first_token_pipelines = ctx.pipeline_build_times().since(&before);
    log(&format!(
        "time to the first token: {time_to_first_token_s:.2} s (upload, pipelines, one prefill); \
         {} pipelines built in {:.2} s (naga {:.2} s, wgpu's translation {:.2} s, the driver {:.2} s)",
        first_token_pipelines.pipelines,
        first_token_pipelines.total_s(),
        first_token_pipelines.naga_s,
        first_token_pipelines.module_s,
        first_token_pipelines.driver_s,
    ));
    let mut results = Vec::new();
    for gates in gates {
        let gate = gates.gate;
        engine.set_gate(ctx, gates.clone())?;
        // Warm-up: every pipeline and the prefill pass of this length.
        let out = engine.prefill(ctx, prompt, false).await?;
        engine.decode(ctx, argmax(out.last())?).await?;
        let mut times = Vec::new();
        for _ in 0..samples {
            let sw = Stopwatch::start();
            engine.prefill(ctx, prompt, false).await?;
            times.push(sw.seconds());
        }
        times.sort_by(f64::total_cmp);
        let prefill_s = times[times.len() / 2];
        // The decode loop, `samples` times from the same prompt; the median.
        let (mut two, mut routes, mut used) = (0usize, 0usize, 0usize);
        let mut times = Vec::new();
        for _ in 0..samples {
            let out = engine.prefill(ctx, prompt, false).await?;
            let mut next = argmax(out.last())?;
            let sw = Stopwatch::start();
            for _ in 0..decode_tokens {
                let out = engine.decode(ctx, next).await?;
                for r in &out.routes[0] {
                    routes += 1;
                    two += (r.experts.len() > 1) as usize;
                    used += r.experts.len();
                }
                next = argmax(out.last())?;
            }
            times.push(sw.seconds());
        }
        times.sort_by(f64::total_cmp);
        let decode_s = times[times.len() / 2];
        let f = InferFigure {
            gating: gate.gating.to_string(),
            threshold: gate.threshold,
            gate: gates.describe(),
            prefill_tps: prompt.len() as f64 / prefill_s,
            decode_tps: decode_tokens as f64 / decode_s,
            gpu_bytes: engine.gpu_bytes(),
            prompt_tokens: prompt.len(),
            decode_tokens,
            two_expert_fraction: two as f64 / routes.max(1) as f64,
            mean_experts_per_token: used as f64 / routes.max(1) as f64,
        };
        log(&format!(
            "{}: prefill {:.0} tok/s, decode {:.1} tok/s, {:.2} experts per token",
            f.gate, f.prefill_tps, f.decode_tps, f.mean_experts_per_token
        ));
        results.push(f);
    }
    Ok(InferBench {
        adapter: ctx.info.name.clone(),
        backend: ctx.backend(),
        checkpoint: ck.source.clone(),
        dtype: engine.storage().matmul.to_string(),
        experts_dtype: engine.storage().experts.to_string(),
        projections_dtype: engine.storage().projections.to_string(),
        time_to_first_token_s,
        first_token_pipelines,
        results,
    })
}

/// Layer shapes of published MoE models, for `amoe bench infer --shape`:
/// random weights, the shapes and routers that decide the speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BenchShape {
    /// granite-3.0-1b-a400m: D 1024, 16 query / 8 kv heads of 64, 32 experts
    /// of 512, top-8 (renormalized), vocabulary 49155, tied head.
    Granite1bA400m,
    /// OLMoE-1B-7B: D 2048, 16 heads of 128, QK-norm, 64 experts of 1024,
    /// top-8 (raw weights), vocabulary 50304.
    Olmoe1b7b,
}

crate::choice::choice! { BenchShape, "model shape",
    Granite1bA400m = "granite-1b-a400m": "granite-3.0-1b-a400m's layers",
    Olmoe1b7b = "olmoe-1b-7b": "OLMoE-1B-7B's layers",
}

impl BenchShape {
    /// A model of `layers` such layers with random weights (seed 1), a
    /// context of `context` and the vocabulary `vocab` (default: the
    /// model's), holding `tokenizer` (a benchmark feeds it ids, not text):
    /// what `amoe bench infer --shape` and the page's `Gpu.benchShape` run.
    pub fn checkpoint(
        self,
        layers: usize,
        context: usize,
        vocab: Option<usize>,
        tokenizer: crate::tokenizer::Tokenizer,
    ) -> Result<crate::infer::InferCheckpoint> {
        let mut cfg = self.config(layers, context);
        if let Some(v) = vocab {
            cfg.vocab = v;
        }
        cfg.validate()?;
        Ok(crate::infer::InferCheckpoint {
            weights: crate::model::HostParams::init(&cfg, 1).into_lazy(),
            eval_gating: cfg.gate.gating,
            cfg,
            stop_ids: vec![],
            tokenizer,
            source: format!("random {self}"),
            model_type: Some(self.to_string()),
        })
    }

    /// The config of `layers` such layers and a context of `context`.
    pub fn config(self, layers: usize, context: usize) -> crate::model::ModelConfig {
        use crate::kernels::{Activation, GateConfig, RouterScore};
        use crate::model::config::{QkNorm, Rope};
        let base = crate::model::ModelConfig {
            layers,
            context,
            activation: Activation::SwiGlu,
            rope: Some(Rope {
                theta: 10000.0,
                scaling: None,
            }),
            max_positions: Some(4096),
            eps: 1e-6,
            ..Default::default()
        };
        match self {
            BenchShape::Granite1bA400m => crate::model::ModelConfig {
                vocab: 49155,
                d: 1024,
                heads: 16,
                kv_heads: Some(8),
                ffn: 512,
                experts: 32,
                gate: GateConfig::top_k(8, true, RouterScore::Softmax),
                tied: true,
                ..base
            },
            BenchShape::Olmoe1b7b => crate::model::ModelConfig {
                vocab: 50304,
                d: 2048,
                heads: 16,
                ffn: 1024,
                experts: 64,
                gate: GateConfig::top_k(8, false, RouterScore::Softmax),
                qk_norm: QkNorm::Whole,
                ..base
            },
        }
    }
}
