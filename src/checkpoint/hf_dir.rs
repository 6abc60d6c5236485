//! A Hugging Face model directory (native only): `config.json`,
//! `generation_config.json` (optional), `model.safetensors` or the shards
//! of `model.safetensors.index.json`, and `tokenizer.json`, read into
//! amoe's types with `checkpoint::hf` (see its docs for the mapping).

use super::hf::{params_from_tensors, parse_config, parse_generation_config, Family};
use super::{read_model_tensors, CONFIG_FILE, MODEL_FILE, SHARD_INDEX_FILE, TOKENIZER_FILE};
use crate::error::{Error, Result};
use crate::model::transformer::HostParams;
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;
use std::path::Path;

/// The generation settings file of a Hugging Face directory.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// A loaded Hugging Face model.
#[derive(Debug)]
pub struct HfModel {
    pub family: Family,
    pub cfg: ModelConfig,
    pub params: HostParams,
    /// Ids that end generation (`eos_token_id`).
    pub eos: Vec<u32>,
    pub bos: Option<u32>,
    pub tokenizer: Tokenizer,
}

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
    let config_path = dir.join(CONFIG_FILE);
    let config_source = config_path.display().to_string();
    let config_bytes = read(&config_path)?;
    let (family, cfg) = parse_config(&config_source, &config_bytes)?;

    let gen_path = dir.join(GENERATION_CONFIG_FILE);
    let gen_source = gen_path.display().to_string();
    let gen_bytes = if gen_path.exists() {
        Some(read(&gen_path)?)
    } else {
        None
    };
    let ids = parse_generation_config(
        (&config_source, &config_bytes),
        gen_bytes.as_deref().map(|b| (gen_source.as_str(), b)),
    )?;
    let ids_source = if gen_bytes.is_some() {
        &gen_source
    } else {
        &config_source
    };
    if let Some(bad) = ids
        .eos
        .iter()
        .chain(&ids.bos)
        .find(|&&id| id as usize >= cfg.vocab)
    {
        return Err(Error::checkpoint(
            ids_source,
            format!(
                "token id {bad} is outside the model's vocabulary of {}",
                cfg.vocab
            ),
        ));
    }

    // The tokenizer first: it is small, and a wrong one is cheap to report.
    let tok_path = dir.join(TOKENIZER_FILE);
    let tok_json = String::from_utf8(read(&tok_path)?)
        .map_err(|_| Error::checkpoint(tok_path.display(), "not UTF-8"))?;
    let tokenizer = Tokenizer::from_pretrained_json(&tok_json, ids.eos.first().copied())
        .map_err(|e| Error::checkpoint(tok_path.display(), e.to_string()))?;
    if tokenizer.vocab_size() > cfg.vocab {
        return Err(Error::checkpoint(
            tok_path.display(),
            format!(
                "{} tokens, more than the model's vocab_size {} in {config_source}",
                tokenizer.vocab_size(),
                cfg.vocab
            ),
        ));
    }

    let file = if dir.join(MODEL_FILE).exists() || !dir.join(SHARD_INDEX_FILE).exists() {
        dir.join(MODEL_FILE)
    } else {
        dir.join(SHARD_INDEX_FILE)
    };
    let tensors = read_model_tensors(dir)?;
    let params = params_from_tensors(family, &cfg, &file.display().to_string(), tensors)?;
    Ok(HfModel {
        family,
        cfg,
        params,
        eos: ids.eos,
        bos: ids.bos,
        tokenizer,
    })
}
