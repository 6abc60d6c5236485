//! Conformance cases of the embedding kernels against their twins
//! (`reference::embedding`): the forward within `Tol::ELEMENTWISE`, the two
//! backward gathers within `Tol::reduction` of the longest sum.
//!
//! Outputs start as NaN, so an element a kernel fails to write (a row of an
//! unseen id must become zeros) shows up as a failure.

use super::CheckResult;
use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass};
use crate::error::{Error, Result};
use crate::gpu::{rounded_f16, Dtype, GpuContext, Tensor, Weight};
use crate::kernels::embedding::{
    token_order, EmbeddingBackwardWpe, EmbeddingBackwardWpeBuffers, EmbeddingBackwardWte,
    EmbeddingBackwardWteBuffers, EmbeddingForward, EmbeddingForwardBuffers, EmbeddingSpec,
};
use crate::reference::embedding::{
    embedding_backward_wpe, embedding_backward_wte, embedding_forward,
};
use crate::tol::Tol;
use crate::util::Rng;

/// How the case draws its token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ids {
    /// Uniform over the vocabulary.
    Uniform,
    /// Every token the same id (the longest gather).
    Same,
    /// Uniform over the first 8 ids, so most rows of dwte are zeros.
    Few,
    /// Uniform, with every 5th id past V (forward only: the shader clamps
    /// them to V - 1, where the host would have refused them).
    PastV,
}

/// An embedding conformance case.
#[derive(Clone, Debug)]
pub enum Case {
    Twin {
        spec: EmbeddingSpec,
        t: usize,
        v: usize,
        n: usize,
        d: usize,
        ids: Ids,
        seed: u64,
        /// wte in this many parts of rows (the forward once per part).
        parts: usize,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Twin {
                spec,
                t,
                v,
                n,
                d,
                ids,
                parts,
                ..
            } => {
                let f16 = match (*spec == EmbeddingSpec::ForwardF16, *parts > 1) {
                    (false, false) => String::new(),
                    (true, false) => ", wte in f16".into(),
                    (f16, true) => {
                        format!(", wte{} in {parts} parts", if f16 { " (f16)" } else { "" })
                    }
                };
                (
                    spec.name().to_string(),
                    if *n == 0 {
                        format!("T={t} V={v} no wpe, scale 0.5, D={d} ids {ids:?}{f16}")
                    } else {
                        format!("T={t} V={v} N={n} D={d} ids {ids:?}{f16}")
                    },
                )
            }
            Case::BadInputs => (
                EmbeddingSpec::Forward.name().to_string(),
                "bad inputs: T = 0, shape mismatch, id >= V".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for spec in EmbeddingSpec::all() {
        let c = |t, vv, n, d, ids, seed| Case::Twin {
            spec,
            t,
            v: vv,
            n,
            d,
            ids,
            seed,
            parts: 1,
        };
        v.extend([
            c(1, 4, 1, 8, Ids::Uniform, 1),
            c(37, 50, 8, 33, Ids::Uniform, 2),
            c(96, 300, 32, 64, Ids::Few, 3),
            c(64, 16, 16, 7, Ids::Same, 4),
            c(512, 4096, 128, 64, Ids::Uniform, 5),
        ]);
    }
    v.push(Case::Twin {
        spec: EmbeddingSpec::Forward,
        t: 40,
        v: 30,
        n: 16,
        d: 12,
        ids: Ids::PastV,
        seed: 6,
        parts: 1,
    });
    // N = 0: no position table (rotary models), tokens scaled by 0.5
    // (Granite's embedding multiplier).
    v.push(Case::Twin {
        spec: EmbeddingSpec::Forward,
        t: 40,
        v: 30,
        n: 0,
        d: 12,
        ids: Ids::Uniform,
        seed: 7,
        parts: 1,
    });
    // A token table in parts of rows (larger than one storage binding).
    for (spec, n, parts, seed) in [
        (EmbeddingSpec::Forward, 32, 3, 8),
        (EmbeddingSpec::ForwardF16, 0, 2, 9),
    ] {
        v.push(Case::Twin {
            spec,
            t: 96,
            v: 300,
            n,
            d: 20,
            ids: Ids::Uniform,
            seed,
            parts,
        });
    }
    v.push(Case::BadInputs);
    v
}

fn make_ids(t: usize, v: usize, ids: Ids, rng: &mut Rng) -> Vec<u32> {
    (0..t)
        .map(|i| match ids {
            Ids::Uniform => rng.below(v) as u32,
            Ids::Same => (v / 2) as u32,
            Ids::Few => rng.below(v.min(8)) as u32,
            Ids::PastV if i % 5 == 0 => (v + i) as u32,
            Ids::PastV => rng.below(v) as u32,
        })
        .collect()
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let Case::Twin {
        spec,
        t,
        v,
        n,
        d,
        ids,
        seed,
        parts,
    } = *case
    else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let mut rng = Rng::new(seed ^ 0xE3B0);
    let ids_host = make_ids(t, v, ids, &mut rng);
    let (got, want, tol) = match spec {
        EmbeddingSpec::Forward | EmbeddingSpec::ForwardF16 => {
            let f16 = spec == EmbeddingSpec::ForwardF16;
            let mut wte_h = rng.vec_sym(v * d, 1.0);
            if f16 {
                wte_h = rounded_f16(&wte_h);
            }
            let rotary = n == 0;
            let wpe_h = rng.vec_sym(n.max(1) * d, 1.0);
            let scale = if rotary { 0.5 } else { 1.0 };
            let wpe_ref = (!rotary).then_some(&wpe_h[..]);
            let want = embedding_forward(&ids_host, &wte_h, wpe_ref, scale, t, v, n.max(1), d);
            let ids_t = Tensor::from_slice(ctx, "ids", &[t], &ids_host)?;
            let dtype = if f16 { Dtype::F16 } else { Dtype::F32 };
            let wpe = Tensor::from_slice(ctx, "wpe", &[n.max(1), d], &wpe_h)?;
            let x = Tensor::from_slice(ctx, "x", &[t, d], &vec![f32::NAN; t * d])?;
            // The table whole, or in parts of rows (each token written by
            // the part holding its id).
            let per = v.div_ceil(parts.max(1));
            let mut ks = Vec::new();
            for v0 in (0..v).step_by(per) {
                let vc = per.min(v - v0);
                let part = &wte_h[v0 * d..(v0 + vc) * d];
                let wte = Weight::upload(ctx, "wte", &[vc, d], part, dtype)?;
                ks.push(EmbeddingForward::new(
                    ctx,
                    &EmbeddingForwardBuffers {
                        ids: &ids_t,
                        wte: wte.view("embedding")?,
                        wpe: (!rotary).then_some(&wpe),
                        x: &x,
                        scale,
                        rows: (parts > 1).then_some((v0, v)),
                    },
                )?);
            }
            submit_pass(ctx, |pass| ks.iter().for_each(|k| k.record(pass)))?;
            (x.read(ctx).await?, want, Tol::ELEMENTWISE)
        }
        EmbeddingSpec::BackwardWte => {
            let dx_h = rng.vec_sym(t * d, 1.0);
            let (offsets_h, order_h) = token_order(&ids_host, v)?;
            let want = embedding_backward_wte(&dx_h, &offsets_h, &order_h, v, d);
            let longest = offsets_h.windows(2).map(|w| w[1] - w[0]).max();
            let dx = Tensor::from_slice(ctx, "dx", &[t, d], &dx_h)?;
            let offsets = Tensor::from_slice(ctx, "offsets", &[v + 1], &offsets_h)?;
            let order = Tensor::from_slice(ctx, "order", &[t], &order_h)?;
            let dwte = Tensor::from_slice(ctx, "dwte", &[v, d], &vec![f32::NAN; v * d])?;
            let k = EmbeddingBackwardWte::new(
                ctx,
                &EmbeddingBackwardWteBuffers {
                    dx: &dx,
                    offsets: &offsets,
                    order: &order,
                    dwte: &dwte,
                },
            )?;
            submit_pass(ctx, |pass| k.record(pass))?;
            let tol = Tol::reduction(longest.unwrap_or(1) as usize);
            (dwte.read(ctx).await?, want, tol)
        }
        EmbeddingSpec::BackwardWpe => {
            let dx_h = rng.vec_sym(t * d, 1.0);
            let want = embedding_backward_wpe(&dx_h, t, n, d);
            let dx = Tensor::from_slice(ctx, "dx", &[t, d], &dx_h)?;
            let dwpe = Tensor::from_slice(ctx, "dwpe", &[n, d], &vec![f32::NAN; n * d])?;
            let k = EmbeddingBackwardWpe::new(
                ctx,
                &EmbeddingBackwardWpeBuffers {
                    dx: &dx,
                    dwpe: &dwpe,
                },
            )?;
            submit_pass(ctx, |pass| k.record(pass))?;
            (dwpe.read(ctx).await?, want, Tol::reduction(t.div_ceil(n)))
        }
    };
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[("out", tol.compare(&got, &want))],
    ))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_forward = |what: &str, ids: &[usize], wte, wpe, x, want| {
        let scope = ctx.error_scope();
        let r = (|| -> Result<EmbeddingForward> {
            let ids = Tensor::<u32>::zeros(ctx, "ids", ids)?;
            let wte = Tensor::<f32>::zeros(ctx, "wte", wte)?;
            let wpe = Tensor::<f32>::zeros(ctx, "wpe", wpe)?;
            let x = Tensor::<f32>::zeros(ctx, "x", x)?;
            EmbeddingForward::new(
                ctx,
                &EmbeddingForwardBuffers {
                    ids: &ids,
                    wte: (&wte).into(),
                    wpe: Some(&wpe),
                    x: &x,
                    scale: 1.0,
                    rows: None,
                },
            )
        })();
        checks.push(expect_error(scope, what, r, want));
    };
    try_forward("T = 0", &[0], &[8, 4], &[2, 4], &[0, 4], is_invalid);
    try_forward("wpe [N, D+1]", &[6], &[8, 4], &[2, 5], &[6, 4], is_shape);
    try_forward("x [T+1, D]", &[6], &[8, 4], &[2, 4], &[7, 4], is_shape);
    try_forward("ids [T, 1]", &[6, 1], &[8, 4], &[2, 4], &[6, 4], is_shape);

    let scope = ctx.error_scope();
    let r = (|| -> Result<EmbeddingBackwardWte> {
        let dx = Tensor::<f32>::zeros(ctx, "dx", &[6, 4])?;
        let offsets = Tensor::<u32>::zeros(ctx, "offsets", &[8])?;
        let order = Tensor::<u32>::zeros(ctx, "order", &[6])?;
        let dwte = Tensor::<f32>::zeros(ctx, "dwte", &[8, 4])?;
        EmbeddingBackwardWte::new(
            ctx,
            &EmbeddingBackwardWteBuffers {
                dx: &dx,
                offsets: &offsets,
                order: &order,
                dwte: &dwte,
            },
        )
    })();
    checks.push(expect_error(scope, "offsets [V]", r, is_shape));

    let scope = ctx.error_scope();
    let r = (|| -> Result<EmbeddingBackwardWpe> {
        let dx = Tensor::<f32>::zeros(ctx, "dx", &[6, 4])?;
        let dwpe = Tensor::<f32>::zeros(ctx, "dwpe", &[2, 3])?;
        EmbeddingBackwardWpe::new(
            ctx,
            &EmbeddingBackwardWpeBuffers {
                dx: &dx,
                dwpe: &dwpe,
            },
        )
    })();
    checks.push(expect_error(scope, "dwpe [N, D-1]", r, is_shape));

    let scope = ctx.error_scope();
    checks.push(expect_error(
        scope,
        "token id >= V",
        token_order(&[0, 3, 8, 1], 8),
        |e: &Error| matches!(e, Error::InvalidArgument { .. }),
    ));
    bad_inputs_result(kernel, case, checks)
}
