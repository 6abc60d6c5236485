//! One model graph for every path: the embedding, the blocks and the head
//! of the transformer, built once per token count and recorded into a
//! compute pass. Training, evaluation, prefill and decode differ only in
//! their [`Mode`]: how tokens are embedded (positions from 0 for a batch of
//! sequences, or from the KV cache's step) and how a block attends (flash
//! attention over its own rows, saving statistics for the backward when it
//! trains; or the same into the KV cache at prefill; or over the cache at
//! decode), and which FFN plan it runs (training, grouped, decode).
//!
//! Per block (pre-norm, T rows):
//! ```text
//! a  = rmsnorm(x, g1)        qkv = a Wqkv        o = attention(qkv)
//! xm = x + o Wo              m = rmsnorm(xm, g2)  y = ffn(m)   x' = xm + y
//! ```
//! then the head: `logits = rmsnorm(x_L, g_f) W_out`. Twin:
//! `model::reference::forward` (batch) and `infer::reference` (generation).

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Tensor, Weight, WeightPart, WeightRef};
use crate::kernels::add::Add;
use crate::kernels::attention::{
    supports_head_dim, AttentionConfig, AttentionForward, AttentionForwardBuffers,
};
use crate::kernels::embedding::{EmbeddingForward, EmbeddingForwardBuffers};
use crate::kernels::kv_cache::{
    KvAppend, KvAttention, KvCache, KvEmbed, KvEmbedBuffers, KvShape, KvStep,
};
use crate::kernels::matmul::{Matmul, MatmulShape, MatmulSpec, Trans};
use crate::kernels::qk::{QkNormKernel, QkvBias, QkvShape, RopeTables, Rotary};
use crate::kernels::rmsnorm::{RmsNormForward, RmsNormForwardBuffers};
use crate::model::config::ModelConfig;
use crate::model::params::BlockParams;
use crate::model::transformer::Model;
use crate::moe::{MoeLayer, MoePlan, MoeTrainPlan, Path};

/// The KV cache a generation pass reads and writes.
#[derive(Clone, Copy)]
pub struct KvRefs<'a> {
    /// One cache per layer.
    pub caches: &'a [KvCache],
    /// The call's start position (`step[0]`) on the GPU.
    pub step: &'a KvStep,
}

/// What a graph is built for.
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    /// B sequences of N tokens, positions from 0, flash attention; with
    /// `train`, every FFN keeps what the backward needs (its training plan).
    Batch { b: usize, train: bool },
    /// A prompt from position 0: flash attention over the call's own rows,
    /// keys and values appended to the caches; grouped expert path.
    Prefill(KvRefs<'a>),
    /// Tokens at `step[0]..`: attention over the caches; a mat-vec per
    /// selected expert.
    Decode(KvRefs<'a>),
}

impl Mode<'_> {
    fn kv(&self) -> Option<KvRefs<'_>> {
        match *self {
            Mode::Batch { .. } => None,
            Mode::Prefill(kv) | Mode::Decode(kv) => Some(kv),
        }
    }
}

/// A GEMM `c = a b (+ beta c)` of shape (m, n, k) with the adapter's
/// choice of kernel.
pub(crate) fn mm<'b>(
    ctx: &GpuContext,
    mnk: (usize, usize, usize),
    trans: Trans,
    beta: f32,
    a: &Tensor<f32>,
    b: impl Into<WeightRef<'b>>,
    c: &Tensor<f32>,
) -> Result<Matmul> {
    gemm(ctx, mnk, trans, 1.0, beta, a, b, c)
}

#[allow(clippy::too_many_arguments)]
fn gemm<'b>(
    ctx: &GpuContext,
    (m, n, k): (usize, usize, usize),
    trans: Trans,
    alpha: f32,
    beta: f32,
    a: &Tensor<f32>,
    b: impl Into<WeightRef<'b>>,
    c: &Tensor<f32>,
) -> Result<Matmul> {
    let shape = MatmulShape {
        m,
        n,
        k,
        trans,
        alpha,
        beta,
    };
    let b = b.into();
    let spec = MatmulSpec::choose_for(ctx, m, n, k, trans, b.dtype).with_beta(beta != 0.0);
    Matmul::new(ctx, &shape, spec, a, b, c)
}

/// How tokens become the first residual stream: one lookup per part of
/// the token table (one for a table in one buffer).
enum Embed {
    /// Positions 0..N of each sequence.
    Batch(Vec<EmbeddingForward>),
    /// Positions from the cache's step.
    Cached(Vec<KvEmbed>),
}

impl Embed {
    fn new(
        ctx: &GpuContext,
        model: &Model,
        mode: &Mode,
        ids: &Tensor<u32>,
        x: &Tensor<f32>,
    ) -> Result<Embed> {
        let wpe = match &model.params.wpe {
            Some(w) => Some(w.f32("position embedding")?),
            None => None,
        };
        let scale = model.cfg.embedding_multiplier;
        let v = model.cfg.vocab;
        let parts = model.params.wte.parts();
        let rows = |p: &WeightPart| (parts.len() > 1).then_some((p.range.start, v));
        Ok(match mode.kv() {
            None => Embed::Batch(
                parts
                    .iter()
                    .map(|p| {
                        EmbeddingForward::new(
                            ctx,
                            &EmbeddingForwardBuffers {
                                ids,
                                wte: p.view,
                                wpe,
                                x,
                                scale,
                                rows: rows(p),
                            },
                        )
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(kv) => Embed::Cached(
                parts
                    .iter()
                    .map(|p| {
                        KvEmbed::new(
                            ctx,
                            &KvEmbedBuffers {
                                step: kv.step,
                                ids,
                                wte: p.view,
                                wpe,
                                x,
                                scale,
                                rows: rows(p),
                            },
                        )
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        match self {
            Embed::Batch(e) => e.iter().for_each(|e| e.record(pass)),
            Embed::Cached(e) => e.iter().for_each(|e| e.record(pass)),
        }
    }
}

/// A block's FFN plan.
pub enum FfnPlan {
    Train(Box<MoeTrainPlan>),
    Infer(Box<MoePlan>),
}

impl FfnPlan {
    /// The forward (input `x`, output `y`, routing).
    pub fn fwd(&self) -> &MoePlan {
        match self {
            FfnPlan::Train(p) => &p.fwd,
            FfnPlan::Infer(p) => p,
        }
    }

    /// The training plan (gradients), if the graph trains.
    pub fn train(&self) -> Result<&MoeTrainPlan> {
        match self {
            FfnPlan::Train(p) => Ok(p),
            FfnPlan::Infer(_) => Err(Error::invalid(
                "model",
                "training step without a training plan",
            )),
        }
    }
}

/// How a block attends.
enum Attention {
    /// Over the call's own rows (training, evaluation, prefill).
    Flash(AttentionForward),
    /// Over the KV cache (decode; prefill of heads wider than flash takes).
    Cached(KvAttention),
}

/// What a block does to q and k before attention: biases, QK-norm, rotary
/// positions (each where the model has it).
struct QkPrep {
    bias: Option<QkvBias>,
    norm: Option<QkNormKernel>,
    rope: Option<Rotary>,
}

impl QkPrep {
    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        if let Some(b) = &self.bias {
            b.record(pass);
        }
        if let Some(n) = &self.norm {
            n.record(pass);
        }
        if let Some(r) = &self.rope {
            r.record(pass);
        }
    }
}

/// One transformer block of one graph: its buffers and launchers.
// Some tensors are held only so that they live as long as the launchers
// that bind them (and for inspection in tests).
#[allow(dead_code)]
pub struct Block {
    /// x [T, D]: the block's input (the residual stream).
    pub x: Tensor<f32>,
    /// a [T, D] = rmsnorm(x), rstd1 [T]
    pub a: Tensor<f32>,
    pub rstd1: Tensor<f32>,
    /// qkv [T, (H + 2 Hkv) Dh]
    pub qkv: Tensor<f32>,
    /// o [T, H Dh]: the attention's output.
    pub o: Tensor<f32>,
    /// lse [B, H, N]: the attention's log-sum-exp per row (flash only).
    pub lse: Option<Tensor<f32>>,
    pub proj: Tensor<f32>,
    /// xm [T, D] = x + o Wo
    pub xm: Tensor<f32>,
    pub rstd2: Tensor<f32>,
    /// out [T, D] = xm + ffn(rmsnorm(xm)): the next block's input.
    pub out: Tensor<f32>,
    pub ffn: FfnPlan,
    /// The shared expert (its input is the routed FFN's) and the sum of
    /// the two outputs.
    pub shared: Option<(Box<MoePlan>, Tensor<f32>)>,
    norm1: RmsNormForward,
    qkv_mm: Matmul,
    prep: QkPrep,
    append: Option<KvAppend>,
    attn: Attention,
    proj_mm: Matmul,
    add1: Add,
    norm2: RmsNormForward,
    add_shared: Option<Add>,
    add2: Add,
    /// The one-sequence evaluation of wide heads: its step (0) and cache.
    _scratch: Option<(KvStep, KvCache)>,
}

/// What every block of one graph shares: the mode, the rows, the rope
/// tables' step.
struct BlockCtx<'a> {
    cfg: &'a ModelConfig,
    mode: &'a Mode<'a>,
    t: usize,
    /// step [4] of the rotary positions: the cache's (prefill, decode) or
    /// zeros (a batch of sequences from 0).
    step: &'a Tensor<u32>,
    rope: Option<&'a RopeTables>,
}

impl Block {
    /// Block `l` on input `x`.
    fn new(
        ctx: &GpuContext,
        bc: &BlockCtx,
        l: usize,
        p: &BlockParams<Weight>,
        layer: &MoeLayer,
        shared: Option<&MoeLayer>,
        x: &Tensor<f32>,
    ) -> Result<Block> {
        let (cfg, mode, t) = (bc.cfg, bc.mode, bc.t);
        let (d, h, hkv, dh) = (cfg.d, cfg.heads, cfg.kv_heads(), cfg.head_dim());
        let (qw, qkv_w) = (cfg.q_width(), cfg.qkv_width());
        let z = |name: &str, shape: &[usize]| Tensor::<f32>::zeros(ctx, name, shape);
        let a = z("a", &[t, d])?;
        let rstd1 = z("rstd1", &[t])?;
        let qkv = z("qkv", &[t, qkv_w])?;
        let o = z("o", &[t, qw])?;
        let proj = z("proj", &[t, d])?;
        let xm = z("xm", &[t, d])?;
        let rstd2 = z("rstd2", &[t])?;
        let out = z("x", &[t, d])?;
        let path = match *mode {
            Mode::Batch { .. } | Mode::Prefill(_) => Path::Grouped,
            Mode::Decode(_) => Path::Decode,
        };
        let ffn = match *mode {
            Mode::Batch { train: true, .. } => {
                FfnPlan::Train(Box::new(layer.plan_train(ctx, t, &cfg.aux_config(l), 1)?))
            }
            _ => FfnPlan::Infer(Box::new(layer.plan(ctx, t, path)?)),
        };
        let shared = match shared {
            Some(s) => Some((
                Box::new(s.plan_on(ctx, &ffn.fwd().x, path)?),
                z("y_sum", &[t, d])?,
            )),
            None => None,
        };

        let norm1 = RmsNormForward::new(
            ctx,
            cfg.eps,
            &RmsNormForwardBuffers {
                x,
                g: p.norm1.f32("rmsnorm")?,
                y: &a,
                rstd: &rstd1,
            },
        )?;
        let qkv_mm = mm(
            ctx,
            (t, qkv_w, d),
            Trans::NN,
            0.0,
            &a,
            p.wqkv.view("qkv projection")?,
            &qkv,
        )?;
        let qshape = QkvShape { t, h, hkv, dh };
        let prep = QkPrep {
            bias: match &p.bqkv {
                Some(b) => Some(QkvBias::new(ctx, qshape, b.f32("qkv bias")?, &qkv)?),
                None => None,
            },
            norm: match (&p.q_norm, &p.k_norm) {
                (Some(gq), Some(gk)) => Some(QkNormKernel::new(
                    ctx,
                    qshape,
                    cfg.eps,
                    gq.f32("qk norm")?,
                    gk.f32("qk norm")?,
                    &qkv,
                )?),
                (None, None) => None,
                _ => return Err(Error::invalid("model", "a q norm without a k norm")),
            },
            rope: match bc.rope {
                Some(tables) => {
                    let period = match mode {
                        Mode::Batch { .. } => cfg.context,
                        _ => t,
                    };
                    Some(Rotary::new(
                        ctx, qshape, tables, bc.step, period, false, &qkv,
                    )?)
                }
                None => None,
            },
        };
        let kv_shape = KvShape {
            t,
            h,
            hkv,
            dh,
            n: cfg.context,
            window: cfg.sliding_window.unwrap_or(0),
            scale: cfg.attn_scale(),
        };
        let append = match mode.kv() {
            Some(kv) => Some(KvAppend::new(ctx, &kv_shape, kv.step, &qkv, &kv.caches[l])?),
            None => None,
        };
        let flash = |b: usize, n: usize| -> Result<(Attention, Option<Tensor<f32>>)> {
            let lse = z("attn_lse", &[b, h, n])?;
            let f = AttentionForward::new(
                ctx,
                AttentionConfig {
                    b,
                    n,
                    h,
                    hkv,
                    window: kv_shape.window,
                    scale: Some(kv_shape.scale),
                },
                &AttentionForwardBuffers {
                    qkv: &qkv,
                    o: &o,
                    lse: &lse,
                },
            )?;
            Ok((Attention::Flash(f), Some(lse)))
        };
        let cached = |kv: KvRefs| -> Result<(Attention, Option<Tensor<f32>>)> {
            Ok((
                Attention::Cached(KvAttention::new(
                    ctx,
                    &kv_shape,
                    kv.step,
                    &qkv,
                    &kv.caches[l],
                    &o,
                )?),
                None,
            ))
        };
        let mut scratch = None;
        let (attn, lse) = match *mode {
            // Heads wider than the flash kernel takes, one sequence, no
            // backward (evaluation): append to a scratch cache from
            // position 0 and attend over it.
            Mode::Batch { b: 1, train: false } if !supports_head_dim(dh) => {
                let step = KvStep::new(ctx, cfg.context)?;
                let cache = KvCache::new(ctx, hkv, cfg.context, dh)?;
                let append = KvAppend::new(ctx, &kv_shape, &step, &qkv, &cache)?;
                let attend = KvAttention::new(ctx, &kv_shape, &step, &qkv, &cache, &o)?;
                scratch = Some((append, step, cache));
                (Attention::Cached(attend), None)
            }
            Mode::Batch { b, .. } => {
                if !supports_head_dim(dh) {
                    return Err(Error::invalid(
                        "model",
                        format!(
                            "head_dim = {dh}: training takes heads of up to 64, and evaluation runs them one sequence at a time"
                        ),
                    ));
                }
                flash(b, cfg.context)?
            }
            Mode::Prefill(kv) if !supports_head_dim(dh) => cached(kv)?,
            Mode::Prefill(_) => flash(1, t)?,
            Mode::Decode(kv) => cached(kv)?,
        };
        let proj_mm = mm(
            ctx,
            (t, d, qw),
            Trans::NN,
            0.0,
            &o,
            p.wo.view("output projection")?,
            &proj,
        )?;
        let rm = cfg.residual_multiplier;
        let add1 = Add::scaled(ctx, x, &proj, rm, &xm)?;
        let norm2 = RmsNormForward::new(
            ctx,
            cfg.eps,
            &RmsNormForwardBuffers {
                x: &xm,
                g: p.norm2.f32("rmsnorm")?,
                y: &ffn.fwd().x,
                rstd: &rstd2,
            },
        )?;
        let (add_shared, y) = match &shared {
            Some((plan, sum)) => (Some(Add::new(ctx, &ffn.fwd().y, &plan.y, sum)?), sum),
            None => (None, &ffn.fwd().y),
        };
        let add2 = Add::scaled(ctx, &xm, y, rm, &out)?;
        let (append, scratch) = match (append, scratch) {
            (Some(a), _) => (Some(a), None),
            (None, Some((a, step, cache))) => (Some(a), Some((step, cache))),
            (None, None) => (None, None),
        };
        Ok(Block {
            x: x.clone(),
            a,
            rstd1,
            qkv,
            o,
            lse,
            proj,
            xm,
            rstd2,
            out,
            ffn,
            shared,
            norm1,
            qkv_mm,
            prep,
            append,
            attn,
            proj_mm,
            add1,
            norm2,
            add_shared,
            add2,
            _scratch: scratch,
        })
    }

    pub(crate) fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record_attention(pass);
        self.ffn.fwd().record_pass(pass);
        self.record_after_ffn(pass);
    }

    /// Expert parallelism: the block up to its routed experts (attention,
    /// the FFN's norm, its router, gate and route); the routed rows go to
    /// the experts' ranks here. False on a decode plan (no route).
    pub(crate) fn record_to_experts(&self, pass: &mut wgpu::ComputePass<'_>) -> bool {
        self.record_attention(pass);
        self.ffn.fwd().record_routing(pass)
    }

    /// The rest of the block once the experts' outputs are in the FFN's
    /// `y_expert`: the combine, the shared expert, the residual add.
    pub(crate) fn record_from_experts(&self, pass: &mut wgpu::ComputePass<'_>) -> bool {
        let ok = self.ffn.fwd().record_combine(pass);
        self.record_after_ffn(pass);
        ok
    }

    fn record_attention(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.norm1.record(pass);
        self.qkv_mm.record(pass);
        self.prep.record(pass);
        if let Some(a) = &self.append {
            a.record(pass);
        }
        match &self.attn {
            Attention::Flash(f) => f.record(pass),
            Attention::Cached(c) => c.record(pass),
        }
        self.proj_mm.record(pass);
        self.add1.record(pass);
        self.norm2.record(pass);
    }

    fn record_after_ffn(&self, pass: &mut wgpu::ComputePass<'_>) {
        if let (Some((plan, _)), Some(add)) = (&self.shared, &self.add_shared) {
            plan.record_pass(pass);
            add.record(pass);
        }
        self.add2.record(pass);
    }
}

/// The final norm and the unembedding.
// Tensors are held so that they live as long as the launchers binding them.
#[allow(dead_code)]
pub struct Head {
    /// x_L [T, D]: the last block's output.
    pub x: Tensor<f32>,
    /// xf [T, D] = rmsnorm(x_L), rstdf [T]
    pub xf: Tensor<f32>,
    pub rstdf: Tensor<f32>,
    /// logits [T, V]
    pub logits: Tensor<f32>,
    norm_f: RmsNormForward,
    /// One GEMM per part of the unembedding (or of the tied table), each
    /// writing its columns of the logits.
    out_mm: Vec<Matmul>,
}

impl Head {
    fn new(ctx: &GpuContext, model: &Model, t: usize, x: &Tensor<f32>) -> Result<Head> {
        let cfg = &model.cfg;
        let (d, v) = (cfg.d, cfg.vocab);
        let xf = Tensor::zeros(ctx, "xf", &[t, d])?;
        let rstdf = Tensor::zeros(ctx, "rstdf", &[t])?;
        let norm_f = RmsNormForward::new(
            ctx,
            cfg.eps,
            &RmsNormForwardBuffers {
                x,
                g: model.params.norm_f.f32("rmsnorm")?,
                y: &xf,
                rstd: &rstdf,
            },
        )?;
        let logits = Tensor::zeros(ctx, "logits", &[t, v])?;
        // Untied: xf W_out; tied: xf wteᵀ. Logits divided by Granite's
        // logits_scaling (alpha = 1 for every other model: exact). A split
        // table (W_out by column blocks, wte by row blocks) gives each part
        // its columns of the logits.
        let (w, trans) = match &model.params.w_out {
            Some(w) => (w, Trans::NN),
            None => (&model.params.wte, Trans::NT),
        };
        let out_mm = w
            .parts()
            .iter()
            .map(|p| {
                let (n, col) = (p.range.len(), p.range.start);
                let shape = MatmulShape {
                    m: t,
                    n,
                    k: d,
                    trans,
                    alpha: 1.0 / cfg.logits_scaling,
                    beta: 0.0,
                };
                let spec = MatmulSpec::choose_for(ctx, t, n, d, trans, p.view.dtype);
                Matmul::new_cols(ctx, &shape, spec, &xf, p.view, &logits, col)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Head {
            x: x.clone(),
            xf,
            rstdf,
            logits,
            norm_f,
            out_mm,
        })
    }

    pub(crate) fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.norm_f.record(pass);
        for mm in &self.out_mm {
            mm.record(pass);
        }
    }
}

/// The whole forward of one token count: ids in, logits out.
pub struct Graph {
    /// Tokens per call T (B N for a batch).
    pub t: usize,
    /// ids [T]: write the tokens here.
    pub ids: Tensor<u32>,
    embed: Embed,
    pub blocks: Vec<Block>,
    pub head: Head,
    /// step [4] of the rotary positions of a batch: zeros (the sequences
    /// start at 0; the backward turns the same rotation back).
    pub rope_step: Tensor<u32>,
}

impl Graph {
    /// Every buffer and launcher of `t` tokens in `mode`, the FFNs run by
    /// `layers` (the model's MoE layers under the chosen gate).
    pub fn new(
        ctx: &GpuContext,
        model: &Model,
        layers: &[MoeLayer],
        t: usize,
        mode: Mode,
    ) -> Result<Graph> {
        let cfg = &model.cfg;
        if t == 0 {
            return Err(Error::invalid("model", "a call of 0 tokens"));
        }
        if layers.len() != cfg.layers || model.params.blocks.len() != cfg.layers {
            return Err(Error::shape(
                "model graph",
                format!("{} layers", cfg.layers),
                format!(
                    "{} FFN layers, {} blocks",
                    layers.len(),
                    model.params.blocks.len()
                ),
            ));
        }
        let ids = Tensor::<u32>::zeros(ctx, "ids", &[t])?;
        let x0 = Tensor::<f32>::zeros(ctx, "x0", &[t, cfg.d])?;
        let embed = Embed::new(ctx, model, &mode, &ids, &x0)?;
        // Rotary positions: a batch's sequences start at 0; a call at the
        // cache's step.
        let zero_step = Tensor::<u32>::zeros(ctx, "rope_step", &[4])?;
        let step = mode.kv().map_or(&zero_step, |kv| &kv.step.tensor);
        let bc = BlockCtx {
            cfg,
            mode: &mode,
            t,
            step,
            rope: model.rope.as_ref(),
        };
        let mut blocks: Vec<Block> = Vec::with_capacity(cfg.layers);
        for (l, (p, layer)) in model.params.blocks.iter().zip(layers).enumerate() {
            let x = blocks.last().map_or(&x0, |b| &b.out);
            let shared = model.shared.get(l).and_then(Option::as_ref);
            let blk = Block::new(ctx, &bc, l, p, layer, shared, x)?;
            blocks.push(blk);
        }
        let x_last = blocks.last().map_or(&x0, |b| &b.out).clone();
        let head = Head::new(ctx, model, t, &x_last)?;
        Ok(Graph {
            t,
            ids,
            embed,
            blocks,
            head,
            rope_step: zero_step,
        })
    }

    /// Zero what the FFNs accumulate into (outside any pass).
    pub fn clear(&self, encoder: &mut wgpu::CommandEncoder) {
        for blk in &self.blocks {
            blk.ffn.fwd().clear(encoder);
            if let Some((plan, _)) = &blk.shared {
                plan.clear(encoder);
            }
        }
    }

    /// The embedding alone (expert parallelism records the graph in parts).
    pub(crate) fn record_embedding(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.embed.record(pass);
    }

    /// Embedding, blocks, head.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.embed.record(pass);
        for blk in &self.blocks {
            blk.record(pass);
        }
        self.head.record(pass);
    }
}
