//! Argument groups shared by several commands, and the clap value parsers of the
//! library's named choices.

use amoe::choice::Choice;
use amoe::gpu::AdapterFilter;
use amoe::infer::calibration::Calibration;
use amoe::infer::checkpoint::demo_dir;
use amoe::infer::checkpoint::ExpertCount;
use amoe::infer::InferCheckpoint;
use amoe::kernels::{Activation, ExpertRule, GateConfig, Gates, Gating};
use amoe::model::{DtypeChoice, QuantScope, StorageChoice};
use amoe::quant::QuantFormat;
use amoe::train::trainer::TrainConfig;
use amoe::{Error, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use std::path::PathBuf;

/// The clap parser of a library choice: `--help` lists `T::NAMES` (with their help),
/// a value outside them is a usage error, and the value is `T`'s `FromStr`.
pub fn choice<T: Choice>() -> impl TypedValueParser<Value = T> {
    let values = T::NAMES.iter().zip(T::HELP).map(|(&name, &help)| {
        let v = PossibleValue::new(name);
        if help.is_empty() {
            v
        } else {
            v.help(help)
        }
    });
    PossibleValuesParser::new(values).map(|s| match s.parse::<T>() {
        Ok(v) => v,
        Err(e) => unreachable!("a listed name does not parse: {e}"),
    })
}

/// `on` | `off` as a bool.
pub fn on_off() -> impl TypedValueParser<Value = bool> {
    PossibleValuesParser::new(["on", "off"]).map(|s| s == "on")
}

#[derive(clap::Args, Clone, Default)]
pub struct AdapterArgs {
    /// Backend: vulkan, metal, dx12, gl or browser (default: env AMOE_BACKEND, else all).
    #[arg(long)]
    pub backend: Option<String>,
    /// Adapter index as listed by `amoe devices`.
    #[arg(long)]
    pub adapter: Option<usize>,
}

impl AdapterArgs {
    pub fn filter(&self) -> Result<AdapterFilter> {
        AdapterFilter::from_args(self.backend.as_deref(), self.adapter)
    }
}

/// Model shape and run sizes shared by `train` and `reproduce`.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Sequences per batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Context length N.
    #[arg(long)]
    pub context: Option<usize>,
    /// Model width D.
    #[arg(long)]
    pub d: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// Experts per MoE layer E.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Hidden width of each expert F.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Every n-th FFN is an MoE layer.
    #[arg(long)]
    pub moe_every: Option<usize>,
    /// FFN activation [default: gelu].
    #[arg(long, value_parser = choice::<Activation>())]
    pub activation: Option<Activation>,
    /// Rotary positions with this base (e.g. 10000) instead of learned
    /// ones: the layout of Llama, Mistral and Mixtral, which `amoe export`
    /// can write as a Hugging Face model.
    #[arg(long)]
    pub rope_theta: Option<f32>,
    /// Key/value heads (grouped-query attention; must divide --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Width of each attention head (default: d / heads; a multiple of 4 up to 64).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Sliding-window attention: each token sees itself and the W - 1 before it.
    #[arg(long)]
    pub window: Option<usize>,
    /// BPE vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Validation batches per validation.
    #[arg(long)]
    pub eval_batches: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl ModelArgs {
    /// Overwrite what was given.
    pub fn apply(&self, c: &mut TrainConfig) {
        let m = &mut c.model;
        macro_rules! set {
            ($($field:expr => $arg:expr),* $(,)?) => { $(if let Some(v) = $arg { $field = v; })* };
        }
        set!(
            m.context => self.context,
            m.d => self.d,
            m.layers => self.layers,
            m.heads => self.heads,
            m.experts => self.experts,
            m.ffn => self.ffn,
            m.moe_every => self.moe_every,
            c.batch => self.batch,
            c.vocab_size => self.vocab,
            c.opt.adamw.lr => self.lr,
            c.eval_batches => self.eval_batches,
            c.seed => self.seed,
            m.activation => self.activation,
        );
        if let Some(theta) = self.rope_theta {
            m.rope = Some(amoe::model::config::Rope {
                theta,
                scaling: None,
            });
        }
        if self.kv_heads.is_some() {
            m.kv_heads = self.kv_heads;
        }
        if self.head_dim.is_some() {
            m.head_dim = self.head_dim;
        }
        if self.window.is_some() {
            m.sliding_window = self.window;
        }
    }
}

/// Which checkpoint and which rule.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelPick {
    /// Checkpoint directory (or a run directory holding checkpoint/), a
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json)
    /// or a GGUF file. Default: the demo checkpoint in data/demo.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Context in tokens (rotary models only: up to the model's
    /// max_position_embeddings; default: that, at most 4096).
    #[arg(long)]
    pub context: Option<usize>,
    /// Gating of the MoE layers (default for generate: what the checkpoint was
    /// validated with; for routes: what it was trained with).
    #[arg(long, value_parser = choice::<Gating>())]
    pub gating: Option<Gating>,
    /// Adaptive threshold in [0, 1] (default: the training's).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// How many of a top-k model's experts each token takes: all (fixed),
    /// or by a rule whose parameter is --threshold: gap (p(i-1) - p(i) <= T),
    /// ratio (p(i) >= r p1), mass (the experts taken hold less than P).
    #[arg(long, value_parser = choice::<ExpertRule>())]
    pub rule: Option<ExpertRule>,
    /// The most experts a token takes under --rule (default: the model's k).
    #[arg(long)]
    pub max_experts: Option<usize>,
    /// Per-layer thresholds of a rule from `amoe calibrate` (a top-k model:
    /// sets the rule, its thresholds and the most experts per token).
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// How the matmul weights are stored on the GPU (math is f32 either way).
    #[arg(long, value_parser = choice::<DtypeChoice>(), default_value = "auto")]
    pub dtype: DtypeChoice,
    /// Store the expert banks block-quantized on the GPU, quantized as the
    /// model loads (no second copy on disk); the other weights follow --dtype.
    #[arg(long, value_name = "FORMAT", value_parser = choice::<QuantFormat>())]
    pub quantize_on_load: Option<QuantFormat>,
    /// What --quantize-on-load covers: the expert banks, or all: also the
    /// attention projections and an untied unembedding.
    #[arg(
        long,
        value_name = "WHICH",
        value_parser = choice::<QuantScope>(),
        default_value = "experts",
        requires = "quantize_on_load"
    )]
    pub quantize: QuantScope,
}

impl ModelPick {
    /// --dtype, --quantize-on-load and --quantize.
    pub fn storage(&self) -> StorageChoice {
        StorageChoice {
            dtype: self.dtype,
            quant: self.quantize_on_load,
            scope: self.quantize,
        }
    }

    /// The gate for `ck`: `gating` (default: the checkpoint's), --threshold,
    /// --rule and --max-experts.
    pub fn gate(&self, ck: &InferCheckpoint, gating: Option<Gating>) -> Result<GateConfig> {
        ck.gate_counted(
            gating,
            self.threshold,
            ExpertCount {
                rule: self.rule,
                max_experts: self.max_experts,
            },
        )
    }

    /// `gate`, or with --calibration the file's rule and per-layer
    /// thresholds on the model's own top-k router.
    pub fn gates(&self, ck: &InferCheckpoint, gating: Option<Gating>) -> Result<Gates> {
        let Some(path) = &self.calibration else {
            return Ok(self.gate(ck, gating)?.into());
        };
        if self.rule.is_some() || self.threshold.is_some() || self.max_experts.is_some() {
            return Err(Error::invalid(
                "calibration",
                "--calibration sets the rule, its per-layer thresholds and the most experts per token: leave out --rule, --threshold and --max-experts",
            ));
        }
        if gating.is_some_and(|g| g != Gating::TopK) {
            return Err(Error::invalid(
                "calibration",
                "--calibration applies to the model's own top-k router (--gating topk or no --gating)",
            ));
        }
        let calibration = Calibration::load(path)?;
        if ck.cfg.gate.gating != Gating::TopK {
            return Err(Error::invalid(
                "calibration",
                format!(
                    "a calibration chooses among a top-k router's experts; {} is {}",
                    ck.source,
                    ck.cfg.gate.describe()
                ),
            ));
        }
        let base = self.gate(ck, Some(Gating::TopK))?;
        calibration.gates(&ck.cfg, base, &ck.source)
    }

    pub fn load(&self) -> Result<InferCheckpoint> {
        let dir = self.checkpoint.clone().unwrap_or_else(|| {
            let local = PathBuf::from("data/demo");
            if local.join("config.json").exists() {
                local
            } else {
                demo_dir()
            }
        });
        let mut ck = InferCheckpoint::load(&dir)?;
        let read = std::path::Path::new(&ck.source);
        if read
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".checkpoint."))
        {
            eprintln!(
                "note: {}: the last save was interrupted; reading the newest whole checkpoint, {}",
                dir.display(),
                ck.source
            );
        }
        if let Some(n) = self.context {
            ck.set_context(n)?;
        }
        Ok(ck)
    }
}

/// The ids of a text to analyze or score: the documents of `data` (a file or
/// directory) or, without it, the held-out part of the shipped corpus (its
/// `domain`: "both", "kjv" or "shakespeare"), each followed by the
/// end-of-text token, at most `max_tokens` of them.
pub fn text_ids(
    tokenizer: &amoe::tokenizer::Tokenizer,
    data: Option<&std::path::Path>,
    domain: &str,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    use amoe::train::data::{shipped_dir, Corpus, Domain};
    let docs = match data {
        Some(p) => Corpus::load(p)?.docs,
        None => {
            Corpus::shipped(shipped_dir(), domain.parse::<Domain>()?)?
                .split()?
                .val
        }
    };
    let mut ids = Vec::new();
    for d in &docs {
        if ids.len() >= max_tokens {
            break;
        }
        ids.extend(tokenizer.encode(&d.text)?);
        ids.push(tokenizer.eot_id());
    }
    ids.truncate(max_tokens);
    Ok(ids)
}
