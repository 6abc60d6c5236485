//! Conformance cases of the attention family against the twins
//! `reference::attention::{attention_forward, attention_backward}`, run in
//! f64 and rounded to f32 (so the tolerance measures the GPU's error alone).
//!
//! The forward compares `o` and `lse`; the backward takes `o` and `lse` from
//! the twin (not from the GPU forward, so a forward bug cannot hide a
//! backward one) and compares `dqkv`. Shapes cross the 128-row workgroup
//! block and the staged tile sizes, and N = 300 crosses 256.

use super::CheckResult;
use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::attention::{
    AttentionBackward, AttentionBackwardBuffers, AttentionConfig, AttentionForward,
    AttentionForwardBuffers, AttentionPass, AttentionSpec,
};
use crate::reference::attention::{
    attention_backward, attention_backward_gqa, attention_forward, attention_forward_gqa,
    AttnShape, GqaShape,
};
use crate::tol::Tol;
use crate::util::Rng;

/// An attention conformance case.
#[derive(Clone, Debug)]
pub enum Case {
    Twin {
        backward: bool,
        shape: AttnShape,
        seed: u64,
    },
    /// GQA, a sliding window or a score scale of the model's own (twins:
    /// `attention_forward_gqa`, `attention_backward_gqa`).
    Gqa {
        backward: bool,
        shape: AttnShape,
        hkv: usize,
        window: usize,
        scale: Option<f32>,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Twin {
                backward, shape, ..
            } => {
                let kernel = if *backward {
                    "attention_backward"
                } else {
                    AttentionSpec {
                        pass: AttentionPass::Forward,
                        dh: 32,
                    }
                    .name()
                };
                let AttnShape { b, n, h, dh } = *shape;
                (kernel.into(), format!("B={b} N={n} H={h} Dh={dh}"))
            }
            Case::Gqa {
                backward,
                shape,
                hkv,
                window,
                scale,
                ..
            } => {
                let AttnShape { b, n, h, dh } = *shape;
                (
                    if *backward {
                        "attention_backward"
                    } else {
                        "attention_forward"
                    }
                    .into(),
                    format!("B={b} N={n} H={h} Hkv={hkv} Dh={dh} W={window} scale={scale:?}"),
                )
            }
            Case::BadInputs => (
                "attention".into(),
                "bad inputs: shapes, qkv not a multiple of the heads, unsupported Dh".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let shapes = [
        (1, 1, 1, 16),
        (2, 7, 2, 16),
        (3, 20, 3, 16),
        (1, 65, 4, 32),
        (1, 40, 2, 64),
        (2, 130, 2, 64),
        (1, 300, 1, 32),
    ];
    let mut v = Vec::new();
    for backward in [false, true] {
        for (i, &(b, n, h, dh)) in shapes.iter().enumerate() {
            v.push(Case::Twin {
                backward,
                shape: AttnShape { b, n, h, dh },
                seed: 10 + i as u64,
            });
        }
    }
    // Published layouts: Mixtral-like GQA 4/2 of width 24 with a window of
    // 8, MQA 4/1, a window across the 128-row block, Granite's scale.
    for backward in [false, true] {
        let gqa = |b, n, h, hkv, dh, window, scale, seed| Case::Gqa {
            backward,
            shape: AttnShape { b, n, h, dh },
            hkv,
            window,
            scale,
            seed,
        };
        v.extend([
            gqa(1, 26, 4, 2, 24, 8, None, 30),
            gqa(2, 40, 4, 1, 16, 0, None, 31),
            gqa(1, 200, 2, 1, 32, 100, None, 32),
            gqa(2, 33, 4, 2, 16, 0, Some(0.125), 33),
            gqa(1, 150, 8, 2, 64, 0, None, 34),
        ]);
    }
    v.push(Case::BadInputs);
    v
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    if let Case::Gqa {
        backward,
        shape: s,
        hkv,
        window,
        scale,
        seed,
    } = *case
    {
        let t = s.t();
        let qs = (s.h + 2 * hkv) * s.dh;
        let mut rng = Rng::new(seed);
        let qkv32 = rng.vec_sym(t * qs, 2.0);
        let qkv64: Vec<f64> = qkv32.iter().map(|&x| x as f64).collect();
        let sc = scale.unwrap_or(1.0 / (s.dh as f32).sqrt());
        let g = GqaShape {
            s,
            hkv,
            window,
            scale: sc as f64,
        };
        let (o64, lse64) = attention_forward_gqa(&qkv64, g);
        let qkv = Tensor::from_slice(ctx, "qkv", &[t, qs], &qkv32)?;
        let acfg = AttentionConfig {
            b: s.b,
            n: s.n,
            h: s.h,
            hkv,
            window,
            scale,
        };
        if backward {
            let do32 = rng.vec_sym(t * s.d(), 1.0);
            let do64: Vec<f64> = do32.iter().map(|&x| x as f64).collect();
            let want = attention_backward_gqa(&qkv64, &o64, &do64, &lse64, g);
            let o = Tensor::from_slice(ctx, "o", &[t, s.d()], &to_f32(&o64))?;
            let lse = Tensor::from_slice(ctx, "lse", &[s.b, s.h, s.n], &to_f32(&lse64))?;
            let dout = Tensor::from_slice(ctx, "do", &[t, s.d()], &do32)?;
            let dqkv = Tensor::from_slice(ctx, "dqkv", &[t, qs], &vec![f32::NAN; t * qs])?;
            let bwd = AttentionBackward::new(
                ctx,
                acfg,
                &AttentionBackwardBuffers {
                    qkv: &qkv,
                    o: &o,
                    dout: &dout,
                    lse: &lse,
                    dqkv: &dqkv,
                },
            )?;
            submit_pass(ctx, |pass| bwd.record(pass))?;
            let got = dqkv.read(ctx).await?;
            // A kv head sums the keys of H / Hkv query heads.
            let tol = Tol::reduction(s.n * s.dh * (s.h / hkv));
            return Ok(CheckResult::from_comparisons(
                kernel,
                name,
                &[("dqkv", tol.compare(&got, &to_f32(&want)))],
            ));
        }
        let o = Tensor::<f32>::zeros(ctx, "o", &[t, s.d()])?;
        let lse = Tensor::<f32>::zeros(ctx, "lse", &[s.b, s.h, s.n])?;
        let fwd = AttentionForward::new(
            ctx,
            acfg,
            &AttentionForwardBuffers {
                qkv: &qkv,
                o: &o,
                lse: &lse,
            },
        )?;
        submit_pass(ctx, |pass| fwd.record(pass))?;
        let got_o = o.read(ctx).await?;
        let got_lse = lse.read(ctx).await?;
        return Ok(CheckResult::from_comparisons(
            kernel,
            name,
            &[
                ("o", Tol::reduction(s.n).compare(&got_o, &to_f32(&o64))),
                (
                    "lse",
                    Tol::reduction(s.dh).compare(&got_lse, &to_f32(&lse64)),
                ),
            ],
        ));
    }
    let Case::Twin {
        backward,
        shape: s,
        seed,
    } = *case
    else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let (t, d) = (s.t(), s.d());
    let cfg = AttentionConfig::mha(s.b, s.n, s.h);
    let mut rng = Rng::new(seed);
    // Magnitudes that make some rows peaked and others flat.
    let qkv32 = rng.vec_sym(t * 3 * d, 2.0);
    let qkv64: Vec<f64> = qkv32.iter().map(|&x| x as f64).collect();
    let (o64, lse64) = attention_forward(&qkv64, s);
    let qkv = Tensor::from_slice(ctx, "qkv", &[t, 3 * d], &qkv32)?;
    // Reductions run over up to N keys of Dh products.
    let tol_o = Tol::reduction(s.n);
    if !backward {
        let o = Tensor::<f32>::zeros(ctx, "o", &[t, d])?;
        let lse = Tensor::<f32>::zeros(ctx, "lse", &[s.b, s.h, s.n])?;
        let fwd = AttentionForward::new(
            ctx,
            cfg,
            &AttentionForwardBuffers {
                qkv: &qkv,
                o: &o,
                lse: &lse,
            },
        )?;
        submit_pass(ctx, |pass| fwd.record(pass))?;
        let got_o = o.read(ctx).await?;
        let got_lse = lse.read(ctx).await?;
        return Ok(CheckResult::from_comparisons(
            kernel,
            name,
            &[
                ("o", tol_o.compare(&got_o, &to_f32(&o64))),
                (
                    "lse",
                    Tol::reduction(s.dh).compare(&got_lse, &to_f32(&lse64)),
                ),
            ],
        ));
    }
    let do32 = rng.vec_sym(t * d, 1.0);
    let do64: Vec<f64> = do32.iter().map(|&x| x as f64).collect();
    let want = attention_backward(&qkv64, &o64, &do64, &lse64, s);
    let o = Tensor::from_slice(ctx, "o", &[t, d], &to_f32(&o64))?;
    let lse = Tensor::from_slice(ctx, "lse", &[s.b, s.h, s.n], &to_f32(&lse64))?;
    let dout = Tensor::from_slice(ctx, "do", &[t, d], &do32)?;
    // NaN first, so an element the kernels fail to write shows up.
    let dqkv = Tensor::from_slice(ctx, "dqkv", &[t, 3 * d], &vec![f32::NAN; t * 3 * d])?;
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
    submit_pass(ctx, |pass| bwd.record(pass))?;
    let got = dqkv.read(ctx).await?;
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[(
            "dqkv",
            Tol::reduction(s.n * s.dh).compare(&got, &to_f32(&want)),
        )],
    ))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let cfg = AttentionConfig::mha;
    let mut try_fwd =
        |what: &str, c: AttentionConfig, q: &[usize], o: &[usize], l: &[usize], want| {
            let scope = ctx.error_scope();
            let r = (|| -> Result<AttentionForward> {
                let qkv = Tensor::<f32>::zeros(ctx, "qkv", q)?;
                let o = Tensor::<f32>::zeros(ctx, "o", o)?;
                let lse = Tensor::<f32>::zeros(ctx, "lse", l)?;
                AttentionForward::new(
                    ctx,
                    c,
                    &AttentionForwardBuffers {
                        qkv: &qkv,
                        o: &o,
                        lse: &lse,
                    },
                )
            })();
            checks.push(expect_error(scope, what, r, want));
        };
    try_fwd(
        "B = 0",
        cfg(0, 4, 2),
        &[0, 96],
        &[0, 32],
        &[0, 2, 4],
        is_invalid,
    );
    try_fwd(
        "qkv [T+1, 3D]",
        cfg(2, 4, 2),
        &[9, 96],
        &[8, 32],
        &[2, 2, 4],
        is_shape,
    );
    try_fwd(
        "qkv [T, 3D+1]",
        cfg(2, 4, 2),
        &[8, 97],
        &[8, 32],
        &[2, 2, 4],
        is_shape,
    );
    try_fwd(
        "qkv of 144 columns over 3 x 5 heads",
        cfg(2, 4, 5),
        &[8, 144],
        &[8, 48],
        &[2, 5, 4],
        is_shape,
    );
    try_fwd(
        "Dh = 68",
        cfg(2, 4, 2),
        &[8, 408],
        &[8, 136],
        &[2, 2, 4],
        is_invalid,
    );
    try_fwd(
        "Dh = 128",
        cfg(1, 4, 1),
        &[4, 384],
        &[4, 128],
        &[1, 1, 4],
        is_invalid,
    );
    try_fwd(
        "o [T, D+4]",
        cfg(2, 4, 2),
        &[8, 96],
        &[8, 36],
        &[2, 2, 4],
        is_shape,
    );
    try_fwd(
        "lse [B, N, H]",
        cfg(2, 4, 2),
        &[8, 96],
        &[8, 32],
        &[2, 4, 2],
        is_shape,
    );
    let mut try_bwd = |what: &str, dout: &[usize], dqkv: &[usize], want| {
        let scope = ctx.error_scope();
        let r = (|| -> Result<AttentionBackward> {
            let qkv = Tensor::<f32>::zeros(ctx, "qkv", &[8, 96])?;
            let o = Tensor::<f32>::zeros(ctx, "o", &[8, 32])?;
            let dout = Tensor::<f32>::zeros(ctx, "do", dout)?;
            let lse = Tensor::<f32>::zeros(ctx, "lse", &[2, 2, 4])?;
            let dqkv = Tensor::<f32>::zeros(ctx, "dqkv", dqkv)?;
            AttentionBackward::new(
                ctx,
                cfg(2, 4, 2),
                &AttentionBackwardBuffers {
                    qkv: &qkv,
                    o: &o,
                    dout: &dout,
                    lse: &lse,
                    dqkv: &dqkv,
                },
            )
        })();
        checks.push(expect_error(scope, what, r, want));
    };
    try_bwd("do [T-1, D]", &[7, 32], &[8, 96], is_shape);
    try_bwd("dqkv [T, D]", &[8, 32], &[8, 32], is_shape);
    bad_inputs_result(kernel, case, checks)
}
