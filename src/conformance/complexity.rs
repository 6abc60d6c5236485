//! Conformance of `sequence_complexity` against
//! `reference::complexity::sequence_complexity` (exact: one count and one
//! division, as in the twin), writing several layers' columns of one matrix.

use super::route::{make_ids, Ids};
use super::{bad_inputs_result, expect_error, is_shape, submit_pass, CheckResult};
use crate::error::Result;
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::complexity::{ComplexitySpec, SequenceComplexity};
use crate::kernels::UNUSED;
use crate::reference::complexity::sequence_complexity;
use crate::tol::compare_exact;

#[derive(Clone, Debug)]
pub enum Case {
    /// `cols` layers of `b` sequences of `n` tokens, K slots, E experts.
    Twin {
        b: usize,
        n: usize,
        k: usize,
        cols: usize,
        seed: u64,
    },
    BadInputs,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        let kernel = ComplexitySpec.name().to_string();
        match self {
            Case::Twin { b, n, k, cols, .. } => {
                (kernel, format!("B={b} N={n} K={k} {cols} layers"))
            }
            Case::BadInputs => (
                kernel,
                "bad inputs: T not a multiple of B, K = 3, column past the matrix".into(),
            ),
        }
    }
}

pub fn cases() -> Vec<Case> {
    let c = |b, n, k, cols, seed| Case::Twin {
        b,
        n,
        k,
        cols,
        seed,
    };
    vec![
        c(1, 1, 2, 1, 1),
        c(4, 16, 2, 2, 2),
        c(16, 128, 2, 4, 3),
        c(70, 33, 2, 3, 4),
        c(8, 32, 1, 2, 5),
        c(6, 40, 8, 2, 6),
        c(3, 17, 5, 1, 7),
        Case::BadInputs,
    ]
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let Case::Twin {
        b,
        n,
        k,
        cols,
        seed,
    } = *case
    else {
        return Ok(bad_inputs(ctx, &kernel, &name));
    };
    let t = b * n;
    let out = Tensor::<f32>::from_slice(ctx, "complexity", &[b, cols], &vec![f32::NAN; b * cols])?;
    let mut want = vec![0.0f32; b * cols];
    let mut ids = Vec::new();
    let mut launchers = Vec::new();
    for col in 0..cols {
        // A different share of two-expert tokens in every layer.
        let two_pct = [20, 50, 90, 5][col % 4];
        let host = if k > 2 {
            // A top-k rule's prefix of 1..=k experts per token.
            let mut rng = crate::util::Rng::new(seed + col as u64);
            let mut v = vec![UNUSED; t * k];
            for tok in 0..t {
                let c = 1 + rng.below(k);
                for j in 0..c {
                    v[tok * k + j] = rng.below(16) as u32;
                }
            }
            v
        } else {
            make_ids(t, k, 8, Ids::Adaptive { two_pct }, seed + col as u64)
        };
        for (s, v) in sequence_complexity(&host, b, n, k).into_iter().enumerate() {
            want[s * cols + col] = v;
        }
        let dev = Tensor::from_slice(ctx, "topk_ids", &[t, k], &host)?;
        launchers.push(SequenceComplexity::new(ctx, b, &dev, &out, col)?);
        ids.push(dev);
    }
    submit_pass(ctx, |pass| {
        for l in &launchers {
            l.record(pass);
        }
    })?;
    let got = out.read(ctx).await?;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    Ok(CheckResult::from_comparisons(
        kernel,
        name,
        &[("complexity", compare_exact(&bits(&got), &bits(&want)))],
    ))
}

fn bad_inputs(ctx: &GpuContext, kernel: &str, case: &str) -> CheckResult {
    let mut checks = Vec::new();
    let mut try_new = |what: &str, b: usize, ids: &[usize], out: &[usize], col: usize| {
        let scope = ctx.error_scope();
        let r = (|| -> Result<SequenceComplexity> {
            let ids = Tensor::<u32>::zeros(ctx, "topk_ids", ids)?;
            let out = Tensor::<f32>::zeros(ctx, "complexity", out)?;
            SequenceComplexity::new(ctx, b, &ids, &out, col)
        })();
        checks.push(expect_error(scope, what, r, is_shape));
    };
    try_new("T = 10 for B = 3", 3, &[10, 2], &[3, 1], 0);
    try_new("K = 9", 2, &[8, 9], &[2, 1], 0);
    try_new("column 2 of 2", 2, &[8, 2], &[2, 2], 2);
    try_new("complexity [B + 1, cols]", 2, &[8, 2], &[3, 2], 0);
    bad_inputs_result(kernel, case, checks)
}
