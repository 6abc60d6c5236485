//! Conformance of the KV-cache kernels against `reference::kv_cache`:
//! `kv_embed` and `kv_append` exactly (copies and one add), `kv_attention`
//! within a reduction tolerance, over calls that start at position 0, in the
//! middle of a chunk of keys and across chunk boundaries.

use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass, CheckResult};
use crate::error::{Error, Result};
use crate::gpu::{rounded_f16, Dtype, GpuContext, Tensor, Weight};
use crate::kernels::kv_cache::{
    KvAppend, KvAttention, KvCache, KvEmbed, KvEmbedBuffers, KvShape, KvSpec, KvStep,
};
use crate::reference::kv_cache::{kv_append, kv_attention, kv_embed, KvDims};
use crate::tol::{compare_exact, Tol};
use crate::util::Rng;

#[derive(Clone, Debug)]
pub enum Case {
    Embed {
        t: usize,
        pos0: usize,
        v: usize,
        d: usize,
        n: usize,
        seed: u64,
        /// wte stored as f16 (the twin reads it rounded).
        f16: bool,
        /// wte in this many parts of rows.
        parts: usize,
    },
    Attention {
        dims: KvDims,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Embed {
                t,
                pos0,
                v,
                d,
                n,
                f16,
                parts,
                ..
            } => {
                let f16 = format!(
                    "{}{}",
                    if *f16 { ", wte in f16" } else { "" },
                    if *parts > 1 {
                        format!(", wte in {parts} parts")
                    } else {
                        String::new()
                    }
                );
                (
                    KvSpec::Embed.name().into(),
                    if *n == 0 {
                        format!("T={t} pos0={pos0} V={v} D={d} no wpe, scale 0.5{f16}")
                    } else {
                        format!("T={t} pos0={pos0} V={v} D={d} N={n}{f16}")
                    },
                )
            }
            Case::Attention { dims: s, .. } => (
                format!("{}+{}", KvSpec::Append.name(), KvSpec::Attention.name()),
                format!(
                    "T={} pos0={} H={} Hkv={} Dh={} N={} W={} scale={}",
                    s.t, s.pos0, s.h, s.hkv, s.dh, s.n, s.window, s.scale
                ),
            ),
            Case::BadInputs => (
                KvSpec::Attention.name().into(),
                "bad inputs: Dh > 256, H not a multiple of Hkv, qkv shape, span past the cache"
                    .into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let att = |t, pos0, h, dh, n, seed| Case::Attention {
        dims: KvDims::mha(t, h, dh, n, pos0),
        seed,
    };
    // GQA / MQA, a sliding window, a score scale of the model's own.
    let gqa = |t, pos0, h, hkv, dh, n, window, scale: Option<f32>, seed| Case::Attention {
        dims: KvDims {
            hkv,
            window,
            scale: scale.unwrap_or(1.0 / (dh as f32).sqrt()),
            ..KvDims::mha(t, h, dh, n, pos0)
        },
        seed,
    };
    vec![
        Case::Embed {
            t: 1,
            pos0: 0,
            v: 11,
            d: 8,
            n: 4,
            seed: 1,
            f16: false,
            parts: 1,
        },
        Case::Embed {
            t: 5,
            pos0: 27,
            v: 300,
            d: 36,
            n: 32,
            seed: 2,
            f16: false,
            parts: 1,
        },
        Case::Embed {
            t: 5,
            pos0: 27,
            v: 300,
            d: 36,
            n: 32,
            seed: 15,
            f16: true,
            parts: 1,
        },
        // Decode: one token, first position and deep into the cache.
        att(1, 0, 1, 16, 8, 3),
        att(1, 77, 4, 32, 128, 4),
        // A few tokens across the 64-key chunk boundary; Dh = 64.
        att(5, 60, 2, 64, 70, 5),
        // A prefill from 0 longer than one chunk; odd head width.
        att(130, 0, 2, 12, 130, 6),
        // The cache exactly full.
        att(3, 0, 3, 8, 3, 7),
        // GQA 4/2 with a window shorter than the prompt (Mixtral), MQA 4/1,
        // a window across the 64-key chunk boundary, Granite's scale.
        gqa(26, 0, 4, 2, 24, 64, 8, None, 8),
        gqa(1, 30, 4, 1, 16, 64, 0, None, 9),
        gqa(3, 100, 8, 2, 32, 128, 70, None, 10),
        gqa(9, 4, 4, 2, 16, 32, 0, Some(0.125), 11),
        // Head widths of published models: 128 and 256 (several output
        // columns per invocation).
        gqa(4, 5, 4, 2, 128, 16, 0, None, 12),
        gqa(2, 70, 2, 1, 256, 80, 0, None, 13),
        // Rotary models embed without wpe; Granite scales the tokens.
        Case::Embed {
            t: 4,
            pos0: 9,
            v: 50,
            d: 20,
            n: 0,
            seed: 14,
            f16: false,
            parts: 1,
        },
        Case::Embed {
            t: 3,
            pos0: 2,
            v: 50,
            d: 21,
            n: 0,
            seed: 16,
            f16: true,
            parts: 1,
        },
        Case::Embed {
            t: 6,
            pos0: 3,
            v: 50,
            d: 20,
            n: 16,
            seed: 17,
            f16: false,
            parts: 3,
        },
        Case::BadInputs,
    ]
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    match *case {
        Case::Embed {
            t,
            pos0,
            v,
            d,
            n,
            seed,
            f16,
            parts,
        } => {
            let mut rng = Rng::new(seed);
            let ids: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
            let mut wte = rng.vec_sym(v * d, 1.0);
            if f16 {
                wte = rounded_f16(&wte);
            }
            // N = 0: no position table (a rotary model), tokens scaled.
            let rotary = n == 0;
            let cap = if rotary { pos0 + t } else { n };
            let wpe = rng.vec_sym(cap * d, 1.0);
            let scale = if rotary { 0.5 } else { 1.0 };
            let want = kv_embed(&ids, &wte, (!rotary).then_some(&wpe[..]), scale, pos0, d);
            let step = KvStep::new(ctx, cap)?;
            step.set(ctx, pos0, t)?;
            let tids = Tensor::from_slice(ctx, "ids", &[t], &ids)?;
            let dtype = if f16 { Dtype::F16 } else { Dtype::F32 };
            let twpe = Tensor::from_slice(ctx, "wpe", &[cap, d], &wpe)?;
            let x = Tensor::<f32>::zeros(ctx, "x", &[t, d])?;
            let per = v.div_ceil(parts.max(1));
            let mut ks = Vec::new();
            for v0 in (0..v).step_by(per) {
                let vc = per.min(v - v0);
                let twte =
                    Weight::upload(ctx, "wte", &[vc, d], &wte[v0 * d..(v0 + vc) * d], dtype)?;
                ks.push(KvEmbed::new(
                    ctx,
                    &KvEmbedBuffers {
                        step: &step,
                        ids: &tids,
                        wte: twte.view("kv_embed")?,
                        wpe: (!rotary).then_some(&twpe),
                        x: &x,
                        scale,
                        rows: (parts > 1).then_some((v0, v)),
                    },
                )?);
            }
            submit_pass(ctx, |p| ks.iter().for_each(|k| k.record(p)))?;
            let got = x.read(ctx).await?;
            Ok(CheckResult::from_comparisons(
                kernel,
                name,
                &[("x", compare_exact(&bits(&got), &bits(&want)))],
            ))
        }
        Case::Attention { dims: s, seed } => {
            let mut rng = Rng::new(seed);
            let d = s.h * s.dh;
            let shape = KvShape {
                t: s.t,
                h: s.h,
                hkv: s.hkv,
                dh: s.dh,
                n: s.n,
                window: s.window,
                scale: s.scale,
            };
            let qkv = rng.vec_sym(s.t * shape.qkv_width(), 2.0);
            // Earlier positions hold earlier keys; later ones garbage that
            // must not be read.
            let mut kc = rng.vec_sym(s.hkv * s.n * s.dh, 2.0);
            let mut vc = rng.vec_sym(s.hkv * s.n * s.dh, 2.0);
            let step = KvStep::new(ctx, s.n)?;
            step.set(ctx, s.pos0, s.t)?;
            let tqkv = Tensor::from_slice(ctx, "qkv", &[s.t, shape.qkv_width()], &qkv)?;
            let cache = KvCache {
                k: Tensor::from_slice(ctx, "k_cache", &shape.cache(), &kc)?,
                v: Tensor::from_slice(ctx, "v_cache", &shape.cache(), &vc)?,
            };
            let o = Tensor::<f32>::zeros(ctx, "o", &[s.t, d])?;
            let append = KvAppend::new(ctx, &shape, &step, &tqkv, &cache)?;
            let attend = KvAttention::new(ctx, &shape, &step, &tqkv, &cache, &o)?;
            submit_pass(ctx, |p| {
                append.record(p);
                attend.record(p);
            })?;
            kv_append(&qkv, &mut kc, &mut vc, s);
            let want = kv_attention(&qkv, &kc, &vc, s);
            let got_k = cache.k.read(ctx).await?;
            let got_v = cache.v.read(ctx).await?;
            let got_o = o.read(ctx).await?;
            let tol = Tol {
                atol: 2e-5,
                rtol: 1e-4,
            };
            Ok(CheckResult::from_comparisons(
                kernel,
                name,
                &[
                    ("k_cache", compare_exact(&bits(&got_k), &bits(&kc))),
                    ("v_cache", compare_exact(&bits(&got_v), &bits(&vc))),
                    ("o", tol.compare(&got_o, &want)),
                ],
            ))
        }
        Case::BadInputs => Ok(bad_inputs(ctx, &kernel, &name)),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let attention = |t: usize, h: usize, dh: usize, qkv_rows: usize| -> Result<KvAttention> {
        let shape = KvShape::mha(t, h, dh, 8);
        let step = KvStep::new(ctx, 8)?;
        let qkv = Tensor::<f32>::zeros(ctx, "qkv", &[qkv_rows, 3 * h * dh])?;
        let cache = KvCache::new(ctx, h, 8, dh)?;
        let o = Tensor::<f32>::zeros(ctx, "o", &[t, h * dh])?;
        KvAttention::new(ctx, &shape, &step, &qkv, &cache, &o)
    };
    let scope = ctx.error_scope();
    checks.push(expect_error(
        scope,
        "Dh = 260",
        attention(1, 1, 260, 1),
        is_invalid,
    ));
    let scope = ctx.error_scope();
    let r = (|| -> Result<KvAppend> {
        let shape = KvShape {
            hkv: 2,
            ..KvShape::mha(1, 3, 8, 8)
        };
        let step = KvStep::new(ctx, 8)?;
        let qkv = Tensor::<f32>::zeros(ctx, "qkv", &[1, 7 * 8])?;
        let cache = KvCache::new(ctx, 2, 8, 8)?;
        KvAppend::new(ctx, &shape, &step, &qkv, &cache)
    })();
    checks.push(expect_error(scope, "H = 3 over Hkv = 2", r, is_invalid));
    let scope = ctx.error_scope();
    checks.push(expect_error(
        scope,
        "qkv with 2 rows for T = 1",
        attention(1, 2, 16, 2),
        is_shape,
    ));
    let scope = ctx.error_scope();
    let r = KvStep::new(ctx, 8).and_then(|s| s.set(ctx, 6, 3));
    checks.push(expect_error(scope, "positions 6..9 of 8", r, |e| {
        matches!(e, Error::Limit { .. })
    }));
    bad_inputs_result(kernel, case, checks)
}
