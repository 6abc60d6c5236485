//! Tensors read lazily: a safetensors file's tensors as (dtype, shape,
//! byte range) over the file's bytes ([`RawTensor`]), and each model
//! parameter as a recipe over them ([`LazyTensor`]) whose f32 values are
//! made only when the GPU upload asks for them, one parameter at a time.
//!
//! Natively the bytes are a memory map, so loading a model of many
//! gigabytes holds in host memory the file's pages (the kernel's page
//! cache, given back under pressure) and one tensor's f32 values at a time,
//! never an f32 copy of the model. In the page they are the file the user
//! picked. Wasm-safe.

use super::NamedTensor;
use crate::error::{Error, Result};
use crate::model::params::{values_fit_f16, TensorValues};
use crate::model::Params;
use crate::quant::{QuantFormat, BLOCK};
use safetensors::tensor::Dtype;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// The bytes of one file that tensors read from, shared by them.
#[derive(Clone)]
pub struct FileBytes(Arc<dyn AsRef<[u8]> + Send + Sync>);

impl FileBytes {
    pub fn new(bytes: impl AsRef<[u8]> + Send + Sync + 'static) -> Self {
        FileBytes(Arc::new(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileBytes({} bytes)", self.bytes().len())
    }
}

/// The element types amoe reads from a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileDtype {
    F32,
    F16,
    BF16,
    /// Block-quantized words (`quant`), as `amoe quantize` writes them: a
    /// U32 tensor of the packed words whose logical shape and format the
    /// file's metadata give ([`QUANT_METADATA`]).
    Packed(QuantFormat),
    /// A block-quantized ggml type of a GGUF file, dequantized when read.
    Ggml(super::gguf::GgmlType),
}

/// The safetensors metadata key that describes a file's block-quantized
/// tensors: a JSON object `{"block": 32, "tensors": {name: {"format":
/// "q4", "shape": [..]}}}`. Each such tensor is stored as U32 words.
pub const QUANT_METADATA: &str = "amoe.quantized";

/// What [`QUANT_METADATA`] holds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantMetadata {
    /// Values per block (one scale each): `quant::BLOCK`.
    pub block: usize,
    pub tensors: std::collections::BTreeMap<String, PackedTensor>,
}

/// One packed tensor of a quantized file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedTensor {
    pub format: String,
    pub shape: Vec<usize>,
}

/// Values per slice along the first axis of `shape` (what a weight split
/// into parts along that axis keeps together).
pub fn slice_numel(shape: &[usize]) -> usize {
    shape.iter().skip(1).product()
}

/// Why a packed tensor of `shape` cannot be stored: its slices along the
/// first axis must hold whole blocks, so that the blocks are the same
/// whether the weight is uploaded whole or split into parts (an expert's
/// weights never share a block with the next expert's).
pub fn check_packable(name: &str, shape: &[usize]) -> Result<()> {
    let slice = slice_numel(shape);
    if shape.len() < 2 || !slice.is_multiple_of(BLOCK) {
        return Err(Error::invalid(
            "quantized tensor",
            format!(
                "{name} {shape:?}: {slice} values per slice of its first axis is not a \
                 multiple of the block ({BLOCK} values), so blocks would straddle its slices"
            ),
        ));
    }
    Ok(())
}

impl FileDtype {
    pub(crate) fn of(dtype: Dtype) -> Option<FileDtype> {
        match dtype {
            Dtype::F32 => Some(FileDtype::F32),
            Dtype::F16 => Some(FileDtype::F16),
            Dtype::BF16 => Some(FileDtype::BF16),
            _ => None,
        }
    }

    /// Bytes per value (a packed format: per word; see
    /// [`FileDtype::bytes`]).
    pub fn size(self) -> usize {
        match self {
            FileDtype::F32 | FileDtype::Packed(_) => 4,
            FileDtype::F16 | FileDtype::BF16 => 2,
            FileDtype::Ggml(t) => t.block_bytes(),
        }
    }

    /// Little-endian values as f32 (exact: every F16 and BF16 value is an
    /// f32), appended to `out`; packed words: the `numel` values they hold.
    pub(crate) fn decode(self, bytes: &[u8], numel: usize, out: &mut Vec<f32>) {
        match self {
            FileDtype::Ggml(t) => t.dequantize(bytes, out),
            FileDtype::Packed(f) => {
                let words: Vec<u32> = bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                out.extend(crate::quant::dequantize(f, &words, numel));
            }
            FileDtype::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            FileDtype::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            FileDtype::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }

    /// Whether any value is NaN or infinite (all exponent bits set), read
    /// from the bits without converting.
    fn any_non_finite(self, bytes: &[u8]) -> bool {
        match self {
            FileDtype::Ggml(t) => t.any_non_finite(bytes),
            // The scales (two f16 in the last word of each pair).
            FileDtype::Packed(f) => bytes
                .chunks_exact(4 * f.pair_words())
                .map(|pair| u32::from_le_bytes(pair[pair.len() - 4..].try_into().unwrap()))
                .any(|w| w & 0x7c00 == 0x7c00 || (w >> 16) & 0x7c00 == 0x7c00),
            FileDtype::F32 => bytes
                .chunks_exact(4)
                .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000),
            FileDtype::F16 => bytes
                .chunks_exact(2)
                .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
            FileDtype::BF16 => bytes
                .chunks_exact(2)
                .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        }
    }
}

/// One tensor of a safetensors file, not yet read.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: FileDtype,
    file: FileBytes,
    /// Its bytes in the file.
    range: Range<usize>,
    /// Rows stored in llama.cpp's rotary order for this many heads (q or
    /// k of a GGUF `llama` / `granitemoe` file): read back in the order of
    /// the Hugging Face layout ([`RawTensor::unpermuted`]).
    unpermute: Option<usize>,
}

/// Values decoded per step when a tensor is scanned (bounded memory).
const SCAN_CHUNK: usize = 1 << 16;

impl RawTensor {
    /// An f32 tensor held in memory (tests, amoe's own tensors made on the
    /// host); `data.len()` must equal the product of `shape`.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> Result<Self> {
        let t = NamedTensor::new(name, shape, data.to_vec())?;
        Ok(Self::from_named(t))
    }

    /// A tensor of values in memory.
    pub fn from_named(t: NamedTensor) -> Self {
        let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let len = bytes.len();
        RawTensor {
            name: t.name,
            shape: t.shape,
            dtype: FileDtype::F32,
            file: FileBytes::new(bytes),
            range: 0..len,
            unpermute: None,
        }
    }

    /// A tensor of `file`'s bytes `range` (checked by the caller to hold
    /// `shape` in `dtype`).
    pub(crate) fn over(
        name: String,
        shape: Vec<usize>,
        dtype: FileDtype,
        file: FileBytes,
        range: Range<usize>,
    ) -> Self {
        RawTensor {
            name,
            shape,
            dtype,
            file,
            range,
            unpermute: None,
        }
    }

    /// The same tensor whose rows (the first axis: `heads` heads of
    /// `rows / heads`) are stored as llama.cpp's converter permutes q and
    /// k, read back in the original order: stored row `2b + a` of a head
    /// is row `a * half + b` (`half` = half the head's rows).
    pub(crate) fn unpermuted(self, heads: usize) -> Self {
        RawTensor {
            unpermute: Some(heads),
            ..self
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Its bytes, as stored.
    pub fn bytes(&self) -> &[u8] {
        &self.file.bytes()[self.range.clone()]
    }

    /// Every value, as f32.
    pub fn values(&self) -> Vec<f32> {
        self.values_range(0..self.numel())
    }

    /// Values `range` (flat, row-major indices), as f32.
    pub fn values_range(&self, range: Range<usize>) -> Vec<f32> {
        let mut out = Vec::with_capacity(range.len());
        if let Some(heads) = self.unpermute {
            let all = self.decode_all();
            let rows = self.shape.first().copied().unwrap_or(1);
            let width = self.numel() / rows.max(1);
            let per_head = rows / heads.max(1);
            let half = per_head / 2;
            out.resize(self.numel(), 0.0);
            for r in 0..rows {
                let (h, i) = (r / per_head.max(1), r % per_head.max(1));
                // Original row i = a * half + b was stored at 2b + a.
                let (a, b) = (i / half.max(1), i % half.max(1));
                let stored = h * per_head + 2 * b + a;
                out[r * width..(r + 1) * width]
                    .copy_from_slice(&all[stored * width..(stored + 1) * width]);
            }
            out.truncate(range.end);
            out.drain(..range.start);
            return out;
        }
        let block = match self.dtype {
            FileDtype::Ggml(t) => t.block(),
            _ => 1,
        };
        if matches!(self.dtype, FileDtype::Packed(_))
            || !range.start.is_multiple_of(block)
            || !range.end.is_multiple_of(block)
        {
            // Blocks need not start at `range`: decode all, keep the range.
            out = self.decode_all();
            out.truncate(range.end);
            out.drain(..range.start);
            return out;
        }
        if let FileDtype::Ggml(t) = self.dtype {
            let (a, b) = (range.start / block, range.end / block);
            t.dequantize(
                &self.bytes()[a * t.block_bytes()..b * t.block_bytes()],
                &mut out,
            );
            return out;
        }
        let w = self.dtype.size();
        self.dtype.decode(
            &self.bytes()[range.start * w..range.end * w],
            range.len(),
            &mut out,
        );
        out
    }

    /// Every value, decoded in the stored order.
    fn decode_all(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.numel());
        self.dtype.decode(self.bytes(), self.numel(), &mut out);
        out
    }

    /// The block-quantized format it is stored in (packed words), or the
    /// one that holds a GGUF type's values best (`GgmlType::nearest_quant`).
    pub fn quant(&self) -> Option<QuantFormat> {
        match self.dtype {
            FileDtype::Packed(f) => Some(f),
            FileDtype::Ggml(t) => t.nearest_quant(),
            _ => None,
        }
    }

    /// The tensor read into memory.
    pub fn to_named(&self) -> NamedTensor {
        NamedTensor {
            name: self.name.clone(),
            shape: self.shape.clone(),
            data: self.values(),
        }
    }

    /// Whether any value is NaN or infinite.
    pub fn any_non_finite(&self) -> bool {
        self.dtype.any_non_finite(self.bytes())
    }

    /// Whether every value is exactly a 16-bit float that f16 holds (see
    /// [`TensorValues::fits_f16`]); decoded a chunk at a time, stopping at
    /// the first value that is not.
    pub fn fits_f16(&self) -> bool {
        match self.dtype {
            FileDtype::F16 => return true,
            // Codes times f16 scales: not 16-bit floats in general (the
            // format, not --dtype, decides how they are stored).
            FileDtype::Packed(_) | FileDtype::Ggml(_) => return false,
            _ => {}
        }
        let w = self.dtype.size();
        let mut buf = Vec::with_capacity(SCAN_CHUNK);
        self.bytes().chunks(SCAN_CHUNK * w).all(|c| {
            buf.clear();
            self.dtype.decode(c, c.len() / w, &mut buf);
            values_fit_f16(&buf)
        })
    }
}

/// The tensors of a safetensors file's bytes, sorted by name, their values
/// not read (see [`RawTensor`]). A dtype other than F32, F16 and BF16 is an
/// error naming the tensor; `source` names the file in errors.
pub fn parse_raw(source: &str, file: FileBytes) -> Result<Vec<RawTensor>> {
    Ok(entries(source, file.bytes())?
        .into_iter()
        .map(|(name, shape, dtype, range)| RawTensor::over(name, shape, dtype, file.clone(), range))
        .collect())
}

/// One tensor of a safetensors file: name, shape, dtype, byte range.
pub(crate) type Entry = (String, Vec<usize>, FileDtype, Range<usize>);

/// The tensors of a safetensors file's bytes, sorted by name: name, shape,
/// dtype and byte range (what [`parse_raw`] and
/// `checkpoint::parse_safetensors` read). A dtype amoe does not read, or
/// bytes that are not a safetensors file, are errors naming `source`.
pub(crate) fn entries(source: &str, bytes: &[u8]) -> Result<Vec<Entry>> {
    use safetensors::tensor::SafeTensors;
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::checkpoint(
            source,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let quant = quant_metadata(source, bytes)?;
    let base = bytes.as_ptr() as usize;
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(tensors.len());
    for (name, view) in tensors {
        // The view borrows the file's bytes: its place in them.
        let start = view.data().as_ptr() as usize - base;
        let range = start..start + view.data().len();
        if let Some(packed) = quant.tensors.get(&name) {
            let (dtype, shape) = packed_entry(source, &name, packed, &view)?;
            out.push((name, shape, dtype, range));
            continue;
        }
        let dtype = FileDtype::of(view.dtype()).ok_or_else(|| {
            Error::checkpoint(
                source,
                format!(
                    "tensor {name} is {:?}: amoe reads F32, F16 and BF16 tensors (and U32 \
                     words that the metadata's {QUANT_METADATA} describes)",
                    view.dtype()
                ),
            )
        })?;
        out.push((name, view.shape().to_vec(), dtype, range));
    }
    if let Some(name) = quant
        .tensors
        .keys()
        .find(|n| !out.iter().any(|(m, ..)| m == *n))
    {
        return Err(Error::checkpoint(
            source,
            format!("the metadata's {QUANT_METADATA} names tensor {name}, which the file lacks"),
        ));
    }
    Ok(out)
}

/// The file's [`QUANT_METADATA`] (empty when it has none), its block
/// checked.
fn quant_metadata(source: &str, bytes: &[u8]) -> Result<QuantMetadata> {
    use safetensors::tensor::SafeTensors;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::checkpoint(source, format!("not a valid safetensors file: {e}")))?;
    let Some(text) = meta.metadata().as_ref().and_then(|m| m.get(QUANT_METADATA)) else {
        return Ok(QuantMetadata::default());
    };
    let q: QuantMetadata = serde_json::from_str(text)
        .map_err(|e| Error::checkpoint(source, format!("metadata {QUANT_METADATA}: {e}")))?;
    if q.block != BLOCK {
        return Err(Error::checkpoint(
            source,
            format!(
                "metadata {QUANT_METADATA}: blocks of {} values; amoe reads blocks of {BLOCK}",
                q.block
            ),
        ));
    }
    Ok(q)
}

/// A packed tensor's dtype and logical shape, checked against its words.
fn packed_entry(
    source: &str,
    name: &str,
    packed: &PackedTensor,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<(FileDtype, Vec<usize>)> {
    let bad = |msg: String| Error::checkpoint(source, format!("quantized tensor {name}: {msg}"));
    let format: QuantFormat = packed
        .format
        .parse()
        .map_err(|e| bad(format!("format: {e}")))?;
    if view.dtype() != Dtype::U32 || view.shape().len() != 1 {
        return Err(bad(format!(
            "stored as {:?} {:?}; packed words are a 1-D U32 tensor",
            view.dtype(),
            view.shape()
        )));
    }
    let numel = packed
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {:?} overflows", packed.shape)))?;
    check_packable(name, &packed.shape).map_err(|e| Error::checkpoint(source, e.to_string()))?;
    if view.shape()[0] != format.words(numel) {
        return Err(bad(format!(
            "{} words, but {format} of shape {:?} takes {}",
            view.shape()[0],
            packed.shape,
            format.words(numel)
        )));
    }
    Ok((FileDtype::Packed(format), packed.shape.clone()))
}

/// How one parameter is made from file tensors.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Op {
    /// The one source as stored.
    Copy,
    /// 2-D `[out_i, in]` Linear weights, each transposed, side by side:
    /// `[in, sum out_i]` (one source: a plain transpose).
    Cols,
    /// 1-D sources end to end.
    Concat,
    /// One `[out, in]` Linear weight per expert: `[E, in, out]`.
    Experts,
    /// A fused bank `[E, R, in]`: rows `start..start + len` of each expert,
    /// transposed: `[E, in, len]` (Granite).
    Bank { start: usize, len: usize },
    /// No file tensor: zeros (a dense FFN's one-expert router).
    Zeros,
    /// Let go after the upload ([`LazyParams::released`]): no values.
    Released,
}

/// One parameter of a model read lazily: its shape and how its values are
/// made from file tensors (checked against the shapes when it was built).
#[derive(Clone, Debug)]
pub struct LazyTensor {
    pub shape: Vec<usize>,
    op: Op,
    sources: Vec<RawTensor>,
}

/// A model's parameters read lazily.
pub type LazyParams = Params<LazyTensor>;

impl LazyTensor {
    /// The file tensor as stored.
    pub fn copy(t: RawTensor) -> Self {
        LazyTensor {
            shape: t.shape.clone(),
            op: Op::Copy,
            sources: vec![t],
        }
    }

    /// `shape` made by `op` from `sources`, whose shapes the caller checked.
    pub(crate) fn new(shape: Vec<usize>, op: Op, sources: Vec<RawTensor>) -> Self {
        LazyTensor { shape, op, sources }
    }

    /// The file tensors it reads.
    pub fn sources(&self) -> &[RawTensor] {
        &self.sources
    }

    /// Its values (see [`Op`]), row-major in its shape.
    pub fn build(&self) -> Result<Vec<f32>> {
        let shape = &self.shape;
        let numel: usize = shape.iter().product();
        let src = |i: usize| {
            self.sources
                .get(i)
                .ok_or_else(|| Error::invalid("lazy tensor", "a recipe lacks a source"))
        };
        let mut out = Vec::with_capacity(numel);
        match self.op {
            Op::Zeros => out.resize(numel, 0.0),
            Op::Released => {
                return Err(Error::invalid(
                    "model weights",
                    "released after their upload to the GPU",
                ))
            }
            Op::Copy => out = src(0)?.values(),
            Op::Concat => {
                for t in &self.sources {
                    out.extend(t.values());
                }
            }
            Op::Cols => {
                // [in, sum out_i]: row i holds column i of every source in turn.
                let (n_in, width) = (shape[0], shape[1]);
                out.resize(numel, 0.0);
                let mut col = 0;
                for t in &self.sources {
                    let n_out = t.shape[0];
                    let v = t.values();
                    for o in 0..n_out {
                        for i in 0..n_in {
                            out[i * width + col + o] = v[o * n_in + i];
                        }
                    }
                    col += n_out;
                }
            }
            Op::Experts => {
                // Expert e: [out, in] transposed into out[e] = [in, out].
                let (n_in, n_out) = (shape[1], shape[2]);
                for t in &self.sources {
                    let v = t.values();
                    for i in 0..n_in {
                        out.extend((0..n_out).map(|o| v[o * n_in + i]));
                    }
                }
            }
            Op::Bank { start, len } => {
                let t = src(0)?;
                let (e, rows, n_in) = (t.shape[0], t.shape[1], t.shape[2]);
                for x in 0..e {
                    let bank = t.values_range(x * rows * n_in..(x + 1) * rows * n_in);
                    for i in 0..n_in {
                        out.extend((start..start + len).map(|row| bank[row * n_in + i]));
                    }
                }
            }
        }
        if out.len() != numel {
            return Err(Error::shape(
                "lazy tensor",
                format!("{numel} values for {shape:?}"),
                out.len(),
            ));
        }
        Ok(out)
    }
}

impl TensorValues for LazyTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn values(&self) -> Result<Cow<'_, [f32]>> {
        self.build().map(Cow::Owned)
    }

    fn fits_f16(&self) -> bool {
        self.sources.iter().all(RawTensor::fits_f16)
    }

    fn quant(&self) -> Option<QuantFormat> {
        // Every source quantized alike (a GGUF bank, q/k/v of one type).
        let first = self.sources.first()?.quant()?;
        self.sources
            .iter()
            .all(|t| t.quant() == Some(first))
            .then_some(first)
    }
}

impl Params<LazyTensor> {
    /// Every parameter's values in host memory (what training, the CPU
    /// reference and the export read; inference uploads from the lazy tree).
    pub fn to_host(&self) -> Result<crate::model::HostParams> {
        self.try_map(|_, t| {
            Ok(crate::model::HostTensor {
                shape: t.shape.clone(),
                data: t.build()?,
            })
        })
    }

    /// The first parameter holding a NaN or an infinite value, found from
    /// the files' bits (no f32 copy is made).
    pub fn first_non_finite(&self) -> Option<crate::model::ParamId> {
        self.iter()
            .find(|(_, t)| t.sources.iter().any(RawTensor::any_non_finite))
            .map(|(id, _)| id)
    }

    /// The same tree with shapes alone, holding no file: what is kept of a
    /// checkpoint once its weights are on the GPU (the page); asking it for
    /// values is an error.
    pub fn released(self) -> LazyParams {
        self.into_map(|_, t| LazyTensor::new(t.shape, Op::Released, Vec::new()))
    }
}

impl crate::model::HostParams {
    /// The tree as lazy tensors over its values (a model made on the host,
    /// given where a checkpoint is expected), one tensor moved at a time.
    pub fn into_lazy(self) -> LazyParams {
        self.into_map(|id, t| {
            LazyTensor::copy(RawTensor::from_named(NamedTensor {
                name: id.name(),
                shape: t.shape,
                data: t.data,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tensors: &[NamedTensor], dtype: Dtype) -> FileBytes {
        use safetensors::tensor::TensorView;
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|t| match dtype {
                Dtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => t
                    .data
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            })
            .collect();
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                (
                    t.name.as_str(),
                    TensorView::new(dtype, t.shape.clone(), b).unwrap(),
                )
            })
            .collect();
        FileBytes::new(safetensors::serialize(views, None).unwrap())
    }

    #[test]
    fn raw_tensors_read_what_the_file_holds_in_every_dtype() {
        let a = NamedTensor::new("b", vec![2, 3], vec![1.0, -2.5, 0.125, 3.0, 0.0, -0.0]).unwrap();
        let z = NamedTensor::new("a", vec![3], vec![65504.0, -1.0, 0.5]).unwrap();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let raw = parse_raw("f", file(&[a.clone(), z.clone()], dtype)).unwrap();
            assert_eq!(
                raw.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
                ["a", "b"]
            );
            let parsed =
                super::super::parse_safetensors("f", file(&[a.clone(), z.clone()], dtype).bytes())
                    .unwrap();
            for (r, p) in raw.iter().zip(&parsed) {
                assert_eq!(r.to_named(), *p, "{dtype:?}");
                assert_eq!(r.values_range(1..3), p.data[1..3].to_vec());
                assert!(!r.any_non_finite());
            }
            assert_eq!(raw[1].values(), a.data, "{dtype:?}");
            // 65504 is f16's largest value: bf16 rounds it to 65536.
            assert_eq!(raw[0].fits_f16(), dtype != Dtype::BF16, "{dtype:?}");
        }
        let bad = NamedTensor::new("n", vec![2], vec![1.0, f32::NAN]).unwrap();
        let inf = NamedTensor::new("i", vec![1], vec![f32::NEG_INFINITY]).unwrap();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for t in [&bad, &inf] {
                let raw = parse_raw("f", file(std::slice::from_ref(t), dtype)).unwrap();
                assert!(raw[0].any_non_finite(), "{dtype:?} {}", t.name);
            }
        }
        let msg = parse_raw("dir/x.safetensors", FileBytes::new(vec![1u8, 2, 3]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("dir/x.safetensors") && msg.contains("not a valid"),
            "{msg}"
        );
    }

    /// A file holding `words` as the packed tensor "w" with the metadata
    /// `meta`, and an f32 tensor "b".
    fn packed_file(words: &[u32], meta: &str) -> FileBytes {
        use safetensors::tensor::TensorView;
        let w: Vec<u8> = words.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let views = vec![
            (
                "w",
                TensorView::new(Dtype::U32, vec![words.len()], &w).unwrap(),
            ),
            ("b", TensorView::new(Dtype::F32, vec![2], &b).unwrap()),
        ];
        let meta =
            std::collections::HashMap::from([(QUANT_METADATA.to_string(), meta.to_string())]);
        FileBytes::new(safetensors::serialize(views, Some(meta)).unwrap())
    }

    #[test]
    fn packed_tensors_read_back_their_values_and_bad_ones_are_named() {
        use crate::quant::{dequantize, quantize};
        // [2 experts, 4, 16]: each expert 64 values, two whole blocks.
        let data: Vec<f32> = (0..128)
            .map(|i| ((i * 37) % 23) as f32 * 0.1 - 1.0)
            .collect();
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let words = quantize(format, "w", &data).unwrap();
            let meta = format!(
                r#"{{"block":32,"tensors":{{"w":{{"format":"{format}","shape":[2,4,16]}}}}}}"#
            );
            let raw = parse_raw("f", packed_file(&words, &meta)).unwrap();
            let w = raw.iter().find(|t| t.name == "w").unwrap();
            assert_eq!((w.shape.clone(), w.quant()), (vec![2, 4, 16], Some(format)));
            assert_eq!(w.values(), dequantize(format, &words, 128));
            assert_eq!(w.values_range(40..70), w.values()[40..70].to_vec());
            assert!(!w.any_non_finite() && !w.fits_f16());
            // The upload packs the values read back into the same words.
            assert_eq!(quantize(format, "w", &w.values()).unwrap(), words);
            let b = raw.iter().find(|t| t.name == "b").unwrap();
            assert_eq!((b.values(), b.quant()), (vec![1.5, -2.0], None));
            // A NaN scale is found from the bits.
            let mut nan = words.clone();
            let last = format.pair_words() - 1;
            nan[last] |= 0x7e00;
            let raw = parse_raw("f", packed_file(&nan, &meta)).unwrap();
            assert!(raw.iter().find(|t| t.name == "w").unwrap().any_non_finite());
        }
        let words = quantize(QuantFormat::Q4, "w", &data).unwrap();
        let bad = |meta: &str, words: &[u32], want: &str| {
            let msg = parse_raw("dir/model.safetensors", packed_file(words, meta))
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("dir/model.safetensors") && msg.contains(want),
                "{meta}: {msg}"
            );
        };
        let meta = |block: usize, format: &str, shape: &str| {
            format!(
                r#"{{"block":{block},"tensors":{{"w":{{"format":"{format}","shape":{shape}}}}}}}"#
            )
        };
        bad(&meta(64, "q4", "[2,4,16]"), &words, "blocks of 64 values");
        bad(&meta(32, "q3", "[2,4,16]"), &words, "tensor w: format");
        bad(
            &meta(32, "q4", "[2,4,17]"),
            &words,
            "not a multiple of the block",
        );
        bad(
            &meta(32, "q4", "[128]"),
            &words,
            "not a multiple of the block",
        );
        bad(&meta(32, "q4", "[4,4,16]"), &words, "takes 36");
        bad(&meta(32, "q8", "[2,4,16]"), &words, "takes 34");
        bad(&meta(32, "q4", "[2,4,16]"), &words[..17], "takes 18");
        bad(
            r#"{"block":32,"tensors":{"w":{"format":"q4","shape":[2,4,16]},
                "x":{"format":"q4","shape":[2,32]}}}"#,
            &words,
            "names tensor x, which the file lacks",
        );
        bad(r#"{"block":32}"#, &words, "metadata amoe.quantized");
        bad("[1, 2]", &words, "metadata amoe.quantized");
        // U32 words that the metadata does not describe.
        bad(r#"{"block":32,"tensors":{}}"#, &words, "tensor w is U32");
        // Packed words that claim an f32 tensor's place.
        bad(
            r#"{"block":32,"tensors":{"b":{"format":"q4","shape":[2,32]}}}"#,
            &words,
            "1-D U32 tensor",
        );
    }

    #[test]
    fn recipes_transpose_concatenate_and_slice_banks() {
        let t = |name: &str, shape: Vec<usize>| {
            let n = shape.iter().product::<usize>();
            RawTensor::from_f32(name, shape, &(0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap()
        };
        // Cols: [2 out, 3 in] and [1 out, 3 in] -> [3, 3].
        let cols = LazyTensor::new(
            vec![3, 3],
            Op::Cols,
            vec![t("q", vec![2, 3]), t("k", vec![1, 3])],
        );
        assert_eq!(
            cols.build().unwrap(),
            [0.0, 3.0, 0.0, 1.0, 4.0, 1.0, 2.0, 5.0, 2.0]
        );
        let cat = LazyTensor::new(vec![5], Op::Concat, vec![t("a", vec![2]), t("b", vec![3])]);
        assert_eq!(cat.build().unwrap(), [0.0, 1.0, 0.0, 1.0, 2.0]);
        let ex = LazyTensor::new(
            vec![2, 2, 1],
            Op::Experts,
            vec![t("e0", vec![1, 2]), t("e1", vec![1, 2])],
        );
        assert_eq!(ex.build().unwrap(), [0.0, 1.0, 0.0, 1.0]);
        // Bank [2 experts, 4 rows, 2 in]: rows 2..4 of each, transposed.
        let bank = LazyTensor::new(
            vec![2, 2, 2],
            Op::Bank { start: 2, len: 2 },
            vec![t("w", vec![2, 4, 2])],
        );
        assert_eq!(
            bank.build().unwrap(),
            [4.0, 6.0, 5.0, 7.0, 12.0, 14.0, 13.0, 15.0]
        );
        let zeros = LazyTensor::new(vec![2, 1], Op::Zeros, vec![]);
        assert_eq!(zeros.build().unwrap(), [0.0, 0.0]);
        // A recipe whose sources do not make its shape is an error, never
        // a tensor of the wrong size.
        let short = LazyTensor::new(vec![9], Op::Concat, vec![t("a", vec![2])]);
        assert!(short.build().is_err());
        // Released weights (the page, after the upload) keep their shapes
        // and refuse to give values.
        let released = LazyTensor::new(vec![2, 1], Op::Released, vec![]);
        assert_eq!(released.shape(), &[2, 1]);
        let msg = released.build().unwrap_err().to_string();
        assert!(msg.contains("released"), "{msg}");
    }
}
