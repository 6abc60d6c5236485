//! Dev harness for the GEMM kernels, in the manner of llm.c's `dev/cuda`
//! files: for every adapter, every matmul specialization the adapter can run
//! on a few shapes, and the grouped expert FFN against the dense matmul at
//! equal FLOPs; each line prints the max error against the CPU twin and the
//! GFLOP/s (also as a percentage of the adapter's FMA peak).
//!
//! To run:
//!     cargo run --release --example matmul_dev            # every adapter
//!     AMOE_BACKEND=vulkan cargo run --release --example matmul_dev -- --quick
//! `--quick` skips the 4096 x 4096 x 1024 shape; `--all` also runs the
//! variants `choose` would not pick on this adapter on the big shapes.
//!
//! Example output (2-vCPU AMD EPYC 7001 VM, Mesa 22.3.6 lavapipe / llvmpipe;
//! `*` marks the variant `MatmulSpec::choose` picks; other lines elided):
//!     vulkan/llvmpipe (LLVM 15.0.6, 256 bits): FMA peak 38.8 GFLOP/s
//!     matmul nn 1024x1024x1024 [subgroup 96x96]* max err 1.3e-5  9.6 GFLOP/s  24.7% of peak
//!     matmul nn 1024x1024x1024 [blocked 32x128]  max err 1.3e-5  3.3 GFLOP/s  8.6% of peak
//!     matmul nn 1024x1024x1024 [tiled 64x64]  max err 1.3e-5  0.6 GFLOP/s  1.5% of peak
//!     matmul nt 1024x1024x1024 [subgroup 96x96]* max err 1.5e-5  9.9 GFLOP/s  25.5% of peak
//!     matmul tn 1024x1024x1024 [subgroup 96x96]* max err 1.3e-5  9.5 GFLOP/s  24.4% of peak
//!     matmul nn 4096x16x512 [subgroup 128x32]* max err 3.8e-6  3.3 GFLOP/s  8.5% of peak
//!     matmul nn 4096x4096x1024 [subgroup 96x96]* max err 1.5e-5  10.2 GFLOP/s  26.3% of peak
//!     expert gemm1+gemm2 Gelu T=2048 K=2 E=16 D=512 F=1024 [subgroup 96x96] max err 8.3e-7  8.2 GFLOP/s  21.1% of peak; dense equal-FLOPs 9.4 GFLOP/s; grouped/dense 0.87
//!     expert gemm1+gemm2 SwiGlu T=2048 K=2 E=16 D=512 F=1024 [subgroup 96x96] max err 1.1e-6  9.2 GFLOP/s  23.7% of peak; dense equal-FLOPs 9.6 GFLOP/s; grouped/dense 0.96
//!     gl/llvmpipe (LLVM 15.0.6, 256 bits): FMA peak 45.1 GFLOP/s
//!     matmul nn 1024x1024x1024 [blocked 32x128]* max err 1.3e-5  3.4 GFLOP/s  7.5% of peak
//!     matmul nn 4096x4096x1024 [blocked 32x128]* max err 1.5e-5  3.3 GFLOP/s  7.4% of peak
//!     expert gemm1+gemm2 Gelu T=2048 K=2 E=16 D=512 F=1024 [blocked 32x128] max err 8.3e-7  3.2 GFLOP/s  7.0% of peak; dense equal-FLOPs 3.3 GFLOP/s; grouped/dense 0.97

use amoe::bench::{fma_peak, time_dispatches};
use amoe::gpu::{AdapterFilter, GpuContext, Tensor};
use amoe::kernels::expert::{ExpertBuffers, ExpertFfn, ExpertShape, ExpertSpec};
use amoe::kernels::matmul::{Matmul, MatmulShape, MatmulSpec, MatmulVariant, Trans};
use amoe::kernels::route::{routing_tensor, RouteConfig};
use amoe::kernels::{Activation, RoutingLayout, UNUSED};
use amoe::reference::activation::{act_gelu, act_silu};
use amoe::reference::matmul::matmul as matmul_twin;
use amoe::reference::route::route;
use amoe::util::Rng;
use amoe::Result;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let all = args.iter().any(|a| a == "--all");
    let filter = AdapterFilter::from_args(None, None)?;
    for ctx in pollster::block_on(GpuContext::all(&filter))? {
        pollster::block_on(run_adapter(&ctx, quick, all))?;
    }
    Ok(())
}

async fn run_adapter(ctx: &GpuContext, quick: bool, all: bool) -> Result<()> {
    let peak = fma_peak(ctx).await?;
    println!("{}: FMA peak {peak:.1} GFLOP/s", ctx.adapter_label());
    let mut shapes = vec![
        MatmulShape::nn(1024, 1024, 1024),
        MatmulShape {
            trans: Trans::NT,
            ..MatmulShape::nn(1024, 1024, 1024)
        },
        MatmulShape {
            trans: Trans::TN,
            ..MatmulShape::nn(1024, 1024, 1024)
        },
        // The router GEMM: T tokens x E experts.
        MatmulShape::nn(4096, 16, 512),
    ];
    if !quick {
        shapes.push(MatmulShape::nn(4096, 4096, 1024));
    }
    for shape in &shapes {
        let chosen = MatmulSpec::choose(ctx, shape.m, shape.n, shape.k, shape.trans);
        let big = shape.flops() > 3e9;
        for spec in MatmulSpec::configs() {
            if !spec.available(ctx) || (big && !all && spec != chosen) {
                continue;
            }
            // The workgroup-memory core is for GPUs; on a CPU adapter it is
            // only worth a look at one shape.
            let cpu = ctx.info.device_type == wgpu::DeviceType::Cpu;
            if cpu && spec.variant == MatmulVariant::Tiled && shape.m * shape.n > 1 << 20 && !all {
                continue;
            }
            let (gflops, err) = bench_matmul(ctx, shape, spec).await?;
            println!(
                "matmul {} {}x{}x{} [{}]{} max err {err:.1e}  {gflops:.1} GFLOP/s  {:.1}% of peak",
                shape.trans,
                shape.m,
                shape.n,
                shape.k,
                spec.label(),
                if spec == chosen { "*" } else { " " },
                100.0 * gflops / peak
            );
        }
    }
    let t = if quick { 1024 } else { 2048 };
    for act in [Activation::Gelu, Activation::SwiGlu] {
        let shape = ExpertShape {
            t,
            k: 2,
            e: 16,
            d: 512,
            f: 1024,
            act,
        };
        bench_expert(ctx, &shape, peak).await?;
    }
    Ok(())
}

/// The grouped expert FFN (top-2 routing, every slot used) against two dense
/// matmuls of the same FLOPs: [S, D] x [D, F] and [S, F] x [F, D], S = slots.
async fn bench_expert(ctx: &GpuContext, shape: &ExpertShape, peak: f64) -> Result<()> {
    let (t, k, e, d, f) = (shape.t, shape.k, shape.e, shape.d, shape.f);
    let spec = ExpertSpec::choose(ctx, shape);
    let layout = shape.layout(&spec);
    let rows = layout.max_rows();
    let mut rng = Rng::new(5);
    let mut ids = Vec::with_capacity(t * k);
    for _ in 0..t {
        let a = rng.below(e) as u32;
        let b = (a + 1 + rng.below(e - 1) as u32) % e as u32;
        ids.extend([a, b]);
    }
    let gy1 = f.div_ceil(spec.tile_n()) as u32;
    let gy2 = d.div_ceil(spec.tile_n()) as u32;
    let config = RouteConfig {
        grid_y1: gy1,
        grid_y2: gy2,
        ..RouteConfig::new(layout)
    };
    let (words, tos, _) = route(&ids, &config);
    let slots = words[RoutingLayout::USED_SLOTS] as usize;
    let x = rng.vec_sym(t * d, 1.0);
    let w1 = rng.vec_sym(e * d * f, (3.0 / d as f32).sqrt());
    let w3 = rng.vec_sym(e * d * f, (3.0 / d as f32).sqrt());
    let w2 = rng.vec_sym(e * f * d, (3.0 / f as f32).sqrt());
    let swiglu = shape.act == Activation::SwiGlu;
    let xt = Tensor::from_slice(ctx, "x", &[t, d], &x)?;
    let tost = Tensor::from_slice(ctx, "token_of_slot", &[rows], &tos)?;
    let routing = routing_tensor(ctx, &layout)?;
    routing.write(ctx, &words)?;
    let w1t = Tensor::from_slice(ctx, "w1", &[e, d, f], &w1)?;
    let w3t = if swiglu {
        Some(Tensor::from_slice(ctx, "w3", &[e, d, f], &w3)?)
    } else {
        None
    };
    let w2t = Tensor::from_slice(ctx, "w2", &[e, f, d], &w2)?;
    let h = Tensor::<f32>::zeros(ctx, "h", &[rows, f])?;
    let y = Tensor::<f32>::zeros(ctx, "y_expert", &[rows, d])?;
    let ffn = ExpertFfn::new(
        ctx,
        shape,
        spec,
        ExpertBuffers {
            x: &xt,
            token_of_slot: &tost,
            routing: &routing,
            w1: (&w1t).into(),
            w3: w3t.as_ref().map(Into::into),
            w2: (&w2t).into(),
            e0: 0,
            h: &h,
            y_expert: &y,
            u: None,
            u3: None,
        },
    )?;
    let s_grouped = time_dispatches(ctx, 1, 3, |enc| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        ffn.record(&mut pass);
        Ok(())
    })?;
    let up = if swiglu { 2.0 } else { 1.0 };
    let flops = 2.0 * slots as f64 * d as f64 * f as f64 * (up + 1.0);
    let grouped = flops / s_grouped / 1e9;

    // Check 16 routed rows against the twin's formula.
    let got_h = h.read(ctx).await?;
    let got_y = y.read(ctx).await?;
    let te = &words[layout.tile_expert()..];
    let live: Vec<usize> = (0..rows).filter(|&r| tos[r] != UNUSED).collect();
    let mut err = 0.0f64;
    for i in 0..16 {
        let r = live[i * (live.len() - 1) / 15];
        let (tok, ex) = (tos[r] as usize, te[r / layout.tile_m] as usize);
        let xr = &x[tok * d..(tok + 1) * d];
        let hr: Vec<f32> = (0..f)
            .map(|n| {
                let g = (0..d).fold(0.0f32, |acc, p| {
                    xr[p].mul_add(w1[ex * d * f + p * f + n], acc)
                });
                if swiglu {
                    let u = (0..d).fold(0.0f32, |acc, p| {
                        xr[p].mul_add(w3[ex * d * f + p * f + n], acc)
                    });
                    act_silu(g) * u
                } else {
                    act_gelu(g)
                }
            })
            .collect();
        for n in 0..f {
            err = err.max((got_h[r * f + n] - hr[n]).abs() as f64);
        }
        for n in 0..d {
            let want = (0..f).fold(0.0f32, |acc, p| {
                hr[p].mul_add(w2[ex * f * d + p * d + n], acc)
            });
            err = err.max((got_y[r * d + n] - want).abs() as f64);
        }
    }

    // Dense matmuls of the same FLOPs on [S, .] rows.
    let xs = Tensor::from_slice(ctx, "xs", &[slots, d], &rng.vec_sym(slots * d, 1.0))?;
    let wd1 = Tensor::from_slice(ctx, "wd1", &[d, f], &w1[..d * f])?;
    let wd2 = Tensor::from_slice(ctx, "wd2", &[f, d], &w2[..f * d])?;
    let hs = Tensor::<f32>::zeros(ctx, "hs", &[slots, f])?;
    let ys = Tensor::<f32>::zeros(ctx, "ys", &[slots, d])?;
    let s1 = MatmulShape::nn(slots, f, d);
    let s2 = MatmulShape::nn(slots, d, f);
    let mm1 = Matmul::new(
        ctx,
        &s1,
        MatmulSpec::choose(ctx, slots, f, d, Trans::NN),
        &xs,
        &wd1,
        &hs,
    )?;
    let mm2 = Matmul::new(
        ctx,
        &s2,
        MatmulSpec::choose(ctx, slots, d, f, Trans::NN),
        &hs,
        &wd2,
        &ys,
    )?;
    let s_dense = time_dispatches(ctx, 1, 3, |enc| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        for _ in 0..up as usize {
            mm1.record(&mut pass);
        }
        mm2.record(&mut pass);
        Ok(())
    })?;
    let dense = flops / s_dense / 1e9;
    println!(
        "expert gemm1+gemm2 {:?} T={t} K={k} E={e} D={d} F={f} [{}] max err {err:.1e}  {grouped:.1} GFLOP/s  {:.1}% of peak; dense equal-FLOPs {dense:.1} GFLOP/s; grouped/dense {:.2}",
        shape.act,
        spec.core.label(),
        100.0 * grouped / peak,
        grouped / dense
    );
    Ok(())
}

/// GFLOP/s of `spec` on `shape`, and the max abs error on a sample of rows.
async fn bench_matmul(
    ctx: &GpuContext,
    shape: &MatmulShape,
    spec: MatmulSpec,
) -> Result<(f64, f64)> {
    let (m, n, k, t) = (shape.m, shape.n, shape.k, shape.trans);
    let mut rng = Rng::new(7);
    let a = rng.vec_sym(m * k, 1.0);
    let b = rng.vec_sym(k * n, 1.0);
    let at = Tensor::from_slice(ctx, "a", &t.a_shape(m, k), &a)?;
    let bt = Tensor::from_slice(ctx, "b", &t.b_shape(k, n), &b)?;
    let ct = Tensor::<f32>::zeros(ctx, "c", &[m, n])?;
    let mm = Matmul::new(ctx, shape, spec, &at, &bt, &ct)?;
    let reps = if shape.flops() > 3e9 { 1 } else { 3 };
    let s = time_dispatches(ctx, reps, 3, |enc| {
        let mut pass = enc.begin_compute_pass(&Default::default());
        mm.record(&mut pass);
        Ok(())
    })?;
    let got = ct.read(ctx).await?;
    // Check 16 rows spread over M against the twin (the whole product on the
    // CPU would take longer than the GPU run).
    let rows: Vec<usize> = (0..16).map(|i| i * (m - 1) / 15).collect();
    let mut err = 0.0f64;
    for &r in &rows {
        let a_row: Vec<f32> = (0..k)
            .map(|p| match t {
                Trans::TN => a[p * m + r],
                _ => a[r * k + p],
            })
            .collect();
        // One row of A as a [1, K] matrix; B as it is.
        let want = matmul_twin(
            &a_row,
            &b,
            1,
            n,
            k,
            if t == Trans::NT { Trans::NT } else { Trans::NN },
            1.0,
            0.0,
            None,
        );
        for (g, w) in got[r * n..(r + 1) * n].iter().zip(&want) {
            err = err.max((g - w).abs() as f64);
        }
    }
    Ok((shape.flops() / s / 1e9, err))
}
