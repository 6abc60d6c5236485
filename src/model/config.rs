//! The transformer's configuration, saved as `config.json` with every
//! checkpoint.

use crate::error::{Error, Result};
use crate::kernels::{Activation, AuxConfig, GateConfig, Gating, RouterScore, SingleWeight};
use crate::model::params::{BlockParams, FfnParams, ParamSpec, Params};
use crate::moe::MoeConfig;
use serde::{Deserialize, Serialize};

/// How many parameters a model has (see `ModelConfig::param_counts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    pub total: usize,
    /// Token and position embeddings.
    pub embeddings: usize,
    /// Expert weights of every FFN (w1, w3, w2; a dense FFN is one expert).
    pub experts: usize,
    /// Parameters one token uses with the fewest and the most experts.
    pub active_min: usize,
    pub active_max: usize,
}

/// Bytes a model takes on the GPU (see `ModelConfig::gpu_bytes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GpuBytes {
    pub params: u64,
    /// `params` by part of the model.
    pub parts: PartBytes,
    pub kv_cache: u64,
    pub largest_tensor: u64,
    pub largest_tensor_name: String,
}

/// A model's parameter bytes by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PartBytes {
    /// Expert banks (routed and shared; a dense FFN is one expert).
    pub experts: u64,
    /// q/k/v and output projections, their biases and norms.
    pub attention: u64,
    /// Token table, learned positions, unembedding.
    pub embeddings: u64,
    /// Norms, routers, shared-expert gates.
    pub other: u64,
}

/// Which FFN a layer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    /// A dense FFN (the baseline): run as a one-expert MoE whose weight is 1.
    Dense,
    /// E experts under the model's gating rule.
    Moe,
}

/// How the scaled rotary frequencies are derived (`rope_scaling`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency over `factor`).
    Linear { factor: f32 },
    /// Llama 3.1: low frequencies over `factor`, high ones kept, a smooth
    /// blend between (wavelengths measured against `original` positions).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original: usize,
    },
}

/// Rotary position embeddings (rotate-half layout, pairs `i` and `i + Dh/2`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// The inverse frequencies `[Dh / 2]`, in f32 as the reference library
    /// computes them (`1 / theta^(2i / Dh)`, then the scaling).
    pub fn inv_freq(&self, dh: usize) -> Vec<f32> {
        let half = dh / 2;
        (0..half)
            .map(|i| {
                let base = 1.0 / (self.theta as f64).powf((2 * i) as f64 / dh as f64);
                let f = base as f32;
                match self.scaling {
                    None => f,
                    Some(RopeScaling::Linear { factor }) => f / factor,
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original,
                    }) => {
                        let old = original as f32;
                        let low_wavelen = old / low_freq_factor;
                        let high_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    }
                }
            })
            .collect()
    }

    /// cos and sin tables `[N, Dh / 2]` of positions 0..N: the angle is the
    /// f32 product `pos * inv_freq` (as the reference computes it), its
    /// cosine and sine taken in f64 and rounded.
    pub fn tables(&self, n: usize, dh: usize) -> (Vec<f32>, Vec<f32>) {
        let inv = self.inv_freq(dh);
        let mut cos = Vec::with_capacity(n * inv.len());
        let mut sin = Vec::with_capacity(n * inv.len());
        for pos in 0..n {
            for &f in &inv {
                let a = (pos as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }
}

/// Where a block normalizes q and k before attention (QK-norm).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    #[default]
    None,
    /// RMSNorm over each head's Dh (Qwen3), gains `[Dh]`.
    PerHead,
    /// RMSNorm over the whole q (and k) projection (OLMoE), gains `[H Dh]`
    /// and `[Hkv Dh]`.
    Whole,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

fn one() -> f32 {
    1.0
}

fn is_one(x: &f32) -> bool {
    *x == 1.0
}

/// Decoder-only LM: token embeddings (+ learned positions, or rotary ones
/// inside attention), L pre-norm blocks (RMSNorm, causal attention,
/// RMSNorm, FFN or MoE), final norm, unembedding. The fields after `eps`
/// are the axes of published model families; their defaults are amoe's
/// own model, and a `config.json` without them reads as before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary V.
    pub vocab: usize,
    /// Width D.
    pub d: usize,
    /// Layers L.
    pub layers: usize,
    /// Attention heads H (D / H in 16..=64, a multiple of 4).
    pub heads: usize,
    /// Context N (tokens per sequence).
    pub context: usize,
    /// Hidden width of each expert (and of a dense FFN) F.
    pub ffn: usize,
    /// Experts E of an MoE layer.
    pub experts: usize,
    /// Every n-th FFN is an MoE (1 = every layer); the others are dense.
    pub moe_every: usize,
    /// Activation of every FFN (experts and dense): GELU (default) or
    /// SwiGLU, which adds `w3 [E, D, F]` to each FFN.
    #[serde(default = "gelu")]
    pub activation: Activation,
    /// Dense model: every FFN dense (the `--gating dense` baseline).
    pub dense: bool,
    /// Gating rule of the MoE layers during training.
    pub gate: GateConfig,
    pub aux: AuxConfig,
    /// Capacity factor of the MoE layers during training (Switch style,
    /// `MoeConfig::capacity_factor`); None: dropless (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f32>,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Key/value heads Hkv (GQA, MQA); None: H.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<usize>,
    /// Head width Dh; None: D / H.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Rotary positions; None: learned ones (`wpe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope: Option<Rope>,
    /// The largest position the model was made for (rotary models): the
    /// context (`context`) may not exceed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_positions: Option<usize>,
    /// Biases on the q, k and v projections.
    #[serde(default, skip_serializing_if = "is_default")]
    pub qkv_bias: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub qk_norm: QkNorm,
    /// A query attends to at most this many keys (itself and the W - 1
    /// before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Attention score scale; None: 1 / sqrt(Dh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_scale: Option<f32>,
    /// Each layer's FFN kind, when the model says per layer (overrides
    /// `moe_every` and `dense`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_kinds: Option<Vec<FfnKind>>,
    /// Hidden width of the dense FFN layers; None: `ffn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense_ffn: Option<usize>,
    /// Hidden width of the sigmoid-gated shared expert of every MoE layer
    /// (Qwen2-MoE); None: no shared expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_ffn: Option<usize>,
    /// The unembedding is `wteᵀ` (no `w_out`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub tied: bool,
    /// Granite: token embeddings times this, the attention and FFN outputs
    /// times `residual_multiplier` before their residual adds, the logits
    /// divided by `logits_scaling`.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub embedding_multiplier: f32,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub residual_multiplier: f32,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub logits_scaling: f32,
}

/// The widest attention head any kernel takes.
pub const MAX_HEAD_DIM: usize = 256;
/// Most layers a config may have (published models have up to ~128).
pub const MAX_LAYERS: usize = 4096;
/// Most parameters (values) a config may describe: 2^40, about 1.1e12.
pub const MAX_PARAMS: u128 = 1 << 40;

fn gelu() -> Activation {
    Activation::Gelu
}

impl Default for ModelConfig {
    /// The default small model of `amoe train`.
    fn default() -> Self {
        ModelConfig {
            vocab: 4096,
            d: 128,
            layers: 4,
            heads: 4,
            context: 128,
            ffn: 256,
            experts: 16,
            moe_every: 1,
            activation: Activation::Gelu,
            dense: false,
            gate: GateConfig::default(),
            aux: AuxConfig::default(),
            capacity_factor: None,
            eps: 1e-5,
            kv_heads: None,
            head_dim: None,
            rope: None,
            max_positions: None,
            qkv_bias: false,
            qk_norm: QkNorm::None,
            sliding_window: None,
            attn_scale: None,
            ffn_kinds: None,
            dense_ffn: None,
            shared_ffn: None,
            tied: false,
            embedding_multiplier: 1.0,
            residual_multiplier: 1.0,
            logits_scaling: 1.0,
        }
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let pos = [
            ("vocab", self.vocab),
            ("d", self.d),
            ("layers", self.layers),
            ("heads", self.heads),
            ("context", self.context),
            ("ffn", self.ffn),
            ("experts", self.experts),
            ("moe_every", self.moe_every),
        ];
        for (name, v) in pos {
            if v == 0 {
                return Err(Error::invalid("model config", format!("{name} = 0")));
            }
        }
        let bad = |msg: String| Err(Error::invalid("model config", msg));
        if self.head_dim.is_none() && !self.d.is_multiple_of(self.heads) {
            return bad(format!(
                "d = {} is not a multiple of heads = {}",
                self.d, self.heads
            ));
        }
        let (h, hkv, dh) = (self.heads, self.kv_heads(), self.head_dim());
        if hkv == 0 || !h.is_multiple_of(hkv) {
            return bad(format!(
                "kv_heads = {hkv}: must divide heads = {h} (GQA groups)"
            ));
        }
        if dh == 0 || !dh.is_multiple_of(4) || dh > MAX_HEAD_DIM {
            return bad(format!(
                "head_dim = {dh}: must be a multiple of 4 up to {MAX_HEAD_DIM}"
            ));
        }
        self.check_sizes()?;
        if let Some(rope) = &self.rope {
            if !rope.theta.is_finite() || rope.theta <= 1.0 {
                return bad(format!("rope_theta = {}", rope.theta));
            }
            let ok = match rope.scaling {
                None => true,
                Some(RopeScaling::Linear { factor }) => factor.is_finite() && factor > 0.0,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original,
                }) => {
                    factor.is_finite()
                        && factor > 0.0
                        && low_freq_factor > 0.0
                        && high_freq_factor > low_freq_factor
                        && original > 0
                }
            };
            if !ok {
                return bad(format!("rope_scaling {:?}", rope.scaling));
            }
        }
        if let Some(max) = self.max_positions {
            if self.context > max {
                return bad(format!(
                    "context = {} is past the model's max_position_embeddings = {max}",
                    self.context
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window = 0".into());
        }
        if let Some(s) = self.attn_scale {
            if !s.is_finite() || s <= 0.0 {
                return bad(format!("attention scale {s}"));
            }
        }
        for (name, v) in [
            ("embedding_multiplier", self.embedding_multiplier),
            ("residual_multiplier", self.residual_multiplier),
            ("logits_scaling", self.logits_scaling),
        ] {
            if !v.is_finite() || v == 0.0 {
                return bad(format!("{name} = {v}"));
            }
        }
        if let Some(kinds) = &self.ffn_kinds {
            if kinds.len() != self.layers {
                return bad(format!(
                    "{} FFN kinds for {} layers",
                    kinds.len(),
                    self.layers
                ));
            }
        }
        for (name, v) in [
            ("dense_ffn", self.dense_ffn),
            ("shared_ffn", self.shared_ffn),
        ] {
            if v == Some(0) {
                return bad(format!("{name} = 0"));
            }
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(Error::invalid(
                "model config",
                format!("eps = {}", self.eps),
            ));
        }
        self.gate.validate(self.experts)?;
        for l in 0..self.layers {
            self.ffn_config(l).validate()?;
            if let Some(c) = self.shared_config(l) {
                c.validate()?;
            }
        }
        Ok(())
    }

    /// The sizes bounded before anything is sized from them: at most
    /// [`MAX_LAYERS`] layers and [`MAX_PARAMS`] parameters, and no tensor
    /// (nor the KV cache) whose element count overflows this platform's
    /// `usize` arithmetic (a lying config is an error, not a hang, an
    /// overflow or an allocation failure). Computed in u128.
    fn check_sizes(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("model config", msg));
        if self.layers > MAX_LAYERS {
            return bad(format!("layers = {}: at most {MAX_LAYERS}", self.layers));
        }
        let u = |x: usize| x as u128;
        let (d, dh) = (u(self.d), u(self.head_dim()));
        let (qw, kw) = (u(self.heads) * dh, u(self.kv_heads()) * dh);
        let e = u(self.experts);
        let f = u(self.ffn).max(u(self.dense_ffn.unwrap_or(0)));
        let fs = u(self.shared_ffn.unwrap_or(0));
        let layer = d * (qw + 2 * kw)
            + qw * d
            + 3 * (qw + 2 * kw)
            + 4 * d
            + d * e
            + e * 3 * d * f
            + 3 * d * fs
            + d;
        let total = 2 * u(self.vocab) * d + u(self.context) * d + u(self.layers) * layer + d;
        let largest = [
            u(self.vocab) * d,
            e * d * f,
            d * (qw + 2 * kw),
            u(self.context) * d,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let kv = 2 * u(self.layers) * kw * u(self.context);
        if total > MAX_PARAMS {
            return bad(format!(
                "{total} parameters: at most {MAX_PARAMS} (d = {}, layers = {}, experts = {}, \
                 ffn = {}, vocab = {})",
                self.d, self.layers, self.experts, self.ffn, self.vocab
            ));
        }
        let room = usize::MAX as u128 / 16;
        if largest > room || kv > room {
            return bad(format!(
                "a tensor of {} values (or a KV cache of {kv}) is more than this platform \
                 can address",
                largest
            ));
        }
        Ok(())
    }

    /// Key/value heads Hkv.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }

    /// Head width Dh.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d / self.heads.max(1))
    }

    /// Columns of the q projection, H Dh.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim()
    }

    /// Columns of `qkv`: (H + 2 Hkv) Dh.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads()) * self.head_dim()
    }

    /// Attention score scale.
    pub fn attn_scale(&self) -> f32 {
        self.attn_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim() as f32).sqrt())
    }

    /// Refuse what the training step does not take yet. It takes learned
    /// or rotary positions, GQA, any head width of up to 64, sliding
    /// windows, score scales and softmax top-k routers; not q/k/v biases,
    /// QK-norm, a tied head, a shared expert, per-layer FFN kinds,
    /// multipliers or sigmoid router scores.
    pub fn check_trainable(&self) -> Result<()> {
        let mut not = Vec::new();
        if self.qkv_bias || self.qk_norm != QkNorm::None {
            not.push("q/k/v biases or QK-norm");
        }
        if self.tied {
            not.push("a tied head");
        }
        if self.shared_ffn.is_some() {
            not.push("a shared expert");
        }
        if self.ffn_kinds.is_some() || self.dense_ffn.is_some() {
            not.push("per-layer FFN kinds or widths");
        }
        if [
            self.embedding_multiplier,
            self.residual_multiplier,
            self.logits_scaling,
        ] != [1.0; 3]
        {
            not.push("embedding, residual or logit multipliers");
        }
        if self.gate.gating == Gating::TopK && self.gate.score != RouterScore::Softmax {
            not.push("a top-k router with sigmoid scores");
        }
        if not.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(
            "model config",
            format!("training does not take {} yet", not.join(", ")),
        ))
    }

    /// How positions enter: "learned" or "rotary (theta T[, scaling])".
    pub fn positions(&self) -> String {
        match &self.rope {
            None => "learned".into(),
            Some(r) => {
                let scaling = match r.scaling {
                    None => String::new(),
                    Some(RopeScaling::Linear { factor }) => format!(", linear x{factor}"),
                    Some(RopeScaling::Llama3 { factor, .. }) => format!(", llama3 x{factor}"),
                };
                format!("rotary (theta {}{scaling})", r.theta)
            }
        }
    }

    /// The axes where this model differs from amoe's own layout, in words
    /// (for `amoe info` and messages): empty for amoe's own model.
    pub fn axes(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.kv_heads() != self.heads {
            v.push(format!("GQA {}/{}", self.heads, self.kv_heads()));
        }
        if self.qkv_bias {
            v.push("q/k/v bias".into());
        }
        match self.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => v.push("QK-norm per head".into()),
            QkNorm::Whole => v.push("QK-norm over the projections".into()),
        }
        if let Some(w) = self.sliding_window {
            v.push(format!("sliding window {w}"));
        }
        if let Some(s) = self.attn_scale {
            v.push(format!("score scale {s}"));
        }
        if let Some(f) = self.shared_ffn {
            v.push(format!("shared expert F={f} (sigmoid gate)"));
        }
        if self.tied {
            v.push("tied head".into());
        }
        for (name, x) in [
            ("embedding multiplier", self.embedding_multiplier),
            ("residual multiplier", self.residual_multiplier),
            ("logits scaling", self.logits_scaling),
        ] {
            if x != 1.0 {
                v.push(format!("{name} {x}"));
            }
        }
        v
    }

    /// Whether layer `l`'s FFN is an MoE.
    pub fn kind(&self, l: usize) -> FfnKind {
        if let Some(kinds) = &self.ffn_kinds {
            return kinds.get(l).copied().unwrap_or(FfnKind::Dense);
        }
        if self.dense || !(l + 1).is_multiple_of(self.moe_every) {
            FfnKind::Dense
        } else {
            FfnKind::Moe
        }
    }

    /// The shared expert of layer `l` (MoE layers of a model that has one):
    /// one SwiGLU expert whose weight is the sigmoid of its gate's logit.
    pub fn shared_config(&self, l: usize) -> Option<MoeConfig> {
        let f = self.shared_ffn?;
        (self.kind(l) == FfnKind::Moe).then(|| MoeConfig {
            d: self.d,
            f,
            e: 1,
            activation: self.activation,
            gate: GateConfig::top_k(1, false, RouterScore::Sigmoid),
            capacity_factor: None,
        })
    }

    /// The FFN of layer `l` as an MoE layer (a dense FFN is one expert,
    /// top-1, weight 1: no router gradient, and no balancing loss).
    pub fn ffn_config(&self, l: usize) -> MoeConfig {
        match self.kind(l) {
            FfnKind::Moe => MoeConfig {
                d: self.d,
                f: self.ffn,
                e: self.experts,
                activation: self.activation,
                gate: self.gate,
                capacity_factor: self.capacity_factor,
            },
            FfnKind::Dense => MoeConfig {
                d: self.d,
                f: self.dense_ffn.unwrap_or(self.ffn),
                e: 1,
                activation: self.activation,
                gate: GateConfig {
                    gating: Gating::Top1,
                    single_weight: SingleWeight::One,
                    ..self.gate
                },
                capacity_factor: None,
            },
        }
    }

    /// Auxiliary loss coefficients of layer `l` (none for a dense FFN).
    pub fn aux_config(&self, l: usize) -> AuxConfig {
        match self.kind(l) {
            FfnKind::Moe => self.aux,
            FfnKind::Dense => AuxConfig {
                balance: 0.0,
                z_loss: 0.0,
            },
        }
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.layers)
            .filter(|&l| self.kind(l) == FfnKind::Moe)
            .collect()
    }

    /// Every parameter's shape, as the typed tree (weight decay applies
    /// where `ParamId::decay` says so).
    pub fn param_specs(&self) -> Params<ParamSpec> {
        let (v, d, n) = (self.vocab, self.d, self.context);
        let (qw, dh) = (self.q_width(), self.head_dim());
        let kw = self.kv_heads() * dh;
        let s = |shape: Vec<usize>| ParamSpec { shape };
        let ffn = |c: &MoeConfig| FfnParams {
            w_router: s(vec![d, c.e]),
            w1: s(vec![c.e, d, c.f]),
            w3: (c.activation == Activation::SwiGlu).then(|| s(vec![c.e, d, c.f])),
            w2: s(vec![c.e, c.f, d]),
        };
        let (qn, kn) = match self.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (Some(s(vec![dh])), Some(s(vec![dh]))),
            QkNorm::Whole => (Some(s(vec![qw])), Some(s(vec![kw]))),
        };
        Params {
            wte: s(vec![v, d]),
            wpe: self.rope.is_none().then(|| s(vec![n, d])),
            blocks: (0..self.layers)
                .map(|l| BlockParams {
                    norm1: s(vec![d]),
                    wqkv: s(vec![d, self.qkv_width()]),
                    bqkv: self.qkv_bias.then(|| s(vec![self.qkv_width()])),
                    q_norm: qn.clone(),
                    k_norm: kn.clone(),
                    wo: s(vec![qw, d]),
                    norm2: s(vec![d]),
                    ffn: ffn(&self.ffn_config(l)),
                    shared: self.shared_config(l).map(|c| ffn(&c)),
                })
                .collect(),
            norm_f: s(vec![d]),
            w_out: (!self.tied).then(|| s(vec![d, v])),
        }
    }

    /// Parameters in total.
    pub fn num_params(&self) -> usize {
        self.param_specs().values().map(ParamSpec::numel).sum()
    }

    /// Parameter counts: in total, and active for one token when each MoE
    /// layer runs between `min_k` and `max_k` of its experts (a dense FFN
    /// always runs its one).
    pub fn param_counts(&self, min_k: usize, max_k: usize) -> ParamCounts {
        let specs = self.param_specs();
        let numel = |s: &ParamSpec| s.numel();
        let total = specs.values().map(numel).sum();
        let embeddings = numel(&specs.wte) + specs.wpe.as_ref().map_or(0, numel);
        let mut experts = 0;
        let (mut idle_max, mut idle_min) = (0, 0);
        for (l, b) in specs.blocks.iter().enumerate() {
            let f = &b.ffn;
            let bank = numel(&f.w1) + f.w3.as_ref().map_or(0, numel) + numel(&f.w2);
            experts += bank;
            let e = self.ffn_config(l).e;
            let per_expert = bank / e;
            if e > 1 {
                // Experts a token does not run.
                idle_max += e.saturating_sub(min_k.min(e)) * per_expert;
                idle_min += e.saturating_sub(max_k.min(e)) * per_expert;
            }
        }
        ParamCounts {
            total,
            embeddings,
            experts,
            active_min: total - idle_max,
            active_max: total - idle_min,
        }
    }

    /// What the model takes on the GPU with f32 storage: the parameters,
    /// the K/V caches of generation (every layer, the whole context) and
    /// the largest single tensor (which must fit one storage binding).
    pub fn gpu_bytes(&self, storage: impl Into<crate::model::params::Storage>) -> GpuBytes {
        let storage = storage.into();
        let specs = self.param_specs();
        let size =
            |id: crate::model::params::ParamId, numel: usize| storage.of(id).bytes(numel as u64);
        let params = specs.iter().map(|(id, s)| size(id, s.numel())).sum();
        let mut parts = PartBytes::default();
        for (id, s) in specs.iter() {
            use crate::model::params::{BlockParam as B, ParamId};
            let b = size(id, s.numel());
            match id {
                _ if id.is_expert_bank() => parts.experts += b,
                ParamId::Wte | ParamId::Wpe | ParamId::WOut => parts.embeddings += b,
                ParamId::Block(_, B::Wqkv | B::Bqkv | B::Wo | B::QNorm | B::KNorm) => {
                    parts.attention += b
                }
                _ => parts.other += b,
            }
        }
        let largest = specs
            .iter()
            .map(|(id, s)| (size(id, s.numel()), id.name()))
            .max()
            .unwrap_or_default();
        let kv = 2 * (self.layers * self.kv_heads() * self.context * self.head_dim()) as u64 * 4;
        GpuBytes {
            params,
            parts,
            kv_cache: kv,
            largest_tensor: largest.0,
            largest_tensor_name: largest.1,
        }
    }

    /// How the parameters go onto an adapter whose storage binding holds
    /// `binding` bytes, weights larger than `split` bytes (at most
    /// `binding`) split in parts, the matmul weights stored as `dtype`: the
    /// tensors split (name, parts), as the loaders split them (expert banks
    /// by experts, the token table and the unembedding by the vocabulary);
    /// or, when one does not fit, its name and the bytes of its smallest
    /// piece (a tensor amoe does not split, or one expert).
    pub fn split_plan(
        &self,
        storage: impl Into<crate::model::params::Storage>,
        split: u64,
        binding: u64,
    ) -> std::result::Result<Vec<(String, usize)>, (String, u64)> {
        use crate::model::params::{BlockParam as B, ParamId};
        // As `gpu::Weight::upload_split` rounds it.
        let split = split.min(binding) / 16 * 16;
        let storage = storage.into();
        let mut parts = Vec::new();
        for (id, s) in self.param_specs().iter() {
            let bytes = storage.of(id).bytes(s.numel() as u64);
            let slices = match id {
                ParamId::Wte => s.shape[0],
                ParamId::WOut => s.shape[1],
                ParamId::Block(
                    _,
                    B::W1 | B::W3 | B::W2 | B::SharedW1 | B::SharedW3 | B::SharedW2,
                ) => s.shape[0],
                _ => 0,
            };
            if slices == 0 {
                // Not split: one buffer.
                if bytes > binding {
                    return Err((id.name(), bytes));
                }
                continue;
            }
            if bytes <= split {
                continue;
            }
            let slice = bytes / slices as u64;
            if slice > split {
                return Err((id.name(), slice));
            }
            let mut per = (split / slice) as usize;
            if id == ParamId::WOut && storage.of(id).quant().is_some() && per >= crate::quant::BLOCK
            {
                // Quantized column blocks are cut at whole blocks.
                per -= per % crate::quant::BLOCK;
            }
            parts.push((id.name(), slices.div_ceil(per.max(1))));
        }
        Ok(parts)
    }

    /// Forward FLOPs per token with `slots_per_token` routed experts per MoE
    /// layer (1 for top-1, 2 for top-2, 1 + two-expert fraction for
    /// adaptive); training costs about three times this.
    pub fn forward_flops_per_token(&self, slots_per_token: f64) -> f64 {
        let (d, n, v) = (self.d as f64, self.context as f64, self.vocab as f64);
        let mut fl = 2.0 * d * v;
        for l in 0..self.layers {
            // QKV, output projection, attention (causal: half of N^2 on average).
            let (qkv, q) = (self.qkv_width() as f64, self.q_width() as f64);
            fl += 2.0 * d * qkv + 2.0 * q * d + 2.0 * q * n;
            let c = self.ffn_config(l);
            let slots = if c.e == 1 { 1.0 } else { slots_per_token };
            fl += 2.0 * d * c.e as f64 + slots * c.flops_per_slot();
            if let Some(sh) = self.shared_config(l) {
                fl += 2.0 * d + sh.flops_per_slot();
            }
        }
        fl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (fuzz): sizes that would hang, overflow or exhaust
    /// memory are refused by validate, quickly.
    #[test]
    fn absurd_sizes_are_refused_before_anything_is_sized() {
        let demo: ModelConfig =
            serde_json::from_str(include_str!("../../data/demo/config.json")).unwrap();
        demo.validate().unwrap();
        for (what, c) in [
            (
                "layers",
                ModelConfig {
                    layers: 89977434547421184,
                    ..demo.clone()
                },
            ),
            (
                "parameters",
                ModelConfig {
                    d: 1 << 20,
                    heads: 1 << 15,
                    ..demo.clone()
                },
            ),
            (
                "parameters",
                ModelConfig {
                    vocab: 1 << 40,
                    ..demo.clone()
                },
            ),
            (
                "parameters",
                ModelConfig {
                    experts: 1 << 30,
                    ..demo.clone()
                },
            ),
        ] {
            let t = std::time::Instant::now();
            let m = c.validate().unwrap_err().to_string();
            assert!(m.contains(what), "{m}");
            assert!(t.elapsed().as_secs_f64() < 1.0);
        }
    }

    #[test]
    fn default_is_valid_and_every_layer_is_moe() {
        let c = ModelConfig::default();
        c.validate().unwrap();
        assert_eq!(c.moe_layers(), vec![0, 1, 2, 3]);
        let every2 = ModelConfig {
            moe_every: 2,
            ..ModelConfig::default()
        };
        assert_eq!(every2.moe_layers(), vec![1, 3]);
        assert_eq!(every2.ffn_config(0).e, 1);
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let bad = ModelConfig {
            heads: 3,
            ..ModelConfig::default()
        };
        assert!(matches!(bad.validate(), Err(Error::InvalidArgument { .. })));
        let bad = ModelConfig {
            experts: 1,
            ..ModelConfig::default()
        };
        assert!(bad.validate().is_err());
        for factor in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let bad = ModelConfig {
                capacity_factor: Some(factor),
                ..ModelConfig::default()
            };
            assert!(
                matches!(bad.validate(), Err(Error::InvalidArgument { .. })),
                "capacity factor {factor}"
            );
        }
    }

    #[test]
    fn capacity_applies_to_moe_layers_only_and_old_configs_read() {
        let c = ModelConfig {
            capacity_factor: Some(1.25),
            moe_every: 2,
            ..ModelConfig::default()
        };
        c.validate().unwrap();
        assert_eq!(c.ffn_config(1).capacity_factor, Some(1.25));
        assert_eq!(c.ffn_config(0).capacity_factor, None);
        // 128 tokens, K = 2, E = 16: ceil(1.25 * 256 / 16) = 20.
        assert_eq!(c.ffn_config(1).capacity(128), Some(20));
        // A config.json written before the field existed reads as dropless.
        let mut v = serde_json::to_value(ModelConfig::default()).unwrap();
        assert!(v.get("capacity_factor").is_none());
        v.as_object_mut().unwrap().remove("capacity_factor");
        let back: ModelConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back.capacity_factor, None);
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), c);
    }

    #[test]
    fn config_round_trips_through_json() {
        let c = ModelConfig::default();
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), c);
    }

    #[test]
    fn active_parameters_leave_out_the_experts_a_token_does_not_run() {
        let c = ModelConfig {
            moe_every: 2,
            activation: Activation::SwiGlu,
            ..ModelConfig::default()
        };
        let (d, f, e) = (c.d, c.ffn, c.experts);
        let per_expert = 3 * d * f;
        let moe = c.moe_layers().len();
        let p = c.param_counts(1, 2);
        assert_eq!(p.total, c.num_params());
        assert_eq!(p.embeddings, c.vocab * d + c.context * d);
        assert_eq!(
            p.experts,
            moe * e * per_expert + (c.layers - moe) * per_expert
        );
        assert_eq!(p.active_min, p.total - moe * (e - 1) * per_expert);
        assert_eq!(p.active_max, p.total - moe * (e - 2) * per_expert);
        assert_eq!(c.param_counts(2, 2).active_min, p.active_max);
        let dense = ModelConfig {
            dense: true,
            ..c.clone()
        };
        let p = dense.param_counts(1, 2);
        assert_eq!((p.active_min, p.active_max), (p.total, p.total));
        let b = c.gpu_bytes(crate::gpu::Dtype::F32);
        assert_eq!(b.params, 4 * c.num_params() as u64);
        let p = b.parts;
        assert_eq!(p.experts + p.attention + p.embeddings + p.other, b.params);
        assert_eq!(p.experts, 4 * c.param_counts(1, 2).experts as u64);
        assert_eq!(b.kv_cache, (2 * c.layers * c.context * d * 4) as u64);
        let largest = (c.vocab * d).max(e * d * f);
        assert_eq!(b.largest_tensor, 4 * largest as u64);
    }

    #[test]
    fn split_plan_follows_the_loaders() {
        use crate::gpu::Dtype;
        let c = ModelConfig {
            vocab: 1000,
            d: 64,
            experts: 8,
            ffn: 32,
            ..ModelConfig::default()
        };
        let big = 1 << 30;
        assert_eq!(c.split_plan(Dtype::F32, big, big), Ok(vec![]));
        // wte 1000 x 64 x 4 = 250 KiB in 64 KiB parts of 256 rows; each
        // expert bank (8 x 64 x 32 x 4 = 64 KiB) fits.
        let plan = c.split_plan(Dtype::F32, 64 * 1024, big).unwrap();
        assert!(plan.contains(&("wte".to_string(), 4)), "{plan:?}");
        assert!(plan.contains(&("w_out".to_string(), 4)), "{plan:?}");
        assert!(!plan.iter().any(|(n, _)| n.contains("ffn")), "{plan:?}");
        // f16 halves every part count's bytes.
        let plan = c.split_plan(Dtype::F16, 64 * 1024, big).unwrap();
        assert!(plan.contains(&("wte".to_string(), 2)), "{plan:?}");
        // One expert (8 KiB) past a 4 KiB split: no split can hold it.
        let err = c.split_plan(Dtype::F32, 4096, big).unwrap_err();
        assert!(err.0.contains("ffn.w1") && err.1 == 8192, "{err:?}");
        // A tensor amoe does not split, past the binding itself.
        let err = c.split_plan(Dtype::F32, 1024, 16 * 1024).unwrap_err();
        assert_eq!(err, ("wpe".to_string(), 128 * 64 * 4));
    }
}
