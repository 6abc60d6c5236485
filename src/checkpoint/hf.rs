//! Hugging Face model directories: `config.json` onto [`ModelConfig`] and
//! the safetensors tensors onto amoe's parameter tree. Bytes only (wasm-safe);
//! `hf_dir` reads a directory.
//!
//! Families: the MoE ones `mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe`,
//! `granitemoe` and the dense ones `llama`, `mistral`, `qwen2`, `qwen3`, with
//! the semantics of transformers 4.57 (see `tests/fixtures/hf/README.md`).
//!
//! # config.json
//!
//! Common keys: `hidden_size` -> `d`, `num_hidden_layers` -> `layers`,
//! `num_attention_heads` -> `heads`, `num_key_value_heads` -> `kv_heads`
//! (absent: `heads`), `head_dim` (absent or null: `d / heads`), `rms_norm_eps`
//! -> `eps`, `vocab_size` -> `vocab`, `rope_theta` and `rope_scaling` (none,
//! `linear` or `llama3`) -> `rope`, `max_position_embeddings` ->
//! `max_positions` (the context is the smaller of it and 4096),
//! `tie_word_embeddings` (absent: false) -> `tied`, `hidden_act` must be
//! `silu` (SwiGLU FFNs).
//!
//! Per family: the router (`num_experts_per_tok`, renormalized for Mixtral
//! and Granite, `norm_topk_prob` for the others), the expert widths, the
//! per-layer FFN kinds of the Qwen MoE families (`mlp_only_layers`,
//! `decoder_sparse_step`), Qwen2-MoE's shared expert, q/k/v biases (Qwen2
//! families), QK-norm (Qwen3 per head, OLMoE over the whole projection), the
//! sliding window (Mistral, Mixtral, and the Qwen families when
//! `use_sliding_window` windows every layer) and Granite's multipliers.
//!
//! No setting is ignored silently: a key is either mapped, checked (and
//! refused where amoe cannot compute what it asks for: o/MLP biases,
//! `clip_qkv`, partial rotary, a per-layer window mix, another activation or
//! rope type), or on a list of keys that do not change the forward
//! (metadata, dropout, training losses, generation defaults). Any other key
//! is an error naming it.
//!
//! # Tensors
//!
//! amoe's matrices are `[in, out]` (`y = x W`), Hugging Face's `nn.Linear`
//! weights `[out, in]`: every matrix is transposed. `wqkv` is
//! `[q_projᵀ | k_projᵀ | v_projᵀ]`, `bqkv` the three biases end to end; expert
//! banks `[E, D, F]` / `[E, F, D]` stack the experts' transposes (Granite's
//! fused `input_linear [E, 2F, D]` gives w1 from rows `0..F` and w3 from rows
//! `F..2F`); a router `[E, D]` becomes `w_router [D, E]`; a dense FFN is one
//! expert whose router `[D, 1]` is zeros (no file tensor). Every parameter
//! is checked for its shape and every file tensor must be used: the problems
//! are listed together in one error naming the file.

use crate::checkpoint::{LazyParams, LazyTensor, NamedTensor, Op, RawTensor};
use crate::error::{Error, Result};
use crate::kernels::{Activation, GateConfig, Gating, RouterScore, SingleWeight};
use crate::model::config::{FfnKind, ModelConfig, QkNorm, Rope, RopeScaling};
use crate::model::params::{BlockParam, ParamId, ParamSpec};
use crate::model::transformer::HostParams;
use crate::model::Params;
use crate::tokenizer::Tokenizer;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

/// The model families this loader reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    GraniteMoe,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Family {
    pub const ALL: [Family; 9] = [
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::Olmoe,
        Family::GraniteMoe,
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
    ];

    /// The `model_type` of its `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
            Family::GraniteMoe => "granitemoe",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The family of a `model_type`, if this loader reads it.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
    }

    /// Whether its FFNs are (some or all) mixtures of experts.
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Family::Mixtral
                | Family::Qwen2Moe
                | Family::Qwen3Moe
                | Family::Olmoe
                | Family::GraniteMoe
        )
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Whether `json` looks like a Hugging Face `config.json` (an object with a
/// string `model_type`; amoe's own config.json has none).
pub fn is_hf_config(json: &[u8]) -> bool {
    serde_json::from_slice::<Value>(json)
        .ok()
        .and_then(|v| v.get("model_type").map(Value::is_string))
        .unwrap_or(false)
}

/// Keys that do not change the forward of a loaded model: metadata, the
/// dtype of the stored weights (amoe computes in f32), dropout and training
/// losses, cache and output switches, token ids (read by
/// [`parse_generation_config`]), and the generation defaults old
/// transformers versions wrote into every config.
const IGNORED_KEYS: &[&str] = &[
    "architectures",
    "transformers_version",
    "_name_or_path",
    "_commit_hash",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "hidden_dropout",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    // Tensor-parallel slicing of the same products (no longer read by 4.57).
    "pretraining_tp",
    "tokenizer_class",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "tie_encoder_decoder",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "chunk_size_feed_forward",
    "finetuning_task",
    "id2label",
    "label2id",
    "problem_type",
    "prefix",
    "task_specific_params",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// The largest default context: `max_position_embeddings` of published
/// models reaches 128k, whose KV cache amoe need not reserve by default.
pub const DEFAULT_CONTEXT_CAP: usize = 4096;

/// The keys of one JSON object, read with errors naming the file and the
/// key; remembers which keys were read so that the rest can be refused.
struct Keys<'a> {
    source: &'a str,
    obj: &'a Map<String, Value>,
    read: RefCell<BTreeSet<&'a str>>,
}

impl<'a> Keys<'a> {
    fn new(source: &'a str, value: &'a Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::checkpoint(source, "not a JSON object"))?;
        Ok(Keys {
            source,
            obj,
            read: RefCell::new(BTreeSet::new()),
        })
    }

    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::checkpoint(self.source, format!("{key}: {msg}"))
    }

    /// The value of `key`; None when absent or null. Marks it read.
    fn get(&self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.obj.get_key_value(key)?;
        self.read.borrow_mut().insert(k.as_str());
        (!v.is_null()).then_some(v)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.err(key, format!("{v} is not a non-negative integer")))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "missing (required for this family)"))
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| self.err(key, format!("{v} is not a finite number")))
            })
            .transpose()
    }

    fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?
            .ok_or_else(|| self.err(key, "missing (required for this family)"))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.err(key, format!("{v} is not true or false")))
            })
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.err(key, format!("{v} is not a string")))
            })
            .transpose()
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let bad = || self.err(key, format!("{v} is not a list of non-negative integers"));
        v.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|x| x.as_u64().map(|n| n as usize).ok_or_else(bad))
            .collect()
    }

    fn opt_str_list(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let bad = || self.err(key, format!("{v} is not a list of strings"));
        v.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|x| x.as_str().ok_or_else(bad))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Every key neither read nor in `IGNORED_KEYS`: one error listing them.
    fn refuse_unread(&self, family: Family) -> Result<()> {
        let read = self.read.borrow();
        let unknown: Vec<&str> = self
            .obj
            .keys()
            .map(String::as_str)
            .filter(|k| !read.contains(k) && !IGNORED_KEYS.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(Error::checkpoint(
            self.source,
            format!(
                "key(s) {} not understood by amoe's {family} loader (they may change the \
                 computation, so amoe does not ignore them)",
                unknown.join(", ")
            ),
        ))
    }
}

/// A `config.json` onto the family and amoe's config. `source` names the
/// file in errors (a missing or malformed key, a setting amoe cannot
/// compute, an unknown `model_type` or key, an invalid result).
pub fn parse_config(source: &str, json: &[u8]) -> Result<(Family, ModelConfig)> {
    let value: Value = serde_json::from_slice(json)
        .map_err(|e| Error::checkpoint(source, format!("not valid JSON: {e}")))?;
    let k = Keys::new(source, &value)?;
    let model_type = k
        .opt_str("model_type")?
        .ok_or_else(|| k.err("model_type", "missing: not a Hugging Face config.json"))?;
    let family = Family::from_model_type(model_type).ok_or_else(|| {
        let known: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
        k.err(
            "model_type",
            format!(
                "{model_type:?} is not supported; amoe reads {}",
                known.join(", ")
            ),
        )
    })?;
    let mut cfg = common(&k)?;
    attention(family, &k, &mut cfg)?;
    match family {
        Family::Mixtral | Family::GraniteMoe => {
            routed_ffn(&k, &mut cfg, "num_local_experts", true)?
        }
        Family::Olmoe => {
            let renorm = k.opt_bool("norm_topk_prob")?.unwrap_or(false);
            routed_ffn(&k, &mut cfg, "num_experts", renorm)?
        }
        Family::Qwen2Moe | Family::Qwen3Moe => qwen_moe_ffn(family, &k, &mut cfg)?,
        Family::Llama | Family::Mistral | Family::Qwen2 | Family::Qwen3 => dense_ffn(&k, &mut cfg)?,
    }
    if family == Family::GraniteMoe {
        granite_multipliers(&k, &mut cfg)?;
    }
    k.refuse_unread(family)?;
    cfg.validate()
        .map_err(|e| Error::checkpoint(source, format!("gives an invalid model: {e}")))?;
    Ok((family, cfg))
}

/// The keys every family has: sizes, norm, rotary positions, tied head,
/// activation.
fn common(k: &Keys) -> Result<ModelConfig> {
    let d = k.usize("hidden_size")?;
    let heads = k.usize("num_attention_heads")?;
    let max_positions = k.usize("max_position_embeddings")?;
    let act = k.opt_str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(k.err(
            "hidden_act",
            format!("{act:?}: amoe runs these families' FFNs as SwiGLU, which needs \"silu\""),
        ));
    }
    if let Some(f) = k.opt_f32("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(k.err(
                "partial_rotary_factor",
                format!("{f}: amoe rotates the whole head"),
            ));
        }
    }
    let layers = k.usize("num_hidden_layers")?;
    if layers > crate::model::config::MAX_LAYERS {
        // Bounded before anything is sized by it (per-layer lists).
        return Err(k.err(
            "num_hidden_layers",
            format!("{layers}: at most {}", crate::model::config::MAX_LAYERS),
        ));
    }
    Ok(ModelConfig {
        vocab: k.usize("vocab_size")?,
        d,
        layers,
        heads,
        context: max_positions.min(DEFAULT_CONTEXT_CAP),
        ffn: 1,
        experts: 1,
        moe_every: 1,
        activation: Activation::SwiGlu,
        dense: false,
        gate: dense_gate(),
        eps: k.f32("rms_norm_eps")?,
        kv_heads: k.opt_usize("num_key_value_heads")?,
        head_dim: k.opt_usize("head_dim")?,
        rope: Some(Rope {
            theta: k.f32("rope_theta")?,
            scaling: rope_scaling(k)?,
        }),
        max_positions: Some(max_positions),
        tied: k.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        ..ModelConfig::default()
    })
}

/// The gate of a dense model (one expert, weight 1).
fn dense_gate() -> GateConfig {
    GateConfig {
        gating: Gating::Top1,
        single_weight: SingleWeight::One,
        ..GateConfig::default()
    }
}

/// `rope_scaling`: null or `default` (none), `linear`, `llama3`.
fn rope_scaling(k: &Keys) -> Result<Option<RopeScaling>> {
    let Some(v) = k.get("rope_scaling") else {
        return Ok(None);
    };
    let src = format!("{} rope_scaling", k.source);
    let s = Keys::new(&src, v)?;
    let ty = match (s.opt_str("rope_type")?, s.opt_str("type")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(k.err("rope_scaling", format!("rope_type {a:?} but type {b:?}")))
        }
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Err(k.err("rope_scaling", "has no rope_type")),
    };
    let scaling = match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: s.f32("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: s.f32("factor")?,
            low_freq_factor: s.f32("low_freq_factor")?,
            high_freq_factor: s.f32("high_freq_factor")?,
            original: s.usize("original_max_position_embeddings")?,
        }),
        other => {
            return Err(k.err(
                "rope_scaling",
                format!(
                    "rope type {other:?} is not supported; amoe reads \"default\", \"linear\" \
                     and \"llama3\""
                ),
            ))
        }
    };
    // A key the type does not take (e.g. a YaRN setting) is refused too.
    let read = s.read.borrow();
    let extra: Vec<&String> = s
        .obj
        .keys()
        .filter(|key| !read.contains(key.as_str()))
        .collect();
    if !extra.is_empty() {
        return Err(k.err(
            "rope_scaling",
            format!("keys {extra:?} are not read by rope type {ty:?}"),
        ));
    }
    Ok(scaling)
}

/// Biases, QK-norm, sliding window and score scale of a family.
fn attention(family: Family, k: &Keys, cfg: &mut ModelConfig) -> Result<()> {
    if k.opt_bool("attention_bias")? == Some(true) {
        return Err(k.err(
            "attention_bias",
            "true gives q, k, v and o biases; amoe has no o bias",
        ));
    }
    if k.opt_bool("mlp_bias")? == Some(true) {
        return Err(k.err("mlp_bias", "true: amoe's FFNs have no biases"));
    }
    cfg.qkv_bias = match family {
        // Qwen2 families always had q/k/v biases (the key came later).
        Family::Qwen2 | Family::Qwen2Moe => k.opt_bool("qkv_bias")?.unwrap_or(true),
        _ => false,
    };
    cfg.qk_norm = match family {
        Family::Qwen3 | Family::Qwen3Moe => QkNorm::PerHead,
        Family::Olmoe => QkNorm::Whole,
        _ => QkNorm::None,
    };
    if family == Family::Olmoe {
        if let Some(v) = k.get("clip_qkv") {
            return Err(k.err(
                "clip_qkv",
                format!("{v}: amoe does not clamp q, k and v (it must be null)"),
            ));
        }
    }
    if family == Family::GraniteMoe {
        cfg.attn_scale = Some(k.opt_f32("attention_multiplier")?.unwrap_or(1.0));
        if let Some(p) = k.opt_str("position_embedding_type")? {
            if p != "rope" {
                return Err(k.err(
                    "position_embedding_type",
                    format!("{p:?}: amoe reads rotary (\"rope\") Granite models only"),
                ));
            }
        }
    }
    cfg.sliding_window = sliding_window(family, k, cfg.layers)?;
    Ok(())
}

/// The attention window of every layer, or an error where layers differ.
fn sliding_window(family: Family, k: &Keys, layers: usize) -> Result<Option<usize>> {
    match family {
        // transformers' MistralConfig defaults to 4096 when the key is absent.
        Family::Mistral => match k.obj.get("sliding_window") {
            None => Ok(Some(4096)),
            Some(_) => k.opt_usize("sliding_window"),
        },
        Family::Mixtral => k.opt_usize("sliding_window"),
        Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe | Family::Qwen3Moe => {
            qwen_window(family, k, layers)
        }
        Family::Llama | Family::Olmoe | Family::GraniteMoe => Ok(None),
    }
}

/// The Qwen families: `sliding_window` counts only with
/// `use_sliding_window`. The dense ones (transformers 4.57) window the
/// layers whose `layer_types` entry is `sliding_attention`, by default
/// those from `max_window_layers` on; the MoE ones have no `layer_types`
/// and window every layer whenever a window is set, while the key
/// `max_window_layers` says the first layers are not windowed. amoe
/// windows all layers or none: a mix, or a MoE config whose two readings
/// differ (`max_window_layers` > 0), is refused.
fn qwen_window(family: Family, k: &Keys, layers: usize) -> Result<Option<usize>> {
    let use_window = k.opt_bool("use_sliding_window")?.unwrap_or(false);
    let window = k.opt_usize("sliding_window")?.filter(|_| use_window);
    let max_window_layers = k.opt_usize("max_window_layers")?;
    let windowed: Vec<bool> = match k.opt_str_list("layer_types")? {
        Some(types) => {
            if types.len() != layers {
                return Err(k.err(
                    "layer_types",
                    format!("{} entries for {layers} layers", types.len()),
                ));
            }
            types
                .iter()
                .map(|t| match *t {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    other => Err(k.err("layer_types", format!("unknown layer type {other:?}"))),
                })
                .collect::<Result<_>>()?
        }
        None if window.is_none() => vec![false; layers],
        None => {
            // transformers' default when the key is absent.
            let first = max_window_layers.unwrap_or(28);
            if family.is_moe() && first > 0 {
                return Err(k.err(
                    "max_window_layers",
                    format!(
                        "{first} with use_sliding_window: transformers windows every layer of \
                         {family} while this key leaves layers 0..{first} unwindowed; amoe \
                         refuses the ambiguity (0 windows every layer)"
                    ),
                ));
            }
            (0..layers).map(|l| l >= first).collect()
        }
    };
    if windowed.iter().all(|&w| !w) {
        return Ok(None);
    }
    if windowed.iter().any(|&w| !w) {
        let on: Vec<usize> = (0..layers).filter(|&l| windowed[l]).collect();
        return Err(k.err(
            "sliding_window",
            format!(
                "only layers {on:?} of {layers} are windowed (max_window_layers / layer_types); \
                 amoe windows every layer or none"
            ),
        ));
    }
    window.map(Some).ok_or_else(|| {
        k.err(
            "sliding_window",
            "layer_types asks for sliding attention but no window is set",
        )
    })
}

/// Every layer one MoE: E experts of width `intermediate_size`, softmax
/// router, top `num_experts_per_tok`, renormalized or not.
fn routed_ffn(k: &Keys, cfg: &mut ModelConfig, experts_key: &str, renorm: bool) -> Result<()> {
    cfg.experts = k.usize(experts_key)?;
    cfg.ffn = k.usize("intermediate_size")?;
    cfg.gate = GateConfig::top_k(
        k.usize("num_experts_per_tok")?,
        renorm,
        RouterScore::Softmax,
    );
    Ok(())
}

/// Qwen2-MoE and Qwen3-MoE: layer l is an MoE iff `num_experts > 0`, l is
/// not in `mlp_only_layers` and `(l + 1) % decoder_sparse_step == 0`; the
/// others are dense FFNs of width `intermediate_size`. Qwen2-MoE adds a
/// sigmoid-gated shared expert to every MoE layer.
fn qwen_moe_ffn(family: Family, k: &Keys, cfg: &mut ModelConfig) -> Result<()> {
    let experts = k.usize("num_experts")?;
    let step = k.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return Err(k.err("decoder_sparse_step", "0"));
    }
    let mlp_only = k.usize_list("mlp_only_layers")?;
    let kinds: Vec<FfnKind> = (0..cfg.layers)
        .map(|l| {
            if experts > 0 && !mlp_only.contains(&l) && (l + 1) % step == 0 {
                FfnKind::Moe
            } else {
                FfnKind::Dense
            }
        })
        .collect();
    let renorm = k.opt_bool("norm_topk_prob")?.unwrap_or(false);
    let top_k = k.usize("num_experts_per_tok")?;
    let dense = k.opt_usize("intermediate_size")?;
    let moe_width = k.opt_usize("moe_intermediate_size")?;
    let shared = match family {
        Family::Qwen2Moe => Some(k.usize("shared_expert_intermediate_size")?),
        _ => None,
    };
    if kinds.contains(&FfnKind::Dense) && dense.is_none() {
        return Err(k.err("intermediate_size", "missing (the model has dense layers)"));
    }
    if !kinds.contains(&FfnKind::Moe) {
        // No MoE layer at all: a dense model.
        cfg.dense = true;
        cfg.ffn = dense.unwrap_or(1);
        cfg.ffn_kinds = Some(kinds);
        return Ok(());
    }
    cfg.experts = experts;
    cfg.ffn = moe_width.ok_or_else(|| k.err("moe_intermediate_size", "missing"))?;
    cfg.dense_ffn = dense;
    cfg.shared_ffn = shared;
    cfg.ffn_kinds = Some(kinds);
    cfg.gate = GateConfig::top_k(top_k, renorm, RouterScore::Softmax);
    Ok(())
}

/// Llama, Mistral, Qwen2, Qwen3: one SwiGLU FFN per layer.
fn dense_ffn(k: &Keys, cfg: &mut ModelConfig) -> Result<()> {
    cfg.dense = true;
    cfg.ffn = k.usize("intermediate_size")?;
    Ok(())
}

/// Granite's embedding, residual and logit multipliers (absent: 1).
fn granite_multipliers(k: &Keys, cfg: &mut ModelConfig) -> Result<()> {
    cfg.embedding_multiplier = k.opt_f32("embedding_multiplier")?.unwrap_or(1.0);
    cfg.residual_multiplier = k.opt_f32("residual_multiplier")?.unwrap_or(1.0);
    cfg.logits_scaling = k.opt_f32("logits_scaling")?.unwrap_or(1.0);
    Ok(())
}

/// The token ids a generation loop needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialIds {
    /// Ids that end generation (`eos_token_id`: one id or a list).
    pub eos: Vec<u32>,
    /// `bos_token_id`, if any.
    pub bos: Option<u32>,
}

/// `eos_token_id` and `bos_token_id` of `generation_config.json` (when
/// given: `(source, bytes)`), each key falling back to `config.json`'s.
pub fn parse_generation_config(
    config: (&str, &[u8]),
    generation: Option<(&str, &[u8])>,
) -> Result<SpecialIds> {
    let read = |(source, bytes): (&str, &[u8])| -> Result<(Option<Vec<u32>>, Option<u32>)> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::checkpoint(source, format!("not valid JSON: {e}")))?;
        let k = Keys::new(source, &v)?;
        let id = |key: &str, x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| k.err(key, format!("{x} is not a token id")))
        };
        let eos = match k.get("eos_token_id") {
            None => None,
            Some(Value::Array(list)) => Some(
                list.iter()
                    .map(|x| id("eos_token_id", x))
                    .collect::<Result<_>>()?,
            ),
            Some(x) => Some(vec![id("eos_token_id", x)?]),
        };
        let bos = k
            .get("bos_token_id")
            .map(|x| id("bos_token_id", x))
            .transpose()?;
        Ok((eos, bos))
    };
    let (mut eos, mut bos) = read(config)?;
    if let Some(g) = generation {
        let (g_eos, g_bos) = read(g)?;
        eos = g_eos.or(eos);
        bos = g_bos.or(bos);
    }
    Ok(SpecialIds {
        eos: eos.unwrap_or_default(),
        bos,
    })
}

/// The sources of one parameter (file name and expected shape) and how to
/// combine them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Recipe {
    pub(crate) op: Op,
    pub(crate) sources: Vec<(String, Vec<usize>)>,
}

fn copy(name: String, shape: &[usize]) -> Recipe {
    Recipe {
        op: Op::Copy,
        sources: vec![(name, shape.to_vec())],
    }
}

/// A Linear weight `[out, in]` for the parameter `[in, out]`.
fn linear(name: String, shape: &[usize]) -> Recipe {
    Recipe {
        op: Op::Cols,
        sources: vec![(name, vec![shape[1], shape[0]])],
    }
}

/// The three projections of a Linear layer's FFN.
#[derive(Clone, Copy, Debug)]
enum Proj {
    Gate,
    Up,
    Down,
}

impl Proj {
    fn of(p: BlockParam) -> Proj {
        match p {
            BlockParam::W1 | BlockParam::SharedW1 => Proj::Gate,
            BlockParam::W3 | BlockParam::SharedW3 => Proj::Up,
            _ => Proj::Down,
        }
    }

    /// `gate_proj`, `up_proj`, `down_proj`.
    fn hf(self) -> &'static str {
        match self {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Mixtral's names: `w1`, `w3`, `w2`.
    fn mixtral(self) -> &'static str {
        match self {
            Proj::Gate => "w1",
            Proj::Up => "w3",
            Proj::Down => "w2",
        }
    }
}

fn layer(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}

/// The router of layer `l`'s routed experts, `[E, D]`.
fn router_name(family: Family, l: usize) -> String {
    match family {
        Family::Mixtral => layer(l, "block_sparse_moe.gate.weight"),
        Family::GraniteMoe => layer(l, "block_sparse_moe.router.layer.weight"),
        _ => layer(l, "mlp.gate.weight"),
    }
}

/// Projection `p` of routed expert `e` of layer `l`.
fn expert_name(family: Family, l: usize, e: usize, p: Proj) -> String {
    match family {
        Family::Mixtral => layer(
            l,
            &format!("block_sparse_moe.experts.{e}.{}.weight", p.mixtral()),
        ),
        _ => layer(l, &format!("mlp.experts.{e}.{}.weight", p.hf())),
    }
}

/// Every parameter's recipe for `family`.
fn recipe(family: Family, cfg: &ModelConfig, id: ParamId, spec: &ParamSpec) -> Recipe {
    let s = spec.shape.as_slice();
    match id {
        ParamId::Wte => copy("model.embed_tokens.weight".into(), s),
        // Rotary families have none (`params_from_tensors` refuses a config
        // with learned positions before asking).
        ParamId::Wpe => copy("(learned positions)".into(), s),
        ParamId::NormF => copy("model.norm.weight".into(), s),
        ParamId::WOut => linear("lm_head.weight".into(), s),
        ParamId::Block(l, p) => block_recipe(family, cfg, l, p, s),
    }
}

fn block_recipe(family: Family, cfg: &ModelConfig, l: usize, p: BlockParam, s: &[usize]) -> Recipe {
    let (d, qw) = (cfg.d, cfg.q_width());
    let kw = cfg.kv_heads() * cfg.head_dim();
    let attn = |x: &str, what: &str| layer(l, &format!("self_attn.{x}_proj.{what}"));
    match p {
        BlockParam::Norm1 => copy(layer(l, "input_layernorm.weight"), s),
        BlockParam::Norm2 => copy(layer(l, "post_attention_layernorm.weight"), s),
        BlockParam::Wqkv => Recipe {
            op: Op::Cols,
            sources: vec![
                (attn("q", "weight"), vec![qw, d]),
                (attn("k", "weight"), vec![kw, d]),
                (attn("v", "weight"), vec![kw, d]),
            ],
        },
        BlockParam::Bqkv => Recipe {
            op: Op::Concat,
            sources: vec![
                (attn("q", "bias"), vec![qw]),
                (attn("k", "bias"), vec![kw]),
                (attn("v", "bias"), vec![kw]),
            ],
        },
        BlockParam::QNorm => copy(layer(l, "self_attn.q_norm.weight"), s),
        BlockParam::KNorm => copy(layer(l, "self_attn.k_norm.weight"), s),
        BlockParam::Wo => linear(attn("o", "weight"), s),
        BlockParam::Router => match cfg.kind(l) {
            FfnKind::Moe => linear(router_name(family, l), s),
            FfnKind::Dense => Recipe {
                op: Op::Zeros,
                sources: Vec::new(),
            },
        },
        BlockParam::W1 | BlockParam::W3 | BlockParam::W2 => {
            let proj = Proj::of(p);
            match (cfg.kind(l), family) {
                (FfnKind::Dense, _) => {
                    experts(s, |_| layer(l, &format!("mlp.{}.weight", proj.hf())))
                }
                (FfnKind::Moe, Family::GraniteMoe) => granite_bank(l, proj, s),
                (FfnKind::Moe, _) => experts(s, |e| expert_name(family, l, e, proj)),
            }
        }
        BlockParam::SharedGate => linear(layer(l, "mlp.shared_expert_gate.weight"), s),
        BlockParam::SharedW1 | BlockParam::SharedW3 | BlockParam::SharedW2 => {
            let proj = Proj::of(p);
            experts(s, |_| {
                layer(l, &format!("mlp.shared_expert.{}.weight", proj.hf()))
            })
        }
    }
}

/// An expert bank `[E, in, out]` from one `[out, in]` Linear per expert.
fn experts(s: &[usize], name: impl Fn(usize) -> String) -> Recipe {
    Recipe {
        op: Op::Experts,
        sources: (0..s[0]).map(|e| (name(e), vec![s[2], s[1]])).collect(),
    }
}

/// Granite's fused banks: `input_linear [E, 2F, D]` (gate rows, then up
/// rows) and `output_linear [E, D, F]`.
fn granite_bank(l: usize, proj: Proj, s: &[usize]) -> Recipe {
    let (e, n_in, n_out) = (s[0], s[1], s[2]);
    let (name, rows, start) = match proj {
        Proj::Gate => ("input_linear", 2 * n_out, 0),
        Proj::Up => ("input_linear", 2 * n_out, n_out),
        Proj::Down => ("output_linear", n_out, 0),
    };
    Recipe {
        op: Op::Bank { start, len: n_out },
        sources: vec![(
            layer(l, &format!("block_sparse_moe.{name}.weight")),
            vec![e, rows, n_in],
        )],
    }
}

/// The file tensors of a Hugging Face checkpoint of `family` onto amoe's
/// parameter tree for `cfg` (from [`parse_config`]), read into host memory
/// (tests and small models; loading reads them lazily: [`lazy_params`]).
pub fn params_from_tensors(
    family: Family,
    cfg: &ModelConfig,
    file: &str,
    tensors: Vec<NamedTensor>,
) -> Result<HostParams> {
    let raw = tensors.into_iter().map(RawTensor::from_named).collect();
    lazy_params(family, cfg, file, raw)?.to_host()
}

/// The file tensors of a Hugging Face checkpoint of `family` onto amoe's
/// parameter tree for `cfg` (from [`parse_config`]), each parameter a
/// recipe over them whose values are made when it is uploaded. Every
/// parameter must find its tensors with their shapes and every tensor must
/// be used; the problems (missing, unexpected, repeated or misshapen
/// tensors) are listed together in one error naming `file`. Dropped without
/// a word: `rotary_emb.inv_freq` buffers of old checkpoints (recomputed
/// from the config) and, with a tied head, an `lm_head.weight` equal to the
/// embeddings.
pub fn lazy_params(
    family: Family,
    cfg: &ModelConfig,
    file: &str,
    tensors: Vec<RawTensor>,
) -> Result<LazyParams> {
    if cfg.rope.is_none() || cfg.activation != Activation::SwiGlu {
        return Err(Error::invalid(
            "hf params",
            "the config must have rotary positions and SwiGLU FFNs (use parse_config)",
        ));
    }
    let specs = cfg.param_specs();
    let recipes = specs.map(|id, spec| recipe(family, cfg, id, spec));
    let mut problems = Vec::new();
    let mut kept = Vec::with_capacity(tensors.len());
    let mut head = None;
    for t in tensors {
        if t.name.ends_with(".rotary_emb.inv_freq") {
            continue;
        }
        if cfg.tied && t.name == "lm_head.weight" && head.is_none() {
            head = Some(t);
            continue;
        }
        kept.push(t);
    }
    if let Some(head) = head {
        let same = kept
            .iter()
            .find(|e| e.name == "model.embed_tokens.weight")
            .is_some_and(|e| {
                e.shape == head.shape
                    && if e.dtype == head.dtype {
                        e.bytes() == head.bytes()
                    } else {
                        e.values() == head.values()
                    }
            });
        if !same {
            problems.push(
                "tensor lm_head.weight differs from model.embed_tokens.weight, but \
                 tie_word_embeddings is true"
                    .into(),
            );
        }
    }
    assign_recipes(
        &format!("the {family} config"),
        cfg,
        file,
        kept,
        recipes,
        problems,
    )
}

/// Each parameter made by its recipe over `tensors`: every recipe must
/// find its tensors with their shapes and every tensor must be used; the
/// problems (missing, unexpected, repeated or misshapen tensors, and the
/// caller's `problems`) are listed together in one error naming `file` and
/// `what` the tensors should match.
pub(crate) fn assign_recipes(
    what: &str,
    cfg: &ModelConfig,
    file: &str,
    tensors: Vec<RawTensor>,
    recipes: Params<Recipe>,
    mut problems: Vec<String>,
) -> Result<LazyParams> {
    let specs = cfg.param_specs();
    let mut pool: HashMap<String, RawTensor> = HashMap::with_capacity(tensors.len());
    for t in tensors {
        if pool.contains_key(&t.name) {
            problems.push(format!("tensor {} appears twice", t.name));
            continue;
        }
        pool.insert(t.name.clone(), t);
    }
    let mut used = std::collections::HashSet::new();
    for (_, r) in recipes.iter() {
        for (name, shape) in &r.sources {
            if !used.insert(name.as_str()) {
                // Granite's input_linear feeds w1 and w3: checked once.
                continue;
            }
            match pool.get(name) {
                None => problems.push(format!("missing tensor {name} {shape:?}")),
                Some(t) if t.shape != *shape => problems.push(format!(
                    "tensor {name}: expected shape {shape:?}, found {:?}",
                    t.shape
                )),
                Some(_) => {}
            }
        }
    }
    let mut unexpected: Vec<&RawTensor> = pool
        .values()
        .filter(|t| !used.contains(t.name.as_str()))
        .collect();
    unexpected.sort_by(|a, b| a.name.cmp(&b.name));
    for t in unexpected {
        problems.push(format!("unexpected tensor {} {:?}", t.name, t.shape));
    }
    if !problems.is_empty() {
        return Err(Error::checkpoint(
            file,
            format!(
                "does not match {what} ({} problem(s)): {}",
                problems.len(),
                problems.join("; ")
            ),
        ));
    }
    recipes.try_map(|id, r| {
        let shape = specs
            .get(id)
            .map(|s| s.shape.clone())
            .ok_or_else(|| Error::invalid("hf params", format!("no spec for {id}")))?;
        let sources = r
            .sources
            .iter()
            .map(|(name, _)| {
                pool.get(name)
                    .cloned()
                    .ok_or_else(|| Error::invalid("hf params", format!("{name} is gone")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LazyTensor::new(shape, r.op.clone(), sources))
    })
}

/// The generation settings file of a Hugging Face directory.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// A loaded Hugging Face model.
#[derive(Debug)]
pub struct HfModel {
    pub family: Family,
    pub cfg: ModelConfig,
    /// Read lazily from the files.
    pub params: LazyParams,
    /// Ids that end generation (`eos_token_id`).
    pub eos: Vec<u32>,
    pub bos: Option<u32>,
    pub tokenizer: Tokenizer,
}

/// The small files of a Hugging Face model, each with where it was read
/// (for messages) and its bytes.
pub struct HfFiles<'a> {
    pub config: (&'a str, &'a [u8]),
    pub generation: Option<(&'a str, &'a [u8])>,
    pub tokenizer: (&'a str, &'a [u8]),
}

/// A Hugging Face model from its files (natively a directory, in the page
/// the files a user picked): the config, the special ids, the tokenizer
/// (checked before any weight is read: small, and cheap to report), then
/// `tensors(cfg) -> (where they were read, the tensors)`, mapped onto the
/// tree. Errors name the file and the key or tensor.
pub fn load_hf_parts(
    files: HfFiles,
    tensors: impl FnOnce(&ModelConfig) -> Result<(String, Vec<RawTensor>)>,
) -> Result<HfModel> {
    let (config_source, config_bytes) = files.config;
    let (family, cfg) = parse_config(config_source, config_bytes)?;
    let ids = parse_generation_config(files.config, files.generation)?;
    let ids_source = files.generation.map_or(config_source, |(s, _)| s);
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
    let (tok_source, tok_bytes) = files.tokenizer;
    let tok_json =
        std::str::from_utf8(tok_bytes).map_err(|_| Error::checkpoint(tok_source, "not UTF-8"))?;
    let tokenizer = Tokenizer::from_pretrained_json(tok_json, ids.eos.first().copied())
        .map_err(|e| Error::checkpoint(tok_source, e.to_string()))?;
    if tokenizer.vocab_size() > cfg.vocab {
        return Err(Error::checkpoint(
            tok_source,
            format!(
                "{} tokens, more than the model's vocab_size {} in {config_source}",
                tokenizer.vocab_size(),
                cfg.vocab
            ),
        ));
    }
    let (file, tensors) = tensors(&cfg)?;
    let params = lazy_params(family, &cfg, &file, tensors)?;
    Ok(HfModel {
        family,
        cfg,
        params,
        eos: ids.eos,
        bos: ids.bos,
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (fuzz): a huge layer count is refused before per-layer
    /// lists are sized by it (it ran the allocator out).
    #[test]
    fn a_huge_layer_count_is_refused_first() {
        let mut v: Value = serde_json::from_slice(fixture_config("qwen2_moe")).unwrap();
        v["num_hidden_layers"] = (1u64 << 45).into();
        v["use_sliding_window"] = true.into();
        v["sliding_window"] = 4096.into();
        let m = parse_config("c", v.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("num_hidden_layers") && m.contains("at most"),
            "{m}"
        );
    }
    use crate::model::config::RopeScaling;

    fn fixture_config(name: &str) -> &'static [u8] {
        match name {
            "mixtral" => include_bytes!("../../tests/fixtures/hf/mixtral/config.json"),
            "qwen2_moe" => include_bytes!("../../tests/fixtures/hf/qwen2_moe/config.json"),
            "qwen3_moe" => include_bytes!("../../tests/fixtures/hf/qwen3_moe/config.json"),
            "olmoe" => include_bytes!("../../tests/fixtures/hf/olmoe/config.json"),
            "granitemoe" => include_bytes!("../../tests/fixtures/hf/granitemoe/config.json"),
            "llama" => include_bytes!("../../tests/fixtures/hf/llama/config.json"),
            "mistral" => include_bytes!("../../tests/fixtures/hf/mistral/config.json"),
            "qwen2" => include_bytes!("../../tests/fixtures/hf/qwen2/config.json"),
            "qwen3" => include_bytes!("../../tests/fixtures/hf/qwen3/config.json"),
            _ => unreachable!(),
        }
    }

    fn parse(name: &str) -> ModelConfig {
        let (family, cfg) = parse_config("config.json", fixture_config(name)).unwrap();
        assert_eq!(family.model_type(), name);
        cfg
    }

    /// `config.json` of fixture `name` with `edit` applied, parsed.
    fn parse_edited(name: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ModelConfig> {
        let mut v: Value = serde_json::from_slice(fixture_config(name)).unwrap();
        edit(v.as_object_mut().unwrap());
        parse_config("dir/config.json", &serde_json::to_vec(&v).unwrap()).map(|(_, c)| c)
    }

    fn err_of(name: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let e = parse_edited(name, edit).unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("dir/config.json"), "{msg}");
        msg
    }

    #[test]
    fn fixture_configs_map_onto_their_axes() {
        for f in Family::ALL {
            assert!(is_hf_config(fixture_config(f.model_type())));
            parse(f.model_type()).validate().unwrap();
        }
        assert!(!is_hf_config(
            serde_json::to_string(&ModelConfig::default())
                .unwrap()
                .as_bytes()
        ));

        let c = parse("mixtral");
        assert_eq!((c.heads, c.kv_heads(), c.head_dim()), (4, 2, 24));
        assert_eq!((c.experts, c.ffn, c.sliding_window), (4, 48, Some(8)));
        assert_eq!(c.gate, GateConfig::top_k(2, true, RouterScore::Softmax));
        assert_eq!((c.context, c.max_positions, c.eps), (256, Some(256), 1e-5));
        assert!(!c.tied && !c.qkv_bias && c.activation == Activation::SwiGlu);

        let c = parse("qwen2_moe");
        assert_eq!(
            c.ffn_kinds,
            Some(vec![FfnKind::Dense, FfnKind::Moe, FfnKind::Moe])
        );
        assert_eq!((c.ffn, c.dense_ffn, c.shared_ffn), (32, Some(64), Some(48)));
        assert_eq!(c.gate, GateConfig::top_k(4, false, RouterScore::Softmax));
        assert!(c.qkv_bias && c.sliding_window.is_none());
        assert_eq!(c.ffn_config(0).e, 1);
        assert!(c.shared_config(0).is_none() && c.shared_config(1).is_some());

        let c = parse("qwen3_moe");
        assert_eq!((c.qk_norm, c.head_dim()), (QkNorm::PerHead, 32));
        assert_eq!(c.gate, GateConfig::top_k(8, true, RouterScore::Softmax));
        assert_eq!((c.experts, c.ffn, c.dense_ffn), (16, 32, Some(64)));

        let c = parse("olmoe");
        assert_eq!(c.qk_norm, QkNorm::Whole);
        assert_eq!(c.gate, GateConfig::top_k(4, false, RouterScore::Softmax));

        let c = parse("granitemoe");
        assert_eq!(c.attn_scale, Some(0.125));
        assert_eq!(
            (
                c.embedding_multiplier,
                c.residual_multiplier,
                c.logits_scaling
            ),
            (0.5, 2.0, 2.0)
        );
        assert!(c.tied);
        assert_eq!(c.gate, GateConfig::top_k(8, true, RouterScore::Softmax));

        let c = parse("llama");
        assert_eq!((c.vocab, c.kv_heads(), c.ffn, c.dense), (520, 1, 96, true));
        assert_eq!(
            c.rope.unwrap().scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original: 64
            })
        );
        assert_eq!(parse("mistral").sliding_window, Some(12));
        let c = parse("qwen2");
        assert!(c.qkv_bias && c.tied && c.sliding_window.is_none());
        assert_eq!(parse("qwen3").qk_norm, QkNorm::PerHead);
    }

    #[test]
    fn settings_amoe_cannot_compute_are_refused_by_key() {
        let msg = err_of("olmoe", |c| {
            c.insert("model_type".into(), "deepseek_v3".into());
        });
        assert!(
            msg.contains("\"deepseek_v3\"") && msg.contains("granitemoe"),
            "{msg}"
        );
        let msg = err_of("qwen3", |c| {
            c.insert("hidden_act".into(), "gelu".into());
        });
        assert!(msg.contains("hidden_act: \"gelu\""), "{msg}");
        for (name, key, value) in [
            ("llama", "attention_bias", Value::Bool(true)),
            ("llama", "mlp_bias", Value::Bool(true)),
            ("olmoe", "clip_qkv", 8.0.into()),
            ("qwen3", "partial_rotary_factor", 0.5.into()),
            ("granitemoe", "position_embedding_type", "alibi".into()),
            (
                "mixtral",
                "quantization_config",
                serde_json::json!({"bits": 4}),
            ),
            ("qwen2_moe", "decoder_sparse_step", 0.into()),
        ] {
            let msg = err_of(name, |c| {
                c.insert(key.into(), value);
            });
            assert!(msg.contains(key), "{name} {key}: {msg}");
        }
        // Rope types other than default, linear and llama3; unread keys.
        let msg = err_of("mistral", |c| {
            c.insert(
                "rope_scaling".into(),
                serde_json::json!({"type": "dynamic", "factor": 2.0}),
            );
        });
        assert!(
            msg.contains("rope_scaling") && msg.contains("\"dynamic\""),
            "{msg}"
        );
        let msg = err_of("mistral", |c| {
            c.insert(
                "rope_scaling".into(),
                serde_json::json!({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}),
            );
        });
        assert!(msg.contains("beta_fast"), "{msg}");
        let c = parse_edited("mistral", |c| {
            c.insert(
                "rope_scaling".into(),
                serde_json::json!({"type": "linear", "factor": 2.0}),
            );
        })
        .unwrap();
        assert_eq!(
            c.rope.unwrap().scaling,
            Some(RopeScaling::Linear { factor: 2.0 })
        );
        // A missing or mistyped required key.
        let msg = err_of("qwen2", |c| {
            c.remove("rms_norm_eps");
        });
        assert!(msg.contains("rms_norm_eps: missing"), "{msg}");
        let msg = err_of("qwen2", |c| {
            c.insert("hidden_size".into(), "64".into());
        });
        assert!(msg.contains("hidden_size"), "{msg}");
        // A config that maps to an invalid model (k > E).
        let msg = err_of("mixtral", |c| {
            c.insert("num_experts_per_tok".into(), 5.into());
        });
        assert!(msg.contains("K = 5"), "{msg}");
    }

    #[test]
    fn qwen_windows_cover_every_layer_or_none() {
        // Dense Qwen: layers from max_window_layers on are windowed.
        let on = |c: &mut Map<String, Value>, first: usize| {
            c.insert("use_sliding_window".into(), true.into());
            c.insert("sliding_window".into(), 16.into());
            c.insert("max_window_layers".into(), first.into());
            c.remove("layer_types");
        };
        let c = parse_edited("qwen2", |c| on(c, 0)).unwrap();
        assert_eq!(c.sliding_window, Some(16));
        let c = parse_edited("qwen2", |c| on(c, 2)).unwrap();
        assert_eq!(c.sliding_window, None);
        let msg = err_of("qwen3", |c| on(c, 1));
        assert!(msg.contains("only layers [1] of 2"), "{msg}");
        // Explicit layer types win.
        let msg = err_of("qwen2", |c| {
            on(c, 0);
            c.insert(
                "layer_types".into(),
                serde_json::json!(["sliding_attention", "full_attention"]),
            );
        });
        assert!(msg.contains("only layers [0] of 2"), "{msg}");
        // A window without use_sliding_window is not used.
        let c = parse_edited("qwen2", |c| {
            c.insert("sliding_window".into(), 16.into());
        })
        .unwrap();
        assert_eq!(c.sliding_window, None);
        // MoE Qwen: transformers windows every layer, so only 0 is unambiguous.
        let c = parse_edited("qwen3_moe", |c| on(c, 0)).unwrap();
        assert_eq!(c.sliding_window, Some(16));
        let msg = err_of("qwen2_moe", |c| on(c, 28));
        assert!(msg.contains("max_window_layers"), "{msg}");
    }

    #[test]
    fn special_ids_prefer_the_generation_config() {
        let cfg = br#"{"eos_token_id": 2, "bos_token_id": 1}"#;
        let ids = parse_generation_config(("c", cfg), None).unwrap();
        assert_eq!((ids.eos, ids.bos), (vec![2], Some(1)));
        let gen = br#"{"eos_token_id": [7, 8], "do_sample": true}"#;
        let ids = parse_generation_config(("c", cfg), Some(("g", gen))).unwrap();
        assert_eq!((ids.eos, ids.bos), (vec![7, 8], Some(1)));
        let bad = br#"{"eos_token_id": -1}"#;
        let msg = parse_generation_config(("c", cfg), Some(("g.json", bad)))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("g.json") && msg.contains("eos_token_id"),
            "{msg}"
        );
    }

    /// A tensor whose value at flat index i is `code + i`.
    fn coded(name: &str, shape: &[usize], code: f32) -> NamedTensor {
        let n = shape.iter().product();
        NamedTensor::new(
            name,
            shape.to_vec(),
            (0..n).map(|i| code + i as f32).collect(),
        )
        .unwrap()
    }

    /// Tiny Qwen2-MoE: D 8, H 2, Hkv 1, Dh 4, layer 0 dense (F 3), layer
    /// 1 MoE (E 2, F 2, shared F 3).
    fn tiny_qwen2_moe() -> (ModelConfig, Vec<NamedTensor>) {
        let json = serde_json::json!({
            "model_type": "qwen2_moe", "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 5,
            "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "intermediate_size": 3, "moe_intermediate_size": 2,
            "shared_expert_intermediate_size": 3, "num_experts": 2,
            "num_experts_per_tok": 1, "mlp_only_layers": [0], "decoder_sparse_step": 1
        });
        let (_, cfg) = parse_config("c", json.to_string().as_bytes()).unwrap();
        let mut t = vec![
            coded("model.embed_tokens.weight", &[5, 8], 0.0),
            coded("model.norm.weight", &[8], 0.0),
            coded("lm_head.weight", &[5, 8], 1000.0),
        ];
        for l in 0..2 {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            t.push(coded(&p("input_layernorm.weight"), &[8], 0.0));
            t.push(coded(&p("post_attention_layernorm.weight"), &[8], 0.0));
            t.push(coded(&p("self_attn.q_proj.weight"), &[8, 8], 100.0));
            t.push(coded(&p("self_attn.k_proj.weight"), &[4, 8], 200.0));
            t.push(coded(&p("self_attn.v_proj.weight"), &[4, 8], 300.0));
            t.push(coded(&p("self_attn.q_proj.bias"), &[8], 10.0));
            t.push(coded(&p("self_attn.k_proj.bias"), &[4], 20.0));
            t.push(coded(&p("self_attn.v_proj.bias"), &[4], 30.0));
            t.push(coded(&p("self_attn.o_proj.weight"), &[8, 8], 400.0));
        }
        for (name, shape) in [("gate", [3, 8]), ("up", [3, 8]), ("down", [8, 3])] {
            t.push(coded(
                &format!("model.layers.0.mlp.{name}_proj.weight"),
                &shape,
                500.0,
            ));
            t.push(coded(
                &format!("model.layers.1.mlp.shared_expert.{name}_proj.weight"),
                &shape,
                600.0,
            ));
        }
        t.push(coded("model.layers.1.mlp.gate.weight", &[2, 8], 700.0));
        t.push(coded(
            "model.layers.1.mlp.shared_expert_gate.weight",
            &[1, 8],
            800.0,
        ));
        for e in 0..2 {
            let code = 900.0 + 100.0 * e as f32;
            for (name, shape) in [("gate", [2, 8]), ("up", [2, 8]), ("down", [8, 2])] {
                t.push(coded(
                    &format!("model.layers.1.mlp.experts.{e}.{name}_proj.weight"),
                    &shape,
                    code,
                ));
            }
        }
        (cfg, t)
    }

    #[test]
    fn tensors_are_transposed_and_packed_as_amoe_lays_them_out() {
        let (cfg, t) = tiny_qwen2_moe();
        let p = params_from_tensors(Family::Qwen2Moe, &cfg, "f", t).unwrap();
        p.validate(&cfg).unwrap();
        let b = &p.blocks[1];
        // wqkv [D, 16]: row i = q_proj[:, i], k_proj[:, i], v_proj[:, i].
        let row1: Vec<f32> = b.wqkv.data[16..32].to_vec();
        let q: Vec<f32> = (0..8).map(|o| 101. + 8. * o as f32).collect();
        assert_eq!(row1[..8], q[..]);
        assert_eq!(row1[8..], [201., 209., 217., 225., 301., 309., 317., 325.]);
        let bias: Vec<f32> = (10..18)
            .chain(20..24)
            .chain(30..34)
            .map(|x| x as f32)
            .collect();
        assert_eq!(b.bqkv.as_ref().unwrap().data, bias);
        // wo = o_projᵀ; w_out = lm_headᵀ.
        assert_eq!(b.wo.data[..4], [400., 408., 416., 424.]);
        assert_eq!(
            p.w_out.as_ref().unwrap().data[..5],
            [1000., 1008., 1016., 1024., 1032.]
        );
        // Router [D, E] = gateᵀ; experts [E, D, F] of gate_projᵀ.
        assert_eq!(b.ffn.w_router.data[..4], [700., 708., 701., 709.]);
        assert_eq!(b.ffn.w1.data[..4], [900., 908., 901., 909.]);
        assert_eq!(b.ffn.w1.data[16..18], [1000., 1008.]);
        assert_eq!(b.ffn.w2.data[..4], [900., 902., 904., 906.]);
        let sh = b.shared.as_ref().unwrap();
        let gate: Vec<f32> = (800..808).map(|x| x as f32).collect();
        assert_eq!(sh.w_router.data, gate);
        assert_eq!(sh.w3.as_ref().unwrap().shape, vec![1, 8, 3]);
        // The dense layer: one expert, zero router.
        let d = &p.blocks[0].ffn;
        assert_eq!(d.w_router.data, vec![0.0; 8]);
        assert_eq!(d.w1.data[..3], [500., 508., 516.]);
        assert!(p.blocks[0].shared.is_none());
    }

    #[test]
    fn granite_banks_split_into_gate_and_up() {
        let json = serde_json::json!({
            "model_type": "granitemoe", "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 1, "vocab_size": 3, "max_position_embeddings": 8,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "intermediate_size": 2,
            "num_local_experts": 2, "num_experts_per_tok": 1, "tie_word_embeddings": true
        });
        let (_, cfg) = parse_config("c", json.to_string().as_bytes()).unwrap();
        let p = |s: &str| format!("model.layers.0.{s}");
        let mut t = vec![
            coded("model.embed_tokens.weight", &[3, 4], 0.0),
            coded("model.norm.weight", &[4], 0.0),
            coded(&p("input_layernorm.weight"), &[4], 0.0),
            coded(&p("post_attention_layernorm.weight"), &[4], 0.0),
            coded(&p("self_attn.q_proj.weight"), &[4, 4], 0.0),
            coded(&p("self_attn.k_proj.weight"), &[4, 4], 0.0),
            coded(&p("self_attn.v_proj.weight"), &[4, 4], 0.0),
            coded(&p("self_attn.o_proj.weight"), &[4, 4], 0.0),
            coded(&p("block_sparse_moe.router.layer.weight"), &[2, 4], 0.0),
            // [E 2, 2F 4, D 4] and [E 2, D 4, F 2].
            coded(&p("block_sparse_moe.input_linear.weight"), &[2, 4, 4], 0.0),
            coded(&p("block_sparse_moe.output_linear.weight"), &[2, 4, 2], 0.0),
        ];
        // A tied head may come with an identical lm_head copy.
        t.push(coded("lm_head.weight", &[3, 4], 0.0));
        let params = params_from_tensors(Family::GraniteMoe, &cfg, "f", t.clone()).unwrap();
        let f = &params.blocks[0].ffn;
        // w1[e][i][j] = input[e][j][i] (rows 0..2), w3 rows 2..4.
        assert_eq!(f.w1.data[..4], [0., 4., 1., 5.]);
        assert_eq!(f.w1.data[8..10], [16., 20.]);
        assert_eq!(f.w3.as_ref().unwrap().data[..4], [8., 12., 9., 13.]);
        // w2[e][i][j] = output[e][j][i].
        assert_eq!(f.w2.data[..4], [0., 2., 4., 6.]);
        assert_eq!(f.w2.data[8..12], [8., 10., 12., 14.]);
        assert!(params.w_out.is_none());
        // A different lm_head under a tied config is an error.
        let last = t.len() - 1;
        t[last].data[0] = 99.0;
        let msg = params_from_tensors(Family::GraniteMoe, &cfg, "f", t)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("lm_head.weight differs"), "{msg}");
    }

    #[test]
    fn every_tensor_problem_is_listed_in_one_error() {
        let (cfg, mut t) = tiny_qwen2_moe();
        t.retain(|x| x.name != "model.layers.1.mlp.experts.1.up_proj.weight");
        t.push(coded(
            "model.layers.1.mlp.experts.2.up_proj.weight",
            &[2, 8],
            0.0,
        ));
        t.push(coded("model.norm.weight", &[8], 0.0));
        t.push(coded(
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            &[1],
            0.0,
        ));
        for x in &mut t {
            if x.name == "model.layers.0.self_attn.k_proj.bias" {
                x.shape = vec![1, 4];
            }
        }
        let e =
            params_from_tensors(Family::Qwen2Moe, &cfg, "dir/model.safetensors", t).unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }));
        let msg = e.to_string();
        for want in [
            "dir/model.safetensors",
            "4 problem(s)",
            "missing tensor model.layers.1.mlp.experts.1.up_proj.weight [2, 8]",
            "unexpected tensor model.layers.1.mlp.experts.2.up_proj.weight [2, 8]",
            "tensor model.norm.weight appears twice",
            "tensor model.layers.0.self_attn.k_proj.bias: expected shape [4], found [1, 4]",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
    }
}
