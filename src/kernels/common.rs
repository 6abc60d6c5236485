//! Types shared by several kernel families: the gating configuration, the
//! router's auxiliary-loss coefficients, the activation, and the layout of
//! the packed routing metadata buffer.

use crate::choice::choice;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Marks an unused slot in `topk_ids` / `slot_of_token` / `token_of_slot`.
pub const UNUSED: u32 = 0xFFFF_FFFF;

/// Expert selection rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gating {
    /// Switch: one expert, weight = raw p1.
    Top1,
    /// GShard: two experts, weights renormalized over the two.
    Top2,
    /// Li et al. 2023: top-1, plus the second expert when the gap is <= threshold.
    Adaptive,
    /// A published model's fixed top-k (`GateConfig::k`, 1..=8), weights
    /// raw or renormalized over the k (`GateConfig::renorm`).
    TopK,
}

choice! { Gating, "gating",
    Top1 = "top1",
    Top2 = "top2",
    Adaptive = "adaptive",
    TopK = "topk": "The model's own top-k experts (pretrained models)",
}

/// The most experts a `topk` gate may choose per token.
pub const MAX_TOPK: usize = 8;

/// What the router's logits become before the top-k is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RouterScore {
    /// A softmax over the experts (every family here).
    #[default]
    Softmax,
    /// An independent sigmoid per expert (DeepSeek-V3 style routers, and
    /// Qwen2-MoE's shared-expert gate).
    Sigmoid,
}

choice! { RouterScore, "router score",
    Softmax = "softmax": "Softmax over the experts",
    Sigmoid = "sigmoid": "A sigmoid per expert",
}

/// How many of a top-k router's k experts a token takes (`Gating::TopK`):
/// all of them, or by a rule on its ranked scores p1 >= p2 >= ... >= pk.
/// The first expert always; then expert i joins while the rule holds, and
/// the first that fails ends the list. `GateConfig::threshold` is the
/// rule's parameter (T, r or P). At the extremes a rule is the fixed top-1
/// (gap 0, ratio 1, mass near 0) or the fixed top-k (gap 1, ratio 0,
/// mass 1), exact ties aside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ExpertRule {
    /// All k (the model's own rule).
    #[default]
    Fixed,
    /// p(i-1) - p(i) <= T: the paper's rule, generalized. With
    /// `GapMode::Top2` the gap is measured on the top-k-renormalized
    /// scores, (p(i-1) - p(i)) / (p1 + ... + pk) (for k = 2 the paper's
    /// (p1 - p2) / (p1 + p2)).
    Gap,
    /// p(i) >= r p1.
    Ratio,
    /// The experts already taken hold less than P of the probability
    /// (top-p routing; softmax scores only).
    Mass,
}

choice! { ExpertRule, "expert rule",
    Fixed = "fixed": "All k experts of the model's top-k",
    Gap = "gap": "Expert i joins while p(i-1) - p(i) <= T",
    Ratio = "ratio": "Expert i joins while p(i) >= r p1",
    Mass = "mass": "Expert i joins while the experts taken hold less than P of the probability",
}

impl ExpertRule {
    /// Its code in the gate kernel's flags (bits 2-3).
    pub fn code(self) -> u32 {
        match self {
            ExpertRule::Fixed => 0,
            ExpertRule::Gap => 1,
            ExpertRule::Ratio => 2,
            ExpertRule::Mass => 3,
        }
    }
}

/// How the adaptive rule measures the gap between the top two experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GapMode {
    /// `p1 - p2` on the full softmax.
    Softmax,
    /// `(p1 - p2) / (p1 + p2)`: renormalized over the top two (default).
    Top2,
}

choice! { GapMode, "gap",
    Softmax = "softmax": "p1 - p2 on the full softmax",
    Top2 = "top2": "(p1 - p2) / (p1 + p2)",
}

/// Weight of a token routed to one expert (under top1 or adaptive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SingleWeight {
    /// Raw `p1` (Switch style; the router still gets a gradient). Default.
    RawP1,
    /// 1.0: renormalized over the selected experts (for top-2-trained models).
    One,
}

// `--weight raw|renorm`; config.json files say "raw_p1" | "one".
choice! { SingleWeight, "single-expert weight",
    RawP1 = "raw" (serde "raw_p1"): "A one-expert token is weighted by its raw probability p1",
    One = "renorm" (serde "one"):
        "Weights renormalized over the selected experts (a one-expert token gets 1)",
}

/// Everything the gate kernel needs to know about the rule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateConfig {
    pub gating: Gating,
    /// Adaptive threshold in [0, 1]; ignored by top1/top2.
    pub threshold: f32,
    pub gap: GapMode,
    pub single_weight: SingleWeight,
    /// Experts per token of `Gating::TopK` (ignored by the others).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub k: usize,
    /// `Gating::TopK`: weights renormalized to sum to 1 over the k
    /// (Mixtral, Granite, Qwen3-MoE), or the raw scores (OLMoE, Qwen2-MoE).
    #[serde(default, skip_serializing_if = "is_false")]
    pub renorm: bool,
    /// `Gating::TopK`: softmax or sigmoid scores.
    #[serde(default, skip_serializing_if = "is_softmax")]
    pub score: RouterScore,
    /// `Gating::TopK`: how many of the k each token takes.
    #[serde(default, skip_serializing_if = "is_fixed")]
    pub rule: ExpertRule,
}

fn is_fixed(r: &ExpertRule) -> bool {
    *r == ExpertRule::Fixed
}

fn is_zero(k: &usize) -> bool {
    *k == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_softmax(s: &RouterScore) -> bool {
    *s == RouterScore::Softmax
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            gating: Gating::Adaptive,
            threshold: 0.1,
            gap: GapMode::Top2,
            single_weight: SingleWeight::RawP1,
            k: 0,
            renorm: false,
            score: RouterScore::Softmax,
            rule: ExpertRule::Fixed,
        }
    }
}

impl GateConfig {
    pub fn new(gating: Gating) -> Self {
        GateConfig {
            gating,
            ..Default::default()
        }
    }

    /// A published model's router: softmax or sigmoid scores, the top `k`,
    /// weights raw or renormalized.
    pub fn top_k(k: usize, renorm: bool, score: RouterScore) -> Self {
        GateConfig {
            gating: Gating::TopK,
            k,
            renorm,
            score,
            ..Default::default()
        }
    }

    /// The rule in words, for reports: `top1`, `top2`, `adaptive
    /// (threshold 0.1)`, `top-8`, `top-8, ratio rule r = 0.5`.
    pub fn describe(&self) -> String {
        match (self.gating, self.rule) {
            (Gating::Adaptive, _) => format!("adaptive (threshold {})", self.threshold),
            (Gating::TopK, ExpertRule::Fixed) => format!("top-{}", self.k),
            (Gating::TopK, rule) => {
                let p = match rule {
                    ExpertRule::Gap => "T",
                    ExpertRule::Ratio => "r",
                    _ => "P",
                };
                format!("top-{}, {rule} rule {p} = {}", self.k, self.threshold)
            }
            (g, _) => g.to_string(),
        }
    }

    /// The rule with another parameter (a per-layer threshold).
    pub fn with_threshold(&self, threshold: f32) -> GateConfig {
        GateConfig { threshold, ..*self }
    }

    /// K: the most experts a token can use (the slots per token).
    pub fn max_k(&self) -> usize {
        match self.gating {
            Gating::Top1 => 1,
            Gating::Top2 | Gating::Adaptive => 2,
            Gating::TopK => self.k,
        }
    }

    /// The fewest experts a token can use.
    pub fn min_k(&self) -> usize {
        match self.gating {
            Gating::Top1 | Gating::Adaptive => 1,
            Gating::Top2 => 2,
            Gating::TopK if self.rule != ExpertRule::Fixed => 1,
            Gating::TopK => self.k,
        }
    }

    /// Check the config against `e` experts.
    pub fn validate(&self, e: usize) -> Result<()> {
        if self.gating == Gating::TopK && !(1..=MAX_TOPK).contains(&self.k) {
            return Err(Error::invalid(
                "gate",
                format!("top-k with k = {}: must be 1..={MAX_TOPK}", self.k),
            ));
        }
        if self.gating != Gating::TopK && self.score != RouterScore::Softmax {
            return Err(Error::invalid(
                "gate",
                format!("{} gating takes softmax scores only", self.gating),
            ));
        }
        if !(0.0..=1.0).contains(&self.threshold) || self.threshold.is_nan() {
            return Err(Error::invalid(
                "gate",
                format!("threshold {} is outside [0, 1]", self.threshold),
            ));
        }
        if self.rule != ExpertRule::Fixed {
            if self.gating != Gating::TopK {
                return Err(Error::invalid(
                    "gate",
                    format!(
                        "the {} rule chooses among a top-k router's experts, not under {} gating",
                        self.rule, self.gating
                    ),
                ));
            }
            if self.rule == ExpertRule::Mass {
                if self.score != RouterScore::Softmax {
                    return Err(Error::invalid(
                        "gate",
                        "the mass rule needs softmax scores (a sigmoid router's scores are not a distribution)",
                    ));
                }
                if self.threshold <= 0.0 {
                    return Err(Error::invalid(
                        "gate",
                        format!("mass P = {} must be in (0, 1]", self.threshold),
                    ));
                }
            }
        }
        if self.max_k() > e {
            return Err(Error::invalid(
                "gate",
                format!(
                    "K = {} experts per token but only E = {e} experts",
                    self.max_k()
                ),
            ));
        }
        Ok(())
    }
}

/// Coefficients of the router's auxiliary losses.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuxConfig {
    /// Load-balancing coefficient `a` (0.01 in the paper).
    pub balance: f32,
    /// Router z-loss coefficient `b` (0 = off).
    pub z_loss: f32,
}

impl Default for AuxConfig {
    fn default() -> Self {
        AuxConfig {
            balance: 0.01,
            z_loss: 0.0,
        }
    }
}

/// Expert FFN activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `h = gelu(x · W1)` (tanh approximation).
    Gelu,
    /// `h = silu(x · W1) * (x · W3)`.
    SwiGlu,
}

choice! { Activation, "activation",
    Gelu = "gelu": "gelu(x W1) W2",
    SwiGlu = "swiglu": "(silu(x W1) * (x W3)) W2: a third weight matrix per expert",
}

/// Layout of the packed routing metadata buffer `routing [len()]` (u32 words).
/// One buffer keeps every routing kernel within 8 storage bindings.
///
/// | words | content |
/// |---|---|
/// | 0..3 | indirect dispatch args of expert GEMM 1: (num_tiles, grid_y1, 1) |
/// | 3..6 | indirect dispatch args of expert GEMM 2: (num_tiles, grid_y2, 1) |
/// | 6 | used slots S (number of (token, expert) pairs) |
/// | 7 | num_tiles (row tiles of `tile_m` over the padded slot space) |
/// | 8 | status flags (`STATUS_NONFINITE`: a token had NaN/inf logits) |
/// | 9 | padded rows = num_tiles * tile_m |
/// | 10 | dropped slots (routed slots past their expert's capacity) |
/// | 11..16 | reserved (zero) |
/// | 16..16+E | expert_counts [E] |
/// | 16+E..17+2E | expert_offsets [E+1], padded to `tile_m` (start row of each expert) |
/// | 17+2E..17+2E+max_tiles | tile_expert [max_tiles]: expert of each row tile |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutingLayout {
    pub t: usize,
    pub k: usize,
    pub e: usize,
    pub tile_m: usize,
}

/// Bit in `routing[STATUS]`: some token's router logits were NaN or infinite.
pub const STATUS_NONFINITE: u32 = 1;

impl RoutingLayout {
    pub const ARGS1: usize = 0;
    pub const ARGS2: usize = 3;
    pub const USED_SLOTS: usize = 6;
    pub const NUM_TILES: usize = 7;
    pub const STATUS: usize = 8;
    pub const PADDED_ROWS: usize = 9;
    pub const DROPPED_SLOTS: usize = 10;
    pub const HEADER: usize = 16;

    pub fn counts(&self) -> usize {
        Self::HEADER
    }
    pub fn offsets(&self) -> usize {
        Self::HEADER + self.e
    }
    pub fn tile_expert(&self) -> usize {
        Self::HEADER + 2 * self.e + 1
    }
    /// Upper bound on row tiles: every expert may waste one partial tile.
    /// (`tile_m` 0 is rejected by the launchers; it counts as 1 here so that
    /// sizing buffers first never divides by zero.)
    pub fn max_tiles(&self) -> usize {
        (self.t * self.k).div_ceil(self.tile_m.max(1)) + self.e
    }
    /// Upper bound on padded slot rows (size of `token_of_slot`, `h`, `y_expert`).
    pub fn max_rows(&self) -> usize {
        self.max_tiles() * self.tile_m.max(1)
    }
    pub fn len(&self) -> usize {
        self.tile_expert() + self.max_tiles()
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The MoE layers' rule: one gate, with optionally its threshold per MoE
/// layer (a calibration's, in the order of the model's MoE layers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gates {
    pub gate: GateConfig,
    pub thresholds: Option<Vec<f32>>,
}

impl From<GateConfig> for Gates {
    fn from(gate: GateConfig) -> Self {
        Gates {
            gate,
            thresholds: None,
        }
    }
}

impl Gates {
    /// The gate of MoE layer `i` (0 = the first MoE layer).
    pub fn layer(&self, i: usize) -> GateConfig {
        match self.thresholds.as_deref() {
            Some(t) if !t.is_empty() => self.gate.with_threshold(t[i.min(t.len() - 1)]),
            _ => self.gate,
        }
    }

    /// Check every layer's gate against `e` experts and the thresholds
    /// against the `moe_layers` MoE layers.
    pub fn validate(&self, e: usize, moe_layers: usize) -> Result<()> {
        if let Some(t) = &self.thresholds {
            if t.len() != moe_layers {
                return Err(Error::invalid(
                    "gate",
                    format!(
                        "{} per-layer thresholds for a model with {moe_layers} MoE layers",
                        t.len()
                    ),
                ));
            }
        }
        (0..moe_layers.max(1)).try_for_each(|i| self.layer(i).validate(e))
    }

    /// The rule in words; per-layer thresholds listed.
    pub fn describe(&self) -> String {
        match &self.thresholds {
            Some(t) => {
                let list: Vec<String> = t.iter().map(|x| format!("{x:.4}")).collect();
                let rule = match self.gate.gating {
                    Gating::TopK => format!("top-{}, {} rule", self.gate.k, self.gate.rule),
                    g => g.to_string(),
                };
                format!("{rule}, per-layer thresholds [{}]", list.join(", "))
            }
            None => self.gate.describe(),
        }
    }
}
