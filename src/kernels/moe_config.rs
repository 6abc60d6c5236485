//! Shape, rule and host weights of one MoE layer. They sit in the kernels
//! layer, below `moe`, because the CPU twins (`reference`) take them too;
//! `moe` re-exports both, so `amoe::moe::{MoeConfig, MoeWeights}` still works.

use crate::error::{Error, Result};
use crate::kernels::{Activation, GateConfig};
use serde::{Deserialize, Serialize};

/// Shape and rule of one MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Model width D.
    pub d: usize,
    /// Expert hidden width F.
    pub f: usize,
    /// Experts E.
    pub e: usize,
    pub activation: Activation,
    pub gate: GateConfig,
    /// Switch-style capacity factor of training plans: each expert takes at
    /// most `ceil(factor T K / E)` slots of a batch, first choices first,
    /// and drops the rest (the token keeps its residual). None: dropless
    /// (the default). Inference plans are always dropless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f32>,
}

impl MoeConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("D", self.d), ("F", self.f), ("E", self.e)] {
            if v == 0 {
                return Err(Error::invalid("moe_layer", format!("{name} = 0")));
            }
        }
        if let Some(c) = self.capacity_factor {
            if !c.is_finite() || c <= 0.0 {
                return Err(Error::invalid(
                    "moe_layer",
                    format!("capacity factor {c} (need a finite number > 0)"),
                ));
            }
        }
        self.gate.validate(self.e)
    }

    /// Slots an expert takes at most in a training batch of `t` tokens
    /// (None: dropless).
    pub fn capacity(&self, t: usize) -> Option<u32> {
        self.capacity_factor
            .map(|c| crate::kernels::route::expert_capacity(c, t, self.k(), self.e))
    }

    /// K: the most experts a token can use under this gating rule.
    pub fn k(&self) -> usize {
        self.gate.max_k()
    }

    /// Expert FLOPs of one routed (token, expert) pair: GEMM 1 (x2 for SwiGLU) and GEMM 2.
    pub fn flops_per_slot(&self) -> f64 {
        let up = match self.activation {
            Activation::Gelu => 1.0,
            Activation::SwiGlu => 2.0,
        };
        2.0 * (self.d * self.f) as f64 * (up + 1.0)
    }
}

/// Host copy of a layer's weights (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeWeights {
    /// w_router [D, E]
    pub w_router: Vec<f32>,
    /// w1 [E, D, F]
    pub w1: Vec<f32>,
    /// w3 [E, D, F], SwiGLU only
    pub w3: Option<Vec<f32>>,
    /// w2 [E, F, D]
    pub w2: Vec<f32>,
}

impl MoeWeights {
    /// Seeded random init: uniform with the variance of 1/fan_in.
    pub fn random(cfg: &MoeConfig, seed: u64) -> Self {
        let mut rng = crate::util::Rng::new(seed);
        let (d, f, e) = (cfg.d, cfg.f, cfg.e);
        let a_in = (3.0 / d as f32).sqrt();
        let a_out = (3.0 / f as f32).sqrt();
        MoeWeights {
            w_router: rng.vec_sym(d * e, a_in),
            w1: rng.vec_sym(e * d * f, a_in),
            w3: (cfg.activation == Activation::SwiGlu).then(|| rng.vec_sym(e * d * f, a_in)),
            w2: rng.vec_sym(e * f * d, a_out),
        }
    }

    pub fn validate(&self, cfg: &MoeConfig) -> Result<()> {
        let (d, f, e) = (cfg.d, cfg.f, cfg.e);
        let check = |name: &str, got: usize, want: usize, dims: String| -> Result<()> {
            if got != want {
                return Err(Error::Shape {
                    op: "moe_layer",
                    expected: format!("{name} {dims} = {want} elements"),
                    got: format!("{got} elements"),
                });
            }
            Ok(())
        };
        check(
            "w_router",
            self.w_router.len(),
            d * e,
            format!("[{d}, {e}]"),
        )?;
        check("w1", self.w1.len(), e * d * f, format!("[{e}, {d}, {f}]"))?;
        check("w2", self.w2.len(), e * f * d, format!("[{e}, {f}, {d}]"))?;
        match (cfg.activation, &self.w3) {
            (Activation::SwiGlu, Some(w3)) => {
                check("w3", w3.len(), e * d * f, format!("[{e}, {d}, {f}]"))
            }
            (Activation::SwiGlu, None) => Err(Error::invalid("moe_layer", "SwiGLU needs w3")),
            (Activation::Gelu, Some(_)) => Err(Error::invalid("moe_layer", "GELU takes no w3")),
            (Activation::Gelu, None) => Ok(()),
        }
    }
}
