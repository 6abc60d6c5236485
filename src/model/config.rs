//! The transformer's configuration, saved as `config.json` with every
//! checkpoint.

use crate::error::{Error, Result};
use crate::kernels::{Activation, AuxConfig, GateConfig, Gating, SingleWeight};
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
    pub kv_cache: u64,
    pub largest_tensor: u64,
    pub largest_tensor_name: String,
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

/// Decoder-only LM: token + learned position embeddings, L pre-norm blocks
/// (RMSNorm, causal attention, RMSNorm, FFN or MoE), final norm, unembedding.
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
}

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
        if !self.d.is_multiple_of(self.heads) {
            return Err(Error::invalid(
                "model config",
                format!("d = {} is not a multiple of heads = {}", self.d, self.heads),
            ));
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
        }
        Ok(())
    }

    /// Whether layer `l`'s FFN is an MoE.
    pub fn kind(&self, l: usize) -> FfnKind {
        if self.dense || !(l + 1).is_multiple_of(self.moe_every) {
            FfnKind::Dense
        } else {
            FfnKind::Moe
        }
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
                f: self.ffn,
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
        let s = |shape: Vec<usize>| ParamSpec { shape };
        Params {
            wte: s(vec![v, d]),
            wpe: s(vec![n, d]),
            blocks: (0..self.layers)
                .map(|l| {
                    let c = self.ffn_config(l);
                    BlockParams {
                        norm1: s(vec![d]),
                        wqkv: s(vec![d, 3 * d]),
                        wo: s(vec![d, d]),
                        norm2: s(vec![d]),
                        ffn: FfnParams {
                            w_router: s(vec![d, c.e]),
                            w1: s(vec![c.e, d, c.f]),
                            w3: (c.activation == Activation::SwiGlu).then(|| s(vec![c.e, d, c.f])),
                            w2: s(vec![c.e, c.f, d]),
                        },
                    }
                })
                .collect(),
            norm_f: s(vec![d]),
            w_out: s(vec![d, v]),
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
        let embeddings = numel(&specs.wte) + numel(&specs.wpe);
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
    pub fn gpu_bytes(&self) -> GpuBytes {
        let specs = self.param_specs();
        let params = specs.values().map(|s| s.numel() as u64 * 4).sum();
        let largest = specs
            .iter()
            .map(|(id, s)| (s.numel() as u64 * 4, id.name()))
            .max()
            .unwrap_or_default();
        let kv =
            2 * (self.layers * self.heads * self.context * (self.d / self.heads.max(1))) as u64 * 4;
        GpuBytes {
            params,
            kv_cache: kv,
            largest_tensor: largest.0,
            largest_tensor_name: largest.1,
        }
    }

    /// Forward FLOPs per token with `slots_per_token` routed experts per MoE
    /// layer (1 for top-1, 2 for top-2, 1 + two-expert fraction for
    /// adaptive); training costs about three times this.
    pub fn forward_flops_per_token(&self, slots_per_token: f64) -> f64 {
        let (d, n, v) = (self.d as f64, self.context as f64, self.vocab as f64);
        let mut fl = 2.0 * d * v;
        for l in 0..self.layers {
            // QKV, output projection, attention (causal: half of N^2 on average).
            fl += 2.0 * d * 3.0 * d + 2.0 * d * d + 2.0 * d * n;
            let c = self.ffn_config(l);
            let slots = if c.e == 1 { 1.0 } else { slots_per_token };
            fl += 2.0 * d * c.e as f64 + slots * c.flops_per_slot();
        }
        fl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let b = c.gpu_bytes();
        assert_eq!(b.params, 4 * c.num_params() as u64);
        assert_eq!(b.kv_cache, (2 * c.layers * c.context * d * 4) as u64);
        let largest = (c.vocab * d).max(e * d * f);
        assert_eq!(b.largest_tensor, 4 * largest as u64);
    }
}
