//! Conformance cases of the AdamW kernels against their twins
//! (`reference::adamw`, run in f64 on the same f32 inputs and per-step
//! constants): several `adamw_step`s in a row with `set_step` between them
//! (p, m, v within `Tol::ELEMENTWISE`), a skipped step (scale 0: nothing
//! changes, bit for bit), and the `GradNorm` plan over several tensors
//! (every tensor's partials and the clip pair within `Tol::reduction`),
//! including NaN and inf gradients (scale exactly 0).

use super::CheckResult;
use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::adamw::{
    AdamW, AdamWBuffers, AdamWConfig, AdamWSpec, GradNorm, GRAD_NORM_CHUNK,
};
use crate::reference::adamw::{adamw_step, grad_norm_finish, grad_norm_partial, AdamWStep};
use crate::tol::{compare_exact, Comparison, Tol};
use crate::util::Rng;

/// A non-finite value planted in one gradient of a grad-norm case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poison {
    None,
    Nan,
    Inf,
}

/// An AdamW conformance case.
#[derive(Clone, Debug)]
pub enum Case {
    /// `steps` AdamW steps on one tensor of `n` elements with gradient scale
    /// `scale` (0: every step is skipped).
    Step {
        n: usize,
        steps: u64,
        weight_decay: f32,
        scale: f32,
        seed: u64,
    },
    /// The global norm of tensors of `sizes` elements.
    GradNorm {
        sizes: Vec<usize>,
        max_norm: Option<f32>,
        poison: Poison,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        match self {
            Case::Step {
                n,
                steps,
                weight_decay,
                scale,
                ..
            } => (
                AdamWSpec::Step.name().to_string(),
                format!("n={n} steps={steps} weight_decay={weight_decay} scale={scale}"),
            ),
            Case::GradNorm {
                sizes,
                max_norm,
                poison,
                ..
            } => (
                AdamWSpec::GradNormFinish.name().to_string(),
                format!("sizes={sizes:?} max_norm={max_norm:?} poison={poison:?}"),
            ),
            Case::BadInputs => (
                AdamWSpec::Step.name().to_string(),
                "bad inputs: shape mismatch, step 0, bad config".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let step = |n, steps, weight_decay, scale, seed| Case::Step {
        n,
        steps,
        weight_decay,
        scale,
        seed,
    };
    let norm = |sizes: &[usize], max_norm, poison, seed| Case::GradNorm {
        sizes: sizes.to_vec(),
        max_norm,
        poison,
        seed,
    };
    let big = GRAD_NORM_CHUNK as usize * 3 + 17;
    vec![
        step(1, 3, 0.01, 1.0, 1),
        step(1000, 3, 0.1, 0.5, 2),
        step(4097, 2, 0.0, 1.0, 3),
        step(70_000, 3, 0.01, 0.25, 4),
        step(300, 2, 0.01, 0.0, 5),
        norm(&[1], Some(1.0), Poison::None, 6),
        norm(&[300, 4096, 1, big, 5000], Some(1.0), Poison::None, 7),
        norm(&[300, 4096, 1, big, 5000], Some(1e6), Poison::None, 8),
        norm(&[64, 70_000, 129], None, Poison::None, 9),
        norm(&[300, 4096, 5000], Some(1.0), Poison::Nan, 10),
        norm(&[300, 4096, 5000], None, Poison::Inf, 11),
        Case::BadInputs,
    ]
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    match case {
        Case::Step {
            n,
            steps,
            weight_decay,
            scale,
            seed,
        } => {
            let parts = run_steps(ctx, *n, *steps, *weight_decay, *scale, *seed).await?;
            Ok(CheckResult::from_comparisons(kernel, name, &parts))
        }
        Case::GradNorm {
            sizes,
            max_norm,
            poison,
            seed,
        } => {
            let parts = run_norm(ctx, sizes, *max_norm, *poison, *seed).await?;
            Ok(CheckResult::from_comparisons(kernel, name, &parts))
        }
        Case::BadInputs => Ok(bad_inputs(ctx, &kernel, &name)),
    }
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&x| x as f64).collect()
}

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&x| x as f32).collect()
}

/// `tol.compare`, where an infinite reference must be matched exactly
/// (inf - inf is NaN, which `compare` would count as a mismatch).
fn compare_inf(tol: Tol, got: &[f32], want: &[f32]) -> Comparison {
    let (g, w): (Vec<f32>, Vec<f32>) = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| {
            if w.is_infinite() && g == w {
                (0.0, 0.0)
            } else {
                (g, w)
            }
        })
        .unzip();
    tol.compare(&g, &w)
}

async fn run_steps(
    ctx: &GpuContext,
    n: usize,
    steps: u64,
    weight_decay: f32,
    scale: f32,
    seed: u64,
) -> Result<Vec<(&'static str, Comparison)>> {
    let mut rng = Rng::new(seed ^ 0xADA3);
    let config = AdamWConfig {
        lr: 0.01,
        weight_decay,
        ..Default::default()
    };
    let p_h = rng.vec_sym(n, 1.0);
    let clip_h = [1.5f32, scale];
    let p = Tensor::from_slice(ctx, "p", &[n], &p_h)?;
    let g = Tensor::<f32>::zeros(ctx, "g", &[n])?;
    let m = Tensor::<f32>::zeros(ctx, "m", &[n])?;
    let v = Tensor::<f32>::zeros(ctx, "v", &[n])?;
    let clip = Tensor::from_slice(ctx, "clip", &[2], &clip_h)?;
    let adamw = AdamW::new(
        ctx,
        &config,
        &AdamWBuffers {
            p: &p,
            g: &g,
            m: &m,
            v: &v,
            clip: &clip,
        },
    )?;
    let (mut p64, mut m64, mut v64) = (to64(&p_h), vec![0.0; n], vec![0.0; n]);
    for step in 1..=steps {
        // A warmup-like schedule: the learning rate changes every step.
        let lr = config.lr * step as f32 / steps as f32;
        let g_h = rng.vec_sym(n, 1.0);
        g.write(ctx, &g_h)?;
        adamw.set_step(ctx, lr, step)?;
        submit_pass(ctx, |pass| adamw.record(pass))?;
        let u = config.params(lr, step, n as u32, 1);
        let s = AdamWStep {
            lr: u.lr as f64,
            beta1: u.beta1 as f64,
            beta2: u.beta2 as f64,
            eps: u.eps as f64,
            weight_decay: u.weight_decay as f64,
            bc1: u.bc1 as f64,
            bc2: u.bc2 as f64,
        };
        adamw_step(
            &mut p64,
            &to64(&g_h),
            &mut m64,
            &mut v64,
            &to64(&clip_h),
            &s,
        );
    }
    let (p_got, m_got, v_got) = (p.read(ctx).await?, m.read(ctx).await?, v.read(ctx).await?);
    let tol = Tol::ELEMENTWISE;
    if scale == 0.0 {
        // Skipped steps: the tensors keep their exact bits.
        return Ok(vec![
            ("p", compare_exact(&p_got, &p_h)),
            ("m", compare_exact(&m_got, &vec![0.0; n])),
            ("v", compare_exact(&v_got, &vec![0.0; n])),
        ]);
    }
    Ok(vec![
        ("p", tol.compare(&p_got, &to32(&p64))),
        ("m", tol.compare(&m_got, &to32(&m64))),
        ("v", tol.compare(&v_got, &to32(&v64))),
    ])
}

async fn run_norm(
    ctx: &GpuContext,
    sizes: &[usize],
    max_norm: Option<f32>,
    poison: Poison,
    seed: u64,
) -> Result<Vec<(&'static str, Comparison)>> {
    let mut rng = Rng::new(seed ^ 0x6A0D);
    let mut hosts: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec_sym(n, 1.0)).collect();
    let last = hosts.len() - 1;
    let at = hosts[last].len() / 2;
    match poison {
        Poison::None => {}
        Poison::Nan => hosts[last][at] = f32::NAN,
        Poison::Inf => hosts[last][at] = f32::INFINITY,
    }
    let grads = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Tensor::from_slice(ctx, &format!("g{i}"), &[h.len()], h))
        .collect::<Result<Vec<_>>>()?;
    let clip = Tensor::from_slice(ctx, "clip", &[2], &[f32::NAN; 2])?;
    let refs: Vec<&Tensor<f32>> = grads.iter().collect();
    let plan = GradNorm::new(ctx, &refs, &clip, max_norm)?;
    submit_pass(ctx, |pass| plan.record(pass))?;

    let chunk = GRAD_NORM_CHUNK as usize;
    let mut partials_want = Vec::new();
    for h in &hosts {
        partials_want.extend(grad_norm_partial(&to64(h), chunk));
    }
    let clip_want = grad_norm_finish(&partials_want, max_norm.map(|x| x as f64));
    let partials_got = plan.partials().read(ctx).await?;
    let clip_got = clip.read(ctx).await?;
    let total: usize = sizes.iter().sum();
    let ranges_ok = plan.ranges().last().map(|r| r.end) == Some(partials_want.len());
    Ok(vec![
        (
            "partials",
            compare_inf(Tol::reduction(chunk), &partials_got, &to32(&partials_want)),
        ),
        ("ranges", compare_exact(&[ranges_ok], &[true])),
        (
            "norm",
            compare_inf(
                Tol::reduction(total),
                &clip_got[..1],
                &to32(&clip_want[..1]),
            ),
        ),
        (
            "scale",
            Tol::ELEMENTWISE.compare(&clip_got[1..], &to32(&clip_want[1..])),
        ),
    ])
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_adamw = |what: &str, g: &[usize], clip: &[usize], config: AdamWConfig, want| {
        let scope = ctx.error_scope();
        let r = (|| -> Result<AdamW> {
            let p = Tensor::<f32>::zeros(ctx, "p", &[8, 4])?;
            let g = Tensor::<f32>::zeros(ctx, "g", g)?;
            let m = Tensor::<f32>::zeros(ctx, "m", &[8, 4])?;
            let v = Tensor::<f32>::zeros(ctx, "v", &[8, 4])?;
            let clip = Tensor::<f32>::zeros(ctx, "clip", clip)?;
            AdamW::new(
                ctx,
                &config,
                &AdamWBuffers {
                    p: &p,
                    g: &g,
                    m: &m,
                    v: &v,
                    clip: &clip,
                },
            )
        })();
        checks.push(expect_error(scope, what, r, want));
    };
    let ok = AdamWConfig::default();
    try_adamw("g [4, 8]", &[4, 8], &[2], ok, is_shape);
    try_adamw("clip [1]", &[8, 4], &[1], ok, is_shape);
    let beta = AdamWConfig { beta1: 1.0, ..ok };
    try_adamw("beta1 = 1", &[8, 4], &[2], beta, is_invalid);

    let scope = ctx.error_scope();
    let r = (|| -> Result<()> {
        let t = |l: &str| Tensor::<f32>::zeros(ctx, l, &[8]);
        let (p, g, m, v) = (t("p")?, t("g")?, t("m")?, t("v")?);
        let clip = Tensor::<f32>::zeros(ctx, "clip", &[2])?;
        let bufs = AdamWBuffers {
            p: &p,
            g: &g,
            m: &m,
            v: &v,
            clip: &clip,
        };
        AdamW::new(ctx, &ok, &bufs)?.set_step(ctx, 0.1, 0)
    })();
    checks.push(expect_error(scope, "step 0", r, is_invalid));

    let scope = ctx.error_scope();
    let r = (|| -> Result<GradNorm> {
        let g = Tensor::<f32>::zeros(ctx, "g", &[8])?;
        let clip = Tensor::<f32>::zeros(ctx, "clip", &[2])?;
        GradNorm::new(ctx, &[&g], &clip, Some(-1.0))
    })();
    checks.push(expect_error(scope, "max_norm < 0", r, is_invalid));
    bad_inputs_result(kernel, case, checks)
}
