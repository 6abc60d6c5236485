//! Weights on the GPU: f32, or f16 (IEEE binary16, two to a u32 word,
//! element `i` in the low half of word `i / 2` when `i` is even); in one
//! buffer, or, larger than one storage binding, in parts along one axis
//! (see [`Weight::upload_split`]).
//!
//! f16 storage halves the bytes of the matmul weights (the experts, the
//! attention projections, the embedding and the unembedding) with the math
//! and the accumulation in f32: a kernel reads a word and widens its two
//! halves with integer operations (`shaders/f16.wgsl`). That needs no
//! `SHADER_F16` (nor the capability WGSL's `unpack2x16float` needs, which
//! lavapipe lacks), so no adapter feature is needed (the page keeps f32 for
//! now: the f16 GEMM does not complete on Chromium's SwiftShader);
//! `SHADER_F16` would only add f16 arithmetic, which amoe does not want.
//! The twin of a kernel reading f16 weights is its f32 twin on the weights
//! rounded to f16 ([`round_f16`]): the widening is exact, so the kernel
//! computes exactly that and the same tolerances hold.

use crate::quant::QuantFormat;
use half::f16;

use super::{GpuContext, Tensor};
use crate::error::{Error, Result};

/// How a weight is stored on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    /// Block-quantized (`quant`): 8 or 4 bits with an f16 scale per 32.
    Q8,
    Q4,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Q8 => "q8",
            Dtype::Q4 => "q4",
        }
    }

    /// The block-quantized format, if this is one.
    pub fn quant(self) -> Option<QuantFormat> {
        match self {
            Dtype::Q8 => Some(QuantFormat::Q8),
            Dtype::Q4 => Some(QuantFormat::Q4),
            Dtype::F32 | Dtype::F16 => None,
        }
    }

    /// Bytes that `numel` values take in this storage.
    pub fn bytes(self, numel: u64) -> u64 {
        match self {
            Dtype::F32 => numel * 4,
            Dtype::F16 => numel * 2,
            Dtype::Q8 | Dtype::Q4 => self.quant().expect("quantized").bytes_u64(numel),
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

/// One buffer of a weight.
#[derive(Clone, Debug)]
enum Part {
    F32(Tensor<f32>),
    F16(Tensor<f16>),
    /// Packed words (`quant`) of a tensor of `shape`.
    Packed {
        format: QuantFormat,
        shape: Vec<usize>,
        words: Tensor<u32>,
    },
}

impl Part {
    fn view(&self) -> WeightRef<'_> {
        match self {
            Part::F32(t) => t.into(),
            Part::F16(t) => t.into(),
            Part::Packed {
                format,
                shape,
                words,
            } => WeightRef {
                buffer: &words.buffer,
                shape,
                dtype: match format {
                    QuantFormat::Q8 => Dtype::Q8,
                    QuantFormat::Q4 => Dtype::Q4,
                },
            },
        }
    }

    async fn read(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        Ok(match self {
            Part::F32(t) => t.read(ctx).await?,
            Part::F16(t) => t.read(ctx).await?.iter().map(|h| h.to_f32()).collect(),
            Part::Packed {
                format,
                shape,
                words,
            } => crate::quant::dequantize(*format, &words.read(ctx).await?, shape.iter().product()),
        })
    }

    fn upload(
        ctx: &GpuContext,
        label: &str,
        shape: &[usize],
        data: &[f32],
        dtype: Dtype,
    ) -> Result<Part> {
        Ok(match dtype {
            Dtype::F32 => Part::F32(Tensor::from_slice(ctx, label, shape, data)?),
            Dtype::F16 => Part::F16(Tensor::from_slice(
                ctx,
                label,
                shape,
                &to_f16(label, data)?,
            )?),
            Dtype::Q8 | Dtype::Q4 => {
                let format = dtype.quant().expect("quantized");
                let words = crate::quant::quantize(format, label, data)?;
                Part::Packed {
                    format,
                    shape: shape.to_vec(),
                    words: Tensor::from_slice(ctx, label, &[words.len()], &words)?,
                }
            }
        })
    }
}

/// A weight tensor on the GPU in either storage: one buffer, or, when it is
/// larger than one storage binding (`GpuContext::split_bytes`) and was
/// uploaded with [`Weight::upload_split`], several parts along one axis
/// (experts, vocabulary rows, or columns), each its own buffer. A kernel
/// that reads a split weight runs once per part ([`Weight::parts`]); one that
/// cannot asks for [`Weight::view`], which refuses a split weight by name.
#[derive(Clone, Debug)]
pub struct Weight {
    label: String,
    shape: Vec<usize>,
    dtype: Dtype,
    /// The axis the parts divide (0, or the last for columns).
    axis: usize,
    /// Each part and where it starts along `axis`.
    parts: Vec<(usize, Part)>,
}

/// One part of a weight: the range along the split axis it holds and the
/// buffer (shaped like the whole, with that axis cut to the range).
#[derive(Clone, Debug)]
pub struct WeightPart<'a> {
    pub range: std::ops::Range<usize>,
    pub view: WeightRef<'a>,
}

impl Weight {
    /// Upload `data` (f32 values, `shape`'s element count) stored as
    /// `dtype`, in one buffer.
    pub fn upload(
        ctx: &GpuContext,
        label: &str,
        shape: &[usize],
        data: &[f32],
        dtype: Dtype,
    ) -> Result<Weight> {
        Ok(Weight {
            label: label.to_string(),
            shape: shape.to_vec(),
            dtype,
            axis: 0,
            parts: vec![(0, Part::upload(ctx, label, shape, data, dtype)?)],
        })
    }

    /// Upload as [`Weight::upload`] when the weight fits one storage
    /// binding (`ctx.split_bytes()`), else in parts along `axis` (0, or the
    /// last axis: the parts then hold column blocks, each laid out
    /// row-major on its own), each part as many whole slices along `axis`
    /// as fit. A single slice larger than a binding is `Error::Limit`.
    pub fn upload_split(
        ctx: &GpuContext,
        label: &str,
        shape: &[usize],
        data: &[f32],
        dtype: Dtype,
        axis: usize,
    ) -> Result<Weight> {
        let numel: usize = shape.iter().product();
        let limit = ctx.split_bytes() / 16 * 16;
        if axis >= shape.len() || (axis != 0 && axis + 1 != shape.len()) || data.len() != numel {
            return Err(Error::invalid(
                "weight upload",
                format!(
                    "{label} {shape:?}: split along axis {axis} of {} values",
                    data.len()
                ),
            ));
        }
        if dtype.bytes(numel as u64) <= limit {
            // One part, still described along `axis` (`parts` ranges over it).
            return Ok(Weight {
                axis,
                ..Self::upload(ctx, label, shape, data, dtype)?
            });
        }
        let along = shape[axis];
        let slice = numel / along.max(1);
        let slice_bytes = dtype.bytes(slice as u64);
        if slice_bytes > limit {
            return Err(Error::Limit {
                what: format!(
                    "{label} {shape:?}: one slice along axis {axis} in one storage binding"
                ),
                needed: slice_bytes,
                max: limit,
            });
        }
        let mut per = ((limit / slice_bytes) as usize).max(1);
        if axis != 0 && dtype.quant().is_some() && per >= crate::quant::BLOCK {
            // Column blocks of a quantized matrix start at multiples of the
            // block: with rows of whole blocks (what a quantized checkpoint
            // stores), each part's blocks are the whole's, so its values
            // are the file's exactly.
            per -= per % crate::quant::BLOCK;
        }
        let mut parts = Vec::new();
        let mut start = 0;
        while start < along {
            let end = (start + per).min(along);
            let mut part_shape = shape.to_vec();
            part_shape[axis] = end - start;
            let values: Vec<f32> = if axis == 0 {
                data[start * slice..end * slice].to_vec()
            } else {
                // Columns start..end of every row.
                data.chunks_exact(along)
                    .flat_map(|row| row[start..end].iter().copied())
                    .collect()
            };
            let name = format!("{label}[{start}..{end}]");
            parts.push((
                start,
                Part::upload(ctx, &name, &part_shape, &values, dtype)?,
            ));
            start = end;
        }
        Ok(Weight {
            label: label.to_string(),
            shape: shape.to_vec(),
            dtype,
            axis,
            parts,
        })
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the contents (all parts).
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|(_, p)| p.view().bytes()).sum()
    }

    /// Whether the weight is in more than one part.
    pub fn is_split(&self) -> bool {
        self.parts.len() > 1
    }

    /// The axis the parts divide.
    pub fn split_axis(&self) -> usize {
        self.axis
    }

    /// Every part, in order along the split axis (one part, the whole
    /// range, for a weight in one buffer).
    pub fn parts(&self) -> Vec<WeightPart<'_>> {
        let along = self.shape.get(self.axis).copied().unwrap_or(1);
        self.parts
            .iter()
            .enumerate()
            .map(|(i, (start, p))| WeightPart {
                range: *start..self.parts.get(i + 1).map_or(along, |n| n.0),
                view: p.view(),
            })
            .collect()
    }

    /// The one buffer a kernel binds; a split weight is an error naming it
    /// and `what` (a kernel that reads it whole).
    pub fn view(&self, what: &'static str) -> Result<WeightRef<'_>> {
        match self.parts.as_slice() {
            [(_, p)] => Ok(p.view()),
            _ => Err(Error::Limit {
                what: format!(
                    "{what}: {} {:?} is larger than one storage binding and split in {} parts, which this kernel does not take",
                    self.label,
                    self.shape,
                    self.parts.len()
                ),
                needed: self.bytes(),
                max: self.parts.iter().map(|(_, p)| p.view().bytes()).max().unwrap_or(0),
            }),
        }
    }

    /// The f32 tensor (training and the kernels that read only f32); an
    /// error naming `what` for f16 storage or a split weight.
    pub fn f32(&self, what: &'static str) -> Result<&Tensor<f32>> {
        match self.parts.as_slice() {
            [(_, Part::F32(t))] => Ok(t),
            [(_, Part::F16(_) | Part::Packed { .. })] => Err(Error::invalid(
                what,
                format!(
                    "needs f32 weights; this model is stored in {} (load it with --dtype f32)",
                    self.dtype
                ),
            )),
            _ => Err(Error::invalid(
                what,
                format!(
                    "{} is split in {} parts (larger than one storage binding)",
                    self.label,
                    self.parts.len()
                ),
            )),
        }
    }

    /// The contents as f32 values (parts put back together).
    pub async fn read(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        if let [(_, p)] = self.parts.as_slice() {
            return p.read(ctx).await;
        }
        let mut parts = Vec::with_capacity(self.parts.len());
        for (_, p) in &self.parts {
            parts.push(p.read(ctx).await?);
        }
        if self.axis == 0 {
            return Ok(parts.concat());
        }
        // Column blocks: row r is the r-th row of every block in turn.
        let widths: Vec<usize> = self.parts().iter().map(|p| p.range.len()).collect();
        let rows = self.numel() / self.shape[self.axis].max(1);
        let mut out = Vec::with_capacity(self.numel());
        for r in 0..rows {
            for (p, &w) in parts.iter().zip(&widths) {
                out.extend_from_slice(&p[r * w..(r + 1) * w]);
            }
        }
        Ok(out)
    }

    /// Overwrite the contents from f32 values (rounded for f16 storage);
    /// one buffer only.
    pub fn write(&self, ctx: &GpuContext, data: &[f32]) -> Result<()> {
        match self.parts.as_slice() {
            [(_, Part::F32(t))] => t.write(ctx, data),
            [(_, Part::F16(t))] => t.write(ctx, &to_f16(&self.label, data)?),
            [(_, Part::Packed { format, words, .. })] => {
                words.write(ctx, &crate::quant::quantize(*format, &self.label, data)?)
            }
            _ => Err(Error::invalid(
                "weight write",
                format!("{} is split in {} parts", self.label, self.parts.len()),
            )),
        }
    }
}

impl From<Tensor<f32>> for Weight {
    fn from(t: Tensor<f32>) -> Self {
        Weight {
            label: "weight".to_string(),
            shape: t.shape.clone(),
            dtype: Dtype::F32,
            axis: 0,
            parts: vec![(0, Part::F32(t))],
        }
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

    /// Bytes of the contents.
    pub fn bytes(&self) -> u64 {
        self.dtype
            .bytes(self.shape.iter().product::<usize>() as u64)
    }

    /// `Error::InvalidArgument` naming `op` for block-quantized storage: for
    /// the kernels that read only f32 or f16 weights.
    pub fn expect_float(&self, op: &'static str) -> Result<()> {
        match self.dtype.quant() {
            None => Ok(()),
            Some(f) => Err(Error::invalid(
                op,
                format!("this kernel does not read {f} weights (only f32 and f16)"),
            )),
        }
    }

    /// Fail with `Error::Shape` unless the shape is `want`.
    pub fn expect_shape(&self, op: &'static str, name: &str, want: &[usize]) -> Result<()> {
        super::buffer::expect_shape(op, name, self.shape, want)
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
