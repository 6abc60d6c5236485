//! A Hugging Face model directory (native only): `config.json`,
//! `generation_config.json` (optional), `model.safetensors` or the shards
//! of `model.safetensors.index.json`, and `tokenizer.json`, read into
//! amoe's types with `checkpoint::hf` (see its docs for the mapping).

use super::hf::{load_hf_parts, HfFiles, HfModel, GENERATION_CONFIG_FILE};
use super::{read_model_raw, CONFIG_FILE, MODEL_FILE, SHARD_INDEX_FILE, TOKENIZER_FILE};
use crate::error::{Error, Result};
use std::path::Path;

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        let msg = if e.kind() == std::io::ErrorKind::NotFound {
            "missing".to_string()
        } else {
            e.to_string()
        };
        Error::checkpoint(path.display(), msg)
    })
}

/// Reads the model in `dir`. Errors name the file: a config amoe cannot
/// map, a missing or corrupt file or shard, tensors that do not fit the
/// config, a tokenizer whose vocabulary is larger than the model's, a
/// special token id outside the vocabulary.
pub fn load_hf_dir(dir: &Path) -> Result<HfModel> {
    let file = |name: &str| -> Result<Option<(String, Vec<u8>)>> {
        let p = dir.join(name);
        Ok(if p.exists() {
            Some((p.display().to_string(), read(&p)?))
        } else {
            None
        })
    };
    let required = |name: &str| -> Result<(String, Vec<u8>)> {
        file(name)?.ok_or_else(|| Error::checkpoint(dir.join(name).display(), "missing"))
    };
    let config = required(CONFIG_FILE)?;
    let generation = file(GENERATION_CONFIG_FILE)?;
    let tokenizer = required(TOKENIZER_FILE)?;
    load_hf_parts(
        HfFiles {
            config: (&config.0, &config.1),
            generation: generation.as_ref().map(|(s, b)| (s.as_str(), b.as_slice())),
            tokenizer: (&tokenizer.0, &tokenizer.1),
        },
        |_| {
            // model.safetensors (memory-mapped), or the shards of an index.
            let file = if dir.join(MODEL_FILE).exists() || !dir.join(SHARD_INDEX_FILE).exists() {
                dir.join(MODEL_FILE)
            } else {
                dir.join(SHARD_INDEX_FILE)
            };
            Ok((file.display().to_string(), read_model_raw(dir)?))
        },
    )
}
