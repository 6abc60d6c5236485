//! `amoe info`: what a checkpoint is (architecture, parameters in total and
//! active per token) and what it will take on the chosen adapter, before
//! anything is uploaded to it.

use super::args::{AdapterArgs, ModelPick};
use super::context;
use amoe::model::config::{GpuBytes, ParamCounts};
use amoe::Result;
use serde::Serialize;
use std::process::ExitCode;

#[derive(clap::Args, Clone, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelPick,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Info {
    checkpoint: String,
    /// A Hugging Face model's `model_type`; None for amoe's own.
    model_type: Option<String>,
    layers: usize,
    moe_layers: Vec<usize>,
    d: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    context: usize,
    vocab: usize,
    positions: String,
    /// Where the model differs from amoe's own layout.
    axes: Vec<String>,
    experts: usize,
    ffn: usize,
    /// Hidden width of the dense FFN layers.
    dense_ffn: usize,
    activation: String,
    gating: String,
    /// The adaptive rule's threshold (adaptive gating only).
    threshold: Option<f32>,
    /// Experts one token runs in an MoE layer, fewest and most.
    experts_per_token: [usize; 2],
    params: ParamCounts,
    /// How the matmul weights would be stored (`--dtype`).
    dtype: String,
    /// How the expert banks would be stored (`--dtype`, or
    /// `--quantize-on-load`).
    experts_dtype: String,
    /// How the attention projections and an untied unembedding would be
    /// stored (`--dtype`, or `--quantize-on-load` with `--quantize all`).
    projections_dtype: String,
    #[serde(skip)]
    storage: amoe::model::Storage,
    /// In that storage.
    bytes: GpuBytes,
    /// The same in each storage a user can pick, and whether it fits.
    formats: Vec<Format>,
    adapter: String,
    /// The adapter's largest storage binding (and buffer).
    binding_limit: u64,
    /// Tensors larger than one binding, split into this many parts.
    split: Vec<(String, usize)>,
    /// Every tensor, or each part of a split one, fits one binding.
    fits: bool,
    /// Why not, when it does not.
    too_large: Option<String>,
}

/// What the model takes in one storage.
#[derive(Serialize)]
struct Format {
    /// The flags that pick it.
    flags: String,
    dtype: String,
    experts_dtype: String,
    projections_dtype: String,
    params: u64,
    experts: u64,
    /// Parameters and KV cache.
    total: u64,
    fits: bool,
}

pub fn run(adapter: &AdapterArgs, args: &InfoArgs) -> Result<ExitCode> {
    let ck = args.model.load()?;
    let gate = args.model.gates(&ck, args.model.gating)?.gate;
    let cfg = &ck.cfg;
    let (min_k, max_k) = (gate.min_k(), gate.max_k());
    let ctx = context(adapter)?;
    let limit = ctx
        .limits
        .max_storage_buffer_binding_size
        .min(ctx.limits.max_buffer_size);
    let storage = ck.weights.resolve_storage(args.model.storage());
    let bytes = cfg.gpu_bytes(storage);
    // Weights past the split size (the binding limit, or AMOE_SPLIT_BYTES)
    // go in parts.
    let plan = cfg.split_plan(storage, ctx.split_bytes(), limit);
    let formats = {
        use amoe::gpu::Dtype;
        use amoe::model::Storage;
        let (f32, f16, q8, q4) = (Dtype::F32, Dtype::F16, Dtype::Q8, Dtype::Q4);
        [
            ("--dtype f32", f32, f32, f32),
            ("--dtype f16", f16, f16, f16),
            ("--dtype f16 --quantize-on-load q8", f16, q8, f16),
            ("--dtype f16 --quantize-on-load q4", f16, q4, f16),
            (
                "--dtype f16 --quantize-on-load q8 --quantize all",
                f16,
                q8,
                q8,
            ),
            (
                "--dtype f16 --quantize-on-load q4 --quantize all",
                f16,
                q4,
                q4,
            ),
        ]
        .into_iter()
        .map(|(flags, matmul, experts, projections)| {
            let s = Storage {
                matmul,
                experts,
                projections,
            };
            let b = cfg.gpu_bytes(s);
            Format {
                flags: flags.into(),
                dtype: matmul.to_string(),
                experts_dtype: experts.to_string(),
                projections_dtype: projections.to_string(),
                params: b.params,
                experts: b.parts.experts,
                total: b.params + b.kv_cache,
                fits: cfg.split_plan(s, ctx.split_bytes(), limit).is_ok(),
            }
        })
        .collect()
    };
    let info = Info {
        checkpoint: ck.source.clone(),
        model_type: ck.model_type.clone(),
        layers: cfg.layers,
        moe_layers: cfg.moe_layers(),
        d: cfg.d,
        heads: cfg.heads,
        kv_heads: cfg.kv_heads(),
        head_dim: cfg.head_dim(),
        context: cfg.context,
        vocab: cfg.vocab,
        positions: cfg.positions(),
        axes: cfg.axes(),
        experts: cfg.experts,
        ffn: cfg.ffn,
        dense_ffn: cfg.dense_ffn.unwrap_or(cfg.ffn),
        activation: cfg.activation.to_string(),
        gating: match gate.gating {
            amoe::kernels::Gating::TopK => format!(
                "top-{} ({}, {})",
                gate.k,
                gate.score,
                if gate.renorm {
                    "renormalized"
                } else {
                    "raw weights"
                }
            ),
            g => g.to_string(),
        },
        threshold: (gate.gating == amoe::kernels::Gating::Adaptive).then_some(gate.threshold),
        experts_per_token: [min_k, max_k],
        params: cfg.param_counts(min_k, max_k),
        fits: plan.is_ok(),
        split: plan.clone().unwrap_or_default(),
        too_large: plan
            .err()
            .map(|(name, b)| format!("{name}: {} in one piece", mib(b))),
        dtype: storage.matmul.to_string(),
        experts_dtype: storage.experts.to_string(),
        projections_dtype: storage.projections.to_string(),
        storage,
        bytes,
        formats,
        adapter: format!("{}/{}", ctx.backend(), ctx.info.name),
        binding_limit: limit,
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&info)?)?;
    } else {
        out!("{}", text(&info))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

fn count(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else {
        n.to_string()
    }
}

fn text(i: &Info) -> String {
    let p = &i.params;
    let b = &i.bytes;
    let experts = match i.experts_per_token {
        [a, b] if a == b => format!("{a}"),
        [a, b] => format!("{a} to {b}"),
    };
    let active = if p.active_min == p.active_max {
        count(p.active_min)
    } else {
        format!("{} to {}", count(p.active_min), count(p.active_max))
    };
    let family = i
        .model_type
        .as_ref()
        .map_or(String::new(), |m| format!(" (Hugging Face {m})"));
    let heads = if i.kv_heads == i.heads {
        format!("{} heads of {}", i.heads, i.head_dim)
    } else {
        format!(
            "{} query / {} key-value heads of {}",
            i.heads, i.kv_heads, i.head_dim
        )
    };
    let axes = if i.axes.is_empty() {
        String::new()
    } else {
        format!("; {}", i.axes.join(", "))
    };
    let dense = if i.dense_ffn != i.ffn && i.moe_layers.len() < i.layers {
        format!(", dense layers F={}", i.dense_ffn)
    } else {
        String::new()
    };
    let threshold = i
        .threshold
        .map_or(String::new(), |t| format!(" (threshold {t})"));
    let (moe, ffn) = if i.moe_layers.is_empty() {
        (
            "dense".to_string(),
            format!("dense, F={} ({})", i.dense_ffn, i.activation),
        )
    } else {
        (
            format!("MoE in {:?}", i.moe_layers),
            format!(
                "{} experts of F={} ({}){dense}, gating {}{threshold}",
                i.experts, i.ffn, i.activation, i.gating
            ),
        )
    };
    format!(
        "{}{family}\n\
         architecture: {} layers ({moe}), D={}, {heads}, context {}, vocabulary {}, {} positions{axes}\n\
         FFN: {ffn}\n\
         parameters: {} total ({} embeddings, {} in experts); active per token: {} ({} expert(s) per MoE layer)\n\
         on {} ({} weights): parameters {}, KV cache {}, total {}; largest tensor {} ({}) of a {} binding limit: {}\n\
         by part: experts {}, attention {}, embeddings {}, norms and routers {}, KV cache {}\n\
         in each storage (parameters + KV cache):{}\n",
        i.checkpoint,
        i.layers,
        i.d,
        i.context,
        i.vocab,
        i.positions,
        count(p.total),
        count(p.embeddings),
        count(p.experts),
        active,
        experts,
        i.adapter,
        i.storage.describe(),
        mib(b.params),
        mib(b.kv_cache),
        mib(b.params + b.kv_cache),
        b.largest_tensor_name,
        mib(b.largest_tensor),
        mib(i.binding_limit),
        match (&i.too_large, i.split.is_empty()) {
            (Some(why), _) => format!("does not fit ({why})"),
            (None, true) => "fits".to_string(),
            (None, false) => format!(
                "fits, split: {}",
                i.split
                    .iter()
                    .map(|(n, p)| format!("{n} in {p} parts"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        mib(b.parts.experts),
        mib(b.parts.attention),
        mib(b.parts.embeddings),
        mib(b.parts.other),
        mib(b.kv_cache),
        i.formats
            .iter()
            .map(|f| format!(
                "\n  {:<50} {:>10}{}",
                f.flags,
                mib(f.total),
                if f.fits { "" } else { "  (does not fit)" }
            ))
            .collect::<String>(),
    )
}
