//! The transformer on the GPU: parameters, the forward of a batch, and the
//! training step (forward, backward, gradient clipping, AdamW) recorded into
//! one command encoder with one submit. The host uploads the batch and reads
//! back one small buffer: the loss, the gradient norm and each MoE layer's
//! routing counts (plus, when the curriculum needs them, each sequence's
//! two-expert fraction per MoE layer, computed by `sequence_complexity`).
//!
//! Per block (pre-norm, T = B N rows):
//! ```text
//! a  = rmsnorm(x, g1)        qkv = a Wqkv        o = attention(qkv)
//! xm = x + o Wo              m = rmsnorm(xm, g2)  y = ffn(m)   x' = xm + y
//! ```
//! then `logits = rmsnorm(x_L, g_f) W_out` and the cross-entropy. The FFN is
//! an MoE layer (`moe::MoeLayer`); a dense FFN is the same layer with one
//! expert and weight 1. Twin: `model::reference` (the same step on the CPU).

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Tensor};
use crate::kernels::adamw::{AdamW, AdamWBuffers, AdamWConfig, GradNorm};
use crate::kernels::add::Add;
use crate::kernels::attention::{
    AttentionBackward, AttentionBackwardBuffers, AttentionConfig, AttentionForward,
    AttentionForwardBuffers,
};
use crate::kernels::complexity::SequenceComplexity;
use crate::kernels::cross_entropy::{CrossEntropy, CrossEntropyBuffers, LossSum, LossSumBuffers};
use crate::kernels::embedding::{
    token_order, EmbeddingBackwardWpe, EmbeddingBackwardWpeBuffers, EmbeddingBackwardWte,
    EmbeddingBackwardWteBuffers, EmbeddingForward, EmbeddingForwardBuffers,
};
use crate::kernels::matmul::{Matmul, MatmulShape, MatmulSpec, Trans};
use crate::kernels::rmsnorm::{
    RmsNormBackward, RmsNormBackwardBuffers, RmsNormBackwardGain, RmsNormBackwardGainBuffers,
    RmsNormForward, RmsNormForwardBuffers,
};
use crate::kernels::{GateConfig, RoutingLayout, UNUSED};
use crate::model::config::ModelConfig;
use crate::moe::{MoeConfig, MoeLayer, MoePlan, MoeTrainPlan, MoeWeights, Path};

/// Scale of the unembedding's init relative to 1/sqrt(D): the logits of a
/// fresh model have a standard deviation of about this.
pub const W_OUT_SCALE: f32 = 0.1;

/// Parameter values on the host, in `ModelConfig::param_shapes` order.
#[derive(Clone, Debug, PartialEq)]
pub struct HostParams {
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl HostParams {
    /// Seeded initialization: embeddings and projections uniform with the
    /// variance of 1/fan_in (embeddings 0.02-ish), gains 1; the output
    /// projection of each block scaled by 1/sqrt(2L) (GPT-2's residual rule),
    /// and the unembedding `w_out` by `W_OUT_SCALE`, so that the first
    /// logits are nearly uniform (loss ln V instead of about ln V + 0.5).
    pub fn init(cfg: &ModelConfig, seed: u64) -> HostParams {
        let mut rng = crate::util::Rng::new(seed);
        let resid = 1.0 / (2.0 * cfg.layers as f32).sqrt();
        let mut tensors = Vec::new();
        for (name, shape, _) in cfg.param_shapes() {
            let n: usize = shape.iter().product();
            let fan_in = if shape.len() >= 2 {
                shape[shape.len() - 2]
            } else {
                1
            } as f32;
            let v = if name.ends_with("norm1") || name.ends_with("norm2") || name == "norm_f" {
                vec![1.0; n]
            } else if name == "wte" || name == "wpe" {
                rng.vec_sym(n, 0.035)
            } else if name.ends_with("ffn.w1")
                || name.ends_with("ffn.w3")
                || name.ends_with("ffn.w2")
            {
                // Per expert: [E, fan_in, fan_out].
                let fan = shape[1] as f32;
                let a = (3.0 / fan).sqrt() * if name.ends_with("w2") { resid } else { 1.0 };
                rng.vec_sym(n, a)
            } else {
                let scale = if name.ends_with(".wo") {
                    resid
                } else if name == "w_out" {
                    W_OUT_SCALE
                } else {
                    1.0
                };
                let a = (3.0 / fan_in).sqrt() * scale;
                rng.vec_sym(n, a)
            };
            tensors.push((name, shape, v));
        }
        HostParams { tensors }
    }

    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| v.as_slice())
    }

    /// Check names and shapes against `cfg` (a checkpoint of another model
    /// is a shape error naming the tensor).
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let want = cfg.param_shapes();
        if want.len() != self.tensors.len() {
            return Err(Error::shape(
                "model parameters",
                format!("{} tensors", want.len()),
                format!("{} tensors", self.tensors.len()),
            ));
        }
        for ((wn, ws, _), (n, s, v)) in want.iter().zip(&self.tensors) {
            if wn != n || ws != s || v.len() != ws.iter().product::<usize>() {
                return Err(Error::shape(
                    "model parameters",
                    format!("{wn} {ws:?}"),
                    format!("{n} {s:?} ({} values)", v.len()),
                ));
            }
        }
        Ok(())
    }

    fn moe_weights(&self, l: usize) -> Result<MoeWeights> {
        let get = |s: &str| -> Result<Vec<f32>> {
            self.get(&format!("layers.{l}.ffn.{s}"))
                .map(<[f32]>::to_vec)
                .ok_or_else(|| {
                    Error::invalid("model parameters", format!("layers.{l}.ffn.{s} missing"))
                })
        };
        let swiglu = self.get(&format!("layers.{l}.ffn.w3")).map(<[f32]>::to_vec);
        Ok(MoeWeights {
            w_router: get("w_router")?,
            w1: get("w1")?,
            w3: swiglu,
            w2: get("w2")?,
        })
    }
}

/// One parameter on the GPU.
pub struct Param {
    pub name: String,
    pub value: Tensor<f32>,
    /// AdamW's decoupled weight decay applies (matrices, not gains/embeddings).
    pub decay: bool,
}

/// The model's parameters on the GPU. The FFN weights belong to the MoE
/// layers; `params` holds second handles to them.
pub struct Model {
    pub cfg: ModelConfig,
    pub params: Vec<Param>,
    pub ffn: Vec<MoeLayer>,
}

impl Model {
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, host: &HostParams) -> Result<Model> {
        cfg.validate()?;
        host.validate(cfg)?;
        let mut ffn = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            ffn.push(MoeLayer::new(
                ctx,
                cfg.ffn_config(l),
                &host.moe_weights(l)?,
            )?);
        }
        let mut params = Vec::new();
        for ((name, shape, decay), (_, _, v)) in cfg.param_shapes().into_iter().zip(&host.tensors) {
            let value = match name.rsplit_once(".ffn.") {
                Some((pre, w)) => {
                    let l: usize = pre
                        .strip_prefix("layers.")
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| Error::invalid("model parameters", name.clone()))?;
                    match w {
                        "w_router" => ffn[l].w_router.clone(),
                        "w1" => ffn[l].w1.clone(),
                        "w3" => ffn[l].w3.clone().ok_or_else(|| {
                            Error::invalid("model parameters", format!("{name}: no SwiGLU layer"))
                        })?,
                        _ => ffn[l].w2.clone(),
                    }
                }
                None => Tensor::from_slice(ctx, &name, &shape, v)?,
            };
            params.push(Param { name, value, decay });
        }
        Ok(Model {
            cfg: cfg.clone(),
            params,
            ffn,
        })
    }

    pub fn param(&self, name: &str) -> Result<&Tensor<f32>> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| &p.value)
            .ok_or_else(|| Error::invalid("model", format!("no parameter {name}")))
    }

    /// Every parameter back on the host.
    pub async fn download(&self, ctx: &GpuContext) -> Result<HostParams> {
        let mut tensors = Vec::with_capacity(self.params.len());
        for p in &self.params {
            tensors.push((
                p.name.clone(),
                p.value.shape.clone(),
                p.value.read(ctx).await?,
            ));
        }
        Ok(HostParams { tensors })
    }

    /// Overwrite every parameter from the host (same config).
    pub fn upload(&self, ctx: &GpuContext, host: &HostParams) -> Result<()> {
        host.validate(&self.cfg)?;
        for (p, (_, _, v)) in self.params.iter().zip(&host.tensors) {
            p.value.write(ctx, v)?;
        }
        Ok(())
    }

    /// The FFN layers with another gating rule (for evaluation), sharing
    /// the weights.
    pub(crate) fn ffn_with_gate(&self, gate: Option<GateConfig>) -> Vec<MoeLayer> {
        self.ffn
            .iter()
            .map(|m| {
                let cfg = match gate {
                    // Evaluation and inference are dropless.
                    Some(g) if m.cfg.e > 1 => MoeConfig {
                        gate: g,
                        capacity_factor: None,
                        ..m.cfg
                    },
                    _ => m.cfg,
                };
                MoeLayer {
                    cfg,
                    w_router: m.w_router.clone(),
                    w1: m.w1.clone(),
                    w3: m.w3.clone(),
                    w2: m.w2.clone(),
                }
            })
            .collect()
    }
}

enum FfnPlan {
    Train(Box<MoeTrainPlan>),
    Eval(Box<MoePlan>),
}

impl FfnPlan {
    fn fwd(&self) -> &MoePlan {
        match self {
            FfnPlan::Train(p) => &p.fwd,
            FfnPlan::Eval(p) => p,
        }
    }
}

// Some tensors are held only so that they live as long as the launchers
// that bind them (and for inspection in tests).
#[allow(dead_code)]
struct Block {
    /// x [T, D]: the block's input (the residual stream)
    x: Tensor<f32>,
    /// a [T, D] = rmsnorm(x), rstd1 [T]
    a: Tensor<f32>,
    rstd1: Tensor<f32>,
    qkv: Tensor<f32>,
    o: Tensor<f32>,
    lse: Tensor<f32>,
    proj: Tensor<f32>,
    /// xm [T, D] = x + o Wo
    xm: Tensor<f32>,
    rstd2: Tensor<f32>,
    ffn: FfnPlan,
    norm1: RmsNormForward,
    qkv_mm: Matmul,
    attn: AttentionForward,
    proj_mm: Matmul,
    add1: Add,
    norm2: RmsNormForward,
    add2: Add,
}

/// The forward of one batch shape: every buffer and launcher, built once.
// Some tensors are held only so that they live as long as the launchers
// that bind them (and for inspection in tests).
#[allow(dead_code)]
struct Forward {
    b: usize,
    t: usize,
    ids: Tensor<u32>,
    targets: Tensor<u32>,
    embed: EmbeddingForward,
    blocks: Vec<Block>,
    /// x_L [T, D]: the last block's output
    x_out: Tensor<f32>,
    xf: Tensor<f32>,
    rstdf: Tensor<f32>,
    norm_f: RmsNormForward,
    logits: Tensor<f32>,
    out_mm: Matmul,
    loss: Tensor<f32>,
    ce: CrossEntropy,
    loss_out: Tensor<f32>,
    loss_sum: LossSum,
    _layers: Vec<MoeLayer>,
}

pub(crate) fn mm(
    ctx: &GpuContext,
    (m, n, k): (usize, usize, usize),
    trans: Trans,
    beta: f32,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    c: &Tensor<f32>,
) -> Result<Matmul> {
    let shape = MatmulShape {
        m,
        n,
        k,
        trans,
        alpha: 1.0,
        beta,
    };
    let spec = MatmulSpec::choose(ctx, m, n, k, trans).with_beta(beta != 0.0);
    Matmul::new(ctx, &shape, spec, a, b, c)
}

impl Forward {
    /// `train`: keep what the backward needs and compute the loss gradient
    /// in place of the logits; otherwise the loss only, under `gate`.
    fn new(
        ctx: &GpuContext,
        model: &Model,
        b: usize,
        train: bool,
        gate: Option<GateConfig>,
    ) -> Result<Forward> {
        let cfg = &model.cfg;
        let (v, d, n, h) = (cfg.vocab, cfg.d, cfg.context, cfg.heads);
        let t = b * n;
        if b == 0 {
            return Err(Error::invalid("model", "batch of 0 sequences"));
        }
        let z = |name: &str, shape: &[usize]| Tensor::<f32>::zeros(ctx, name, shape);
        let ids = Tensor::<u32>::zeros(ctx, "ids", &[t])?;
        let targets = Tensor::<u32>::zeros(ctx, "targets", &[t])?;
        let x0 = z("x0", &[t, d])?;
        let embed = EmbeddingForward::new(
            ctx,
            &EmbeddingForwardBuffers {
                ids: &ids,
                wte: model.param("wte")?,
                wpe: model.param("wpe")?,
                x: &x0,
            },
        )?;
        let layers = model.ffn_with_gate(if train { None } else { gate });
        let acfg = AttentionConfig { b, n, h };
        let mut blocks: Vec<Block> = Vec::with_capacity(cfg.layers);
        let mut x = x0;
        for (l, layer) in layers.iter().enumerate() {
            let p = |s: &str| model.param(&format!("layers.{l}.{s}"));
            let a = z("a", &[t, d])?;
            let rstd1 = z("rstd1", &[t])?;
            let qkv = z("qkv", &[t, 3 * d])?;
            let o = z("o", &[t, d])?;
            let lse = z("attn_lse", &[b, h, n])?;
            let proj = z("proj", &[t, d])?;
            let xm = z("xm", &[t, d])?;
            let rstd2 = z("rstd2", &[t])?;
            let ffn = if train {
                FfnPlan::Train(Box::new(layer.plan_train(ctx, t, &cfg.aux_config(l), 1)?))
            } else {
                FfnPlan::Eval(Box::new(layer.plan(ctx, t, Path::Grouped)?))
            };
            let x_next = z("x", &[t, d])?;
            let norm1 = RmsNormForward::new(
                ctx,
                cfg.eps,
                &RmsNormForwardBuffers {
                    x: &x,
                    g: p("norm1")?,
                    y: &a,
                    rstd: &rstd1,
                },
            )?;
            let qkv_mm = mm(ctx, (t, 3 * d, d), Trans::NN, 0.0, &a, p("wqkv")?, &qkv)?;
            let attn = AttentionForward::new(
                ctx,
                acfg,
                &AttentionForwardBuffers {
                    qkv: &qkv,
                    o: &o,
                    lse: &lse,
                },
            )?;
            let proj_mm = mm(ctx, (t, d, d), Trans::NN, 0.0, &o, p("wo")?, &proj)?;
            let add1 = Add::new(ctx, &x, &proj, &xm)?;
            let norm2 = RmsNormForward::new(
                ctx,
                cfg.eps,
                &RmsNormForwardBuffers {
                    x: &xm,
                    g: p("norm2")?,
                    y: &ffn.fwd().x,
                    rstd: &rstd2,
                },
            )?;
            let add2 = Add::new(ctx, &xm, &ffn.fwd().y, &x_next)?;
            blocks.push(Block {
                x: x.clone(),
                a,
                rstd1,
                qkv,
                o,
                lse,
                proj,
                xm,
                rstd2,
                ffn,
                norm1,
                qkv_mm,
                attn,
                proj_mm,
                add1,
                norm2,
                add2,
            });
            x = x_next;
        }
        let xf = z("xf", &[t, d])?;
        let rstdf = z("rstdf", &[t])?;
        let norm_f = RmsNormForward::new(
            ctx,
            cfg.eps,
            &RmsNormForwardBuffers {
                x: &x,
                g: model.param("norm_f")?,
                y: &xf,
                rstd: &rstdf,
            },
        )?;
        let logits = z("logits", &[t, v])?;
        let out_mm = mm(
            ctx,
            (t, v, d),
            Trans::NN,
            0.0,
            &xf,
            model.param("w_out")?,
            &logits,
        )?;
        let loss = z("loss", &[t])?;
        let ce_bufs = CrossEntropyBuffers {
            logits: &logits,
            targets: &targets,
            loss: &loss,
        };
        let ce = if train {
            CrossEntropy::forward_backward(ctx, 1.0 / t as f32, &ce_bufs)?
        } else {
            CrossEntropy::forward(ctx, &ce_bufs)?
        };
        let loss_out = z("loss_out", &[2])?;
        let loss_sum = LossSum::new(
            ctx,
            v,
            &LossSumBuffers {
                loss: &loss,
                targets: &targets,
                out: &loss_out,
            },
        )?;
        Ok(Forward {
            b,
            t,
            ids,
            targets,
            embed,
            blocks,
            x_out: x,
            xf,
            rstdf,
            norm_f,
            logits,
            out_mm,
            loss,
            ce,
            loss_out,
            loss_sum,
            _layers: layers,
        })
    }

    fn upload(
        &self,
        ctx: &GpuContext,
        cfg: &ModelConfig,
        ids: &[u32],
        targets: &[u32],
    ) -> Result<()> {
        if ids.len() != self.t || targets.len() != self.t {
            return Err(Error::shape(
                "model batch",
                format!("ids and targets of B N = {} tokens", self.t),
                format!("{} ids, {} targets", ids.len(), targets.len()),
            ));
        }
        crate::kernels::embedding::check_ids(ids, cfg.vocab)?;
        if let Some(bad) = targets
            .iter()
            .find(|&&x| x != UNUSED && x as usize >= cfg.vocab)
        {
            return Err(Error::invalid(
                "model batch",
                format!("target id {bad} >= vocabulary {}", cfg.vocab),
            ));
        }
        self.ids.write(ctx, ids)?;
        self.targets.write(ctx, targets)
    }

    fn clear(&self, encoder: &mut wgpu::CommandEncoder) {
        for blk in &self.blocks {
            blk.ffn.fwd().clear(encoder);
        }
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.embed.record(pass);
        for blk in &self.blocks {
            blk.norm1.record(pass);
            blk.qkv_mm.record(pass);
            blk.attn.record(pass);
            blk.proj_mm.record(pass);
            blk.add1.record(pass);
            blk.norm2.record(pass);
            blk.ffn.fwd().record_pass(pass);
            blk.add2.record(pass);
        }
        self.norm_f.record(pass);
        self.out_mm.record(pass);
        self.ce.record(pass);
        self.loss_sum.record(pass);
    }
}

/// Optimizer settings of a training run.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptConfig {
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (None = off).
    pub clip: Option<f32>,
}

impl Default for OptConfig {
    fn default() -> Self {
        OptConfig {
            adamw: AdamWConfig {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            clip: Some(1.0),
        }
    }
}

// Some tensors are held only so that they live as long as the launchers
// that bind them (and for inspection in tests).
#[allow(dead_code)]
struct BlockBackward {
    /// Gradient of the block's input x.
    gx: Tensor<f32>,
    gxm: Tensor<f32>,
    /// Gradients of the block input through the second and first norm.
    norm2_grad: Tensor<f32>,
    norm1_grad: Tensor<f32>,
    dout: Tensor<f32>,
    dqkv: Tensor<f32>,
    da: Tensor<f32>,
    norm2_back: RmsNormBackward,
    norm2_gain: RmsNormBackwardGain,
    add_mid: Add,
    dout_mm: Matmul,
    dwo_mm: Matmul,
    attn_back: AttentionBackward,
    da_mm: Matmul,
    dwqkv_mm: Matmul,
    norm1_back: RmsNormBackward,
    norm1_gain: RmsNormBackwardGain,
    add_in: Add,
}

/// Per-step numbers read back after the submit.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy of the batch.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Per MoE layer: load-balancing loss (coefficient applied).
    pub balance_loss: Vec<f32>,
    /// Per MoE layer: fraction of tokens that took two experts (the
    /// router's decisions, before any capacity drop).
    pub two_expert_fraction: Vec<f32>,
    /// Per MoE layer: slots each expert processed (within its capacity).
    pub expert_counts: Vec<Vec<u32>>,
    /// Per MoE layer: slots dropped past their expert's capacity (0
    /// without a capacity factor).
    pub dropped_slots: Vec<u32>,
    /// Per sequence of the batch: two-expert fraction in each MoE layer
    /// (the curriculum's complexity vectors); empty unless requested.
    pub complexity: Vec<Vec<f32>>,
}

/// One training step's inputs.
#[derive(Clone, Copy, Debug)]
pub struct StepArgs<'a> {
    /// ids [B N]
    pub ids: &'a [u32],
    /// targets [B N] (the next token of each)
    pub targets: &'a [u32],
    /// Learning rate of this step.
    pub lr: f32,
    /// Optimizer step, 1-based.
    pub step: u64,
    /// Also read back each sequence's two-expert fractions (curriculum).
    pub complexity: bool,
}

/// Everything a training step of batch size B needs, built once.
// Some tensors are held only so that they live as long as the launchers
// that bind them (and for inspection in tests).
#[allow(dead_code)]
pub struct TrainStep {
    fwd: Forward,
    back: Vec<BlockBackward>,
    gx0: Tensor<f32>,
    emb_offsets: Tensor<u32>,
    emb_order: Tensor<u32>,
    dxf: Tensor<f32>,
    dxf_mm: Matmul,
    dwout_mm: Matmul,
    normf_back: RmsNormBackward,
    normf_gain: RmsNormBackwardGain,
    emb_wte: EmbeddingBackwardWte,
    emb_wpe: EmbeddingBackwardWpe,
    /// complexity [B, MoE layers]: each sequence's two-expert fraction per
    /// MoE layer, computed on the GPU when the curriculum asks for it.
    complexity: Tensor<f32>,
    complexity_kernels: Vec<SequenceComplexity>,
    /// Gradients, AdamW moments, in `Model::params` order.
    pub grads: Vec<Tensor<f32>>,
    pub m: Vec<Tensor<f32>>,
    pub v: Vec<Tensor<f32>>,
    adamw: Vec<AdamW>,
    grad_norm: GradNorm,
    clip: Tensor<f32>,
    /// What the host reads back (see `record_readback`), made once.
    readback: crate::gpu::Staging,
    moe_layers: Vec<usize>,
    vocab: usize,
}

impl TrainStep {
    pub fn new(ctx: &GpuContext, model: &Model, b: usize, opt: &OptConfig) -> Result<TrainStep> {
        let cfg = &model.cfg;
        opt.adamw.validate()?;
        let fwd = Forward::new(ctx, model, b, true, None)?;
        let (t, d, v, n, h) = (fwd.t, cfg.d, cfg.vocab, cfg.context, cfg.heads);
        let z = |name: &str, shape: &[usize]| Tensor::<f32>::zeros(ctx, name, shape);
        // Gradients: the FFN's live in its training plan.
        let mut grads = Vec::with_capacity(model.params.len());
        for p in &model.params {
            let g = match p.name.rsplit_once(".ffn.") {
                Some((pre, w)) => {
                    let l: usize = pre
                        .strip_prefix("layers.")
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| Error::invalid("model parameters", p.name.clone()))?;
                    let FfnPlan::Train(plan) = &fwd.blocks[l].ffn else {
                        return Err(Error::invalid(
                            "model",
                            "training step without a training plan",
                        ));
                    };
                    match w {
                        "w_router" => plan.dw_router.clone(),
                        "w1" => plan.dw1.clone(),
                        "w3" => plan.dw3.clone().ok_or_else(|| {
                            Error::invalid("model", format!("{}: no SwiGLU gradient", p.name))
                        })?,
                        _ => plan.dw2.clone(),
                    }
                }
                None => z(&format!("grad {}", p.name), &p.value.shape)?,
            };
            grads.push(g);
        }
        let grad = |name: &str| -> Result<&Tensor<f32>> {
            model
                .params
                .iter()
                .position(|p| p.name == name)
                .map(|i| &grads[i])
                .ok_or_else(|| Error::invalid("model", format!("no parameter {name}")))
        };

        // Head: dxf = dlogits W_out^T, dW_out = xf^T dlogits, final norm.
        let dxf = z("dxf", &[t, d])?;
        let dxf_mm = mm(
            ctx,
            (t, d, v),
            Trans::NT,
            0.0,
            &fwd.logits,
            model.param("w_out")?,
            &dxf,
        )?;
        let dwout_mm = mm(
            ctx,
            (d, v, t),
            Trans::TN,
            0.0,
            &fwd.xf,
            &fwd.logits,
            grad("w_out")?,
        )?;
        let last_dy = match &fwd.blocks.last().map(|b| &b.ffn) {
            Some(FfnPlan::Train(p)) => p.dy.clone(),
            _ => return Err(Error::invalid("model", "no layers")),
        };
        let normf_back = RmsNormBackward::new(
            ctx,
            &RmsNormBackwardBuffers {
                x: &fwd.x_out,
                g: model.param("norm_f")?,
                dy: &dxf,
                rstd: &fwd.rstdf,
                dx: &last_dy,
            },
        )?;
        let normf_gain = RmsNormBackwardGain::new(
            ctx,
            &RmsNormBackwardGainBuffers {
                x: &fwd.x_out,
                dy: &dxf,
                rstd: &fwd.rstdf,
                dg: grad("norm_f")?,
            },
        )?;

        let gx0 = z("gx0", &[t, d])?;
        let acfg = AttentionConfig { b, n, h };
        let mut back = Vec::with_capacity(cfg.layers);
        for (l, blk) in fwd.blocks.iter().enumerate() {
            let p = |s: &str| model.param(&format!("layers.{l}.{s}"));
            let gname = |s: &str| format!("layers.{l}.{s}");
            let FfnPlan::Train(plan) = &blk.ffn else {
                return Err(Error::invalid(
                    "model",
                    "training step without a training plan",
                ));
            };
            // The gradient of this block's output is the next block's FFN dy
            // (or the final norm's output); of its input, the previous
            // block's FFN dy (or gx0 for the embedding).
            let gy = plan.dy.clone();
            let gx = if l == 0 {
                gx0.clone()
            } else {
                match &fwd.blocks[l - 1].ffn {
                    FfnPlan::Train(prev) => prev.dy.clone(),
                    FfnPlan::Eval(_) => return Err(Error::invalid("model", "mixed plans")),
                }
            };
            let gxm = z("gxm", &[t, d])?;
            let tmp = z("norm_grad", &[t, d])?;
            let tmp1 = z("norm1_grad", &[t, d])?;
            let dout = z("dout", &[t, d])?;
            let dqkv = z("dqkv", &[t, 3 * d])?;
            let da = z("da", &[t, d])?;
            let norm2_back = RmsNormBackward::new(
                ctx,
                &RmsNormBackwardBuffers {
                    x: &blk.xm,
                    g: p("norm2")?,
                    dy: &plan.dx,
                    rstd: &blk.rstd2,
                    dx: &tmp,
                },
            )?;
            let norm2_gain = RmsNormBackwardGain::new(
                ctx,
                &RmsNormBackwardGainBuffers {
                    x: &blk.xm,
                    dy: &plan.dx,
                    rstd: &blk.rstd2,
                    dg: grad(&gname("norm2"))?,
                },
            )?;
            let add_mid = Add::new(ctx, &gy, &tmp, &gxm)?;
            let dout_mm = mm(ctx, (t, d, d), Trans::NT, 0.0, &gxm, p("wo")?, &dout)?;
            let dwo_mm = mm(
                ctx,
                (d, d, t),
                Trans::TN,
                0.0,
                &blk.o,
                &gxm,
                grad(&gname("wo"))?,
            )?;
            let attn_back = AttentionBackward::new(
                ctx,
                acfg,
                &AttentionBackwardBuffers {
                    qkv: &blk.qkv,
                    o: &blk.o,
                    dout: &dout,
                    lse: &blk.lse,
                    dqkv: &dqkv,
                },
            )?;
            let da_mm = mm(ctx, (t, d, 3 * d), Trans::NT, 0.0, &dqkv, p("wqkv")?, &da)?;
            let dwqkv_mm = mm(
                ctx,
                (d, 3 * d, t),
                Trans::TN,
                0.0,
                &blk.a,
                &dqkv,
                grad(&gname("wqkv"))?,
            )?;
            let norm1_back = RmsNormBackward::new(
                ctx,
                &RmsNormBackwardBuffers {
                    x: &blk.x,
                    g: p("norm1")?,
                    dy: &da,
                    rstd: &blk.rstd1,
                    dx: &tmp1,
                },
            )?;
            let norm1_gain = RmsNormBackwardGain::new(
                ctx,
                &RmsNormBackwardGainBuffers {
                    x: &blk.x,
                    dy: &da,
                    rstd: &blk.rstd1,
                    dg: grad(&gname("norm1"))?,
                },
            )?;
            let add_in = Add::new(ctx, &gxm, &tmp1, &gx)?;
            back.push(BlockBackward {
                gx,
                gxm,
                norm2_grad: tmp,
                norm1_grad: tmp1,
                dout,
                dqkv,
                da,
                norm2_back,
                norm2_gain,
                add_mid,
                dout_mm,
                dwo_mm,
                attn_back,
                da_mm,
                dwqkv_mm,
                norm1_back,
                norm1_gain,
                add_in,
            });
        }
        let emb_offsets = Tensor::<u32>::zeros(ctx, "emb_offsets", &[v + 1])?;
        let emb_order = Tensor::<u32>::zeros(ctx, "emb_order", &[t])?;
        let emb_wte = EmbeddingBackwardWte::new(
            ctx,
            &EmbeddingBackwardWteBuffers {
                dx: &gx0,
                offsets: &emb_offsets,
                order: &emb_order,
                dwte: grad("wte")?,
            },
        )?;
        let emb_wpe = EmbeddingBackwardWpe::new(
            ctx,
            &EmbeddingBackwardWpeBuffers {
                dx: &gx0,
                dwpe: grad("wpe")?,
            },
        )?;

        // Optimizer.
        let clip = z("clip", &[2])?;
        let grad_refs: Vec<&Tensor<f32>> = grads.iter().collect();
        let grad_norm = GradNorm::new(ctx, &grad_refs, &clip, opt.clip)?;
        let mut m = Vec::with_capacity(grads.len());
        let mut vv = Vec::with_capacity(grads.len());
        let mut adamw = Vec::with_capacity(grads.len());
        for (p, g) in model.params.iter().zip(&grads) {
            let mt = z(&format!("m {}", p.name), &p.value.shape)?;
            let vt = z(&format!("v {}", p.name), &p.value.shape)?;
            let c = AdamWConfig {
                weight_decay: if p.decay { opt.adamw.weight_decay } else { 0.0 },
                ..opt.adamw
            };
            adamw.push(AdamW::new(
                ctx,
                &c,
                &AdamWBuffers {
                    p: &p.value,
                    g,
                    m: &mt,
                    v: &vt,
                    clip: &clip,
                },
            )?);
            m.push(mt);
            vv.push(vt);
        }
        let moe_layers = cfg.moe_layers();
        let complexity = z("complexity", &[b, moe_layers.len().max(1)])?;
        let mut complexity_kernels = Vec::with_capacity(moe_layers.len());
        for (col, &l) in moe_layers.iter().enumerate() {
            if let FfnPlan::Train(plan) = &fwd.blocks[l].ffn {
                complexity_kernels.push(SequenceComplexity::new(
                    ctx,
                    b,
                    &plan.fwd.topk_ids,
                    &complexity,
                    col,
                )?);
            }
        }
        let readback =
            crate::gpu::Staging::new(ctx, "step readback", readback_len(cfg, t) as u64 * 4)?;
        Ok(TrainStep {
            fwd,
            back,
            gx0,
            emb_offsets,
            emb_order,
            dxf,
            dxf_mm,
            dwout_mm,
            normf_back,
            normf_gain,
            emb_wte,
            emb_wpe,
            complexity,
            complexity_kernels,
            grads,
            m,
            v: vv,
            adamw,
            grad_norm,
            clip,
            readback,
            moe_layers,
            vocab: v,
        })
    }

    /// Sequences per batch B and tokens per batch T = B N.
    pub fn batch(&self) -> (usize, usize) {
        (self.fwd.b, self.fwd.t)
    }

    /// Run one training step on `ids`/`targets` ([B N] each) with learning
    /// rate `lr` at optimizer step `step` (1-based). One submit; reads back
    /// the loss, the gradient norm and the routing counts. With
    /// `complexity`, also each sequence's two-expert fractions. A
    /// non-finite loss or gradient norm is `Error::NonFinite` (the
    /// parameters are left as they were: AdamW skips a non-finite step).
    pub async fn step(
        &self,
        ctx: &GpuContext,
        model: &Model,
        args: &StepArgs<'_>,
    ) -> Result<StepStats> {
        let StepArgs {
            ids,
            targets,
            lr,
            step,
            complexity,
        } = *args;
        self.fwd.upload(ctx, &model.cfg, ids, targets)?;
        let (offsets, order) = token_order(ids, self.vocab)?;
        self.emb_offsets.write(ctx, &offsets)?;
        self.emb_order.write(ctx, &order)?;
        for a in &self.adamw {
            a.set_step(ctx, lr, step)?;
        }
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("train_step"),
            });
        self.fwd.clear(&mut enc);
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("train_step"),
                timestamp_writes: None,
            });
            self.fwd.record(&mut pass);
            if complexity {
                for c in &self.complexity_kernels {
                    c.record(&mut pass);
                }
            }
            self.record_backward(&mut pass);
            self.grad_norm.record(&mut pass);
            for a in &self.adamw {
                a.record(&mut pass);
            }
        }
        self.record_readback(&mut enc, complexity);
        ctx.queue.submit(Some(enc.finish()));
        let words = self
            .readback
            .read::<u32>(
                ctx,
                (self.readback.buffer.size() / 4) as usize,
                "training step results",
            )
            .await?;
        ctx.check_errors("train_step")?;
        self.parse(&model.cfg, &words, complexity)
    }

    fn record_backward(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dxf_mm.record(pass);
        self.dwout_mm.record(pass);
        self.normf_back.record(pass);
        self.normf_gain.record(pass);
        for (blk, bb) in self.fwd.blocks.iter().zip(&self.back).rev() {
            if let FfnPlan::Train(plan) = &blk.ffn {
                plan.record_backward(pass);
            }
            bb.norm2_back.record(pass);
            bb.norm2_gain.record(pass);
            bb.add_mid.record(pass);
            bb.dout_mm.record(pass);
            bb.dwo_mm.record(pass);
            bb.attn_back.record(pass);
            bb.da_mm.record(pass);
            bb.dwqkv_mm.record(pass);
            bb.norm1_back.record(pass);
            bb.norm1_gain.record(pass);
            bb.add_in.record(pass);
        }
        self.emb_wte.record(pass);
        self.emb_wpe.record(pass);
    }

    fn record_readback(&self, enc: &mut wgpu::CommandEncoder, complexity: bool) {
        let rb = &self.readback;
        rb.copy_from(enc, &self.fwd.loss_out.buffer, 0, 0, 8);
        rb.copy_from(enc, &self.clip.buffer, 0, 8, 8);
        let mut off = 16u64;
        for &l in &self.moe_layers {
            let plan = match &self.fwd.blocks[l].ffn {
                FfnPlan::Train(p) => p,
                FfnPlan::Eval(_) => continue,
            };
            let e = plan.fwd.logits.shape[1];
            let head = (RoutingLayout::HEADER + e) as u64 * 4;
            rb.copy_from(enc, &plan.fwd.routing.buffer, 0, off, head);
            off += head;
            let stats = plan.stats();
            rb.copy_from(enc, &stats.buffer, 0, off, stats.bytes());
            off += stats.bytes();
        }
        if complexity && !self.moe_layers.is_empty() {
            rb.copy_from(
                enc,
                &self.complexity.buffer,
                0,
                off,
                self.complexity.bytes(),
            );
        }
    }

    fn parse(&self, cfg: &ModelConfig, w: &[u32], complexity: bool) -> Result<StepStats> {
        let f = |i: usize| f32::from_bits(w[i]);
        let loss_sum = f(0);
        let count = f(1).max(1.0);
        let loss = loss_sum / count;
        let grad_norm = f(2);
        let mut s = StepStats {
            loss,
            grad_norm,
            balance_loss: Vec::new(),
            two_expert_fraction: Vec::new(),
            expert_counts: Vec::new(),
            dropped_slots: Vec::new(),
            complexity: Vec::new(),
        };
        let (b, t) = self.batch();
        let mut off = 4usize;
        for &l in &self.moe_layers {
            let e = cfg.ffn_config(l).e;
            let dropped = w[off + RoutingLayout::DROPPED_SLOTS];
            let routed = (w[off + RoutingLayout::USED_SLOTS] + dropped) as f32;
            s.two_expert_fraction
                .push((routed - t as f32).max(0.0) / t as f32);
            s.dropped_slots.push(dropped);
            s.expert_counts
                .push(w[off + RoutingLayout::HEADER..off + RoutingLayout::HEADER + e].to_vec());
            off += RoutingLayout::HEADER + e;
            s.balance_loss.push(f(off + 2 * e));
            off += 2 * e + 2;
        }
        if complexity {
            let cols = self.moe_layers.len();
            s.complexity = (0..b)
                .map(|seq| (0..cols).map(|c| f(off + seq * cols + c)).collect())
                .collect();
        }
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::NonFinite {
                op: "train_step",
                msg: format!("loss {loss}, gradient norm {grad_norm}: the step was skipped"),
            });
        }
        Ok(s)
    }
}

fn readback_len(cfg: &ModelConfig, t: usize) -> usize {
    let mut n = 4;
    let moe = cfg.moe_layers();
    for &l in &moe {
        let c = cfg.ffn_config(l);
        n += RoutingLayout::HEADER + c.e + 2 * c.e + 2;
    }
    // The complexity matrix [B, MoE layers] (B = T / N).
    n + t / cfg.context * moe.len()
}

/// Forward-only evaluation of batches under an inference gating rule.
pub struct EvalStep {
    fwd: Forward,
}

impl EvalStep {
    /// `gate`: the MoE layers' rule at evaluation (the paper: top-1).
    pub fn new(ctx: &GpuContext, model: &Model, b: usize, gate: GateConfig) -> Result<EvalStep> {
        Ok(EvalStep {
            fwd: Forward::new(ctx, model, b, false, Some(gate))?,
        })
    }

    pub fn batch(&self) -> (usize, usize) {
        (self.fwd.b, self.fwd.t)
    }

    /// (sum of token losses, counted tokens) of one batch.
    pub async fn loss(
        &self,
        ctx: &GpuContext,
        model: &Model,
        ids: &[u32],
        targets: &[u32],
    ) -> Result<(f64, f64)> {
        self.fwd.upload(ctx, &model.cfg, ids, targets)?;
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("eval_step"),
            });
        self.fwd.clear(&mut enc);
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("eval_step"),
                timestamp_writes: None,
            });
            self.fwd.record(&mut pass);
        }
        ctx.queue.submit(Some(enc.finish()));
        let out = self.fwd.loss_out.read(ctx).await?;
        ctx.check_errors("eval_step")?;
        Ok((out[0] as f64, out[1] as f64))
    }
}
