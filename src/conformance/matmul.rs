//! Conformance cases of the matmul kernel (`kernels::matmul`): every
//! specialization, every transpose, edge shapes (1x1x1, sizes that are not
//! multiples of any tile, M = 1, narrow N, K = 0, alpha and beta, B stored as
//! f16 with N a multiple of 4 and not, B block-quantized (q8, q4) with rows
//! that are not whole blocks, blocks across tile edges, all-zero blocks and
//! extreme scales), against the twin `reference::matmul::matmul`. One timed
//! case per specialization reports GFLOP/s.

use super::CheckResult;
use crate::error::Result;
use crate::gpu::{rounded_f16, Dtype, GpuContext, Tensor, Weight};
use crate::kernels::matmul::{Matmul, MatmulShape, MatmulSpec, Trans};
use crate::reference::matmul::matmul as matmul_twin;
use crate::tol::Tol;
use crate::util::{Rng, Stopwatch};

/// A matmul conformance case.
#[derive(Clone, Debug)]
pub struct Case {
    pub shape: MatmulShape,
    pub spec: MatmulSpec,
    pub seed: u64,
    /// Time the GPU run and report GFLOP/s.
    pub timed: bool,
    /// How B is stored (the twin reads B rounded to f16, or through
    /// `quant::rounded`).
    pub b: Dtype,
    /// `(c0, L)`: C is columns `c0 .. c0 + N` of a `[M, L]` matrix whose
    /// other columns must stay as they were (`Matmul::new_cols`).
    pub cols: Option<(usize, usize)>,
}

impl Case {
    pub fn names(&self) -> (String, String) {
        let s = &self.shape;
        let mut case = format!("{} M={} N={} K={}", s.trans, s.m, s.n, s.k);
        if s.alpha != 1.0 || s.beta != 0.0 {
            case += &format!(" alpha={} beta={}", s.alpha, s.beta);
        }
        if let Some((c0, l)) = self.cols {
            case += &format!(" into columns {c0}.. of C [M, {l}]");
        }
        let spec = self.spec.with_beta(s.beta != 0.0).with_b(self.b);
        case += &format!(" [{}]", spec.label());
        (self.spec.name().to_string(), case)
    }
}

/// (M, N, K, alpha, beta) of the edge cases.
const SHAPES: &[(usize, usize, usize, f32, f32)] = &[
    (1, 1, 1, 1.0, 0.0),
    (7, 13, 5, 1.0, 0.0),
    (64, 64, 64, 1.0, 0.0),
    (129, 65, 33, 1.0, 0.0),
    (1, 256, 512, 1.0, 0.0),
    // Router-like: many tokens, N = E = 16.
    (300, 16, 128, 1.0, 0.0),
    // K = 0: C = beta * C.
    (5, 7, 0, 1.0, 0.5),
    (33, 20, 17, 0.5, -1.5),
];

/// (M, N, K, storage) of the cases with B stored as f16 or block-quantized
/// (NN and NT: how the model reads its weights). f16: N a multiple of 4 (B
/// read two words at a time) and not (one half at a time). Quantized, B's
/// values in blocks of mixed scale (`block_scaled`): N not a multiple of 4
/// (one value per load), N = 200 (a multiple of 4, not of 32: blocks run
/// across rows and across the 64-, 96- and 128-column tiles), and a
/// mat-vec (decode).
const STORED_SHAPES: &[(usize, usize, usize, Dtype)] = &[
    (7, 13, 5, Dtype::F16),
    (129, 64, 33, Dtype::F16),
    (7, 13, 5, Dtype::Q8),
    (129, 200, 33, Dtype::Q8),
    (129, 200, 33, Dtype::Q4),
    (1, 256, 96, Dtype::Q4),
];

/// Scale the blocks of 32 values of `b` (its stored order) by 1, 0 (an
/// all-zero block), 1e-3 (subnormal f16 scales) and 1e4 in turn.
fn block_scaled(b: &mut [f32]) {
    for (i, block) in b.chunks_mut(crate::quant::BLOCK).enumerate() {
        let s = [1.0, 0.0, 1e-3, 1e4][i % 4];
        block.iter_mut().for_each(|x| *x *= s);
    }
}

/// The timed case of every specialization.
const TIMED: (usize, usize, usize) = (512, 512, 512);

/// Configurations whose beta (C-reading) specialization is checked too. The
/// others share its epilogue code; leaving them out saves compiling four
/// large pipelines per adapter (a minute on a CPU adapter).
fn beta_checked(spec: &MatmulSpec) -> bool {
    [
        MatmulSpec::SUBGROUP_SQUARE,
        MatmulSpec::BLOCKED_SQUARE,
        MatmulSpec::TILED,
    ]
    .contains(spec)
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut seed = 1;
    for spec in MatmulSpec::configs() {
        for trans in Trans::ALL {
            for &(m, n, k, alpha, beta) in SHAPES {
                if beta != 0.0 && !beta_checked(&spec) {
                    continue;
                }
                seed += 1;
                v.push(Case {
                    shape: MatmulShape {
                        m,
                        n,
                        k,
                        trans,
                        alpha,
                        beta,
                    },
                    spec,
                    seed,
                    timed: false,
                    b: Dtype::F32,
                    cols: None,
                });
            }
            if trans == Trans::TN {
                continue;
            }
            // Stored B on the configurations whose beta path is checked: the
            // loaders are shared by all of them (each stored configuration
            // is one more large pipeline to compile, a minute in the page).
            for &(m, n, k, b) in STORED_SHAPES.iter().filter(|_| beta_checked(&spec)) {
                seed += 1;
                v.push(Case {
                    shape: MatmulShape {
                        trans,
                        ..MatmulShape::nn(m, n, k)
                    },
                    spec,
                    seed,
                    timed: false,
                    b,
                    cols: None,
                });
            }
            // The unembedding of one vocabulary part: its columns of the
            // logits (beta where the configuration checks it: C is read at
            // the same strided places).
            seed += 1;
            v.push(Case {
                shape: MatmulShape {
                    trans,
                    beta: if beta_checked(&spec) { 0.5 } else { 0.0 },
                    ..MatmulShape::nn(9, 13, 7)
                },
                spec,
                seed,
                timed: false,
                b: Dtype::F32,
                cols: Some((5, 22)),
            });
        }
        let (m, n, k) = TIMED;
        seed += 1;
        v.push(Case {
            shape: MatmulShape::nn(m, n, k),
            spec,
            seed,
            timed: true,
            b: Dtype::F32,
            cols: None,
        });
    }
    v
}

pub async fn run(ctx: &GpuContext, case: &Case) -> Result<CheckResult> {
    let (kernel, name) = case.names();
    let s = &case.shape;
    let mut rng = Rng::new(case.seed);
    let a = rng.vec_sym(s.m * s.k, 1.0);
    let mut b = rng.vec_sym(s.k * s.n, 1.0);
    match case.b {
        Dtype::F32 => {}
        Dtype::F16 => b = rounded_f16(&b),
        Dtype::Q8 | Dtype::Q4 => {
            block_scaled(&mut b);
            b = crate::quant::rounded(case.b.quant().expect("quantized"), "b", &b)?;
        }
    }
    let (col, ldc) = case.cols.unwrap_or((0, s.n));
    let c0 = rng.vec_sym(s.m * ldc, 1.0);
    // The twin on the block; the other columns keep their values.
    let block: Vec<f32> = (0..s.m)
        .flat_map(|r| c0[r * ldc + col..r * ldc + col + s.n].to_vec())
        .collect();
    let out = matmul_twin(
        &a,
        &b,
        s.m,
        s.n,
        s.k,
        s.trans,
        s.alpha,
        s.beta,
        Some(&block),
    );
    let mut want = c0.clone();
    for r in 0..s.m {
        want[r * ldc + col..r * ldc + col + s.n].copy_from_slice(&out[r * s.n..(r + 1) * s.n]);
    }

    let at = Tensor::from_slice(ctx, "a", &s.trans.a_shape(s.m, s.k), &a)?;
    let bw = Weight::upload(ctx, "b", &s.trans.b_shape(s.k, s.n), &b, case.b)?;
    let ct = Tensor::from_slice(ctx, "c", &[s.m, ldc], &c0)?;
    let mm = Matmul::new_cols(ctx, s, case.spec, &at, bw.view("matmul")?, &ct, col)?;
    let reps = if case.timed { 3 } else { 1 };
    // Untimed warm-up when timing (the pipeline is compiled in `new`).
    if case.timed {
        run_once(ctx, &mm, 1)?;
        ct.write(ctx, &c0)?;
    }
    let sw = Stopwatch::start();
    run_once(ctx, &mm, 1)?;
    let seconds = sw.seconds();
    let got = ct.read(ctx).await?;
    // Inputs of order 1, except B's 1e4 blocks (quantized cases): the
    // rounding of the sums grows with the largest |B|.
    let bmax = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let tol = Tol::reduction(s.k);
    let tol = Tol {
        atol: tol.atol * bmax,
        ..tol
    };
    let mut r = CheckResult::from_comparisons(kernel, name, &[("c", tol.compare(&got, &want))]);
    if case.timed {
        // beta = 0 here, so repeated runs write the same C.
        let sw = Stopwatch::start();
        run_once(ctx, &mm, reps)?;
        let per_run = sw.seconds() / reps as f64;
        r.gflops = Some(s.flops() / per_run.min(seconds) / 1e9);
    }
    Ok(r)
}

/// Record `reps` dispatches into one pass, submit, wait.
fn run_once(ctx: &GpuContext, mm: &Matmul, reps: usize) -> Result<()> {
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("matmul"),
        });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("matmul"),
            timestamp_writes: None,
        });
        for _ in 0..reps {
            mm.record(&mut pass);
        }
    }
    ctx.submit_and_wait(encoder)
}
