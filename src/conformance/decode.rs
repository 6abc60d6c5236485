//! Conformance cases of the decode FFN (`decode_up_gelu` / `decode_up_swiglu`
//! then `decode_down`, recorded by `kernels::decode::DecodeFfn`) against the
//! twin `reference::decode::decode_ffn`: `h` within `Tol::reduction(D)`, `y`
//! within `Tol::reduction(F)`; with f32 weights, f16 ones (the twin on the
//! weights rounded to f16) and block-quantized q8 and q4 ones (the twin on
//! the weights through `quant::rounded`, as the shader dequantizes them).

use super::route::{make_ids, Ids};
use super::CheckResult;
use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass};
use crate::error::Result;
use crate::gpu::{rounded_f16, Dtype, GpuContext, Tensor, Weight};
use crate::kernels::decode::{DecodeBuffers, DecodeFfn, DecodePart, DecodeShape};
use crate::kernels::Activation;
use crate::reference::decode::decode_ffn;
use crate::tol::Tol;
use crate::util::{Rng, Stopwatch};

/// A decode conformance case.
#[derive(Clone, Debug)]
pub enum Case {
    Twin {
        activation: Activation,
        shape: DecodeShape,
        ids: Ids,
        seed: u64,
        /// How the weights are stored (the twin reads them rounded so).
        storage: Dtype,
        /// The expert bank in this many parts (both kernels once per part,
        /// later parts adding to y).
        parts: usize,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Twin {
                activation,
                shape: s,
                ids,
                storage,
                parts,
                ..
            } => (
                "decode_ffn".into(),
                format!(
                    "{} T={} K={} E={} D={} F={} {}{}",
                    match activation {
                        Activation::Gelu => "gelu",
                        Activation::SwiGlu => "swiglu",
                    },
                    s.t,
                    s.k,
                    s.e,
                    s.d,
                    s.f,
                    ids.label(),
                    if *storage == Dtype::F32 {
                        String::new()
                    } else {
                        format!(" {storage} weights")
                    }
                ) + &if *parts > 1 {
                    format!(", bank in {parts} parts")
                } else {
                    String::new()
                },
            ),
            Case::BadInputs => (
                "decode_ffn".into(),
                "bad inputs: K > E, T = 0, missing w3, shape mismatch".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let c = |activation, t, k, e, d, f, ids, seed| Case::Twin {
        activation,
        shape: DecodeShape { t, k, e, d, f },
        ids,
        seed,
        storage: Dtype::F32,
        parts: 1,
    };
    let c16 = |activation, t, k, e, d, f, ids, seed| Case::Twin {
        activation,
        shape: DecodeShape { t, k, e, d, f },
        ids,
        seed,
        storage: Dtype::F16,
        parts: 1,
    };
    let split = |activation, t, k, e, d, f, ids, seed, storage, parts| Case::Twin {
        activation,
        shape: DecodeShape { t, k, e, d, f },
        ids,
        seed,
        storage,
        parts,
    };
    use Activation::{Gelu, SwiGlu};
    let random = Ids::Random { unused_pct: 0 };
    vec![
        c(Gelu, 1, 1, 4, 64, 128, random, 1),
        c(SwiGlu, 3, 2, 8, 96, 200, random, 2),
        c(
            SwiGlu,
            16,
            2,
            16,
            256,
            512,
            Ids::Adaptive { two_pct: 30 },
            3,
        ),
        c(Gelu, 5, 2, 64, 32, 48, random, 4),
        c(SwiGlu, 2, 2, 4, 300, 1100, random, 5),
        c(Gelu, 8, 1, 8, 128, 256, Ids::OneExpert(2), 6),
        c(SwiGlu, 4, 2, 8, 64, 96, Ids::Random { unused_pct: 25 }, 7),
        // D or F not a multiple of 4: the scalar path.
        c(Gelu, 3, 2, 8, 30, 50, random, 9),
        c(SwiGlu, 2, 2, 4, 97, 300, random, 10),
        c(SwiGlu, 5, 2, 6, 64, 302, Ids::Adaptive { two_pct: 50 }, 11),
        // K not a power of two (decode_up visits the slots in bit-reversed
        // order, skipping those past K), with unused slots, and two column
        // blocks (F > 256).
        c(SwiGlu, 3, 5, 16, 64, 96, Ids::Random { unused_pct: 30 }, 19),
        c(Gelu, 2, 6, 8, 32, 300, random, 20),
        c(SwiGlu, 4, 3, 8, 64, 64, Ids::Random { unused_pct: 25 }, 21),
        c(SwiGlu, 1, 7, 8, 32, 520, random, 22),
        // One decode step of a mid-sized model: big enough to time.
        c(SwiGlu, 1, 2, 4, 512, 2048, random, 8),
        // f16 weights: the vec4 path, the scalar path, adaptive slots, and
        // the timed shape (half the weight bytes).
        c16(Gelu, 3, 2, 8, 96, 200, random, 12),
        c16(SwiGlu, 2, 2, 4, 97, 301, random, 13),
        c16(SwiGlu, 5, 2, 6, 64, 302, Ids::Adaptive { two_pct: 50 }, 14),
        c16(SwiGlu, 1, 2, 4, 512, 2048, random, 15),
        // A bank split into parts (unused slots, the vec4 and scalar paths,
        // more experts per token than one part holds).
        split(
            SwiGlu,
            4,
            2,
            8,
            64,
            96,
            Ids::Random { unused_pct: 25 },
            16,
            Dtype::F32,
            3,
        ),
        split(Gelu, 3, 2, 8, 30, 50, random, 17, Dtype::F16, 2),
        split(SwiGlu, 2, 8, 16, 32, 48, random, 18, Dtype::F32, 4),
        // Block-quantized weights (q8, q4): the vec4 path, the scalar path
        // (D or F not a multiple of 4; blocks then straddle rows), unused
        // slots, top-8 with empty slots, a bank in parts, the timed shape.
        split(SwiGlu, 3, 2, 8, 64, 96, random, 23, Dtype::Q8, 1),
        split(SwiGlu, 3, 2, 8, 64, 96, random, 24, Dtype::Q4, 1),
        split(Gelu, 2, 2, 4, 30, 50, random, 25, Dtype::Q8, 1),
        split(SwiGlu, 2, 2, 4, 97, 302, random, 26, Dtype::Q4, 1),
        split(
            SwiGlu,
            4,
            8,
            16,
            64,
            128,
            Ids::Random { unused_pct: 40 },
            27,
            Dtype::Q4,
            1,
        ),
        split(SwiGlu, 2, 8, 16, 32, 64, random, 28, Dtype::Q8, 4),
        split(SwiGlu, 1, 2, 4, 512, 2048, random, 29, Dtype::Q8, 1),
        split(SwiGlu, 1, 2, 4, 512, 2048, random, 30, Dtype::Q4, 1),
        Case::BadInputs,
    ]
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let Case::Twin {
        activation,
        shape: s,
        ids,
        seed,
        storage,
        parts,
    } = *case
    else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let DecodeShape { t, k, e, d, f } = s;
    let mut rng = Rng::new(seed);
    let ids_host = make_ids(t, k, e, ids, seed);
    let weights: Vec<f32> = (0..t * k).map(|_| rng.uniform()).collect();
    let x = rng.vec_sym(t * d, 1.0);
    // What the kernel reads of each stored weight. A quantized bank in
    // parts is quantized part by part: the cases keep D * F a multiple of
    // a pair of blocks, so that this is the whole bank's rounding.
    let round = |w: Vec<f32>| -> Result<Vec<f32>> {
        Ok(match storage.quant() {
            None if storage == Dtype::F16 => rounded_f16(&w),
            None => w,
            Some(q) => crate::quant::rounded(q, "w", &w)?,
        })
    };
    let dtype = storage;
    let w1 = round(rng.vec_sym(e * d * f, 1.0 / (d as f32).sqrt()))?;
    let w3 = match activation {
        Activation::SwiGlu => Some(round(rng.vec_sym(e * d * f, 1.0 / (d as f32).sqrt()))?),
        Activation::Gelu => None,
    };
    let w2 = round(rng.vec_sym(e * f * d, 1.0 / (f as f32).sqrt()))?;
    let (want_h, want_y) = decode_ffn(
        &s,
        activation,
        &x,
        &ids_host,
        &weights,
        &w1,
        w3.as_deref(),
        &w2,
    );

    let x = Tensor::from_slice(ctx, "x", &[t, d], &x)?;
    let topk_ids = Tensor::from_slice(ctx, "topk_ids", &[t, k], &ids_host)?;
    let topk_weights = Tensor::from_slice(ctx, "topk_weights", &[t, k], &weights)?;
    let y = Tensor::<f32>::zeros(ctx, "y", &[t, d])?;
    // The bank whole, or in parts of whole experts.
    let per = e.div_ceil(parts.max(1));
    let mut ffns = Vec::new();
    for e0 in (0..e).step_by(per) {
        let ec = per.min(e - e0);
        let (a, b) = (e0 * d * f, (e0 + ec) * d * f);
        let w1 = Weight::upload(ctx, "w1", &[ec, d, f], &w1[a..b], dtype)?;
        let w3 = match &w3 {
            Some(w) => Some(Weight::upload(ctx, "w3", &[ec, d, f], &w[a..b], dtype)?),
            None => None,
        };
        let w2 = Weight::upload(ctx, "w2", &[ec, f, d], &w2[a..b], dtype)?;
        ffns.push(DecodeFfn::new(
            ctx,
            activation,
            &DecodeBuffers {
                x: &x,
                topk_ids: &topk_ids,
                topk_weights: &topk_weights,
                w1: w1.view("decode")?,
                w3: match &w3 {
                    Some(w) => Some(w.view("decode")?),
                    None => None,
                },
                w2: w2.view("decode")?,
                y: &y,
                part: (parts > 1).then_some(DecodePart {
                    e0,
                    experts: e,
                    accumulate: e0 > 0,
                }),
            },
        )?);
    }
    let record = |pass: &mut wgpu::ComputePass<'_>| ffns.iter().for_each(|f| f.record(pass));
    // Warm-up run (pipelines, first touch of the weights), then the timed one.
    submit_pass(ctx, record)?;
    let clock = Stopwatch::start();
    submit_pass(ctx, record)?;
    let seconds = clock.seconds();
    // Each slot's h is in the part holding its expert (unused: the first).
    let mut got_h = ffns[0].h().read(ctx).await?;
    for (p, ffn) in ffns.iter().enumerate().skip(1) {
        let h = ffn.h().read(ctx).await?;
        for (slot, &id) in ids_host.iter().enumerate() {
            if (id as usize) < e && id as usize / per == p {
                got_h[slot * f..(slot + 1) * f].copy_from_slice(&h[slot * f..(slot + 1) * f]);
            }
        }
    }
    let got_y = y.read(ctx).await?;
    let mut r = CheckResult::from_comparisons(
        kernel,
        name,
        &[
            ("h", Tol::reduction(d).compare(&got_h, &want_h)),
            ("y", Tol::reduction(f).compare(&got_y, &want_y)),
        ],
    );
    let ffn = &ffns[0];
    if d * f >= 1 << 20 {
        r.gflops = Some(ffn.flops() / seconds / 1e9);
    }
    Ok(r)
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_decode =
        |what: &str, act: Activation, s: DecodeShape, give_w3: bool, y_rows: usize, want| {
            let scope = ctx.error_scope();
            let r = (|| -> Result<DecodeFfn> {
                let DecodeShape { t, k, e, d, f } = s;
                let x = Tensor::<f32>::zeros(ctx, "x", &[t, d])?;
                let topk_ids = Tensor::<u32>::zeros(ctx, "topk_ids", &[t, k])?;
                let topk_weights = Tensor::<f32>::zeros(ctx, "topk_weights", &[t, k])?;
                let w1 = Tensor::<f32>::zeros(ctx, "w1", &[e, d, f])?;
                let w3 = Tensor::<f32>::zeros(ctx, "w3", &[e, d, f])?;
                let w2 = Tensor::<f32>::zeros(ctx, "w2", &[e, f, d])?;
                let y = Tensor::<f32>::zeros(ctx, "y", &[y_rows, d])?;
                DecodeFfn::new(
                    ctx,
                    act,
                    &DecodeBuffers {
                        x: &x,
                        topk_ids: &topk_ids,
                        topk_weights: &topk_weights,
                        w1: (&w1).into(),
                        w3: give_w3.then_some((&w3).into()),
                        w2: (&w2).into(),
                        y: &y,
                        part: None,
                    },
                )
            })();
            checks.push(expect_error(scope, what, r, want));
        };
    let sh = |t, k, e| DecodeShape {
        t,
        k,
        e,
        d: 8,
        f: 16,
    };
    use Activation::{Gelu, SwiGlu};
    try_decode("K > E", Gelu, sh(2, 2, 1), false, 2, is_invalid);
    try_decode("T = 0", Gelu, sh(0, 1, 4), false, 0, is_invalid);
    try_decode(
        "SwiGLU without w3",
        SwiGlu,
        sh(2, 2, 4),
        false,
        2,
        is_invalid,
    );
    try_decode("y [T+1, D]", SwiGlu, sh(2, 2, 4), true, 3, is_shape);
    bad_inputs_result(kernel, case, checks)
}
