//! An amoe model as a Hugging Face model directory: the inverse of
//! `checkpoint::hf` for the families whose computation equals an amoe model's
//! exactly. Bytes only (wasm-safe) but for [`write_hf_dir`].
//!
//! # Which family
//!
//! - **Mixtral** (`MixtralForCausalLM`): every FFN an MoE of SwiGLU experts,
//!   routed by a softmax over the experts whose top k are renormalized:
//!   amoe's `top2` (k = 2), `top1` with the renormalized one-expert weight
//!   (`--weight renorm`, k = 1) or a fixed top-k with `renorm` (a Mixtral
//!   loaded from a Hugging Face directory). Untied head.
//! - **Llama** (`LlamaForCausalLM`): every FFN dense (SwiGLU), no window;
//!   tied or untied head.
//! - **Mistral** (`MistralForCausalLM`): Llama with a sliding window.
//!
//! All three: rotary positions (scaling none, linear or llama3), GQA and any
//! head width, no q/k/v bias, no QK-norm, no shared expert, the default
//! score scale `1 / sqrt(head_dim)`, multipliers 1. [`family_of`] refuses
//! every other model with one error listing each setting that has no
//! equivalent and what would have one (adaptive gating, Switch's raw top-1
//! weight, learned positions, GELU, MoE layers between dense ones, ...).
//! Training-only settings (balancing and z-loss coefficients, capacity
//! factor) do not change the forward and are not refused; the balancing
//! coefficient is written as `router_aux_loss_coef`.
//!
//! # Tensors
//!
//! amoe's matrices are `[in, out]` (`y = x W`), Hugging Face's Linear
//! weights `[out, in]`: each is transposed. `wqkv [D, (H + 2 Hkv) Dh]`
//! gives `q_proj`, `k_proj`, `v_proj` from its column blocks; expert `e` of
//! `w1 [E, D, F]` / `w3` / `w2 [E, F, D]` gives Mixtral's `w1` (gate), `w3`
//! (up), `w2` (down); the router `[D, E]` gives `block_sparse_moe.gate`
//! `[E, D]`; a dense FFN (one expert) gives `mlp.{gate,up,down}_proj`. A dense
//! FFN's router `[D, 1]` is not written (it never changes the forward: one
//! expert, weight 1; `checkpoint::hf` reads it back as zeros). Values are
//! f32, stored as they are: loaded back with `checkpoint::hf` every other
//! parameter is bit for bit the same.

use super::hf::Family;
use super::{NamedTensor, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE};
use crate::error::{Error, Result};
use crate::kernels::{Activation, GateConfig, Gating, RouterScore, SingleWeight};
use crate::model::config::{FfnKind, ModelConfig, QkNorm, RopeScaling};
use crate::model::params::HostTensor;
use crate::model::transformer::HostParams;
use crate::tokenizer::{Tokenizer, EOT};
use serde_json::{json, Map, Value};

/// `generation_config.json`: the generation defaults (here bos and eos).
pub use super::hf::GENERATION_CONFIG_FILE;
/// `tokenizer_config.json`: the tokenizer class, special tokens, length.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// `special_tokens_map.json`: bos and eos by their text.
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";

/// A model as the files of a Hugging Face directory (see [`HfExport::files`]).
#[derive(Clone, Debug)]
pub struct HfExport {
    pub family: Family,
    pub config: Value,
    pub generation_config: Value,
    pub tokenizer_json: String,
    pub tokenizer_config: Value,
    pub special_tokens_map: Value,
    /// Hugging Face names and shapes, f32.
    pub tensors: Vec<NamedTensor>,
}

impl HfExport {
    /// The class transformers builds (`architectures[0]`).
    pub fn architecture(&self) -> &'static str {
        architecture(self.family)
    }

    /// Every file of the directory, name and bytes: `config.json`,
    /// `generation_config.json`, `model.safetensors`, `tokenizer.json`,
    /// `tokenizer_config.json`, `special_tokens_map.json`. JSON is indented
    /// with 2 spaces, keys sorted, one trailing newline (as transformers
    /// writes it).
    pub fn files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let text = |v: &Value| -> Result<Vec<u8>> {
            let mut s = serde_json::to_string_pretty(v)?;
            s.push('\n');
            Ok(s.into_bytes())
        };
        Ok(vec![
            (CONFIG_FILE, text(&self.config)?),
            (GENERATION_CONFIG_FILE, text(&self.generation_config)?),
            (MODEL_FILE, safetensors_pt_bytes(&self.tensors)?),
            (TOKENIZER_FILE, self.tokenizer_json.clone().into_bytes()),
            (TOKENIZER_CONFIG_FILE, text(&self.tokenizer_config)?),
            (SPECIAL_TOKENS_MAP_FILE, text(&self.special_tokens_map)?),
        ])
    }
}

fn architecture(family: Family) -> &'static str {
    match family {
        Family::Mixtral => "MixtralForCausalLM",
        Family::Llama => "LlamaForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        // family_of never picks another.
        Family::Qwen2Moe => "Qwen2MoeForCausalLM",
        Family::Qwen3Moe => "Qwen3MoeForCausalLM",
        Family::Olmoe => "OlmoeForCausalLM",
        Family::GraniteMoe => "GraniteMoeForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        Family::Qwen3 => "Qwen3ForCausalLM",
    }
}

/// Mixtral's `num_experts_per_tok` for an amoe gate, or why there is none.
fn mixtral_top_k(g: &GateConfig) -> std::result::Result<usize, String> {
    match g.gating {
        Gating::Top2 => Ok(2),
        Gating::Top1 => match g.single_weight {
            SingleWeight::One => Ok(1),
            SingleWeight::RawP1 => Err(
                "top-1 gating weighted by the raw probability p1 (Switch): Mixtral renormalizes \
                 the weights of the chosen experts, so a lone expert weighs 1; a model trained \
                 with --gating top1 --weight renorm, or --gating top2, exports as Mixtral"
                    .into(),
            ),
        },
        Gating::Adaptive => Err(
            "adaptive gating (one or two experts per token by the gap between the top two \
             probabilities) is amoe's own rule: Mixtral routes every token to a fixed number of \
             experts; a model trained with --gating top2 (or top1 --weight renorm) exports as \
             Mixtral"
                .into(),
        ),
        Gating::TopK => {
            if g.score != RouterScore::Softmax {
                Err(format!(
                    "a {} router: Mixtral's router is a softmax over the experts",
                    g.score
                ))
            } else if !g.renorm {
                Err(format!(
                    "top-{} with raw (not renormalized) weights: Mixtral renormalizes the \
                     weights of the chosen experts",
                    g.k
                ))
            } else {
                Ok(g.k)
            }
        }
    }
}

/// The family an amoe model exports as, or one `Error::InvalidArgument`
/// (op `export`) listing every setting with no equivalent there.
pub fn family_of(cfg: &ModelConfig) -> Result<Family> {
    cfg.validate()?;
    let mut no: Vec<String> = Vec::new();
    if cfg.rope.is_none() {
        no.push(
            "learned position embeddings (wpe): Mixtral, Llama and Mistral have rotary \
             positions only; a model trained with rotary positions (`rope` in its config; amoe \
             train has no flag for them yet) exports"
                .into(),
        );
    }
    if cfg.activation != Activation::SwiGlu {
        no.push(format!(
            "{} FFNs: these families' FFNs are SwiGLU (silu(x w1) * (x w3)) w2; train with \
             --activation swiglu",
            cfg.activation
        ));
    }
    if cfg.qkv_bias {
        no.push(
            "q/k/v biases: Mixtral, Llama and Mistral have none (Qwen2's layout has them)".into(),
        );
    }
    if cfg.qk_norm != QkNorm::None {
        no.push(
            "QK-norm: Mixtral, Llama and Mistral have none (Qwen3's and OLMoE's layouts have it)"
                .into(),
        );
    }
    if cfg.shared_ffn.is_some() {
        no.push("a shared expert: Mixtral has none (Qwen2-MoE's layout has one)".into());
    }
    for (name, x) in [
        ("embedding_multiplier", cfg.embedding_multiplier),
        ("residual_multiplier", cfg.residual_multiplier),
        ("logits_scaling", cfg.logits_scaling),
    ] {
        if x != 1.0 {
            no.push(format!(
                "{name} {x}: these families have none (Granite-MoE's layout has it)"
            ));
        }
    }
    if let Some(s) = cfg.attn_scale {
        let default = 1.0 / (cfg.head_dim() as f32).sqrt();
        if s != default {
            no.push(format!(
                "attention score scale {s}: these families scale by 1/sqrt(head_dim) = {default}"
            ));
        }
    }
    let moe = cfg.moe_layers();
    let all_moe = moe.len() == cfg.layers;
    if !moe.is_empty() && !all_moe {
        let dense: Vec<usize> = (0..cfg.layers)
            .filter(|&l| cfg.kind(l) == FfnKind::Dense)
            .collect();
        no.push(format!(
            "MoE layers {moe:?} alternate with dense layers {dense:?} (moe_every {} or per-layer \
             FFN kinds): every Mixtral layer is an MoE, every Llama or Mistral layer dense; a \
             model trained with --moe-every 1 exports as Mixtral, one trained with --gating \
             dense as Llama",
            cfg.moe_every
        ));
    }
    if all_moe {
        if let Err(why) = mixtral_top_k(&cfg.gate) {
            no.push(why);
        }
        if cfg.tied {
            no.push(
                "a head tied to the embeddings with MoE layers: Mixtral checkpoints hold their \
                 own lm_head (only the dense Llama and Mistral layouts export a tied head)"
                    .into(),
            );
        }
    }
    if !no.is_empty() {
        return Err(Error::invalid(
            "export",
            format!(
                "no Hugging Face family amoe writes (Mixtral, Llama, Mistral) computes this \
                 model: {}",
                no.join("; ")
            ),
        ));
    }
    Ok(if all_moe {
        Family::Mixtral
    } else if cfg.sliding_window.is_some() {
        Family::Mistral
    } else {
        Family::Llama
    })
}

/// An f32 as JSON: its shortest decimal (what Python prints for the value
/// transformers read), unless that does not read back as the same f32.
fn num(x: f32) -> Value {
    let short: f64 = x.to_string().parse().unwrap_or(x as f64);
    Value::from(if short as f32 == x { short } else { x as f64 })
}

/// `rope_scaling` as transformers 4.57 writes it (`rope_type` and the
/// type's own keys), or null.
fn rope_scaling_json(s: Option<RopeScaling>) -> Value {
    match s {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({
            "factor": num(factor),
            "rope_type": "linear",
        }),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original,
        }) => json!({
            "factor": num(factor),
            "high_freq_factor": num(high_freq_factor),
            "low_freq_factor": num(low_freq_factor),
            "original_max_position_embeddings": original,
            "rope_type": "llama3",
        }),
    }
}

/// `max_position_embeddings`: the model's own limit, else its context.
fn max_positions(cfg: &ModelConfig) -> usize {
    cfg.max_positions.unwrap_or(cfg.context)
}

/// `config.json` of `family` (from [`family_of`]) for `cfg`: every key the
/// family's config class has in transformers 4.57, with `bos_token_id` and
/// `eos_token_id` = `eos` (amoe's end-of-text token separates documents).
pub fn config_json(family: Family, cfg: &ModelConfig, eos: u32) -> Result<Value> {
    let rope = cfg
        .rope
        .ok_or_else(|| Error::invalid("export", "a model without rotary positions"))?;
    let mut c = Map::new();
    let mut put = |k: &str, v: Value| {
        c.insert(k.to_string(), v);
    };
    put("architectures", json!([architecture(family)]));
    put("model_type", family.model_type().into());
    put("attention_dropout", json!(0.0));
    put("bos_token_id", eos.into());
    put("eos_token_id", eos.into());
    put("dtype", "float32".into());
    // Read by transformers before 4.56 (later ones read `dtype`).
    put("torch_dtype", "float32".into());
    put("head_dim", cfg.head_dim().into());
    put("hidden_act", "silu".into());
    put("hidden_size", cfg.d.into());
    put("initializer_range", json!(0.02));
    put("max_position_embeddings", max_positions(cfg).into());
    put("num_attention_heads", cfg.heads.into());
    put("num_hidden_layers", cfg.layers.into());
    put("num_key_value_heads", cfg.kv_heads().into());
    put("rms_norm_eps", num(cfg.eps));
    put("rope_theta", num(rope.theta));
    put("tie_word_embeddings", cfg.tied.into());
    put("use_cache", true.into());
    put("vocab_size", cfg.vocab.into());
    match family {
        Family::Mixtral => {
            let k = mixtral_top_k(&cfg.gate).map_err(|e| Error::invalid("export", e))?;
            put("intermediate_size", cfg.ffn.into());
            put("num_local_experts", cfg.experts.into());
            put("num_experts_per_tok", k.into());
            put("output_router_logits", false.into());
            put("router_aux_loss_coef", num(cfg.aux.balance));
            put("router_jitter_noise", json!(0.0));
            put("sliding_window", cfg.sliding_window.into());
            // MixtralConfig has no such key; its rotary embedding reads it.
            if rope.scaling.is_some() {
                put("rope_scaling", rope_scaling_json(rope.scaling));
            }
        }
        Family::Llama => {
            put("intermediate_size", cfg.ffn_config(0).f.into());
            put("attention_bias", false.into());
            put("mlp_bias", false.into());
            put("pretraining_tp", 1.into());
            put("rope_scaling", rope_scaling_json(rope.scaling));
        }
        Family::Mistral => {
            put("intermediate_size", cfg.ffn_config(0).f.into());
            put("sliding_window", cfg.sliding_window.into());
            // MistralConfig has no such key; its rotary embedding reads it.
            if rope.scaling.is_some() {
                put("rope_scaling", rope_scaling_json(rope.scaling));
            }
        }
        other => {
            return Err(Error::invalid(
                "export",
                format!("amoe writes mixtral, llama and mistral directories, not {other}"),
            ))
        }
    }
    Ok(Value::Object(c))
}

/// Columns `start..start + len` of a row-major `[rows, width]` matrix,
/// transposed: `[len, rows]` (a Linear weight from amoe's `[in, out]`).
fn columns_t(data: &[f32], rows: usize, width: usize, start: usize, len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len * rows);
    for o in start..start + len {
        out.extend((0..rows).map(|i| data[i * width + o]));
    }
    out
}

/// A Linear weight `[out, in]` from an amoe matrix `[in, out]`.
fn linear(name: String, t: &HostTensor) -> Result<NamedTensor> {
    let (n_in, n_out) = (t.shape[0], t.shape[1]);
    NamedTensor::new(
        name,
        vec![n_out, n_in],
        columns_t(&t.data, n_in, n_out, 0, n_out),
    )
}

/// Expert `e` of a bank `[E, in, out]` as a Linear weight `[out, in]`.
fn expert(name: String, bank: &HostTensor, e: usize) -> Result<NamedTensor> {
    let (n_in, n_out) = (bank.shape[1], bank.shape[2]);
    let m = &bank.data[e * n_in * n_out..(e + 1) * n_in * n_out];
    NamedTensor::new(name, vec![n_out, n_in], columns_t(m, n_in, n_out, 0, n_out))
}

fn copy(name: String, t: &HostTensor) -> Result<NamedTensor> {
    NamedTensor::new(name, t.shape.clone(), t.data.clone())
}

fn layer(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}

/// The family of `cfg` and its parameters under the family's tensor names
/// (`[out, in]` Linear weights, f32).
pub fn export_tensors(cfg: &ModelConfig, p: &HostParams) -> Result<(Family, Vec<NamedTensor>)> {
    let family = family_of(cfg)?;
    p.validate(cfg)?;
    if let Some((id, _)) = p
        .iter()
        .find(|(_, t)| t.data.iter().any(|x| !x.is_finite()))
    {
        return Err(Error::invalid(
            "export",
            format!("parameter {id} holds NaN or infinite values"),
        ));
    }
    let (d, qw) = (cfg.d, cfg.q_width());
    let (kw, width) = (cfg.kv_heads() * cfg.head_dim(), cfg.qkv_width());
    let mut out = vec![copy("model.embed_tokens.weight".into(), &p.wte)?];
    for (l, b) in p.blocks.iter().enumerate() {
        out.push(copy(layer(l, "input_layernorm.weight"), &b.norm1)?);
        for (x, start, len) in [("q", 0, qw), ("k", qw, kw), ("v", qw + kw, kw)] {
            out.push(NamedTensor::new(
                layer(l, &format!("self_attn.{x}_proj.weight")),
                vec![len, d],
                columns_t(&b.wqkv.data, d, width, start, len),
            )?);
        }
        out.push(linear(layer(l, "self_attn.o_proj.weight"), &b.wo)?);
        out.push(copy(layer(l, "post_attention_layernorm.weight"), &b.norm2)?);
        let f = &b.ffn;
        let w3 =
            f.w3.as_ref()
                .ok_or_else(|| Error::invalid("export", format!("layer {l} has no w3")))?;
        match family {
            Family::Mixtral => {
                out.push(linear(
                    layer(l, "block_sparse_moe.gate.weight"),
                    &f.w_router,
                )?);
                for e in 0..f.w1.shape[0] {
                    let name =
                        |w: &str| layer(l, &format!("block_sparse_moe.experts.{e}.{w}.weight"));
                    out.push(expert(name("w1"), &f.w1, e)?);
                    out.push(expert(name("w2"), &f.w2, e)?);
                    out.push(expert(name("w3"), w3, e)?);
                }
            }
            _ => {
                out.push(expert(layer(l, "mlp.gate_proj.weight"), &f.w1, 0)?);
                out.push(expert(layer(l, "mlp.up_proj.weight"), w3, 0)?);
                out.push(expert(layer(l, "mlp.down_proj.weight"), &f.w2, 0)?);
            }
        }
    }
    out.push(copy("model.norm.weight".into(), &p.norm_f)?);
    if let Some(w_out) = &p.w_out {
        out.push(linear("lm_head.weight".into(), w_out)?);
    }
    Ok((family, out))
}

/// `tokenizer_config.json` and `special_tokens_map.json` for amoe's
/// tokenizer under transformers' `PreTrainedTokenizerFast`: its added tokens
/// (from `tokenizer.json`), bos = eos = the end-of-text token, no pad.
fn tokenizer_files(tokenizer: &Tokenizer, max_len: usize) -> Result<(Value, Value)> {
    let tj: Value = serde_json::from_str(&tokenizer.to_json())?;
    let mut added = Map::new();
    for t in tj
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let id = t.get("id").and_then(Value::as_u64).ok_or_else(|| {
            Error::Tokenizer(format!("tokenizer.json: added token without an id: {t}"))
        })?;
        let mut entry = Map::new();
        for key in [
            "content",
            "lstrip",
            "normalized",
            "rstrip",
            "single_word",
            "special",
        ] {
            if let Some(v) = t.get(key) {
                entry.insert(key.into(), v.clone());
            }
        }
        added.insert(id.to_string(), Value::Object(entry));
    }
    let eot = tokenizer
        .id_to_token(tokenizer.eot_id())
        .unwrap_or_else(|| EOT.to_string());
    let config = json!({
        "added_tokens_decoder": added,
        "bos_token": eot,
        "clean_up_tokenization_spaces": false,
        "eos_token": eot,
        "extra_special_tokens": {},
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let map = json!({ "bos_token": eot, "eos_token": eot });
    Ok((config, map))
}

/// The whole directory of `cfg`, `p` and `tokenizer` (see the module docs
/// for which models have one).
pub fn export(cfg: &ModelConfig, p: &HostParams, tokenizer: &Tokenizer) -> Result<HfExport> {
    let (family, tensors) = export_tensors(cfg, p)?;
    if tokenizer.vocab_size() > cfg.vocab {
        return Err(Error::invalid(
            "export",
            format!(
                "the tokenizer has {} tokens, more than the model's vocabulary of {}",
                tokenizer.vocab_size(),
                cfg.vocab
            ),
        ));
    }
    let eos = tokenizer.eot_id();
    let config = config_json(family, cfg, eos)?;
    let generation_config = json!({
        "_from_model_config": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
    });
    let (tokenizer_config, special_tokens_map) = tokenizer_files(tokenizer, max_positions(cfg))?;
    Ok(HfExport {
        family,
        config,
        generation_config,
        tokenizer_json: tokenizer.to_json(),
        tokenizer_config,
        special_tokens_map,
        tensors,
    })
}

/// safetensors bytes of f32 tensors with the header metadata
/// `{"format": "pt"}` that transformers' loader checks for.
pub fn safetensors_pt_bytes(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    super::safetensors_bytes_with(tensors, Some(meta))
}

/// Writes `export` into the directory `out` atomically
/// ([`super::write_dir_atomic`]): `out` must be absent or empty unless
/// `overwrite`.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_hf_dir(out: &std::path::Path, export: &HfExport, overwrite: bool) -> Result<()> {
    super::write_dir_atomic(out, overwrite, "export", |tmp| {
        for (file, bytes) in export.files()? {
            super::write_synced(&tmp.join(file), &bytes)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Rope;

    fn mixtral_cfg() -> ModelConfig {
        ModelConfig {
            vocab: 11,
            d: 8,
            layers: 1,
            heads: 2,
            kv_heads: Some(1),
            head_dim: Some(4),
            context: 6,
            ffn: 3,
            experts: 2,
            activation: Activation::SwiGlu,
            gate: GateConfig::new(Gating::Top2),
            rope: Some(Rope {
                theta: 10000.0,
                scaling: None,
            }),
            ..ModelConfig::default()
        }
    }

    /// Parameters whose value at flat index i is `code(param) + i`.
    fn coded(cfg: &ModelConfig) -> HostParams {
        let mut code = 0.0;
        cfg.param_specs().map(|_, s| {
            code += 1000.0;
            HostTensor {
                shape: s.shape.clone(),
                data: (0..s.numel()).map(|i| code + i as f32).collect(),
            }
        })
    }

    fn get<'a>(t: &'a [NamedTensor], name: &str) -> &'a NamedTensor {
        super::super::find(t, name).unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn matrices_are_transposed_and_split_as_the_loader_packs_them() {
        let cfg = mixtral_cfg();
        let p = coded(&cfg);
        let (family, t) = export_tensors(&cfg, &p).unwrap();
        assert_eq!(family, Family::Mixtral);
        let b = &p.blocks[0];
        // wqkv [8, 16]: q_proj[o][i] = wqkv[i][o]; k from column 8, v from 12.
        let q = get(&t, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(q.shape, vec![8, 8]);
        assert_eq!(
            q.data[..3],
            [b.wqkv.data[0], b.wqkv.data[16], b.wqkv.data[32]]
        );
        let k = get(&t, "model.layers.0.self_attn.k_proj.weight");
        assert_eq!(k.shape, vec![4, 8]);
        assert_eq!(k.data[..2], [b.wqkv.data[8], b.wqkv.data[24]]);
        let v = get(&t, "model.layers.0.self_attn.v_proj.weight");
        assert_eq!(v.data[8], b.wqkv.data[13]);
        // Expert 1's w1 [F 3, D 8] from w1[1] = [8, 3]; w2 [8, 3] from w2[1] = [3, 8].
        let w1 = get(&t, "model.layers.0.block_sparse_moe.experts.1.w1.weight");
        assert_eq!(w1.shape, vec![3, 8]);
        assert_eq!(w1.data[..2], [b.ffn.w1.data[24], b.ffn.w1.data[27]]);
        let w2 = get(&t, "model.layers.0.block_sparse_moe.experts.1.w2.weight");
        assert_eq!(w2.shape, vec![8, 3]);
        assert_eq!(w2.data[..2], [b.ffn.w2.data[24], b.ffn.w2.data[32]]);
        let gate = get(&t, "model.layers.0.block_sparse_moe.gate.weight");
        assert_eq!(
            gate.data[..2],
            [b.ffn.w_router.data[0], b.ffn.w_router.data[2]]
        );
        let head = get(&t, "lm_head.weight");
        assert_eq!(head.shape, vec![11, 8]);
        assert_eq!(head.data[1], p.w_out.as_ref().unwrap().data[11]);
        // The loader reads them back exactly.
        let back = super::super::hf::params_from_tensors(family, &cfg, "f", t).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn numbers_are_written_shortest() {
        // The decimal value, not the f32's binary expansion 9.99999974e-6.
        assert_eq!(num(1e-5).as_f64(), Some(1e-5));
        assert_eq!(num(0.1).as_f64(), Some(0.1));
        assert_eq!(num(10000.0).to_string(), "10000.0");
        for x in [1e-6f32, 3.3e-7, 500000.0, 0.015625, f32::MIN_POSITIVE] {
            assert_eq!(num(x).as_f64().unwrap() as f32, x);
        }
    }
}
