//! Decode FFN launcher (`shaders/decode.wgsl`): for few tokens, no
//! permutation; a mat-vec per selected expert (`decode_up_gelu` or
//! `decode_up_swiglu`), then `decode_down`, which also sums the token's slots
//! with their gate weights. Two dispatches. Twin: `reference::decode::decode_ffn`.
//!
//! The stacked weights are bound whole (the selected experts are only known on
//! the GPU), so each of W1, W3, W2 must fit one storage binding; `new` returns
//! `Error::Limit` otherwise.

use super::matmul::wgsl_select;
use super::{Activation, Kernel, ParamsLayout, UNUSED};
use crate::error::{Error, Result};
use crate::gpu::{
    uniform, Binding, Dispatch, Dtype, GpuContext, Grid, KernelDef, Tensor, WeightRef,
};
use crate::gpu_params;

/// Invocations per workgroup.
pub const DECODE_WG: u32 = 64;
/// Output columns per invocation (fixed in the shader).
pub const DECODE_COLS: u32 = 4;

const ACTIVATION_WGSL: &str = include_str!("../../shaders/activation.wgsl");
const DECODE_WGSL: &str = include_str!("../../shaders/decode.wgsl");

/// The decode kernels. `vec4`: D and F are multiples of 4, so weight rows are
/// read with vec4 loads (the fast path); otherwise scalar loads. `storage`:
/// how the weights are stored (f32, f16, or block-quantized q8 / q4,
/// dequantized in registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeSpec {
    /// `h = act(x · W1[e])` (GELU) or `silu(x · W1[e]) * (x · W3[e])` (SwiGLU).
    Up {
        activation: Activation,
        vec4: bool,
        storage: Dtype,
    },
    /// `y = sum_j w_j * (h_j · W2[e_j])`.
    Down { vec4: bool, storage: Dtype },
}

impl DecodeSpec {
    /// Kernel name (WGSL entry point).
    pub fn name(&self) -> &'static str {
        match self {
            DecodeSpec::Up {
                activation: Activation::Gelu,
                ..
            } => "decode_up_gelu",
            DecodeSpec::Up {
                activation: Activation::SwiGlu,
                ..
            } => "decode_up_swiglu",
            DecodeSpec::Down { .. } => "decode_down",
        }
    }

    fn vec4(&self) -> bool {
        match *self {
            DecodeSpec::Up { vec4, .. } | DecodeSpec::Down { vec4, .. } => vec4,
        }
    }

    fn storage(&self) -> Dtype {
        match *self {
            DecodeSpec::Up { storage, .. } | DecodeSpec::Down { storage, .. } => storage,
        }
    }

    pub fn def(&self) -> KernelDef {
        let (vec4, storage) = (self.vec4(), self.storage());
        let flags: &[&str] = match storage {
            Dtype::F32 => &[],
            Dtype::F16 => &["w16"],
            Dtype::Q8 => &["packed", "q8"],
            Dtype::Q4 => &["packed"],
        };
        KernelDef::new(
            format!(
                "{}{}{}",
                self.name(),
                if vec4 { "_vec4" } else { "_scalar" },
                match storage {
                    Dtype::F32 => String::new(),
                    other => format!("_{other}"),
                }
            ),
            &[
                ACTIVATION_WGSL,
                super::f16_source(storage != Dtype::F32),
                if storage.quant().is_some() {
                    super::QUANT_WGSL
                } else {
                    ""
                },
                &wgsl_select(DECODE_WGSL, flags),
            ],
            self.name(),
            &[("WG", DECODE_WG), ("VEC4", vec4 as u32), ("UNUSED", UNUSED)],
            // One binding table for every entry point.
            &[
                Binding::Uniform,
                Binding::Read,      // x [T, D]
                Binding::Read,      // topk_ids [T, K]
                Binding::Read,      // topk_weights [T, K]
                Binding::Read,      // w1 [E, D, F]
                Binding::Read,      // w3 [E, D, F]
                Binding::Read,      // w2 [E, F, D]
                Binding::ReadWrite, // h [T, K, F]
                Binding::ReadWrite, // y [T, D]
            ],
        )
    }

    pub fn all() -> Vec<Self> {
        let mut v = Vec::new();
        for storage in [Dtype::F32, Dtype::F16, Dtype::Q8, Dtype::Q4] {
            for vec4 in [false, true] {
                for activation in [Activation::Gelu, Activation::SwiGlu] {
                    v.push(DecodeSpec::Up {
                        activation,
                        vec4,
                        storage,
                    });
                }
                v.push(DecodeSpec::Down { vec4, storage });
            }
        }
        v
    }
}

gpu_params! {
    /// Mirrors `struct DecodeParams` in `shaders/decode.wgsl`.
    pub struct DecodeParams {
        pub t: u32,
        pub k: u32,
        pub e: u32,
        pub d: u32,
        pub f: u32,
        pub e0: u32,
        pub ec: u32,
        pub accumulate: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<DecodeParams>(Kernel::Decode(
        DecodeSpec::Down {
            vec4: true,
            storage: Dtype::F32,
        },
    ))]
}

/// Sizes of a decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    pub t: usize,
    pub k: usize,
    pub e: usize,
    pub d: usize,
    pub f: usize,
}

/// The tensors the decode FFN reads and writes.
pub struct DecodeBuffers<'a> {
    /// x [T, D]
    pub x: &'a Tensor<f32>,
    /// topk_ids [T, K]
    pub topk_ids: &'a Tensor<u32>,
    /// topk_weights [T, K]
    pub topk_weights: &'a Tensor<f32>,
    /// w1 [E, D, F] (f32, or f16 as w3 and w2 are)
    pub w1: WeightRef<'a>,
    /// w3 [E, D, F]: required for SwiGLU, must be `None` for GELU
    pub w3: Option<WeightRef<'a>>,
    /// w2 [E, F, D]
    pub w2: WeightRef<'a>,
    /// y [T, D]
    pub y: &'a Tensor<f32>,
    /// The weights are one part of a split expert bank (None: all E).
    pub part: Option<DecodePart>,
}

/// One part of a split expert bank: the weights hold experts
/// `e0 .. e0 + Ec` (their first dimension) of `experts`. Each part's run
/// computes the slots of its experts; the part with `e0 = 0` also zeroes
/// the unused slots. `accumulate`: add to `y` (every part but the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePart {
    pub e0: usize,
    pub experts: usize,
    pub accumulate: bool,
}

/// The shapes of `DecodeBuffers`, for `check`.
#[derive(Clone, Copy, Debug)]
pub struct DecodeShapes<'a> {
    pub x: &'a [usize],
    pub topk_ids: &'a [usize],
    pub topk_weights: &'a [usize],
    pub w1: &'a [usize],
    pub w3: Option<&'a [usize]>,
    pub w2: &'a [usize],
    pub y: &'a [usize],
    /// With a part of a split bank: its first expert and all the experts.
    pub part: Option<(usize, usize)>,
}

impl DecodeBuffers<'_> {
    pub fn shapes(&self) -> DecodeShapes<'_> {
        DecodeShapes {
            x: &self.x.shape,
            topk_ids: &self.topk_ids.shape,
            topk_weights: &self.topk_weights.shape,
            w1: self.w1.shape,
            w3: self.w3.map(|w| w.shape),
            w2: self.w2.shape,
            y: &self.y.shape,
            part: self.part.map(|p| (p.e0, p.experts)),
        }
    }
}

/// Check the shapes against each other and the activation. CPU only.
pub fn check(activation: Activation, shapes: &DecodeShapes<'_>) -> Result<DecodeShape> {
    let DecodeShapes {
        x,
        topk_ids: ids,
        topk_weights: weights,
        w1,
        w3,
        w2,
        y,
        part,
    } = *shapes;
    let (&[t, d], &[ti, k], &[e, wd, f]) = (x, ids, w1) else {
        return Err(Error::shape(
            "decode",
            "x [T, D], topk_ids [T, K], w1 [E, D, F]",
            format!("x {x:?}, topk_ids {ids:?}, w1 {w1:?}"),
        ));
    };
    let s = DecodeShape { t, k, e, d, f };
    if [t, k, e, d, f].contains(&0) {
        return Err(Error::invalid(
            "decode",
            format!("every size must be >= 1: {s:?}"),
        ));
    }
    // The experts the ids refer to: all of them, of which w1 holds e.
    let all = match part {
        Some((e0, all)) if e0 + e <= all => all,
        Some((e0, all)) => {
            return Err(Error::invalid(
                "decode",
                format!("a part of experts {e0}..{} of E = {all}", e0 + e),
            ))
        }
        None => e,
    };
    if k > all {
        return Err(Error::invalid(
            "decode",
            format!("K = {k} experts per token but only E = {all}"),
        ));
    }
    let want = |name: &str, got: &[usize], want: &[usize]| -> Result<()> {
        if got != want {
            return Err(Error::shape(
                "decode",
                format!("{name} {want:?}"),
                format!("{name} {got:?}"),
            ));
        }
        Ok(())
    };
    want("topk_ids", &[ti, k], &[t, k])?;
    want("w1", &[e, wd, f], &[e, d, f])?;
    want("topk_weights", weights, &[t, k])?;
    want("w2", w2, &[e, f, d])?;
    want("y", y, &[t, d])?;
    match (activation, w3) {
        (Activation::SwiGlu, Some(w3)) => want("w3", w3, &[e, d, f])?,
        (Activation::Gelu, None) => {}
        (Activation::SwiGlu, None) => return Err(Error::invalid("decode", "SwiGLU needs w3")),
        (Activation::Gelu, Some(_)) => return Err(Error::invalid("decode", "GELU takes no w3")),
    }
    // u64: usize is 32 bits in the browser (wasm32).
    let [t6, k6, e6, d6, f6] = [t, k, e, d, f].map(|v| v as u64);
    let largest = (e6 * d6 * f6).max(t6 * k6 * f6);
    if largest > u32::MAX as u64 {
        return Err(Error::Limit {
            what: "decode: elements of a weight tensor".into(),
            needed: largest,
            max: u32::MAX as u64,
        });
    }
    Ok(s)
}

/// The decode FFN of one shape, ready to record. Owns its scratch `h [T, K, F]`.
pub struct DecodeFfn {
    pub activation: Activation,
    pub shape: DecodeShape,
    up: Dispatch,
    down: Dispatch,
    h: Tensor<f32>,
    _params: wgpu::Buffer,
}

impl DecodeFfn {
    pub fn new(ctx: &GpuContext, activation: Activation, bufs: &DecodeBuffers<'_>) -> Result<Self> {
        let shape = check(activation, &bufs.shapes())?;
        let storage = bufs.w1.dtype;
        if bufs.w2.dtype != storage || bufs.w3.is_some_and(|w3| w3.dtype != storage) {
            return Err(Error::invalid(
                "decode",
                "w1, w3 and w2 must share one storage (f32, f16, q8 or q4)",
            ));
        }
        let DecodeShape { t, k, e, d, f } = shape;
        ctx.check_workgroups("decode_up: tokens T", t as u64)?;
        ctx.check_workgroups("decode_up: slots K", k as u64)?;
        let h = Tensor::<f32>::zeros(ctx, "decode h", &[t, k, f])?;
        let (e0, all, accumulate) = bufs
            .part
            .map_or((0, e, false), |p| (p.e0, p.experts, p.accumulate));
        let params = DecodeParams {
            t: t as u32,
            k: k as u32,
            e: all as u32,
            d: d as u32,
            f: f as u32,
            e0: e0 as u32,
            ec: e as u32,
            accumulate: accumulate as u32,
        };
        let params_buf = uniform(ctx, &params);
        let w3 = bufs.w3.unwrap_or(bufs.w1);
        let buffers = [
            &params_buf,
            &bufs.x.buffer,
            &bufs.topk_ids.buffer,
            &bufs.topk_weights.buffer,
            bufs.w1.buffer,
            w3.buffer,
            bufs.w2.buffer,
            &h.buffer,
            &bufs.y.buffer,
        ];
        let vec4 = d % 4 == 0 && f % 4 == 0;
        let block = (DECODE_WG * DECODE_COLS) as usize;
        let up = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::Decode(DecodeSpec::Up {
                activation,
                vec4,
                storage,
            }))?,
            &buffers,
            Grid::Direct(k as u32, f.div_ceil(block) as u32, t as u32),
        )?;
        let down = Dispatch::new(
            ctx,
            ctx.pipeline(&Kernel::Decode(DecodeSpec::Down { vec4, storage }))?,
            &buffers,
            Grid::Direct(d.div_ceil(block) as u32, t as u32, 1),
        )?;
        Ok(DecodeFfn {
            activation,
            shape,
            up,
            down,
            h,
            _params: params_buf,
        })
    }

    /// The hidden activations `h [T, K, F]` of the last run (for tests).
    pub fn h(&self) -> &Tensor<f32> {
        &self.h
    }

    /// FLOPs of one run, as if every one of the T * K slots were used.
    pub fn flops(&self) -> f64 {
        let s = self.shape;
        let up = if self.activation == Activation::SwiGlu {
            2
        } else {
            1
        };
        2.0 * (s.t * s.k) as f64 * (s.d * s.f) as f64 * (up + 1) as f64
    }

    /// Record the decode FFN: two dispatches (up, down).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.up.record(pass);
        self.down.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consistent shapes for T = 2, K = 2, E = 4, D = 8, F = 16, edited per test.
    fn check_with(
        act: Activation,
        edit: impl FnOnce(&mut DecodeShapes<'static>),
    ) -> Result<DecodeShape> {
        let mut s = DecodeShapes {
            x: &[2, 8],
            topk_ids: &[2, 2],
            topk_weights: &[2, 2],
            w1: &[4, 8, 16],
            w3: (act == Activation::SwiGlu).then_some(&[4, 8, 16]),
            w2: &[4, 16, 8],
            y: &[2, 8],
            part: None,
        };
        edit(&mut s);
        check(act, &s)
    }

    #[test]
    fn rejects_bad_arguments_with_typed_errors() {
        use Activation::{Gelu, SwiGlu};
        let invalid = |r: Result<DecodeShape>| matches!(r, Err(Error::InvalidArgument { .. }));
        let shape = |r: Result<DecodeShape>| matches!(r, Err(Error::Shape { .. }));
        assert_eq!(
            check_with(SwiGlu, |_| {}).unwrap(),
            DecodeShape {
                t: 2,
                k: 2,
                e: 4,
                d: 8,
                f: 16
            }
        );
        assert!(check_with(Gelu, |_| {}).is_ok());
        // K > E
        assert!(invalid(check_with(Gelu, |s| {
            s.w1 = &[1, 8, 16];
            s.w2 = &[1, 16, 8];
        })));
        // T = 0
        assert!(invalid(check_with(Gelu, |s| {
            s.x = &[0, 8];
            s.topk_ids = &[0, 2];
            s.topk_weights = &[0, 2];
            s.y = &[0, 8];
        })));
        // w3 missing for SwiGLU, given for GELU
        assert!(invalid(check_with(SwiGlu, |s| s.w3 = None)));
        assert!(invalid(check_with(Gelu, |s| s.w3 = Some(&[4, 8, 16]))));
        // shape mismatches
        assert!(shape(check_with(SwiGlu, |s| s.w3 = Some(&[4, 8, 15]))));
        assert!(shape(check_with(SwiGlu, |s| s.w2 = &[4, 8, 16])));
        assert!(shape(check_with(SwiGlu, |s| s.topk_ids = &[3, 2])));
        assert!(shape(check_with(SwiGlu, |s| s.w1 = &[4, 7, 16])));
        assert!(shape(check_with(Gelu, |s| s.y = &[2, 9])));
        assert!(shape(check_with(Gelu, |s| s.x = &[16])));
    }
}
