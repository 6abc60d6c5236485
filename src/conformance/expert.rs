//! Conformance cases of the grouped expert FFN (`kernels::expert`): the slot
//! plan is built on the CPU by the route twin (`reference::route::route`)
//! from chosen `topk_ids`, uploaded, and both GEMMs run from it (indirect
//! dispatch); `h` and `y_expert` are compared on the routed rows against the
//! twin `reference::expert::expert_ffn`. Every GEMM core, GELU and SwiGLU,
//! and the routing edge cases: T = 1, T not a multiple of the tile, E > T, an
//! empty expert, all tokens on one expert, 1-token experts, K = 1, K = 2 with
//! unused slots, D and F not multiples of 4; weights stored as f16 with D
//! and F multiples of 4 and not, block-quantized q8 (D and F not multiples
//! of 4) and q4 (multiples, and in parts). One more case checks that
//! stacked weights past the storage-binding limit give `Error::Limit`.

use super::CheckResult;
use crate::error::{Error, Result};
use crate::gpu::{rounded_f16, Dtype, GpuContext, Tensor, Weight};
use crate::kernels::expert::{ExpertBuffers, ExpertFfn, ExpertShape, ExpertSpec, ExpertStage};
use crate::kernels::matmul::MatmulSpec;
use crate::kernels::route::{routing_tensor, RouteConfig};
use crate::kernels::{Activation, UNUSED};
use crate::reference::expert::{expert_ffn, ExpertWeights};
use crate::reference::route::route;
use crate::tol::{compare_exact, Tol};
use crate::util::Rng;

/// An expert FFN conformance case.
#[derive(Clone, Debug)]
pub enum Case {
    /// Run both GEMMs on a CPU-built slot plan.
    Ffn(FfnCase),
    /// Weights larger than the adapter's storage binding: `Error::Limit`.
    BindingLimit,
}

#[derive(Clone, Debug)]
pub struct FfnCase {
    pub what: &'static str,
    pub shape: ExpertShape,
    pub core: MatmulSpec,
    /// topk_ids [T, K]
    pub ids: Vec<u32>,
    pub seed: u64,
    /// How the weights are stored (the twin reads them rounded so: to
    /// f16, or through `quant::rounded`).
    pub storage: Dtype,
    /// The expert bank split into this many parts (a bank larger than one
    /// storage binding): both GEMMs run once per part.
    pub parts: usize,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Ffn(c) => {
                let s = &c.shape;
                (
                    format!(
                        "{}+{}",
                        ExpertStage::gemm1(s.act).name(),
                        ExpertStage::Gemm2.name()
                    ),
                    format!(
                        "{}: T={} K={} E={} D={} F={} [{}]",
                        c.what,
                        s.t,
                        s.k,
                        s.e,
                        s.d,
                        s.f,
                        c.core.with_b16(c.storage == Dtype::F16).label()
                    ) + &match c.storage.quant() {
                        Some(q) => format!(", {q} weights"),
                        None => String::new(),
                    } + &if c.parts > 1 {
                        format!(", bank in {} parts", c.parts)
                    } else {
                        String::new()
                    },
                )
            }
            Case::BindingLimit => (
                "expert_ffn".into(),
                "w1 [E, D, F] past the storage-binding limit gives Error::Limit".into(),
            ),
        }
    }
}

/// A routing pattern: what it covers, (T, K, E, D, F), topk_ids [T, K].
struct Pattern {
    what: &'static str,
    dims: [usize; 5],
    ids: Vec<u32>,
}

fn patterns() -> Vec<Pattern> {
    let mut rng = Rng::new(11);
    let mut pairs = |t: usize, allowed: &[u32], p_unused: f32| -> Vec<u32> {
        let mut v = Vec::with_capacity(2 * t);
        for _ in 0..t {
            let a = allowed[rng.below(allowed.len())];
            let mut b = allowed[rng.below(allowed.len())];
            while b == a {
                b = allowed[rng.below(allowed.len())];
            }
            v.push(a);
            v.push(if rng.uniform() < p_unused { UNUSED } else { b });
        }
        v
    };
    let all = |e: usize| (0..e as u32).collect::<Vec<_>>();
    let p2 = pairs(37, &all(8), 0.0);
    let p3 = pairs(5, &all(16), 0.0);
    let p4 = pairs(24, &[0, 1, 2, 4, 5], 0.0);
    let p8 = pairs(40, &all(6), 0.6);
    let p9 = pairs(200, &all(4), 0.2);
    let mut rng = Rng::new(12);
    let p7: Vec<u32> = (0..64).map(|_| rng.below(4) as u32).collect();
    let p = |what, dims, ids| Pattern { what, dims, ids };
    vec![
        p("T=1", [1, 2, 4, 24, 40], vec![2, 0]),
        p(
            "T not a multiple of the tile, D and F not multiples of 4",
            [37, 2, 8, 13, 21],
            p2,
        ),
        p("E > T", [5, 2, 16, 24, 40], p3),
        p("expert 3 empty", [24, 2, 6, 24, 40], p4),
        p("all tokens on one expert", [50, 1, 4, 24, 40], vec![2; 50]),
        p("1-token experts", [6, 1, 8, 24, 40], (1..7).collect()),
        p("K=1", [64, 1, 4, 24, 40], p7),
        p(
            "K=2 with unused slots (adaptive), odd D and F",
            [40, 2, 6, 13, 21],
            p8,
        ),
        p("several tiles per expert", [200, 2, 4, 64, 96], p9),
    ]
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut seed = 100;
    for core in ExpertSpec::cores() {
        for act in [Activation::Gelu, Activation::SwiGlu] {
            for Pattern { what, dims, ids } in patterns() {
                let [t, k, e, d, f] = dims;
                // f16 weights: D and F multiples of 4 (two words per load)
                // and not (one half per load).
                let f16_too = what.starts_with("T not") || what.starts_with("several");
                // A split bank (E = 4): 4 parts of one expert in f32, 2 of
                // two in f16.
                let split_too = what.starts_with("several");
                // Block-quantized weights likewise: q8 on the odd shapes
                // (one value per load), q4 on the others (one word per
                // four values), and q4 in 2 parts.
                for (storage, parts) in [
                    (Dtype::F32, 1),
                    (Dtype::F16, 1),
                    (Dtype::F32, 4),
                    (Dtype::F16, 2),
                    (Dtype::Q8, 1),
                    (Dtype::Q4, 1),
                    (Dtype::Q4, 2),
                ] {
                    // f16 and quantized with SwiGLU only (the published
                    // models'; GELU's GEMM 1 shares its loaders): fewer
                    // pipelines to build.
                    let stored_here = f16_too && act == Activation::SwiGlu;
                    let odd = what.starts_with("T not");
                    let here = match storage {
                        Dtype::F32 => true,
                        Dtype::F16 => stored_here,
                        Dtype::Q8 => stored_here && odd,
                        Dtype::Q4 => stored_here && !odd,
                    };
                    if !here || (parts > 1 && !split_too) {
                        continue;
                    }
                    seed += 1;
                    v.push(Case::Ffn(FfnCase {
                        what,
                        shape: ExpertShape { t, k, e, d, f, act },
                        core,
                        ids: ids.clone(),
                        seed,
                        storage,
                        parts,
                    }));
                }
            }
        }
    }
    v.push(Case::BindingLimit);
    v
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    match case {
        Case::Ffn(c) => run_ffn(ctx, c, kernel, name).await,
        Case::BindingLimit => run_limit(ctx, kernel, name),
    }
}

async fn run_ffn(
    ctx: &GpuContext,
    c: &FfnCase,
    kernel: String,
    name: String,
) -> Result<CheckResult> {
    let s = &c.shape;
    let spec = ExpertSpec {
        stage: ExpertStage::gemm1(s.act),
        core: c.core,
        quant: c.storage.quant(),
    };
    let (t, e, d, f) = (s.t, s.e, s.d, s.f);
    let layout = s.layout(&spec);
    let rows = layout.max_rows();
    let grid_y1 = f.div_ceil(spec.tile_n()) as u32;
    let grid_y2 = d.div_ceil(spec.tile_n()) as u32;
    let (words, token_of_slot, _) = route(
        &c.ids,
        &RouteConfig {
            grid_y1,
            grid_y2,
            ..RouteConfig::new(layout)
        },
    );

    let mut rng = Rng::new(c.seed);
    let x = rng.vec_sym(t * d, 1.0);
    let a_in = (3.0 / d as f32).sqrt();
    let mut w1 = rng.vec_sym(e * d * f, a_in);
    let mut w3 = rng.vec_sym(e * d * f, a_in);
    let mut w2 = rng.vec_sym(e * f * d, (3.0 / f as f32).sqrt());
    // A quantized bank in parts is quantized part by part: D * F is a
    // multiple of a pair of blocks in those cases, so this is the same.
    for w in [&mut w1, &mut w3, &mut w2] {
        match c.storage {
            Dtype::F32 => {}
            Dtype::F16 => *w = rounded_f16(w),
            Dtype::Q8 | Dtype::Q4 => {
                *w = crate::quant::rounded(c.storage.quant().expect("quantized"), "w", w)?
            }
        }
    }
    let dtype = c.storage;
    let swiglu = s.act == Activation::SwiGlu;

    let xt = Tensor::from_slice(ctx, "x", &[t, d], &x)?;
    let tos = Tensor::from_slice(ctx, "token_of_slot", &[rows], &token_of_slot)?;
    let routing = routing_tensor(ctx, &layout)?;
    routing.write(ctx, &words)?;
    let h = Tensor::<f32>::zeros(ctx, "h", &[rows, f])?;
    let y = Tensor::<f32>::zeros(ctx, "y_expert", &[rows, d])?;
    // The bank whole, or in parts of whole experts (each part its own
    // buffers, both GEMMs once per part).
    let per = e.div_ceil(c.parts.max(1));
    let mut ffns = Vec::new();
    for e0 in (0..e).step_by(per) {
        let ec = per.min(e - e0);
        let (a, b) = (e0 * d * f, (e0 + ec) * d * f);
        let w1t = Weight::upload(ctx, "w1", &[ec, d, f], &w1[a..b], dtype)?;
        let w3t = if swiglu {
            Some(Weight::upload(ctx, "w3", &[ec, d, f], &w3[a..b], dtype)?)
        } else {
            None
        };
        let w2t = Weight::upload(ctx, "w2", &[ec, f, d], &w2[a..b], dtype)?;
        ffns.push(ExpertFfn::new(
            ctx,
            s,
            spec,
            ExpertBuffers {
                x: &xt,
                token_of_slot: &tos,
                routing: &routing,
                w1: w1t.view("expert_ffn")?,
                w3: match &w3t {
                    Some(w) => Some(w.view("expert_ffn")?),
                    None => None,
                },
                w2: w2t.view("expert_ffn")?,
                e0,
                h: &h,
                y_expert: &y,
                u: None,
                u3: None,
            },
        )?);
    }
    let ffn = &ffns[0];
    let grids = compare_exact(&[ffn.grid_y1(), ffn.grid_y2()], &[grid_y1, grid_y2]);
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("expert_ffn"),
        });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("expert_ffn"),
            timestamp_writes: None,
        });
        for f in &ffns {
            f.record(&mut pass);
        }
    }
    ctx.submit_and_wait(encoder)?;
    let got_h = h.read(ctx).await?;
    let got_y = y.read(ctx).await?;

    let weights = ExpertWeights {
        w1: &w1,
        w3: swiglu.then_some(&w3[..]),
        w2: &w2,
    };
    let (want_h, want_y) = expert_ffn(&x, &token_of_slot, &words, &layout, &weights, d, f, s.act);
    // Padding rows may hold anything: compare the routed rows only.
    let live: Vec<usize> = (0..rows).filter(|&r| token_of_slot[r] != UNUSED).collect();
    let pick = |v: &[f32], w: usize| -> Vec<f32> {
        live.iter()
            .flat_map(|&r| v[r * w..(r + 1) * w].to_vec())
            .collect()
    };
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[
            ("grid_y", grids),
            (
                "h",
                Tol::reduction(d).compare(&pick(&got_h, f), &pick(&want_h, f)),
            ),
            (
                "y_expert",
                Tol::reduction(f).compare(&pick(&got_y, d), &pick(&want_y, d)),
            ),
        ],
    ))
}

fn run_limit(ctx: &GpuContext, kernel: String, name: String) -> Result<CheckResult> {
    // 16 x 1024 x 2304 f32 = 144 MiB per stacked weight: past the WebGPU
    // default (128 MiB). Checked from the shape alone, nothing is allocated.
    let shape = ExpertShape {
        t: 64,
        k: 2,
        e: 16,
        d: 1024,
        f: 2304,
        act: Activation::Gelu,
    };
    let spec = ExpertSpec::choose(ctx, &shape);
    let bytes = 4 * (shape.e * shape.d * shape.f) as u64;
    let max = ctx
        .limits
        .max_storage_buffer_binding_size
        .min(ctx.limits.max_buffer_size);
    let got = shape.check_limits(ctx, &spec, shape.e);
    let ok = match (&got, bytes > max) {
        (Err(Error::Limit { what, needed, .. }), true) => what.contains("w1") && *needed == bytes,
        (Ok(()), false) => true,
        _ => false,
    };
    let mut r =
        CheckResult::from_comparisons(kernel, name, &[("error", compare_exact(&[ok], &[true]))]);
    if !ok {
        r.note = Some(format!(
            "weights of {bytes} bytes, binding limit {max}: got {got:?}"
        ));
    }
    Ok(r)
}
