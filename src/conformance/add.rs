//! Conformance of `add_forward` against `reference::add::add_forward`
//! (exact: one rounding, as in the twin).

use super::{bad_inputs_result, expect_error, is_invalid, is_shape, submit_pass, CheckResult};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::add::{Add, AddSpec};
use crate::reference::add::{add_forward, add_scaled};
use crate::tol::{compare_exact, Tol};
use crate::util::Rng;

#[derive(Clone, Debug)]
pub enum Case {
    Twin {
        n: usize,
        seed: u64,
    },
    /// `a + scale * b` (a residual multiplier): within one rounding.
    Scaled {
        n: usize,
        scale: f32,
        seed: u64,
    },
    BadInputs,
    /// Two handles on one device (the page's generator and trainer): a GPU
    /// error in one's work is reported by that one, once, and never by the
    /// other. In the browser a scope answers late (a promise): this runs the
    /// path the page takes, readbacks and all.
    ErrorAttribution,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        let kernel = AddSpec.name().to_string();
        match self {
            Case::Twin { n, .. } => (kernel, format!("N={n}")),
            Case::Scaled { n, scale, .. } => (kernel, format!("N={n} scale={scale}")),
            Case::BadInputs => (kernel, "bad inputs: shape mismatch, aliasing".into()),
            Case::ErrorAttribution => (
                kernel,
                "GPU errors: reported by the handle whose work made them".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        Case::Twin { n: 1, seed: 1 },
        Case::Twin { n: 1000, seed: 2 },
        Case::Twin { n: 70_001, seed: 3 },
        Case::Scaled {
            n: 1000,
            scale: 2.0,
            seed: 4,
        },
        Case::Scaled {
            n: 333,
            scale: 0.37,
            seed: 5,
        },
        Case::BadInputs,
        Case::ErrorAttribution,
    ]
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    if let Case::Scaled { n, scale, seed } = *case {
        let mut rng = Rng::new(seed);
        let a = rng.vec_sym(n, 3.0);
        let b = rng.vec_sym(n, 3.0);
        let want = add_scaled(&a, &b, scale);
        let ta = Tensor::from_slice(ctx, "a", &[n], &a)?;
        let tb = Tensor::from_slice(ctx, "b", &[n], &b)?;
        let out = Tensor::<f32>::zeros(ctx, "out", &[n])?;
        let add = Add::scaled(ctx, &ta, &tb, scale, &out)?;
        submit_pass(ctx, |pass| add.record(pass))?;
        let got = out.read(ctx).await?;
        return Ok(CheckResult::from_comparisons(
            kernel,
            name,
            &[("out", Tol::ELEMENTWISE.compare(&got, &want))],
        ));
    }
    if let Case::ErrorAttribution = case {
        return error_attribution(ctx, kernel, name).await;
    }
    let Case::Twin { n, seed } = *case else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let mut rng = Rng::new(seed);
    let a = rng.vec_sym(n, 3.0);
    let b = rng.vec_sym(n, 3.0);
    let want = add_forward(&a, &b);
    let ta = Tensor::from_slice(ctx, "a", &[n], &a)?;
    let tb = Tensor::from_slice(ctx, "b", &[n], &b)?;
    let out = Tensor::<f32>::zeros(ctx, "out", &[n])?;
    let add = Add::new(ctx, &ta, &tb, &out)?;
    submit_pass(ctx, |pass| add.record(pass))?;
    let got = out.read(ctx).await?;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[("out", compare_exact(&bits(&got), &bits(&want)))],
    ))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let scope = ctx.error_scope();
    let r = (|| -> Result<Add> {
        let a = Tensor::<f32>::zeros(ctx, "a", &[4, 3])?;
        let b = Tensor::<f32>::zeros(ctx, "b", &[3, 4])?;
        let out = Tensor::<f32>::zeros(ctx, "out", &[4, 3])?;
        Add::new(ctx, &a, &b, &out)
    })();
    checks.push(expect_error(scope, "b of another shape", r, is_shape));
    let scope = ctx.error_scope();
    let r = (|| -> Result<Add> {
        let a = Tensor::<f32>::zeros(ctx, "a", &[8])?;
        let b = Tensor::<f32>::zeros(ctx, "b", &[8])?;
        Add::new(ctx, &a, &b, &a)
    })();
    checks.push(expect_error(scope, "out aliases a", r, is_invalid));
    bad_inputs_result(kernel, case, checks)
}

/// A "trainer" handle records a bad copy while a "generator" handle builds
/// and runs a kernel on the same device; each then reads its results back and
/// checks its errors, as the page's objects do after every operation.
async fn error_attribution(ctx: &GpuContext, kernel: String, case: String) -> Result<CheckResult> {
    let generator = ctx.handle();
    let trainer = ctx.handle();
    let a = Tensor::<f32>::zeros(&trainer, "a", &[4])?;
    let b = Tensor::<f32>::zeros(&trainer, "b", &[4])?;
    let mut bad = trainer.device.create_command_encoder(&Default::default());
    bad.copy_buffer_to_buffer(&a.buffer, 0, &b.buffer, 0, 1 << 20);
    let x = Tensor::from_slice(&generator, "x", &[3], &[1.0f32, 2.0, 3.0])?;
    let out = Tensor::<f32>::zeros(&generator, "out", &[3])?;
    let add = Add::new(&generator, &x, &x, &out)?;
    let mut enc = generator.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        add.record(&mut pass);
    }
    generator.submit("generate", enc)?;
    // Natively the trainer's submit fails at once; in the browser its
    // scope answers later and the handle's next check reports it.
    let submitted = trainer.submit("training step", bad);
    let got = out.read(&generator).await?;
    // The trainer's next readback reports its error (in the browser, where
    // the scope answered late, as "readback: training step: ...").
    let read_back = a.read(&trainer).await.map(|_| ());
    let trainer_err = match (submitted, read_back) {
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => trainer.settled_errors("training step").await,
    };
    let mut checks = Vec::new();
    checks.push(match trainer_err {
        Err(crate::error::Error::Gpu { op, msg })
            if op == "training step" || msg.contains("training step: ") =>
        {
            Ok(())
        }
        Err(e) => Err(format!("the trainer's error came as {e}")),
        Ok(()) => Err("the trainer's bad copy was not reported to it".into()),
    });
    checks.push(
        generator
            .settled_errors("generate")
            .await
            .map_err(|e| format!("the generator was handed {e}")),
    );
    checks.push(if got == [2.0, 4.0, 6.0] {
        Ok(())
    } else {
        Err(format!("the generator's results are wrong: {got:?}"))
    });
    checks.push(
        trainer
            .check_errors("next step")
            .map_err(|e| format!("the trainer's error was reported twice: {e}")),
    );
    Ok(bad_inputs_result(&kernel, &case, checks))
}
