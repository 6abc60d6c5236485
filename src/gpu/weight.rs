//! Weights on the GPU: f32, or f16 (IEEE binary16, two to a u32 word,
//! element `i` in the low half of word `i / 2` when `i` is even).
//!
//! f16 storage halves the bytes of the matmul weights (the experts, the
//! attention projections, the embedding and the unembedding) with the math
//! and the accumulation in f32: a kernel reads a word and widens its two
//! halves with integer operations (`shaders/f16.wgsl`). That needs no
//! `SHADER_F16` (nor the capability WGSL's `unpack2x16float` needs, which
//! lavapipe lacks), so every adapter and every browser gets it;
//! `SHADER_F16` would only add f16 arithmetic, which amoe does not want.
//! The twin of a kernel reading f16 weights is its f32 twin on the weights
//! rounded to f16 ([`round_f16`]): the widening is exact, so the kernel
//! computes exactly that and the same tolerances hold.

use half::f16;

use super::{GpuContext, Tensor};
use crate::error::{Error, Result};

/// How a weight is stored on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The largest finite f16.
pub const F16_MAX: f32 = 65504.0;

/// `x` rounded to the nearest f16 (ties to even), as an f32: what a kernel
/// reading f16 storage sees.
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Every value of `data` rounded to f16 (the twins' view of f16 storage).
pub fn rounded_f16(data: &[f32]) -> Vec<f32> {
    data.iter().map(|&x| round_f16(x)).collect()
}

/// Whether `data` holds only values that a 16-bit float file stores
/// (f16 or bf16): what a checkpoint read from such a file holds, and what
/// f32 training practically never produces.
pub fn is_16_bit(data: &[f32]) -> bool {
    data.iter()
        .all(|&x| x.to_bits() & 0xffff == 0 || round_f16(x) == x)
}

/// The f16 values of `data`; an error naming `label` when a finite value
/// lies beyond f16's range (it would become infinite).
pub fn to_f16(label: &str, data: &[f32]) -> Result<Vec<f16>> {
    if let Some(x) = data.iter().find(|x| x.is_finite() && x.abs() > F16_MAX) {
        return Err(Error::invalid(
            "f16 weights",
            format!(
                "{label} holds {x}, beyond f16's range (+-{F16_MAX}): store it in f32 (--dtype f32)"
            ),
        ));
    }
    Ok(data.iter().map(|&x| f16::from_f32(x)).collect())
}

/// A weight tensor on the GPU in either storage.
#[derive(Clone, Debug)]
pub enum Weight {
    F32(Tensor<f32>),
    F16(Tensor<f16>),
}

impl Weight {
    /// Upload `data` (f32 values, `shape`'s element count) stored as `dtype`.
    pub fn upload(
        ctx: &GpuContext,
        label: &str,
        shape: &[usize],
        data: &[f32],
        dtype: Dtype,
    ) -> Result<Weight> {
        Ok(match dtype {
            Dtype::F32 => Weight::F32(Tensor::from_slice(ctx, label, shape, data)?),
            Dtype::F16 => Weight::F16(Tensor::from_slice(
                ctx,
                label,
                shape,
                &to_f16(label, data)?,
            )?),
        })
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Weight::F32(_) => Dtype::F32,
            Weight::F16(_) => Dtype::F16,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Weight::F32(t) => &t.shape,
            Weight::F16(t) => &t.shape,
        }
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        match self {
            Weight::F32(t) => &t.buffer,
            Weight::F16(t) => &t.buffer,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    /// Bytes of the contents.
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * self.dtype().size()
    }

    /// The f32 tensor (training and the kernels that read only f32); an
    /// error naming `what` for f16 storage.
    pub fn f32(&self, what: &'static str) -> Result<&Tensor<f32>> {
        match self {
            Weight::F32(t) => Ok(t),
            Weight::F16(_) => Err(Error::invalid(
                what,
                "needs f32 weights; this model is stored in f16 (load it with --dtype f32)",
            )),
        }
    }

    /// The view kernels bind.
    pub fn view(&self) -> WeightRef<'_> {
        WeightRef {
            buffer: self.buffer(),
            shape: self.shape(),
            dtype: self.dtype(),
        }
    }

    /// The contents as f32 values.
    pub async fn read(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        Ok(match self {
            Weight::F32(t) => t.read(ctx).await?,
            Weight::F16(t) => t.read(ctx).await?.iter().map(|h| h.to_f32()).collect(),
        })
    }

    /// Overwrite the contents from f32 values (rounded for f16 storage).
    pub fn write(&self, ctx: &GpuContext, data: &[f32]) -> Result<()> {
        match self {
            Weight::F32(t) => t.write(ctx, data),
            Weight::F16(t) => t.write(ctx, &to_f16("weight", data)?),
        }
    }
}

impl From<Tensor<f32>> for Weight {
    fn from(t: Tensor<f32>) -> Self {
        Weight::F32(t)
    }
}

/// A borrowed weight: the buffer a kernel binds, its logical shape and its
/// storage. `&Tensor<f32>` and `&Weight` convert into it.
#[derive(Clone, Copy, Debug)]
pub struct WeightRef<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub shape: &'a [usize],
    pub dtype: Dtype,
}

impl WeightRef<'_> {
    pub fn f16(&self) -> bool {
        self.dtype == Dtype::F16
    }

    /// Fail with `Error::Shape` unless the shape is `want`.
    pub fn expect_shape(&self, op: &'static str, name: &str, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(Error::shape(
                op,
                format!("{name} {want:?}"),
                format!("{name} {:?}", self.shape),
            ));
        }
        Ok(())
    }
}

impl<'a> From<&'a Tensor<f32>> for WeightRef<'a> {
    fn from(t: &'a Tensor<f32>) -> Self {
        WeightRef {
            buffer: &t.buffer,
            shape: &t.shape,
            dtype: Dtype::F32,
        }
    }
}

impl<'a> From<&'a Tensor<f16>> for WeightRef<'a> {
    fn from(t: &'a Tensor<f16>) -> Self {
        WeightRef {
            buffer: &t.buffer,
            shape: &t.shape,
            dtype: Dtype::F16,
        }
    }
}

impl<'a> From<&'a Weight> for WeightRef<'a> {
    fn from(w: &'a Weight) -> Self {
        w.view()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_range() {
        assert_eq!(round_f16(1.0), 1.0);
        assert_eq!(round_f16(1.0 + 1.0 / 4096.0), 1.0);
        assert!(is_16_bit(&[
            1.0,
            0.5,
            -3.25,
            half::bf16::from_f32(0.1).to_f32()
        ]));
        assert!(!is_16_bit(&[0.1]));
        assert!(to_f16("w", &[1.0, -65504.0]).is_ok());
        let e = to_f16("layers.0.attn.wqkv", &[1e5])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layers.0.attn.wqkv") && e.contains("--dtype f32"),
            "{e}"
        );
    }
}
