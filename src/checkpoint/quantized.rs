//! `amoe quantize`: a checkpoint whose expert banks (and with `--quantize
//! all` its attention projections and an untied unembedding) are stored
//! block-quantized (`quant`), written one tensor at a time (native only).
//!
//! The directory is an amoe checkpoint for inference: `config.json` (the
//! model config, whatever the source was: amoe's own or a Hugging Face
//! directory), `tokenizer.json`, `state.json` (what inference needs of the
//! source: the gating it evaluates with, the ids that end a generation, the
//! source's `model_type`, and what was quantized) and `model.safetensors`.
//! In that file each quantized tensor is a 1-D U32 tensor of the packed
//! words the kernels read, under the parameter's own name; the metadata key
//! [`QUANT_METADATA`] gives each one's format and logical shape. The other
//! tensors are f16 when every value is a 16-bit float that f16 holds (a
//! bf16/f16 source), else f32.
//!
//! Loading reads the words back to values and the upload packs them again:
//! the same words, as re-quantizing dequantized values is exact and the
//! blocks are the same: a tensor's slices along its first axis hold whole
//! blocks, so a bank split into parts by experts keeps them, and so does
//! an unembedding [D, V] split by columns (its rows are whole blocks and
//! the upload cuts it at multiples of the block). A tensor whose slices do
//! not is kept in floats in the file.

use super::raw::{check_packable, slice_numel, PackedTensor, QuantMetadata, QUANT_METADATA};
use super::{LazyParams, LazyTensor, CONFIG_FILE, MODEL_FILE, STATE_FILE, TOKENIZER_FILE};
use crate::error::{Error, Result};
use crate::model::params::{ParamId, QuantScope, TensorValues};
use crate::model::ModelConfig;
use crate::quant::{QuantFormat, BLOCK};
use crate::tokenizer::Tokenizer;
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::path::Path;

/// How one tensor is stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    F32,
    F16,
    Packed(QuantFormat),
}

/// What [`write_quantized`] wrote.
#[derive(Clone, Debug, Default)]
pub struct QuantizeReport {
    /// Each tensor: name, shape, how it is stored, bytes in the file.
    pub tensors: Vec<(String, Vec<usize>, Stored, u64)>,
    /// Banks kept in floats (their slices are not whole blocks) and why.
    pub kept: Vec<String>,
}

impl QuantizeReport {
    /// Bytes of all tensors in the file.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.3).sum()
    }

    /// Bytes of the tensors stored as `how`.
    pub fn bytes_of(&self, how: Stored) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.2 == how)
            .map(|t| t.3)
            .sum()
    }
}

/// A tensor made as the file is written (its values built from the source
/// when the writer asks for its bytes, so one tensor is in memory at a
/// time). An error is kept in `err` and the bytes are zeros of the promised
/// length; the caller then discards the file.
struct LazyView<'a> {
    name: String,
    tensor: &'a LazyTensor,
    stored: Stored,
    /// The shape in the file (the words' count when packed).
    shape: Vec<usize>,
    len: usize,
    err: &'a RefCell<Option<Error>>,
}

impl LazyView<'_> {
    fn bytes(&self) -> Result<Vec<u8>> {
        let values = self.tensor.build()?;
        Ok(match self.stored {
            Stored::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Stored::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            Stored::Packed(f) => crate::quant::quantize(f, &self.name, &values)?
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect(),
        })
    }
}

impl View for LazyView<'_> {
    fn dtype(&self) -> Dtype {
        match self.stored {
            Stored::F32 => Dtype::F32,
            Stored::F16 => Dtype::F16,
            Stored::Packed(_) => Dtype::U32,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        if self.err.borrow().is_none() {
            match self.bytes() {
                Ok(b) if b.len() == self.len => return Cow::Owned(b),
                Ok(b) => {
                    *self.err.borrow_mut() = Some(Error::shape(
                        "quantize",
                        format!("{} bytes for {}", self.len, self.name),
                        b.len(),
                    ))
                }
                Err(e) => *self.err.borrow_mut() = Some(e),
            }
        }
        Cow::Owned(vec![0; self.len])
    }

    fn data_len(&self) -> usize {
        self.len
    }
}

/// Write `weights` of `cfg` as a quantized checkpoint directory `out`
/// (atomically: see `write_dir_atomic`): the expert banks (routed and
/// shared), and with `QuantScope::All` the attention projections and an
/// untied unembedding, in `format`; the rest as described in the module
/// docs. `state` is written as `state.json`.
#[allow(clippy::too_many_arguments)]
pub fn write_quantized(
    out: &Path,
    overwrite: bool,
    cfg: &ModelConfig,
    weights: &LazyParams,
    tokenizer: &Tokenizer,
    state: &serde_json::Value,
    format: QuantFormat,
    scope: QuantScope,
) -> Result<QuantizeReport> {
    let err = RefCell::new(None);
    let mut report = QuantizeReport::default();
    let mut meta = QuantMetadata {
        block: BLOCK,
        ..Default::default()
    };
    let mut views = Vec::new();
    // What `scope` quantizes, and of that what the file can hold packed
    // (the rest is kept in floats; the loader quantizes it in the format
    // of its kind's packed tensors, so say so only when there are some).
    let covered =
        |id: ParamId| id.is_expert_bank() || (scope == QuantScope::All && id.is_projection());
    let packable =
        |id: ParamId, shape: &[usize]| covered(id) && check_packable(&id.name(), shape).is_ok();
    let any_packed = |kind: fn(ParamId) -> bool| {
        weights
            .iter()
            .any(|(id, t)| kind(id) && packable(id, &t.shape))
    };
    let (banks_packed, projections_packed) = (
        any_packed(ParamId::is_expert_bank),
        any_packed(ParamId::is_projection),
    );
    for (id, t) in weights.iter() {
        let name = id.name();
        let numel: usize = t.shape.iter().product();
        let stored = if packable(id, &t.shape) {
            Some(Stored::Packed(format))
        } else {
            if covered(id) {
                let loads = if (id.is_expert_bank() && banks_packed)
                    || (id.is_projection() && projections_packed)
                {
                    "quantized as it loads".to_string()
                } else {
                    format!(
                        "loaded in floats unless --quantize-on-load {format}{} is given",
                        if id.is_projection() {
                            " --quantize all"
                        } else {
                            ""
                        }
                    )
                };
                report.kept.push(format!(
                    "{name} {:?}: {} values per slice of its first axis are not whole blocks \
                     of {BLOCK}; kept in floats, {loads}",
                    t.shape,
                    slice_numel(&t.shape)
                ));
            }
            None
        };
        let stored = stored.unwrap_or(if t.fits_f16() {
            Stored::F16
        } else {
            Stored::F32
        });
        let (shape, len) = match stored {
            Stored::F32 => (t.shape.clone(), numel * 4),
            Stored::F16 => (t.shape.clone(), numel * 2),
            Stored::Packed(f) => {
                meta.tensors.insert(
                    name.clone(),
                    PackedTensor {
                        format: f.to_string(),
                        shape: t.shape.clone(),
                    },
                );
                (vec![f.words(numel)], f.bytes(numel) as usize)
            }
        };
        report
            .tensors
            .push((name.clone(), t.shape.clone(), stored, len as u64));
        views.push((
            name.clone(),
            LazyView {
                name,
                tensor: t,
                stored,
                shape,
                len,
                err: &err,
            },
        ));
    }
    let metadata = std::collections::HashMap::from([(
        QUANT_METADATA.to_string(),
        serde_json::to_string(&meta).map_err(|e| Error::invalid("quantize", e.to_string()))?,
    )]);
    super::write_dir_atomic(out, overwrite, "quantize", |tmp| {
        super::write_synced(&tmp.join(CONFIG_FILE), json(cfg)?.as_bytes())?;
        super::write_synced(&tmp.join(TOKENIZER_FILE), tokenizer.to_json().as_bytes())?;
        super::write_synced(&tmp.join(STATE_FILE), json(state)?.as_bytes())?;
        let path = tmp.join(MODEL_FILE);
        safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => Error::Io {
                path: path.display().to_string(),
                source,
            },
            e => Error::invalid("quantize", format!("safetensors: {e}")),
        })?;
        if let Some(e) = err.borrow_mut().take() {
            return Err(e);
        }
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })
    })?;
    Ok(report)
}

/// Pretty JSON text of a config or a state.
fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::invalid("quantize", e.to_string()))
}
