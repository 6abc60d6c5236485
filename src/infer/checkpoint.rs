//! What inference needs of a checkpoint: `config.json`, `model.safetensors`,
//! `tokenizer.json` and, if present, `state.json` (for the gating rule the run
//! was evaluated with). `optimizer.safetensors` is not read, so a published
//! checkpoint can leave it out.

use crate::checkpoint::{LazyParams, LazyTensor, RawTensor};
use crate::error::{Error, Result};
use crate::kernels::{ExpertRule, GateConfig, Gating, MAX_TOPK};
use crate::model::{HostParams, ModelConfig, ParamId};
use crate::tokenizer::Tokenizer;

/// How a user asks a top-k model to count its experts per token
/// (`--rule`, `--max-experts`; see `ExpertRule`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExpertCount {
    /// The rule (its parameter is the gate's threshold); None: all k.
    pub rule: Option<ExpertRule>,
    /// The most experts a token takes (default: the model's k).
    pub max_experts: Option<usize>,
}

/// A model ready to upload: config, weights, tokenizer.
#[derive(Clone)]
pub struct InferCheckpoint {
    pub cfg: ModelConfig,
    /// The weights, read from the files only when uploaded (natively over
    /// memory maps): a loaded checkpoint holds no copy of them.
    pub weights: LazyParams,
    pub tokenizer: Tokenizer,
    /// The gating rule the run validated with (`state.json`), else top-1
    /// (what the paper evaluates with); a Hugging Face model's own top-k.
    pub eval_gating: Gating,
    /// Where it came from, for messages.
    pub source: String,
    /// Ids that end a generation: the tokenizer's end-of-text, or a Hugging
    /// Face model's `eos_token_id`s.
    pub stop_ids: Vec<u32>,
    /// A Hugging Face model's `model_type`; None for amoe's own.
    pub model_type: Option<String>,
}

impl InferCheckpoint {
    /// From the files' contents. `tensors`: in any order; every tensor of
    /// the config must be there with its shape, and no other.
    pub fn from_parts(
        source: &str,
        config_json: &[u8],
        tensors: Vec<RawTensor>,
        tokenizer_json: &str,
        state_json: Option<&[u8]>,
    ) -> Result<Self> {
        let cfg: ModelConfig = serde_json::from_slice(config_json)
            .map_err(|e| Error::checkpoint(format!("{source}/config.json"), e.to_string()))?;
        cfg.validate()
            .map_err(|e| Error::checkpoint(format!("{source}/config.json"), e.to_string()))?;
        let tensors = tensors
            .into_iter()
            .map(|t| (t.name.clone(), t.shape.clone(), t))
            .collect();
        let weights = cfg
            .param_specs()
            .assign(
                &format!("{source}/model.safetensors"),
                tensors,
                ParamId::name,
            )?
            .into_map(|_, (_, t)| LazyTensor::copy(t));
        if let Some(id) = weights.first_non_finite() {
            return Err(Error::checkpoint(
                format!("{source}/model.safetensors"),
                format!("tensor {id} holds NaN or infinite values"),
            ));
        }
        let tokenizer = Tokenizer::from_json(tokenizer_json)
            .map_err(|e| Error::checkpoint(format!("{source}/tokenizer.json"), e.to_string()))?;
        if tokenizer.vocab_size() != cfg.vocab {
            return Err(Error::checkpoint(
                format!("{source}/tokenizer.json"),
                format!(
                    "tokenizer has {} tokens but the model's vocabulary is {}",
                    tokenizer.vocab_size(),
                    cfg.vocab
                ),
            ));
        }
        let state: serde_json::Value = match state_json {
            None => serde_json::Value::Null,
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| Error::checkpoint(format!("{source}/state.json"), e.to_string()))?,
        };
        let field = |path: &str| state.pointer(path).filter(|v| !v.is_null()).cloned();
        let parse = |v: serde_json::Value, what: &str| {
            Error::checkpoint(format!("{source}/state.json"), format!("{what}: {v}"))
        };
        // A training run's state, or what `amoe quantize` keeps of its
        // source for inference (`InferCheckpoint::inference_state`).
        let eval_gating = match field("/train/eval_gating").or(field("/inference/eval_gating")) {
            Some(g) => serde_json::from_value(g.clone())
                .map_err(|e| parse(g, &format!("eval_gating ({e})")))?,
            None => Gating::Top1,
        };
        let stop_ids: Vec<u32> = match field("/inference/stop_ids") {
            Some(ids) => serde_json::from_value(ids.clone())
                .map_err(|e| parse(ids, &format!("stop_ids ({e})")))?,
            None => vec![tokenizer.eot_id()],
        };
        if let Some(&id) = stop_ids.iter().find(|&&id| id as usize >= cfg.vocab) {
            return Err(Error::checkpoint(
                format!("{source}/state.json"),
                format!("stop id {id} is outside the vocabulary of {}", cfg.vocab),
            ));
        }
        let model_type = match field("/inference/model_type") {
            Some(serde_json::Value::String(t)) => Some(t),
            Some(v) => return Err(parse(v, "model_type is not a string")),
            None => None,
        };
        Ok(InferCheckpoint {
            cfg,
            weights,
            stop_ids,
            tokenizer,
            eval_gating,
            source: source.to_string(),
            model_type,
        })
    }

    /// What inference needs of this checkpoint besides its config, weights
    /// and tokenizer, as `state.json` holds it for `from_parts` (a
    /// checkpoint written for inference alone, e.g. by `amoe quantize`).
    pub fn inference_state(&self) -> serde_json::Value {
        serde_json::json!({
            "inference": {
                "eval_gating": self.eval_gating,
                "stop_ids": self.stop_ids,
                "model_type": self.model_type,
            }
        })
    }

    /// A Hugging Face model (`checkpoint::load_hf_dir`, or the page's
    /// files): its own router, its end-of-sequence ids.
    pub fn from_hf(m: crate::checkpoint::HfModel, source: &str) -> Result<Self> {
        if let Some(id) = m.params.first_non_finite() {
            return Err(Error::checkpoint(
                source,
                format!("tensor {id} holds NaN or infinite values"),
            ));
        }
        Ok(InferCheckpoint {
            eval_gating: m.cfg.gate.gating,
            cfg: m.cfg,
            weights: m.params,
            tokenizer: m.tokenizer,
            source: source.to_string(),
            stop_ids: m.eos,
            model_type: Some(m.family.model_type().to_string()),
        })
    }

    /// Read a checkpoint directory (or a run directory holding `checkpoint/`).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(dir: impl AsRef<std::path::Path>) -> Result<Self> {
        use crate::checkpoint::{
            read_model_raw, CONFIG_FILE, MODEL_FILE, SHARD_INDEX_FILE, STATE_FILE, TOKENIZER_FILE,
        };
        let mut dir = dir.as_ref().to_path_buf();
        if dir.is_file() {
            // A GGUF file (llama.cpp's, or an ollama blob).
            let file = crate::checkpoint::map_file(&dir)?;
            let source = dir.display().to_string();
            if !crate::checkpoint::gguf::is_gguf(file.bytes()) {
                return Err(Error::checkpoint(
                    &source,
                    "a file that is not GGUF: give a GGUF file or a checkpoint directory",
                ));
            }
            let m = crate::checkpoint::gguf::load_gguf(&source, file)?;
            return Self::from_hf(m, &source);
        }
        if !dir.join(CONFIG_FILE).exists() {
            // A run directory's checkpoint/, or, after a save interrupted
            // between its renames, the newest whole checkpoint beside it
            // (`checkpoint::whole_checkpoint`); the same for a checkpoint
            // directory given by its missing path.
            let whole = |d: &std::path::Path| {
                crate::checkpoint::whole_checkpoint(d)
                    .ok()
                    .flatten()
                    .filter(|w| w.join(CONFIG_FILE).exists())
            };
            if let Some(w) = whole(&dir.join("checkpoint")).or_else(|| whole(&dir)) {
                dir = w;
            }
        }
        if !dir.is_dir() {
            return Err(Error::checkpoint(
                dir.display(),
                "no such checkpoint directory",
            ));
        }
        // A Hugging Face model directory: config.json names a model_type.
        if let Ok(config) = std::fs::read(dir.join(CONFIG_FILE)) {
            if crate::checkpoint::hf::is_hf_config(&config) {
                let m = crate::checkpoint::load_hf_dir(&dir)?;
                return Self::from_hf(m, &dir.display().to_string());
            }
        }
        let read = |name: &str| -> Result<Vec<u8>> {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| {
                let msg = if e.kind() == std::io::ErrorKind::NotFound {
                    "missing (a checkpoint holds config.json, model.safetensors and tokenizer.json)"
                        .to_string()
                } else {
                    e.to_string()
                };
                Error::checkpoint(p.display(), msg)
            })
        };
        let config = read(CONFIG_FILE)?;
        let tokenizer = read(TOKENIZER_FILE)?;
        let tokenizer = String::from_utf8(tokenizer)
            .map_err(|_| Error::checkpoint(dir.join(TOKENIZER_FILE).display(), "not UTF-8"))?;
        // model.safetensors (memory-mapped), or the shards of an index.
        if !dir.join(MODEL_FILE).exists() && !dir.join(SHARD_INDEX_FILE).exists() {
            read(MODEL_FILE)?;
        }
        let tensors = read_model_raw(&dir)?;
        let state = dir.join(STATE_FILE);
        let state = if state.exists() {
            Some(read(STATE_FILE)?)
        } else {
            None
        };
        Self::from_parts(
            &dir.display().to_string(),
            &config,
            tensors,
            &tokenizer,
            state.as_deref(),
        )
    }

    /// Every weight read into host memory (the CPU reference, the export,
    /// training from a checkpoint; inference uploads from `weights`).
    pub fn host(&self) -> Result<HostParams> {
        self.weights.to_host()
    }

    /// Change the context (the KV cache's capacity). Rotary models only:
    /// learned positions fix it at the table's length.
    pub fn set_context(&mut self, n: usize) -> Result<()> {
        if self.cfg.rope.is_none() {
            if n == self.cfg.context {
                return Ok(());
            }
            return Err(Error::invalid(
                "context",
                format!(
                    "{}: learned positions fix the context at {} tokens",
                    self.source, self.cfg.context
                ),
            ));
        }
        let cfg = ModelConfig {
            context: n,
            ..self.cfg.clone()
        };
        cfg.validate()?;
        self.cfg = cfg;
        Ok(())
    }

    /// [`InferCheckpoint::gate`], then a top-k model's expert count per
    /// token: `count.rule` with parameter `threshold` (required with a
    /// rule), over at most `count.max_experts` candidates (1 to 8, at most
    /// E). The weights follow the model's own rule over the experts taken
    /// (renormalized where it renormalizes its top-k, raw otherwise).
    pub fn gate_counted(
        &self,
        gating: Option<Gating>,
        threshold: Option<f32>,
        count: ExpertCount,
    ) -> Result<GateConfig> {
        let mut g = self.gate(gating, threshold)?;
        if count == ExpertCount::default() {
            return Ok(g);
        }
        if g.gating != Gating::TopK || self.cfg.gate.gating != Gating::TopK {
            return Err(Error::invalid(
                "rule",
                format!(
                    "--rule and --max-experts choose among a top-k router's experts; {} is \
                     {} here (a published model's own top-k is `--gating topk`)",
                    self.source, g.gating
                ),
            ));
        }
        if let Some(k) = count.max_experts {
            let most = MAX_TOPK.min(self.cfg.experts);
            if !(1..=most).contains(&k) {
                return Err(Error::invalid(
                    "max-experts",
                    format!(
                        "{k}: must be 1..={most} (the model has {} experts)",
                        self.cfg.experts
                    ),
                ));
            }
            g.k = k;
        }
        if let Some(rule) = count.rule {
            if rule != ExpertRule::Fixed && threshold.is_none() {
                return Err(Error::invalid(
                    "rule",
                    format!("--rule {rule} needs its parameter: --threshold X"),
                ));
            }
            g.rule = rule;
        }
        g.validate(self.cfg.experts)?;
        Ok(g)
    }

    /// The MoE layers' rule at inference: `gating` (default: what the run was
    /// evaluated with) and `threshold` (default: training's), keeping the
    /// training's gap measure and one-expert weight (a top-2-trained model
    /// weighs a lone expert 1, as in training).
    pub fn gate(&self, gating: Option<Gating>, threshold: Option<f32>) -> Result<GateConfig> {
        let mut g = GateConfig {
            gating: gating.unwrap_or(self.eval_gating),
            threshold: threshold.unwrap_or(self.cfg.gate.threshold),
            ..self.cfg.gate
        };
        if self.cfg.gate.gating == Gating::TopK && g.gating != Gating::TopK {
            // Another rule on a pretrained top-k router: a token with one
            // expert weighs it as the model weighs its k (renormalized: 1;
            // raw: its probability).
            g.single_weight = if self.cfg.gate.renorm {
                crate::kernels::SingleWeight::One
            } else {
                crate::kernels::SingleWeight::RawP1
            };
        }
        if self.cfg.moe_layers().is_empty() {
            return Ok(g);
        }
        g.validate(self.cfg.experts)?;
        Ok(g)
    }
}

/// The demo checkpoint shipped with the source tree (`<crate>/data/demo`),
/// what `amoe generate` uses without `--checkpoint`.
#[cfg(not(target_arch = "wasm32"))]
pub fn demo_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("demo")
}
