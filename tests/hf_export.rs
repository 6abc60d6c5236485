//! `amoe export --format hf`: amoe models written as Hugging Face
//! directories (Mixtral, Llama, Mistral layouts) read back by amoe's
//! Hugging Face loader with the same config, the same parameters bit for bit
//! and the same CPU logits bit for bit; the fixtures of those three families
//! survive a load-export-load round trip with their own config.json; every
//! model these layouts cannot compute is refused with the setting named. CPU
//! only (no adapter needed).

use amoe::checkpoint::hf::Family;
use amoe::checkpoint::hf_export::{export, family_of, write_hf_dir, HfExport};
use amoe::checkpoint::{load_hf_dir, save, CheckpointData, NamedTensor};
use amoe::infer::InferCheckpoint;
use amoe::kernels::{Activation, GateConfig, Gating, RouterScore, SingleWeight};
use amoe::model::config::{QkNorm, Rope, RopeScaling};
use amoe::model::{BlockParam, FfnKind, HostParams, ModelConfig, ParamId};
use amoe::tokenizer::Tokenizer;
use amoe::Error;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let text = "Shall I compare thee to a summer's day? Thou art more lovely and more \
                    temperate: rough winds do shake the darling buds of May, and summer's \
                    lease hath all too short a date.";
        Tokenizer::train([text].into_iter(), 300).unwrap()
    })
}

/// A fresh directory under the system temp dir, unique to this test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("amoe-hf-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rotary(scaling: Option<RopeScaling>) -> Option<Rope> {
    Some(Rope {
        theta: 10000.0,
        scaling,
    })
}

/// A small SwiGLU rotary model of the tokenizer's vocabulary.
fn base() -> ModelConfig {
    ModelConfig {
        vocab: tokenizer().vocab_size(),
        d: 32,
        layers: 2,
        heads: 4,
        context: 32,
        ffn: 24,
        experts: 4,
        activation: Activation::SwiGlu,
        rope: rotary(None),
        ..ModelConfig::default()
    }
}

/// Mixtral: top-2, GQA 4/2, head_dim 16 != 48 / 4, a window of 5,
/// llama3 rotary scaling whose three bands all hold frequencies.
fn mixtral_top2() -> ModelConfig {
    ModelConfig {
        d: 48,
        kv_heads: Some(2),
        head_dim: Some(16),
        sliding_window: Some(5),
        max_positions: Some(128),
        rope: rotary(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original: 64,
        })),
        gate: GateConfig::new(Gating::Top2),
        ..base()
    }
}

/// Mixtral layout from a fixed top-2 with renormalized weights (MQA,
/// linear scaling, three experts).
fn mixtral_topk() -> ModelConfig {
    ModelConfig {
        kv_heads: Some(1),
        experts: 3,
        rope: rotary(Some(RopeScaling::Linear { factor: 2.0 })),
        gate: GateConfig::top_k(2, true, RouterScore::Softmax),
        ..base()
    }
}

/// Mixtral with one expert per token: top-1 with the renormalized weight 1.
fn mixtral_top1() -> ModelConfig {
    ModelConfig {
        gate: GateConfig {
            gating: Gating::Top1,
            single_weight: SingleWeight::One,
            ..GateConfig::default()
        },
        ffn_kinds: Some(vec![FfnKind::Moe; 2]),
        ..base()
    }
}

/// Llama: every layer dense, a tied head, GQA 4/2.
fn llama_tied() -> ModelConfig {
    ModelConfig {
        dense: true,
        ffn: 40,
        kv_heads: Some(2),
        tied: true,
        ..base()
    }
}

/// Mistral: dense layers (per-layer kinds with their own width), a window
/// of 4, head_dim 12 != 32 / 4.
fn mistral_window() -> ModelConfig {
    ModelConfig {
        ffn_kinds: Some(vec![FfnKind::Dense; 2]),
        dense_ffn: Some(36),
        sliding_window: Some(4),
        head_dim: Some(12),
        ..base()
    }
}

/// Random parameters: the seeded init with every RMSNorm gain redrawn (a
/// swapped gain must change the logits).
fn params(cfg: &ModelConfig, seed: u64) -> HostParams {
    let mut p = HostParams::init(cfg, seed);
    let mut rng = amoe::util::Rng::new(seed ^ 0x5eed);
    for (id, t) in p.iter_mut() {
        if matches!(
            id,
            ParamId::NormF | ParamId::Block(_, BlockParam::Norm1 | BlockParam::Norm2)
        ) {
            for x in &mut t.data {
                *x = 1.0 + rng.sym(0.3);
            }
        }
    }
    p
}

/// The model saved as `amoe train` saves its run's checkpoint
/// (`<run>/checkpoint`): amoe's tensor names, the ModelConfig as
/// config.json, the tokenizer, a state naming the validation gating.
fn save_run(run: &Path, cfg: &ModelConfig, p: &HostParams) {
    let model: Vec<NamedTensor> = p
        .iter()
        .map(|(id, t)| NamedTensor::new(id.name(), t.shape.clone(), t.data.clone()).unwrap())
        .collect();
    save(
        run.join("checkpoint"),
        &CheckpointData {
            model: &model,
            optimizer: &[],
            config: cfg,
            tokenizer_json: &tokenizer().to_json(),
            state: &serde_json::json!({"step": 2, "train": {"eval_gating": "top1"}}),
        },
    )
    .unwrap();
}

/// (k, renormalized, score) of the experts a gate runs per token.
fn routing(g: &GateConfig) -> (usize, bool, RouterScore) {
    match (g.gating, g.single_weight) {
        (Gating::Top2, _) => (2, true, RouterScore::Softmax),
        (Gating::Top1, SingleWeight::One) => (1, true, RouterScore::Softmax),
        (Gating::Top1, SingleWeight::RawP1) => (1, false, RouterScore::Softmax),
        (Gating::TopK, _) => (g.k, g.renorm, g.score),
        (Gating::Adaptive, _) => panic!("adaptive gating is never exported"),
    }
}

/// (a) The loaded config equals the original on every field that changes
/// the forward; its context is the loader's default for the written
/// `max_position_embeddings` (the original's limit, else its context).
fn assert_same_computation(a: &ModelConfig, b: &ModelConfig) {
    let sizes = |c: &ModelConfig| (c.vocab, c.d, c.layers, c.heads, c.kv_heads(), c.head_dim());
    assert_eq!(sizes(a), sizes(b));
    assert_eq!(a.activation, b.activation);
    assert_eq!(a.eps.to_bits(), b.eps.to_bits());
    assert_eq!(a.rope, b.rope);
    assert_eq!(a.sliding_window, b.sliding_window);
    assert_eq!(a.attn_scale().to_bits(), b.attn_scale().to_bits());
    assert_eq!(
        (a.qkv_bias, a.qk_norm, a.tied, a.shared_ffn),
        (b.qkv_bias, b.qk_norm, b.tied, b.shared_ffn)
    );
    let mult = |c: &ModelConfig| {
        [
            c.embedding_multiplier,
            c.residual_multiplier,
            c.logits_scaling,
        ]
    };
    assert_eq!(mult(a), mult(b));
    for l in 0..a.layers {
        assert_eq!(a.kind(l), b.kind(l), "layer {l}");
        let (fa, fb) = (a.ffn_config(l), b.ffn_config(l));
        assert_eq!(
            (fa.d, fa.f, fa.e, fa.activation),
            (fb.d, fb.f, fb.e, fb.activation),
            "layer {l}"
        );
        assert_eq!(routing(&fa.gate), routing(&fb.gate), "layer {l}");
        assert!(b.shared_config(l).is_none());
    }
    let max = a.max_positions.unwrap_or(a.context);
    assert_eq!(b.max_positions, Some(max));
    assert_eq!(
        b.context,
        max.min(amoe::checkpoint::hf::DEFAULT_CONTEXT_CAP)
    );
}

/// (b) Every parameter bit for bit, but a dense FFN's router: Hugging Face
/// has none (one expert, weight 1), so it reads back as zeros.
fn assert_same_params(cfg: &ModelConfig, a: &HostParams, b: &HostParams) {
    assert_eq!(a.len(), b.len());
    for ((ia, ta), (ib, tb)) in a.iter().zip(b.iter()) {
        assert_eq!(ia, ib);
        assert_eq!(ta.shape, tb.shape, "{ia}");
        if let ParamId::Block(l, BlockParam::Router) = ia {
            if cfg.kind(l) == FfnKind::Dense {
                assert!(tb.data.iter().all(|&x| x == 0.0), "{ia}");
                continue;
            }
        }
        let bits =
            |t: &amoe::model::HostTensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(ta) == bits(tb), "{ia} differs after the round trip");
    }
}

/// Token ids longer than any window here, within the context.
fn prompt(cfg: &ModelConfig) -> Vec<u32> {
    let mut ids = tokenizer()
        .encode("Rough winds do shake the darling buds")
        .unwrap();
    ids.extend((0..12u32).map(|i| (i * 37 + 5) % cfg.vocab as u32));
    ids.truncate(cfg.context.min(24));
    ids
}

/// (c) amoe's CPU forward of both, bit for bit.
fn assert_same_logits(a: (&ModelConfig, &HostParams), b: (&ModelConfig, &HostParams)) {
    let ids = prompt(a.0);
    let la = amoe::model::cpu::logits(a.0, a.1, &ids).unwrap();
    let lb = amoe::model::cpu::logits(b.0, b.1, &ids).unwrap();
    assert_eq!(la.len(), ids.len() * a.0.vocab);
    let same = la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same && la.len() == lb.len(), "logits differ");
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// The files besides the weights look like the fixtures': every key of the
/// family's fixture config.json (transformers 4.57's), the same tokenizer
/// files, bos = eos = end-of-text, f32 tensors with `format: pt`.
fn check_files(dir: &Path, family: Family, cfg: &ModelConfig) {
    let config = read_json(&dir.join("config.json"));
    let fx = read_json(&fixture(family.model_type()).join("config.json"));
    for key in fx.as_object().unwrap().keys() {
        if key != "transformers_version" {
            assert!(
                config.get(key).is_some(),
                "{family}: config.json lacks {key}"
            );
        }
    }
    assert_eq!(config["model_type"], family.model_type());
    assert_eq!(config["dtype"], "float32");
    let eot = tokenizer().eot_id();
    assert_eq!(
        (
            config["bos_token_id"].as_u64(),
            config["eos_token_id"].as_u64()
        ),
        (Some(eot as u64), Some(eot as u64))
    );
    let gen = read_json(&dir.join("generation_config.json"));
    assert_eq!(gen["eos_token_id"].as_u64(), Some(eot as u64));
    let mut tc = read_json(&dir.join("tokenizer_config.json"));
    assert_eq!(
        tc["model_max_length"].as_u64(),
        Some(cfg.max_positions.unwrap_or(cfg.context) as u64)
    );
    let mut fx_tc = read_json(&fixture("mixtral").join("tokenizer_config.json"));
    tc["model_max_length"] = Value::Null;
    fx_tc["model_max_length"] = Value::Null;
    assert_eq!(tc, fx_tc, "tokenizer_config.json");
    assert_eq!(
        read_json(&dir.join("special_tokens_map.json")),
        read_json(&fixture("mixtral").join("special_tokens_map.json"))
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(),
        tokenizer().to_json()
    );
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    }
    let shape = |name: &str| st.tensor(name).ok().map(|v| v.shape().to_vec());
    let (d, f) = (cfg.d, cfg.ffn_config(0).f);
    match family {
        Family::Mixtral => {
            let e = cfg.experts - 1;
            let w = |x: &str| format!("model.layers.1.block_sparse_moe.experts.{e}.{x}.weight");
            assert_eq!(shape(&w("w1")), Some(vec![f, d]));
            assert_eq!(shape(&w("w3")), Some(vec![f, d]));
            assert_eq!(shape(&w("w2")), Some(vec![d, f]));
            assert_eq!(
                shape("model.layers.0.block_sparse_moe.gate.weight"),
                Some(vec![cfg.experts, d])
            );
            assert!(shape("model.layers.0.mlp.gate_proj.weight").is_none());
        }
        _ => {
            assert_eq!(shape("model.layers.1.mlp.up_proj.weight"), Some(vec![f, d]));
            assert_eq!(
                shape("model.layers.1.mlp.down_proj.weight"),
                Some(vec![d, f])
            );
        }
    }
    assert_eq!(
        shape("model.layers.0.self_attn.k_proj.weight"),
        Some(vec![cfg.kv_heads() * cfg.head_dim(), d])
    );
    assert_eq!(shape("lm_head.weight").is_some(), !cfg.tied);
    assert_eq!(config["tie_word_embeddings"], cfg.tied);
}

/// Save, load as `amoe export` does, export, load the export with the
/// Hugging Face loader, compare (a), (b), (c); then the files themselves.
fn round_trip(name: &str, cfg: ModelConfig, family: Family) -> Value {
    cfg.validate().unwrap();
    let p = params(&cfg, 7);
    let run = scratch(name);
    save_run(&run, &cfg, &p);
    let ck = InferCheckpoint::load(&run).unwrap();
    assert_eq!((&ck.cfg, &ck.host().unwrap()), (&cfg, &p));
    let hf: HfExport = export(&ck.cfg, &ck.host().unwrap(), &ck.tokenizer).unwrap();
    assert_eq!(hf.family, family);
    let out = run.join("hf");
    write_hf_dir(&out, &hf, false).unwrap();

    let m = load_hf_dir(&out).unwrap();
    assert_eq!(m.family, family);
    assert_same_computation(&cfg, &m.cfg);
    assert_same_params(&cfg, &p, &m.params.to_host().unwrap());
    assert_same_logits((&cfg, &p), (&m.cfg, &m.params.to_host().unwrap()));
    let eot = tokenizer().eot_id();
    assert_eq!((m.eos.as_slice(), m.bos), ([eot].as_slice(), Some(eot)));
    assert_eq!(m.tokenizer.to_json(), tokenizer().to_json());
    check_files(&out, family, &cfg);

    // The engine's loader takes it as a Hugging Face model, with its top-k.
    let back = InferCheckpoint::load(&out).unwrap();
    assert_eq!(back.model_type.as_deref(), Some(family.model_type()));
    assert_eq!(back.stop_ids, vec![eot]);
    let config = read_json(&out.join("config.json"));
    std::fs::remove_dir_all(&run).unwrap();
    config
}

#[test]
fn mixtral_top2_with_gqa_head_dim_window_and_llama3_rope() {
    let c = round_trip("top2", mixtral_top2(), Family::Mixtral);
    assert_eq!(c["num_experts_per_tok"], 2);
    assert_eq!(c["num_local_experts"], 4);
    assert_eq!(
        (
            c["num_attention_heads"].as_u64(),
            c["num_key_value_heads"].as_u64()
        ),
        (Some(4), Some(2))
    );
    assert_eq!(c["head_dim"], 16);
    assert_eq!(c["sliding_window"], 5);
    assert_eq!(c["max_position_embeddings"], 128);
    assert_eq!(
        c["rope_scaling"],
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    );
    assert_eq!(
        c["architectures"],
        serde_json::json!(["MixtralForCausalLM"])
    );
}

#[test]
fn mixtral_from_a_renormalized_top_k() {
    let c = round_trip("topk", mixtral_topk(), Family::Mixtral);
    assert_eq!(
        (
            c["num_experts_per_tok"].as_u64(),
            c["num_local_experts"].as_u64()
        ),
        (Some(2), Some(3))
    );
    assert_eq!(c["sliding_window"], Value::Null);
    assert_eq!(
        c["rope_scaling"],
        serde_json::json!({"rope_type": "linear", "factor": 2.0})
    );
    // max_position_embeddings: the context when the model names no limit.
    assert_eq!(c["max_position_embeddings"], 32);
}

#[test]
fn mixtral_top1_with_the_renormalized_weight() {
    let c = round_trip("top1", mixtral_top1(), Family::Mixtral);
    assert_eq!(c["num_experts_per_tok"], 1);
    assert!(c.get("rope_scaling").is_none());
}

#[test]
fn llama_dense_with_a_tied_head() {
    let c = round_trip("llama", llama_tied(), Family::Llama);
    assert_eq!(
        (
            c["intermediate_size"].as_u64(),
            c["tie_word_embeddings"].as_bool()
        ),
        (Some(40), Some(true))
    );
    assert_eq!(c["rope_scaling"], Value::Null);
    assert!(c.get("sliding_window").is_none() && c.get("num_local_experts").is_none());
}

#[test]
fn mistral_dense_with_a_window() {
    let c = round_trip("mistral", mistral_window(), Family::Mistral);
    assert_eq!(
        (
            c["sliding_window"].as_u64(),
            c["intermediate_size"].as_u64()
        ),
        (Some(4), Some(36))
    );
    assert_eq!(c["head_dim"], 12);
    assert_eq!(
        c["architectures"],
        serde_json::json!(["MistralForCausalLM"])
    );
}

/// The three families' fixtures (bf16 and f16 weights, a vocabulary wider
/// than the tokenizer) load, export and load again unchanged, and the
/// written config.json is the fixture's own but for the dtype, the version
/// stamp and the balancing coefficient (which amoe's loader does not keep).
#[test]
fn fixtures_of_the_three_families_survive_a_round_trip() {
    for family in [Family::Mixtral, Family::Llama, Family::Mistral] {
        let a = load_hf_dir(&fixture(family.model_type())).unwrap();
        let hf = export(&a.cfg, &a.params.to_host().unwrap(), &a.tokenizer).unwrap();
        assert_eq!(hf.family, family);
        let out = scratch(family.model_type());
        write_hf_dir(&out, &hf, true).unwrap();
        let b = load_hf_dir(&out).unwrap();
        assert_eq!(b.cfg, a.cfg, "{family}");
        assert!(
            b.params.to_host().unwrap() == a.params.to_host().unwrap(),
            "{family}: parameters differ"
        );
        assert_eq!((b.eos, b.bos), (a.eos, a.bos));

        let mut ours = read_json(&out.join("config.json"));
        let mut theirs = read_json(&fixture(family.model_type()).join("config.json"));
        for c in [&mut ours, &mut theirs] {
            let c = c.as_object_mut().unwrap();
            for key in [
                "dtype",
                "torch_dtype",
                "transformers_version",
                "router_aux_loss_coef",
            ] {
                c.remove(key);
            }
        }
        assert_eq!(ours, theirs, "{family}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// The message of a refused export (an `Error::InvalidArgument` of `export`).
fn refusal(cfg: &ModelConfig) -> String {
    cfg.validate().unwrap();
    let e = family_of(cfg).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { op: "export", .. }),
        "{e:?}"
    );
    let p = params(cfg, 1);
    assert!(matches!(
        export(cfg, &p, tokenizer()),
        Err(Error::InvalidArgument { op: "export", .. })
    ));
    e.to_string()
}

fn assert_names(msg: &str, want: &[&str]) {
    for w in want {
        assert!(msg.contains(w), "{w:?} not in: {msg}");
    }
}

#[test]
fn models_without_an_equivalent_are_refused_naming_the_setting() {
    let adaptive = ModelConfig {
        gate: GateConfig::new(Gating::Adaptive),
        ..base()
    };
    assert_names(
        &refusal(&adaptive),
        &["adaptive gating", "amoe's own rule", "--gating top2"],
    );
    let raw_top1 = ModelConfig {
        gate: GateConfig::new(Gating::Top1),
        ..base()
    };
    assert_names(
        &refusal(&raw_top1),
        &["raw probability p1", "--weight renorm"],
    );
    let learned = ModelConfig {
        rope: None,
        ..mixtral_top2()
    };
    assert_names(
        &refusal(&learned),
        &["learned position embeddings (wpe)", "rotary"],
    );
    let gelu = ModelConfig {
        activation: Activation::Gelu,
        ..mixtral_top2()
    };
    assert_names(
        &refusal(&gelu),
        &["gelu FFNs", "SwiGLU", "--activation swiglu"],
    );
    let every2 = ModelConfig {
        moe_every: 2,
        ..mixtral_top2()
    };
    assert_names(
        &refusal(&every2),
        &[
            "MoE layers [1] alternate with dense layers [0]",
            "moe_every 2",
            "--moe-every 1",
        ],
    );
    let kinds = ModelConfig {
        ffn_kinds: Some(vec![FfnKind::Moe, FfnKind::Dense]),
        ..mixtral_top2()
    };
    assert_names(
        &refusal(&kinds),
        &["MoE layers [0] alternate with dense layers [1]"],
    );
    let raw_topk = ModelConfig {
        gate: GateConfig::top_k(2, false, RouterScore::Softmax),
        ..base()
    };
    assert_names(
        &refusal(&raw_topk),
        &["top-2 with raw (not renormalized) weights"],
    );
    let sigmoid = ModelConfig {
        gate: GateConfig::top_k(2, true, RouterScore::Sigmoid),
        ..base()
    };
    assert_names(&refusal(&sigmoid), &["sigmoid router"]);
    let tied_moe = ModelConfig {
        tied: true,
        ..mixtral_top2()
    };
    assert_names(&refusal(&tied_moe), &["tied to the embeddings"]);
    let scale = ModelConfig {
        attn_scale: Some(0.5),
        ..llama_tied()
    };
    assert_names(&refusal(&scale), &["attention score scale 0.5"]);
    // Several at once: one error lists them all.
    let many = ModelConfig {
        qkv_bias: true,
        qk_norm: QkNorm::PerHead,
        shared_ffn: Some(8),
        residual_multiplier: 2.0,
        rope: None,
        ..mixtral_top2()
    };
    assert_names(
        &refusal(&many),
        &[
            "q/k/v biases",
            "QK-norm",
            "a shared expert",
            "residual_multiplier 2",
            "wpe",
        ],
    );
    // A window-less default (exact 1/sqrt(head_dim) spelled out) is fine.
    let spelled = ModelConfig {
        attn_scale: Some(1.0 / (8f32).sqrt()),
        ..llama_tied()
    };
    assert_eq!(family_of(&spelled).unwrap(), Family::Llama);
}

/// The other six fixtures are refused, each for what its family adds.
#[test]
fn the_other_families_fixtures_are_refused_by_their_axes() {
    for (name, want) in [
        (
            "qwen2_moe",
            &[
                "q/k/v biases",
                "a shared expert",
                "alternate with dense layers",
            ][..],
        ),
        ("qwen3_moe", &["QK-norm", "alternate with dense layers"]),
        ("olmoe", &["QK-norm", "raw (not renormalized) weights"]),
        (
            "granitemoe",
            &[
                "embedding_multiplier 0.5",
                "attention score scale 0.125",
                "tied",
            ],
        ),
        ("qwen2", &["q/k/v biases"]),
        ("qwen3", &["QK-norm"]),
    ] {
        let m = load_hf_dir(&fixture(name)).unwrap();
        let msg = family_of(&m.cfg).unwrap_err().to_string();
        assert_names(&msg, want);
    }
}

#[test]
fn a_non_empty_out_needs_overwrite_and_is_replaced_whole() {
    let cfg = llama_tied();
    let hf = export(&cfg, &params(&cfg, 3), tokenizer()).unwrap();
    let dir = scratch("overwrite");
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    // An empty directory is taken as it is.
    write_hf_dir(&out, &hf, false).unwrap();
    std::fs::write(out.join("stale.bin"), b"old").unwrap();
    let e = write_hf_dir(&out, &hf, false).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { op: "export", .. }));
    assert_names(&e.to_string(), &["not empty", "--overwrite"]);
    assert!(out.join("stale.bin").exists());
    write_hf_dir(&out, &hf, true).unwrap();
    assert!(!out.join("stale.bin").exists());
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    // No temp or old sibling is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1);
    // A file in the way is an error, not replaced.
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(write_hf_dir(&file, &hf, true).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn amoe_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amoe"))
        .args(args)
        .output()
        .expect("the amoe binary runs")
}

/// The command on a run directory as `amoe train` leaves it (`<run>/checkpoint`).
#[test]
fn cli_exports_a_run_directory() {
    let cfg = mixtral_top2();
    let p = params(&cfg, 5);
    let dir = scratch("cli");
    let run = dir.join("run");
    save_run(&run, &cfg, &p);
    let out = dir.join("hf");
    let (run_s, out_s) = (run.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "export",
        "--format",
        "hf",
        "--checkpoint",
        run_s,
        "--out",
        out_s,
    ];
    let r = amoe_cli(&args);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_names(&stdout, &["mixtral", "MixtralForCausalLM", "top-2"]);
    let m = load_hf_dir(&out).unwrap();
    assert_same_logits((&cfg, &p), (&m.cfg, &m.params.to_host().unwrap()));

    // Again: refused without --overwrite, done with it.
    let r = amoe_cli(&args);
    assert_eq!(r.status.code(), Some(2));
    assert_names(
        &String::from_utf8_lossy(&r.stderr),
        &["not empty", "--overwrite"],
    );
    let mut again = args.to_vec();
    again.push("--overwrite");
    assert!(amoe_cli(&again).status.success());

    // Never over the checkpoint it reads.
    let r = amoe_cli(&[
        "export",
        "--format",
        "hf",
        "--checkpoint",
        run_s,
        "--out",
        run_s,
        "--overwrite",
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert_names(
        &String::from_utf8_lossy(&r.stderr),
        &["holds the checkpoint"],
    );
    assert!(run.join("checkpoint/model.safetensors").exists());

    // A model with no equivalent: exit 2, the setting named, nothing written.
    let gelu = ModelConfig {
        activation: Activation::Gelu,
        rope: None,
        ..mixtral_top2()
    };
    let run2 = dir.join("run2");
    save_run(&run2, &gelu, &params(&gelu, 5));
    let out2 = dir.join("hf2");
    let r = amoe_cli(&[
        "export",
        "--format",
        "hf",
        "--checkpoint",
        run2.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_names(&err, &["learned position embeddings", "gelu FFNs"]);
    assert!(!err.contains("panicked") && !out2.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With `AMOE_EXPORT_SAMPLES=DIR`: the five layouts above exported into
/// `DIR/<name>/`, each beside `DIR/<name>.amoe.json` holding the prompt ids
/// and amoe's CPU logits, for the reference library to check by hand
/// (`scripts/make_fixtures.py --check-export DIR/<name> --against
/// DIR/<name>.amoe.json`, see tests/fixtures/hf/README.md). Without it,
/// nothing is written.
#[test]
fn sample_exports_for_the_reference_library() {
    let Some(root) = std::env::var_os("AMOE_EXPORT_SAMPLES").map(PathBuf::from) else {
        return;
    };
    for (name, cfg) in [
        ("mixtral_top2", mixtral_top2()),
        ("mixtral_topk", mixtral_topk()),
        ("mixtral_top1", mixtral_top1()),
        ("llama_tied", llama_tied()),
        ("mistral_window", mistral_window()),
    ] {
        let p = params(&cfg, 7);
        let hf = export(&cfg, &p, tokenizer()).unwrap();
        write_hf_dir(&root.join(name), &hf, true).unwrap();
        let ids = prompt(&cfg);
        let logits = amoe::model::cpu::logits(&cfg, &p, &ids).unwrap();
        let rows: Vec<&[f32]> = logits.chunks(cfg.vocab).collect();
        let json = serde_json::json!({"input_ids": ids, "logits": rows});
        std::fs::write(root.join(format!("{name}.amoe.json")), json.to_string()).unwrap();
        println!("wrote {}", root.join(name).display());
    }
}
