//! Checkpoints: a directory of five files, written atomically.
//!
//! ```text
//! <dir>/model.safetensors      named f32 tensors (the model's parameters)
//! <dir>/optimizer.safetensors  named f32 tensors (AdamW state, e.g. m.<name>, v.<name>)
//! <dir>/config.json            the caller's model/training config (any Serialize)
//! <dir>/tokenizer.json         the tokenizer (tokenizer::Tokenizer::to_json)
//! <dir>/state.json             the caller's run state: step, data position, RNG, ...
//! ```
//!
//! Atomic save: everything is written into the sibling `.<name>.tmp`, each file and the
//! folder fsynced, then the old checkpoint is renamed to `.<name>.old`, the new one renamed
//! into place, and the old one deleted. An interrupted save therefore leaves either the
//! previous checkpoint or the new one, complete; in the one window where `<dir>` is absent
//! (between the two renames), [`load`] reads `.<name>.old` and the next [`save`] puts it back
//! first. Two processes saving to one path at once are not supported.
//!
//! safetensors is the Hugging Face format (little-endian, header with name/dtype/shape), so
//! other tools can read the weights. Load errors name the file: missing, truncated or
//! corrupt safetensors, a non-f32 tensor, bad JSON; [`check_tensors`] compares tensors with
//! the names and shapes a model expects. This module is the bytes-level part (wasm-safe: the browser loads weights
//! from bytes); `dir` (native only) reads and writes the directory.

use crate::error::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeSet;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const STATE_FILE: &str = "state.json";

/// One named f32 tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    /// A tensor; `data.len()` must equal the product of `shape`.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let t = NamedTensor {
            name: name.into(),
            shape,
            data,
        };
        t.check_len()?;
        Ok(t)
    }

    fn check_len(&self) -> Result<()> {
        let n: usize = self.shape.iter().product();
        if n != self.data.len() {
            return Err(Error::shape(
                "checkpoint tensor",
                format!("{n} values for {} of shape {:?}", self.name, self.shape),
                self.data.len(),
            ));
        }
        Ok(())
    }
}

/// The tensor called `name`, if any.
pub fn find<'a>(tensors: &'a [NamedTensor], name: &str) -> Option<&'a NamedTensor> {
    tensors.iter().find(|t| t.name == name)
}

/// Checks that `tensors` (read from `file`) are exactly the `expected` names with those
/// shapes: reports every missing tensor, unexpected tensor and shape mismatch in one
/// [`Error::Checkpoint`] naming `file`.
pub fn check_tensors(
    file: impl std::fmt::Display,
    tensors: &[NamedTensor],
    expected: &[(&str, &[usize])],
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match find(tensors, name) {
            None => problems.push(format!("missing tensor {name} {shape:?}")),
            Some(t) if t.shape.as_slice() != *shape => problems.push(format!(
                "tensor {name}: expected shape {shape:?}, found {:?}",
                t.shape
            )),
            Some(_) => {}
        }
    }
    let wanted: BTreeSet<&str> = expected.iter().map(|(n, _)| *n).collect();
    for t in tensors {
        if !wanted.contains(t.name.as_str()) {
            problems.push(format!("unexpected tensor {} {:?}", t.name, t.shape));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::checkpoint(
            file,
            format!(
                "does not match the model ({} problem(s)): {}",
                problems.len(),
                problems.join("; ")
            ),
        ))
    }
}

pub fn safetensors_bytes(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    safetensors_bytes_with(tensors, None)
}

/// [`safetensors_bytes`] with header metadata (a Hugging Face export writes
/// `{"format": "pt"}`, which the reference library's loader checks for).
pub fn safetensors_bytes_with(
    tensors: &[NamedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut names = BTreeSet::new();
    for t in tensors {
        t.check_len()?;
        if !names.insert(t.name.as_str()) {
            return Err(Error::invalid(
                "checkpoint save",
                format!("two tensors named {:?}", t.name),
            ));
        }
    }
    let bytes: Vec<std::borrow::Cow<[u8]>> = tensors
        .iter()
        .map(|t| {
            if cfg!(target_endian = "little") {
                std::borrow::Cow::Borrowed(bytemuck::cast_slice(&t.data))
            } else {
                std::borrow::Cow::Owned(t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
        })
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.as_str(), v))
                .map_err(|e| Error::invalid("checkpoint save", format!("{}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::invalid("checkpoint save", format!("safetensors: {e}")))
}

/// The tensors of a safetensors file's bytes as f32, sorted by name: F32
/// as stored, F16 and BF16 converted exactly (every such value is an f32).
/// Any other dtype is an error naming the tensor. `source` names the file
/// in errors.
pub fn parse_safetensors(source: &str, bytes: &[u8]) -> Result<Vec<NamedTensor>> {
    Ok(raw::entries(source, bytes)?
        .into_iter()
        .map(|(name, shape, dtype, range)| {
            let numel = shape.iter().product();
            let mut data = Vec::with_capacity(numel);
            dtype.decode(&bytes[range], numel, &mut data);
            NamedTensor { name, shape, data }
        })
        .collect())
}

/// `model.safetensors.index.json`: which shard file holds each tensor.
pub const SHARD_INDEX_FILE: &str = "model.safetensors.index.json";

/// The shard files named by an index (`weight_map`: tensor -> file), each
/// once, in order of first appearance, with the tensors it must hold.
pub fn parse_shard_index(source: &str, bytes: &[u8]) -> Result<Vec<(String, Vec<String>)>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(bytes)
        .map_err(|e| Error::checkpoint(source, format!("not a shard index: {e}")))?;
    let mut shards: Vec<(String, Vec<String>)> = Vec::new();
    for (tensor, file) in index.weight_map {
        // A shard is a file next to the index, never a path elsewhere.
        if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
            return Err(Error::checkpoint(
                source,
                format!("tensor {tensor}: shard {file:?} is not a file name"),
            ));
        }
        match shards.iter_mut().find(|(f, _)| *f == file) {
            Some((_, names)) => names.push(tensor),
            None => shards.push((file, vec![tensor])),
        }
    }
    if shards.is_empty() {
        return Err(Error::checkpoint(source, "weight_map names no tensor"));
    }
    Ok(shards)
}

/// The tensors of the shards an index names, each shard read by
/// `read(file) -> (where it was read, its tensors)`, checked against the
/// index: every tensor it names must be in its shard, and a shard may hold
/// no tensor the index does not name there. Sorted by name.
pub fn parse_shards<T: Named>(
    index_source: &str,
    index: &[u8],
    mut read: impl FnMut(&str) -> Result<(String, Vec<T>)>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (file, names) in parse_shard_index(index_source, index)? {
        let (source, tensors) = read(&file)?;
        for n in &names {
            if !tensors.iter().any(|t| t.name() == n) {
                return Err(Error::checkpoint(
                    &source,
                    format!(
                        "{index_source} names tensor {n} in this shard, which does not hold it"
                    ),
                ));
            }
        }
        if let Some(t) = tensors
            .iter()
            .find(|t| !names.iter().any(|n| n == t.name()))
        {
            return Err(Error::checkpoint(
                &source,
                format!(
                    "holds tensor {}, which {index_source} does not name here",
                    t.name()
                ),
            ));
        }
        out.extend(tensors);
    }
    out.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(out)
}

/// A tensor that has a name in its file.
pub trait Named {
    fn name(&self) -> &str;
}

impl Named for NamedTensor {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for RawTensor {
    fn name(&self) -> &str {
        &self.name
    }
}

pub mod gguf;
pub mod hf;
pub mod hf_export;
mod raw;
pub use raw::*;

#[cfg(not(target_arch = "wasm32"))]
mod dir;
#[cfg(not(target_arch = "wasm32"))]
pub use dir::*;
#[cfg(not(target_arch = "wasm32"))]
pub mod hf_dir;
#[cfg(not(target_arch = "wasm32"))]
pub mod quantized;
pub use hf::HfModel;
#[cfg(not(target_arch = "wasm32"))]
pub use hf_dir::load_hf_dir;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_check_reports_all_problems() {
        let model = vec![
            NamedTensor::new("layer0.w", vec![2, 3], vec![0.5; 6]).unwrap(),
            NamedTensor::new("layer0.b", vec![3], vec![1.0; 3]).unwrap(),
        ];
        let err = check_tensors(
            "model.safetensors",
            &model,
            &[("layer0.w", &[3, 2]), ("layer1.w", &[4])],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("model.safetensors"), "{msg}");
        assert!(
            msg.contains("layer0.w: expected shape [3, 2], found [2, 3]"),
            "{msg}"
        );
        assert!(msg.contains("missing tensor layer1.w [4]"), "{msg}");
        assert!(msg.contains("unexpected tensor layer0.b [3]"), "{msg}");
        assert!(NamedTensor::new("x", vec![2], vec![1.0]).is_err());
        let dup = vec![model[0].clone(), model[0].clone()];
        assert!(safetensors_bytes(&dup).is_err());
    }
}
