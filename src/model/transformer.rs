//! The transformer on the GPU: parameters, the forward of a batch, and the
//! training step (forward, backward, gradient clipping, AdamW) recorded into
//! one command encoder with one submit. The host uploads the batch and reads
//! back one small buffer: the loss, the gradient norm and each MoE layer's
//! routing counts (plus, when the curriculum needs them, each sequence's
//! two-expert fraction per MoE layer, computed by `sequence_complexity`).
//!
//! The forward is the shared [`Graph`](crate::model::graph::Graph) in batch
//! mode, followed by the cross-entropy; the backward mirrors it block by
//! block. The FFN is an MoE layer (`moe::MoeLayer`); a dense FFN is the same
//! layer with one expert and weight 1. Twin: `model::reference` (the same
//! step on the CPU).

use crate::checkpoint::NamedTensor;
use crate::error::{Error, Result};
use crate::gpu::{
    Dtype, GpuContext, PartId, Readback, ReadbackLayout, ReadbackWords, Tensor, Weight,
};
use crate::kernels::adamw::{AdamW, AdamWBuffers, AdamWConfig, GradNorm};
use crate::kernels::add::Add;
use crate::kernels::attention::{AttentionBackward, AttentionBackwardBuffers, AttentionConfig};
use crate::kernels::complexity::SequenceComplexity;
use crate::kernels::cross_entropy::{CrossEntropy, CrossEntropyBuffers, LossSum, LossSumBuffers};
use crate::kernels::embedding::{
    token_order, EmbeddingBackwardWpe, EmbeddingBackwardWpeBuffers, EmbeddingBackwardWte,
    EmbeddingBackwardWteBuffers,
};
use crate::kernels::matmul::{Matmul, Trans};
use crate::kernels::qk::{QkvShape, RopeTables, Rotary};
use crate::kernels::rmsnorm::{
    RmsNormBackward, RmsNormBackwardBuffers, RmsNormBackwardGain, RmsNormBackwardGainBuffers,
};
use crate::kernels::{Gates, RoutingLayout, UNUSED};
use crate::model::config::ModelConfig;
use crate::model::graph::{mm, Block, Graph, Mode};
use crate::model::params::{
    BlockParam, FfnParams, HostTensor, ParamId, Params, Storage, TensorValues,
};
use crate::moe::{
    ExpertGradTensors, ExpertGrads, ExpertRowsPlan, ExpertRowsTrainPlan, MoeConfig, MoeLayer,
};
use crate::train::expert_parallel::{dispatch, give_back, ExpertSplit, SlotPlan};

/// Scale of the unembedding's init relative to 1/sqrt(D): the logits of a
/// fresh model have a standard deviation of about this.
pub const W_OUT_SCALE: f32 = 0.1;

/// Parameter values on the host.
pub type HostParams = Params<HostTensor>;

impl Params<HostTensor> {
    /// Seeded initialization, drawn in canonical order: embeddings and
    /// projections uniform with the variance of 1/fan_in (embeddings
    /// 0.02-ish), gains 1; the output projection of each block scaled by
    /// 1/sqrt(2L) (GPT-2's residual rule), and the unembedding `w_out` by
    /// `W_OUT_SCALE`, so that the first logits are nearly uniform (loss ln V
    /// instead of about ln V + 0.5).
    pub fn init(cfg: &ModelConfig, seed: u64) -> HostParams {
        let mut rng = crate::util::Rng::new(seed);
        let resid = 1.0 / (2.0 * cfg.layers as f32).sqrt();
        cfg.param_specs().map(|id, spec| {
            let shape = &spec.shape;
            let n = spec.numel();
            let fan_in = if shape.len() >= 2 {
                shape[shape.len() - 2]
            } else {
                1
            } as f32;
            use BlockParam::*;
            let data = match id {
                ParamId::NormF | ParamId::Block(_, Norm1 | Norm2 | QNorm | KNorm) => {
                    vec![1.0; n]
                }
                ParamId::Block(_, Bqkv) => vec![0.0; n],
                ParamId::Wte | ParamId::Wpe => rng.vec_sym(n, 0.035),
                ParamId::Block(_, p @ (W1 | W3 | W2 | SharedW1 | SharedW3 | SharedW2)) => {
                    // Per expert: [E, fan_in, fan_out].
                    let fan = shape[1] as f32;
                    let scale = if matches!(p, W2 | SharedW2) {
                        resid
                    } else {
                        1.0
                    };
                    rng.vec_sym(n, (3.0 / fan).sqrt() * scale)
                }
                _ => {
                    let scale = match id {
                        ParamId::Block(_, BlockParam::Wo) => resid,
                        ParamId::WOut => W_OUT_SCALE,
                        _ => 1.0,
                    };
                    rng.vec_sym(n, (3.0 / fan_in).sqrt() * scale)
                }
            };
            HostTensor {
                shape: shape.clone(),
                data,
            }
        })
    }

    /// Check the tree against `cfg` (a checkpoint of another model is a
    /// shape error naming the tensor), each tensor holding as many values
    /// as its shape.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        self.validate_shapes(cfg)?;
        for (id, t) in self.iter() {
            let n: usize = t.shape.iter().product();
            if t.data.len() != n {
                return Err(Error::shape(
                    "model parameters",
                    format!("{id} {:?}", t.shape),
                    format!("{} values", t.data.len()),
                ));
            }
        }
        Ok(())
    }

    /// Named tensors of amoe's own files (any order) onto the tree of
    /// `cfg`: every parameter exactly once with its shape and no other name,
    /// or one error naming `file` that lists every problem.
    pub fn from_named(
        cfg: &ModelConfig,
        file: &str,
        tensors: Vec<NamedTensor>,
    ) -> Result<HostParams> {
        let tensors = tensors
            .into_iter()
            .map(|t| (t.name, t.shape, t.data))
            .collect();
        let tree = cfg.param_specs().assign(file, tensors, ParamId::name)?;
        Ok(tree.into_map(|_, (shape, data)| HostTensor { shape, data }))
    }
}

/// The model's parameters on the GPU. The FFN weights belong to the MoE
/// layers (and the shared experts' to theirs); `params` holds second
/// handles to them.
pub struct Model {
    pub cfg: ModelConfig,
    /// Every parameter, stored as `storage` says.
    pub params: Params<Weight>,
    /// How the weights are stored (`Storage::of`).
    pub storage: Storage,
    pub ffn: Vec<MoeLayer>,
    /// Per layer, the sigmoid-gated shared expert (Qwen2-MoE).
    pub shared: Vec<Option<MoeLayer>>,
    /// The rotary embedding's tables over the context (rotary models).
    pub rope: Option<RopeTables>,
    /// Expert parallelism: this rank holds its share of each MoE layer's
    /// experts (`Model::expert_parallel`); `None`: all of them.
    pub shard: Option<ExpertShard>,
}

/// Rank `rank` of `ranks` under expert parallelism: it holds experts
/// `rank · E/N ..` of each MoE layer (E > 1), with their gradients and
/// AdamW moments; everything else is replicated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertShard {
    pub rank: usize,
    pub ranks: usize,
}

impl Model {
    /// The model in f32 (training, and amoe's own checkpoints).
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, host: &HostParams) -> Result<Model> {
        Self::with_dtype(ctx, cfg, host, Dtype::F32)
    }

    /// The model with its matmul weights stored as `storage` says (a
    /// `Dtype` for all of them, or `Storage` with the expert banks apart;
    /// f16: half the bytes, q8 / q4 experts: about a quarter and an eighth;
    /// math still in f32; for inference). The parameters are read and
    /// uploaded one at a time, in canonical order: from a lazily read
    /// checkpoint (`checkpoint::LazyTensor`) the host holds one tensor's
    /// values at a time, never the model. An error drops what was uploaded.
    pub fn with_dtype<T: TensorValues>(
        ctx: &GpuContext,
        cfg: &ModelConfig,
        host: &Params<T>,
        storage: impl Into<Storage>,
    ) -> Result<Model> {
        Self::build(ctx, cfg, host, storage.into(), None)
    }

    /// Rank `rank` of `ranks` of an expert-parallel run: the model in f32,
    /// each MoE layer holding only this rank's experts (`ExpertShard`) from
    /// the whole `host`. Its MoE layers route over all experts and run none
    /// (`TrainStep` and `EvalStep` send the rows to their experts' ranks).
    /// E must be a multiple of N, and no layer may drop slots past a
    /// capacity (an expert would see every rank's tokens).
    pub fn expert_parallel(
        ctx: &GpuContext,
        cfg: &ModelConfig,
        host: &HostParams,
        rank: usize,
        ranks: usize,
    ) -> Result<Model> {
        if rank >= ranks {
            return Err(Error::invalid(
                "expert parallel",
                format!("rank {rank} of {ranks}"),
            ));
        }
        for l in cfg.moe_layers() {
            let c = cfg.ffn_config(l);
            ExpertSplit::new(c.e, ranks)?;
            if c.capacity_factor.is_some() {
                return Err(Error::invalid(
                    "expert parallel",
                    "a capacity factor is per rank's tokens, and experts on other ranks see every rank's: not supported",
                ));
            }
        }
        Self::build(
            ctx,
            cfg,
            host,
            Storage::from(Dtype::F32),
            Some(ExpertShard { rank, ranks }),
        )
    }

    /// The experts this model holds of parameter `id` (a routed expert
    /// tensor of an MoE layer under `shard`), with E; `None` where it holds
    /// the whole tensor.
    pub fn held(&self, id: ParamId) -> Option<(std::ops::Range<usize>, usize)> {
        held_experts(&self.cfg, self.shard, id)
    }

    fn build<T: TensorValues>(
        ctx: &GpuContext,
        cfg: &ModelConfig,
        host: &Params<T>,
        storage: Storage,
        shard: Option<ExpertShard>,
    ) -> Result<Model> {
        cfg.validate()?;
        host.validate_shapes(cfg)?;
        let params = host.try_map(|id, t| {
            let values = t.values()?;
            let (mut shape, name) = (t.shape().to_vec(), id.name());
            let n: usize = shape.iter().product();
            if values.len() != n {
                return Err(Error::shape(
                    "model parameters",
                    format!("{id} {shape:?}"),
                    format!("{} values", values.len()),
                ));
            }
            // Under expert parallelism, this rank's experts alone.
            let values = match held_experts(cfg, shard, id) {
                Some((r, e)) => {
                    let per = n / e;
                    shape[0] = r.len();
                    std::borrow::Cow::Owned(values[r.start * per..r.end * per].to_vec())
                }
                None => values,
            };
            let shape = shape.as_slice();
            let dtype = storage.of(id);
            // What may be larger than one storage binding splits: the
            // vocabulary-sized tables along the vocabulary (wte [V, D] by
            // rows, w_out [D, V] by columns), expert banks [E, ..] by
            // experts (w1, w3 and w2 have the same size, so they split at
            // the same experts).
            use BlockParam::*;
            let w = match id {
                ParamId::WOut => Weight::upload_split(ctx, &name, shape, &values, dtype, 1),
                ParamId::Wte | ParamId::Block(_, W1 | W3 | W2 | SharedW1 | SharedW3 | SharedW2) => {
                    Weight::upload_split(ctx, &name, shape, &values, dtype, 0)
                }
                _ => Weight::upload(ctx, &name, shape, &values, dtype),
            }?;
            // One tensor's staging copy at a time, not the model's.
            ctx.flush_uploads()?;
            Ok(w)
        })?;
        let layer = |c: MoeConfig, f: &FfnParams<Weight>, share| {
            MoeLayer::from_share(
                c,
                share,
                f.w_router.f32("router")?.clone(),
                f.w1.clone(),
                f.w3.clone(),
                f.w2.clone(),
            )
        };
        let mut ffn = Vec::with_capacity(cfg.layers);
        let mut shared = Vec::with_capacity(cfg.layers);
        for (l, b) in params.blocks.iter().enumerate() {
            let share = held_experts(cfg, shard, ParamId::Block(l, BlockParam::W1)).map(|(r, _)| r);
            ffn.push(layer(cfg.ffn_config(l), &b.ffn, share)?);
            shared.push(match (cfg.shared_config(l), &b.shared) {
                (Some(c), Some(w)) => Some(layer(c, w, None)?),
                (None, None) => None,
                _ => {
                    return Err(Error::invalid(
                        "model parameters",
                        format!("layer {l}: the shared expert does not match the config"),
                    ))
                }
            });
        }
        let rope = match &cfg.rope {
            Some(r) => {
                let dh = cfg.head_dim();
                let (cos, sin) = r.tables(cfg.context, dh);
                Some(RopeTables::new(ctx, cfg.context, dh, &cos, &sin)?)
            }
            None => None,
        };
        Ok(Model {
            cfg: cfg.clone(),
            params,
            storage,
            ffn,
            shared,
            rope,
            shard,
        })
    }

    /// Refuse what needs the whole model from one holding a share of the
    /// experts.
    fn whole(&self, what: &str) -> Result<()> {
        match self.shard {
            Some(s) => Err(Error::invalid(
                "expert parallel",
                format!(
                    "{what} needs the whole model; rank {} of {} holds a share of the experts",
                    s.rank, s.ranks
                ),
            )),
            None => Ok(()),
        }
    }

    /// Every parameter back on the host (a model holding all its experts;
    /// an expert-parallel run's gathers them: `Session::host_state`).
    pub async fn download(&self, ctx: &GpuContext) -> Result<HostParams> {
        self.whole("downloading the parameters")?;
        let mut values = Vec::with_capacity(self.params.len());
        for t in self.params.values() {
            values.push(t.read(ctx).await?);
        }
        let mut values = values.into_iter();
        self.params.try_map(|id, t| {
            Ok(HostTensor {
                shape: t.shape().to_vec(),
                data: values
                    .next()
                    .ok_or_else(|| Error::invalid("model download", id.name()))?,
            })
        })
    }

    /// Overwrite every parameter from the host (same config).
    pub fn upload(&self, ctx: &GpuContext, host: &HostParams) -> Result<()> {
        self.whole("uploading the parameters")?;
        host.validate(&self.cfg)?;
        for (p, h) in self.params.values().zip(host.values()) {
            p.write(ctx, &h.data)?;
        }
        Ok(())
    }

    /// Bytes of the parameters on the GPU.
    pub fn bytes(&self) -> u64 {
        self.params.values().map(Weight::bytes).sum()
    }

    /// The FFN layers with another gating rule (for evaluation), sharing
    /// the weights.
    pub(crate) fn ffn_with_gate(&self, gate: Option<&Gates>) -> Vec<MoeLayer> {
        let mut moe = 0;
        self.ffn
            .iter()
            .map(|m| {
                let cfg = match gate {
                    // Evaluation and inference are dropless.
                    Some(g) if m.cfg.e > 1 => {
                        moe += 1;
                        MoeConfig {
                            gate: g.layer(moe - 1),
                            capacity_factor: None,
                            ..m.cfg
                        }
                    }
                    _ => m.cfg,
                };
                MoeLayer {
                    cfg,
                    w_router: m.w_router.clone(),
                    w1: m.w1.clone(),
                    w3: m.w3.clone(),
                    w2: m.w2.clone(),
                    share: m.share.clone(),
                }
            })
            .collect()
    }
}

/// Under `shard`, the experts a rank holds of parameter `id` and E: the
/// routed expert tensors (w1, w3, w2) of the MoE layers (E > 1).
fn held_experts(
    cfg: &ModelConfig,
    shard: Option<ExpertShard>,
    id: ParamId,
) -> Option<(std::ops::Range<usize>, usize)> {
    let s = shard?;
    let ParamId::Block(l, BlockParam::W1 | BlockParam::W3 | BlockParam::W2) = id else {
        return None;
    };
    let e = cfg.ffn_config(l).e;
    let split = ExpertSplit::new(e, s.ranks).ok().filter(|_| e > 1)?;
    Some((split.owned(s.rank), e))
}

/// The forward of one batch shape (the shared graph, then the loss):
/// every buffer and launcher, built once.
// Some tensors are held only so that they live as long as the launchers
// that bind them (and for inspection in tests).
#[allow(dead_code)]
struct Forward {
    b: usize,
    graph: Graph,
    targets: Tensor<u32>,
    loss: Tensor<f32>,
    ce: CrossEntropy,
    loss_out: Tensor<f32>,
    loss_sum: LossSum,
    _layers: Vec<MoeLayer>,
}

impl Forward {
    /// `train`: keep what the backward needs and compute the loss gradient
    /// in place of the logits; otherwise the loss only, under `gate`.
    fn new(
        ctx: &GpuContext,
        model: &Model,
        b: usize,
        train: bool,
        gate: Option<&Gates>,
    ) -> Result<Forward> {
        let cfg = &model.cfg;
        if b == 0 {
            return Err(Error::invalid("model", "batch of 0 sequences"));
        }
        let t = b * cfg.context;
        let layers = model.ffn_with_gate(if train { None } else { gate });
        let graph = Graph::new(ctx, model, &layers, t, Mode::Batch { b, train })?;
        let targets = Tensor::<u32>::zeros(ctx, "targets", &[t])?;
        let loss = Tensor::zeros(ctx, "loss", &[t])?;
        let ce_bufs = CrossEntropyBuffers {
            logits: &graph.head.logits,
            targets: &targets,
            loss: &loss,
        };
        let ce = if train {
            CrossEntropy::forward_backward(ctx, 1.0 / t as f32, &ce_bufs)?
        } else {
            CrossEntropy::forward(ctx, &ce_bufs)?
        };
        let loss_out = Tensor::zeros(ctx, "loss_out", &[2])?;
        let loss_sum = LossSum::new(
            ctx,
            cfg.vocab,
            &LossSumBuffers {
                loss: &loss,
                targets: &targets,
                out: &loss_out,
            },
        )?;
        Ok(Forward {
            b,
            graph,
            targets,
            loss,
            ce,
            loss_out,
            loss_sum,
            _layers: layers,
        })
    }

    fn t(&self) -> usize {
        self.graph.t
    }

    fn upload(
        &self,
        ctx: &GpuContext,
        cfg: &ModelConfig,
        ids: &[u32],
        targets: &[u32],
    ) -> Result<()> {
        let t = self.t();
        if ids.len() != t || targets.len() != t {
            return Err(Error::shape(
                "model batch",
                format!("ids and targets of B N = {t} tokens"),
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
        self.graph.ids.write(ctx, ids)?;
        self.targets.write(ctx, targets)
    }

    fn clear(&self, encoder: &mut wgpu::CommandEncoder) {
        self.graph.clear(encoder);
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.graph.record(pass);
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

impl OptConfig {
    /// AdamW's settings for parameter `id`: no weight decay where `id`
    /// takes none (norm gains, biases, ...).
    pub fn adamw_for(&self, id: ParamId) -> AdamWConfig {
        AdamWConfig {
            weight_decay: if id.decay() {
                self.adamw.weight_decay
            } else {
                0.0
            },
            ..self.adamw
        }
    }
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

/// The backward of one block: the gradient of its output `gy` (its FFN's
/// `dy`) to the gradient of its input `gx` and of its parameters.
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
    /// Rotary models: the rotation turned back on dqkv's q and k heads.
    rope_back: Option<Rotary>,
    da_mm: Matmul,
    dwqkv_mm: Matmul,
    norm1_back: RmsNormBackward,
    norm1_gain: RmsNormBackwardGain,
    add_in: Add,
}

impl BlockBackward {
    /// `p`, `g`: the block's parameters and their gradients; `gx`: where
    /// the gradient of the block's input goes (the previous block's FFN
    /// `dy`, or the embedding's).
    fn new(
        ctx: &GpuContext,
        acfg: AttentionConfig,
        blk: &Block,
        p: &crate::model::params::BlockParams<Tensor<f32>>,
        g: &crate::model::params::BlockParams<Tensor<f32>>,
        gx: Tensor<f32>,
        rope: Option<(&RopeTables, &Tensor<u32>)>,
    ) -> Result<BlockBackward> {
        let plan = blk.ffn.train()?;
        let [t, d] = [blk.x.shape[0], blk.x.shape[1]];
        let z = |name: &str, shape: &[usize]| Tensor::<f32>::zeros(ctx, name, shape);
        let lse = blk
            .lse
            .as_ref()
            .ok_or_else(|| Error::invalid("model", "training step without attention statistics"))?;
        let gxm = z("gxm", &[t, d])?;
        let norm2_grad = z("norm_grad", &[t, d])?;
        let norm1_grad = z("norm1_grad", &[t, d])?;
        let (qw, qkv_w) = (blk.o.shape[1], blk.qkv.shape[1]);
        let dout = z("dout", &[t, qw])?;
        let dqkv = z("dqkv", &[t, qkv_w])?;
        let da = z("da", &[t, d])?;
        let norm2_back = RmsNormBackward::new(
            ctx,
            &RmsNormBackwardBuffers {
                x: &blk.xm,
                g: &p.norm2,
                dy: &plan.dx,
                rstd: &blk.rstd2,
                dx: &norm2_grad,
            },
        )?;
        let norm2_gain = RmsNormBackwardGain::new(
            ctx,
            &RmsNormBackwardGainBuffers {
                x: &blk.xm,
                dy: &plan.dx,
                rstd: &blk.rstd2,
                dg: &g.norm2,
            },
        )?;
        // The gradient of the block's output is its FFN's dy.
        let add_mid = Add::new(ctx, &plan.dy, &norm2_grad, &gxm)?;
        let dout_mm = mm(ctx, (t, qw, d), Trans::NT, 0.0, &gxm, &p.wo, &dout)?;
        let dwo_mm = mm(ctx, (qw, d, t), Trans::TN, 0.0, &blk.o, &gxm, &g.wo)?;
        let attn_back = AttentionBackward::new(
            ctx,
            acfg,
            &AttentionBackwardBuffers {
                qkv: &blk.qkv,
                o: &blk.o,
                dout: &dout,
                lse,
                dqkv: &dqkv,
            },
        )?;
        let rope_back = match rope {
            Some((tables, step)) => Some(Rotary::new(
                ctx,
                QkvShape {
                    t,
                    h: acfg.h,
                    hkv: acfg.hkv,
                    dh: qw / acfg.h,
                },
                tables,
                step,
                acfg.n,
                true,
                &dqkv,
            )?),
            None => None,
        };
        let da_mm = mm(ctx, (t, d, qkv_w), Trans::NT, 0.0, &dqkv, &p.wqkv, &da)?;
        let dwqkv_mm = mm(ctx, (d, qkv_w, t), Trans::TN, 0.0, &blk.a, &dqkv, &g.wqkv)?;
        let norm1_back = RmsNormBackward::new(
            ctx,
            &RmsNormBackwardBuffers {
                x: &blk.x,
                g: &p.norm1,
                dy: &da,
                rstd: &blk.rstd1,
                dx: &norm1_grad,
            },
        )?;
        let norm1_gain = RmsNormBackwardGain::new(
            ctx,
            &RmsNormBackwardGainBuffers {
                x: &blk.x,
                dy: &da,
                rstd: &blk.rstd1,
                dg: &g.norm1,
            },
        )?;
        let add_in = Add::new(ctx, &gxm, &norm1_grad, &gx)?;
        Ok(BlockBackward {
            gx,
            gxm,
            norm2_grad,
            norm1_grad,
            dout,
            dqkv,
            da,
            norm2_back,
            norm2_gain,
            add_mid,
            dout_mm,
            dwo_mm,
            attn_back,
            rope_back,
            da_mm,
            dwqkv_mm,
            norm1_back,
            norm1_gain,
            add_in,
        })
    }

    /// After the block's FFN backward (which writes `plan.dx`).
    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.norm2_back.record(pass);
        self.norm2_gain.record(pass);
        self.add_mid.record(pass);
        self.dout_mm.record(pass);
        self.dwo_mm.record(pass);
        self.attn_back.record(pass);
        if let Some(r) = &self.rope_back {
            r.record(pass);
        }
        self.da_mm.record(pass);
        self.dwqkv_mm.record(pass);
        self.norm1_back.record(pass);
        self.norm1_gain.record(pass);
        self.add_in.record(pass);
    }
}

/// The head's and the embedding's backward: logits gradient (in place of
/// the logits) -> final norm -> last block's `dy`; the first block's input
/// gradient -> the embeddings' gradients (gathers in the host's token order).
// Tensors are held so that they live as long as the launchers binding them.
#[allow(dead_code)]
struct EdgeBackward {
    dxf: Tensor<f32>,
    dxf_mm: Matmul,
    dwout_mm: Matmul,
    normf_back: RmsNormBackward,
    normf_gain: RmsNormBackwardGain,
    /// The gradient of the embedding's output.
    gx0: Tensor<f32>,
    emb_offsets: Tensor<u32>,
    emb_order: Tensor<u32>,
    emb_wte: EmbeddingBackwardWte,
    /// Learned positions only.
    emb_wpe: Option<EmbeddingBackwardWpe>,
}

/// A parameter training needs but this model lacks (training checks the
/// layout first: `ModelConfig::check_trainable`).
fn required<'a>(t: &'a Option<Tensor<f32>>, what: &str) -> Result<&'a Tensor<f32>> {
    t.as_ref().ok_or_else(|| {
        Error::invalid(
            "training step",
            format!("the model has no {what} (tied or rotary models do not train yet)"),
        )
    })
}

impl EdgeBackward {
    fn new(
        ctx: &GpuContext,
        model: &Model,
        params: &Params<Tensor<f32>>,
        graph: &Graph,
        grads: &Params<Tensor<f32>>,
    ) -> Result<EdgeBackward> {
        let (t, d, v) = (graph.t, model.cfg.d, model.cfg.vocab);
        let head = &graph.head;
        let last = graph
            .blocks
            .last()
            .ok_or_else(|| Error::invalid("model", "no layers"))?;
        // Head: dxf = dlogits W_out^T, dW_out = xf^T dlogits, final norm.
        let dxf = Tensor::zeros(ctx, "dxf", &[t, d])?;
        let dxf_mm = mm(
            ctx,
            (t, d, v),
            Trans::NT,
            0.0,
            &head.logits,
            required(&params.w_out, "w_out")?,
            &dxf,
        )?;
        let dwout_mm = mm(
            ctx,
            (d, v, t),
            Trans::TN,
            0.0,
            &head.xf,
            &head.logits,
            required(&grads.w_out, "w_out")?,
        )?;
        let normf_back = RmsNormBackward::new(
            ctx,
            &RmsNormBackwardBuffers {
                x: &head.x,
                g: &params.norm_f,
                dy: &dxf,
                rstd: &head.rstdf,
                dx: &last.ffn.train()?.dy,
            },
        )?;
        let normf_gain = RmsNormBackwardGain::new(
            ctx,
            &RmsNormBackwardGainBuffers {
                x: &head.x,
                dy: &dxf,
                rstd: &head.rstdf,
                dg: &grads.norm_f,
            },
        )?;
        let gx0 = Tensor::zeros(ctx, "gx0", &[t, d])?;
        let emb_offsets = Tensor::<u32>::zeros(ctx, "emb_offsets", &[v + 1])?;
        let emb_order = Tensor::<u32>::zeros(ctx, "emb_order", &[t])?;
        let emb_wte = EmbeddingBackwardWte::new(
            ctx,
            &EmbeddingBackwardWteBuffers {
                dx: &gx0,
                offsets: &emb_offsets,
                order: &emb_order,
                dwte: &grads.wte,
            },
        )?;
        let emb_wpe = match &grads.wpe {
            Some(dwpe) => Some(EmbeddingBackwardWpe::new(
                ctx,
                &EmbeddingBackwardWpeBuffers { dx: &gx0, dwpe },
            )?),
            None => None,
        };
        Ok(EdgeBackward {
            dxf,
            dxf_mm,
            dwout_mm,
            normf_back,
            normf_gain,
            gx0,
            emb_offsets,
            emb_order,
            emb_wte,
            emb_wpe,
        })
    }

    /// Before the blocks' backward.
    fn record_head(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dxf_mm.record(pass);
        self.dwout_mm.record(pass);
        self.normf_back.record(pass);
        self.normf_gain.record(pass);
    }

    /// After the blocks' backward.
    fn record_embedding(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.emb_wte.record(pass);
        if let Some(e) = &self.emb_wpe {
            e.record(pass);
        }
    }
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

/// `s`, or `Error::NonFinite` when its loss or gradient norm is NaN or
/// infinite (AdamW skipped the step).
fn finite(s: StepStats) -> Result<StepStats> {
    if !s.loss.is_finite() || !s.grad_norm.is_finite() {
        return Err(Error::NonFinite {
            op: "train_step",
            msg: format!(
                "loss {}, gradient norm {}: the step was skipped",
                s.loss, s.grad_norm
            ),
        });
    }
    Ok(s)
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

/// One MoE layer's part of the step readback.
struct MoeReadback {
    e: usize,
    /// The routing header and the per-expert counts.
    routing: PartId,
    /// The gate statistics (first-choice fractions, mean probabilities,
    /// balancing and z losses).
    stats: PartId,
}

/// What a training step reads back, laid out once: the loss (sum, count),
/// the clip pair (norm, scale), per MoE layer its routing header + counts
/// and its gate statistics, and (on request) the complexity matrix.
struct StepReadback {
    rb: Readback,
    loss: PartId,
    clip: PartId,
    moe: Vec<MoeReadback>,
    complexity: Option<PartId>,
}

impl StepReadback {
    fn new(
        ctx: &GpuContext,
        fwd: &Forward,
        clip: &Tensor<f32>,
        moe_layers: &[usize],
        complexity: &Tensor<f32>,
    ) -> Result<StepReadback> {
        Ok(Self::with_extra(ctx, fwd, clip, moe_layers, complexity, &[])?.0)
    }

    /// As `new`, with `extra` tensors read back after the rest (the
    /// gradients of a data-parallel step): their parts, in order.
    fn with_extra(
        ctx: &GpuContext,
        fwd: &Forward,
        clip: &Tensor<f32>,
        moe_layers: &[usize],
        complexity: &Tensor<f32>,
        extra: &[&Tensor<f32>],
    ) -> Result<(StepReadback, Vec<PartId>)> {
        let mut layout = ReadbackLayout::new();
        let loss = layout.push_tensor(&fwd.loss_out);
        let clip = layout.push_tensor(clip);
        let mut moe = Vec::with_capacity(moe_layers.len());
        for &l in moe_layers {
            let plan = fwd.graph.blocks[l].ffn.train()?;
            let e = plan.fwd.logits.shape[1];
            moe.push(MoeReadback {
                e,
                routing: layout.push(
                    &plan.fwd.routing.buffer,
                    0,
                    (RoutingLayout::HEADER + e) as u64 * 4,
                ),
                stats: layout.push_tensor(plan.stats()),
            });
        }
        let complexity = (!moe_layers.is_empty()).then(|| layout.push_tensor(complexity));
        let extra = extra.iter().map(|t| layout.push_tensor(t)).collect();
        Ok((
            StepReadback {
                rb: layout.build(ctx, "step readback")?,
                loss,
                clip,
                moe,
                complexity,
            },
            extra,
        ))
    }

    fn record(&self, enc: &mut wgpu::CommandEncoder, complexity: bool) {
        self.rb.record(enc, self.loss);
        self.rb.record(enc, self.clip);
        for m in &self.moe {
            self.rb.record(enc, m.routing);
            self.rb.record(enc, m.stats);
        }
        if let (true, Some(c)) = (complexity, self.complexity) {
            self.rb.record(enc, c);
        }
    }

    /// Distributed steps: every MoE layer's routing counts summed over the
    /// ranks, and (with `complexity`) the ranks' complexity rows gathered.
    fn reduce_counts(
        &self,
        comm: &crate::train::collective::Comm,
        words: &ReadbackWords,
        complexity: bool,
    ) -> Result<(Vec<u32>, Option<Vec<f32>>)> {
        let mut counts = Vec::new();
        for m in &self.moe {
            let r = words.u32s(m.routing);
            counts.push(r[RoutingLayout::USED_SLOTS]);
            counts.push(r[RoutingLayout::DROPPED_SLOTS]);
            counts.extend(&r[RoutingLayout::HEADER..RoutingLayout::HEADER + m.e]);
        }
        comm.sum(&mut counts)?;
        let gathered = match (complexity, self.complexity) {
            (true, Some(c)) => Some(comm.gather(&words.f32s(c))?),
            _ => None,
        };
        Ok((counts, gathered))
    }

    /// Distributed steps: put the global batch's numbers where `parse`
    /// reads them: `sums` = the ranks' summed loss (sum, count) then each
    /// MoE layer's summed mean probabilities P; `counts` from
    /// `reduce_counts`; `f` the global first-choice fractions; `inv` = 1 / N.
    fn globalize(
        &self,
        words: &mut ReadbackWords,
        sums: &[f32],
        counts: &[u32],
        f: &[f32],
        inv: f32,
        balance: f32,
    ) {
        words.set_u32s(self.loss, &[sums[0].to_bits(), sums[1].to_bits()]);
        let (mut p_at, mut c_at, mut f_at) = (2, 0, 0);
        for m in &self.moe {
            let e = m.e;
            let f_l = &f[f_at..f_at + e];
            f_at += e;
            let p: Vec<f32> = sums[p_at..p_at + e].iter().map(|x| x * inv).collect();
            p_at += e;
            let loss = balance * e as f32 * f_l.iter().zip(&p).map(|(a, b)| a * b).sum::<f32>();
            let mut st = words.u32s(m.stats).to_vec();
            st[2 * e] = loss.to_bits();
            words.set_u32s(m.stats, &st);
            let mut r = words.u32s(m.routing).to_vec();
            r[RoutingLayout::USED_SLOTS] = counts[c_at];
            r[RoutingLayout::DROPPED_SLOTS] = counts[c_at + 1];
            r[RoutingLayout::HEADER..RoutingLayout::HEADER + e]
                .copy_from_slice(&counts[c_at + 2..c_at + 2 + e]);
            c_at += 2 + e;
            words.set_u32s(m.routing, &r);
        }
    }

    fn parse(&self, w: &ReadbackWords, b: usize, t: usize, complexity: bool) -> StepStats {
        let loss = w.f32_at(self.loss, 0) / w.f32_at(self.loss, 1).max(1.0);
        let grad_norm = w.f32_at(self.clip, 0);
        let mut s = StepStats {
            loss,
            grad_norm,
            balance_loss: Vec::new(),
            two_expert_fraction: Vec::new(),
            expert_counts: Vec::new(),
            dropped_slots: Vec::new(),
            complexity: Vec::new(),
        };
        for m in &self.moe {
            let r = w.u32s(m.routing);
            let dropped = r[RoutingLayout::DROPPED_SLOTS];
            let routed = (r[RoutingLayout::USED_SLOTS] + dropped) as f32;
            s.two_expert_fraction
                .push((routed - t as f32).max(0.0) / t as f32);
            s.dropped_slots.push(dropped);
            s.expert_counts
                .push(r[RoutingLayout::HEADER..RoutingLayout::HEADER + m.e].to_vec());
            s.balance_loss.push(w.f32_at(m.stats, 2 * m.e));
        }
        if complexity {
            // One row per sequence (empty rows for a model without MoE layers).
            let cols = self.moe.len();
            let v = self.complexity.map(|c| w.f32s(c)).unwrap_or_default();
            s.complexity = (0..b)
                .map(|seq| v[seq * cols..(seq + 1) * cols].to_vec())
                .collect();
        }
        s
    }
}

/// Everything a training step of batch size B needs, built once, in the
/// order it runs: the forward, the head's backward, the blocks' backward in
/// reverse, the embedding's backward, the gradient norm and AdamW.
// Some tensors are held only so that they live as long as the launchers
// that bind them (and for inspection in tests).
#[allow(dead_code)]
pub struct TrainStep {
    fwd: Forward,
    edge: EdgeBackward,
    back: Vec<BlockBackward>,
    /// complexity [B, MoE layers]: each sequence's two-expert fraction per
    /// MoE layer, computed on the GPU when the curriculum asks for it.
    complexity: Tensor<f32>,
    complexity_kernels: Vec<SequenceComplexity>,
    /// Gradients and AdamW moments of every parameter. The FFN's gradients
    /// live in its training plan; these are second handles.
    pub grads: Params<Tensor<f32>>,
    pub m: Params<Tensor<f32>>,
    pub v: Params<Tensor<f32>>,
    grad_norm: GradNorm,
    clip: Tensor<f32>,
    /// One per parameter, in canonical order.
    adamw: Vec<AdamW>,
    readback: StepReadback,
    vocab: usize,
    /// What a data-parallel step adds (`enable_data_parallel`).
    dp: Option<DataParallel>,
    /// What expert parallelism adds (a model holding a share of its experts).
    ep: Option<ExpertParallel>,
}

/// What an expert-parallel training step adds (a model holding a share of
/// its experts, `Model::expert_parallel`).
struct ExpertParallel {
    /// The training graph's exchanges, per MoE layer.
    ex: Exchange,
    gate: GateFractions,
    /// The step's readback with the replicated gradients, then this rank's
    /// experts'.
    rb: StepReadback,
    /// The gradients of the parameters every rank holds (summed over the
    /// ranks), and of this rank's experts (its own): part, tensor.
    replicated: Vec<(PartId, Tensor<f32>)>,
    bank_grads: Vec<(PartId, Tensor<f32>)>,
    max_norm: Option<f32>,
}

/// Expert parallelism over one graph (a training or an evaluation
/// forward): per block, its MoE layer's exchange, or `None` (a dense FFN
/// stays local).
struct Exchange {
    layers: Vec<Option<Banked>>,
}

/// One MoE layer's experts under expert parallelism: how they split over
/// the ranks, the rows plan of this rank's experts (`BankRows`), and the
/// readbacks of this rank's side of the exchanges.
struct Banked {
    split: ExpertSplit,
    /// The most rows every rank together may route to this rank's experts
    /// (all of their slots: N T K).
    max_rows: usize,
    /// Training: the experts' weight gradients (the model's, kept when
    /// the rows plan grows).
    dw: Option<ExpertGradTensors>,
    /// The rows plan, sized for the rows received so far: it starts at
    /// this rank's own slots (T K, what a balanced router sends) and grows
    /// when a step receives more (at most `max_rows`).
    rows: std::cell::RefCell<std::rc::Rc<BankRows>>,
    st: BankStaging,
}

/// A rows plan of a rank's experts and the readbacks of what it gives.
struct BankRows {
    plan: BankPlan,
    /// The bank's output rows; training: the rows' input gradients.
    bank_y: (Readback, PartId),
    bank_dx: Option<(Readback, PartId)>,
}

/// The rows plan of a rank's experts: forward only (evaluation) or with
/// the backward (training).
enum BankPlan {
    Eval(Box<ExpertRowsPlan>),
    Train(Box<ExpertRowsTrainPlan>),
}

impl BankPlan {
    fn fwd(&self) -> &ExpertRowsPlan {
        match self {
            BankPlan::Eval(p) => p,
            BankPlan::Train(p) => &p.fwd,
        }
    }

    fn train(&self) -> Result<&ExpertRowsTrainPlan> {
        match self {
            BankPlan::Train(p) => Ok(p),
            BankPlan::Eval(_) => Err(Error::invalid(
                "expert parallel",
                "a backward through an evaluation plan",
            )),
        }
    }
}

/// The readbacks of this rank's side of one MoE layer's exchanges, each
/// recorded in the submit that produced its data (one map per exchange, no
/// extra submit).
struct BankStaging {
    /// After the route: the routing words up to the offsets, token_of_slot
    /// and the FFN input x.
    routed: Readback,
    routing: PartId,
    token_of_slot: PartId,
    x: PartId,
    /// Training: the slots' output gradients (after the combine backward).
    dys: Option<(Readback, PartId)>,
}

/// What the forward's exchange of one MoE layer learned and the backward's
/// reuses: the routing words (header, counts, offsets) and token_of_slot.
struct RoutedSlots {
    words: Vec<u32>,
    token_of_slot: Vec<u32>,
}

/// The slot plan in a layer's routing words (header, E counts, E + 1
/// padded offsets) and its token_of_slot.
fn slot_plan<'a>(words: &'a [u32], token_of_slot: &'a [u32], e: usize) -> SlotPlan<'a> {
    let h = RoutingLayout::HEADER;
    SlotPlan {
        counts: &words[h..h + e],
        offsets: &words[h + e..h + 2 * e + 1],
        token_of_slot,
    }
}

/// A readback of `t` alone.
fn readback_of(ctx: &GpuContext, t: &Tensor<f32>, label: &str) -> Result<(Readback, PartId)> {
    let mut layout = ReadbackLayout::new();
    let p = layout.push_tensor(t);
    Ok((layout.build(ctx, label)?, p))
}

impl Exchange {
    /// The exchanges of `fwd`'s MoE layers on a model holding a share of
    /// its experts (none for one holding them all), training ones with
    /// `train`.
    fn new(
        ctx: &GpuContext,
        model: &Model,
        fwd: &Forward,
        train: bool,
    ) -> Result<Option<Exchange>> {
        let Some(shard) = model.shard else {
            return Ok(None);
        };
        let t = fwd.t();
        let mut layers = Vec::with_capacity(model.ffn.len());
        for (l, layer) in model.ffn.iter().enumerate() {
            if layer.share.is_none() {
                layers.push(None);
                continue;
            }
            let split = ExpertSplit::new(layer.cfg.e, shard.ranks)?;
            let block = &fwd.graph.blocks[l].ffn;
            let p = block.fwd();
            let slots = t * p.topk_ids.shape[1];
            let (tos, _) = p
                .slot_buffers()
                .ok_or_else(|| Error::invalid("expert parallel", "no grouped plan"))?;
            let mut layout = ReadbackLayout::new();
            let words = (RoutingLayout::HEADER + 2 * split.experts + 1) as u64 * 4;
            let routing = layout.push(&p.routing.buffer, 0, words);
            let token_of_slot = layout.push_tensor(tos);
            let x = layout.push_tensor(&p.x);
            let dys = match train {
                true => Some(readback_of(
                    ctx,
                    &block.train()?.backward.scratch.dys,
                    "slot output gradients",
                )?),
                false => None,
            };
            let st = BankStaging {
                routed: layout.build(ctx, "routed slots")?,
                routing,
                token_of_slot,
                x,
                dys,
            };
            let first = BankRows::new(ctx, layer, slots, train, None)?;
            let dw = match &first.plan {
                BankPlan::Train(t) => Some((t.dw1.clone(), t.dw2.clone(), t.dw3.clone())),
                BankPlan::Eval(_) => None,
            };
            layers.push(Some(Banked {
                split,
                max_rows: shard.ranks * slots,
                dw,
                rows: std::cell::RefCell::new(std::rc::Rc::new(first)),
                st,
            }));
        }
        Ok(Some(Exchange { layers }))
    }

    /// Each bank's rows plan rebuilt for `rows` rows (at most its maximum):
    /// what it grows from. Tests start small to exercise the growth.
    fn set_rows(&self, ctx: &GpuContext, model: &Model, rows: usize) -> Result<()> {
        for (l, b) in self.layers.iter().enumerate() {
            if let Some(b) = b {
                let next = BankRows::new(
                    ctx,
                    &model.ffn[l],
                    rows.clamp(1, b.max_rows),
                    b.dw.is_some(),
                    b.dw.clone(),
                )?;
                *b.rows.borrow_mut() = std::rc::Rc::new(next);
            }
        }
        Ok(())
    }

    /// The rows each bank's plan holds now (per block, 0 without a bank).
    fn rows(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|b| b.as_ref().map_or(0, |b| b.rows.borrow().plan.fwd().rows))
            .collect()
    }

    /// The forward of `fwd` in segments, each ending where an MoE layer's
    /// routed rows leave for the experts' ranks; `tail` records what
    /// follows the loss in the last segment's pass, `tail_enc` after it.
    async fn forward(
        &self,
        ctx: &GpuContext,
        comm: &crate::train::collective::Comm,
        model: &Model,
        fwd: &Forward,
        tail: &dyn Fn(&mut wgpu::ComputePass<'static>) -> Result<()>,
        tail_enc: &dyn Fn(&mut wgpu::CommandEncoder),
    ) -> Result<Vec<Option<RoutedSlots>>> {
        let mut routed: Vec<Option<RoutedSlots>> = (0..self.layers.len()).map(|_| None).collect();
        let graph = &fwd.graph;
        let blocks = &graph.blocks;
        let grouped = || Error::invalid("expert parallel", "an MoE layer without its grouped plan");
        let split_at: Vec<usize> = (0..blocks.len())
            .filter(|&l| self.layers[l].is_some())
            .collect();
        for i in 0..=split_at.len() {
            let from = if i == 0 { 0 } else { split_at[i - 1] + 1 };
            let to = split_at.get(i).copied().unwrap_or(blocks.len());
            let mut clear = None;
            if i == 0 {
                let mut enc = ctx
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
                fwd.clear(&mut enc);
                clear = Some(enc.finish());
            }
            let (mut enc, mut pass) = open_pass(ctx, "expert-parallel forward");
            if i == 0 {
                graph.record_embedding(&mut pass);
            } else if !blocks[from - 1].record_from_experts(&mut pass) {
                return Err(grouped());
            }
            for blk in &blocks[from..to] {
                blk.record(&mut pass);
            }
            let last = to == blocks.len();
            if !last {
                if !blocks[to].record_to_experts(&mut pass) {
                    return Err(grouped());
                }
            } else {
                graph.head.record(&mut pass);
                fwd.ce.record(&mut pass);
                fwd.loss_sum.record(&mut pass);
                tail(&mut pass)?;
            }
            drop(pass);
            if last {
                tail_enc(&mut enc);
            }
            let banked = split_at
                .get(i)
                .and_then(|&l| Some((l, self.layers[l].as_ref()?)));
            if let Some((_, b)) = banked {
                b.st.routed.record_all(&mut enc);
            }
            scoped_submit(ctx, clear, enc)?;
            if let Some((l, b)) = banked {
                let plan = blocks[l].ffn.fwd();
                routed[l] = Some(b.experts_forward(ctx, comm, &model.ffn[l], plan).await?);
            }
        }
        Ok(routed)
    }
}

impl BankRows {
    /// The rows plan of `layer`'s experts over `rows` rows, with its
    /// readbacks; training ones write the weight gradients into `dw` when
    /// given (a plan that grows keeps the model's gradients).
    fn new(
        ctx: &GpuContext,
        layer: &MoeLayer,
        rows: usize,
        train: bool,
        dw: Option<ExpertGradTensors>,
    ) -> Result<BankRows> {
        let plan = match train {
            true => BankPlan::Train(Box::new(layer.plan_rows_train_into(ctx, rows, 1, dw)?)),
            false => BankPlan::Eval(Box::new(layer.plan_rows(ctx, rows)?)),
        };
        let bank_y = readback_of(ctx, &plan.fwd().y, "expert bank output")?;
        let bank_dx = match &plan {
            BankPlan::Train(t) => Some(readback_of(ctx, &t.dx, "expert bank input gradient")?),
            BankPlan::Eval(_) => None,
        };
        Ok(BankRows {
            plan,
            bank_y,
            bank_dx,
        })
    }
}

impl Banked {
    /// The rows plan, grown first where `n` rows came (half as many again,
    /// at most `max_rows`, so that growth stays rare).
    fn rows_for(
        &self,
        ctx: &GpuContext,
        layer: &MoeLayer,
        n: usize,
    ) -> Result<std::rc::Rc<BankRows>> {
        let now = self.rows.borrow().clone();
        if n <= now.plan.fwd().rows {
            return Ok(now);
        }
        let rows = (n + n / 2).min(self.max_rows).max(n);
        let next = std::rc::Rc::new(BankRows::new(
            ctx,
            layer,
            rows,
            self.dw.is_some(),
            self.dw.clone(),
        )?);
        *self.rows.borrow_mut() = next.clone();
        Ok(next)
    }

    /// Forward: this rank's routed rows of `plan` (the FFN input's row of
    /// each slot) to their experts' ranks, the bank on what came, the
    /// outputs back into `y_expert`.
    async fn experts_forward(
        &self,
        ctx: &GpuContext,
        comm: &crate::train::collective::Comm,
        layer: &MoeLayer,
        plan: &crate::moe::MoePlan,
    ) -> Result<RoutedSlots> {
        let st = &self.st;
        let (_, y_expert) = plan
            .slot_buffers()
            .ok_or_else(|| Error::invalid("expert parallel", "no grouped plan"))?;
        let e = self.split.experts;
        let d = plan.x.shape[1];
        let (words, tos, x) = {
            let w = st.routed.read(ctx).await?;
            (
                w.u32s(st.routing).to_vec(),
                w.u32s(st.token_of_slot).to_vec(),
                w.f32s(st.x),
            )
        };
        ctx.check_errors("expert-parallel forward")?;
        let slots = slot_plan(&words, &tos, e);
        let got = dispatch(comm, &self.split, &slots, d, |_, tok| {
            &x[tok * d..(tok + 1) * d]
        })?;
        let rows = self.rows_for(ctx, layer, got.len())?;
        let bank = rows.plan.fwd();
        bank.write(ctx, &got.rows, &got.local_expert)?;
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("expert bank forward"),
            });
        bank.record(&mut enc);
        let n = (got.len() * d) as u64;
        let (y_rb, y_part) = &rows.bank_y;
        y_rb.record_range(&mut enc, *y_part, 0, n * 4);
        scoped_submit(ctx, None, enc)?;
        let out = y_rb.read(ctx).await?.f32s(*y_part);
        let back = give_back(
            comm,
            &self.split,
            &slots,
            &got,
            &out[..got.len() * d],
            tos.len(),
        )?;
        y_expert.write(ctx, &back)?;
        Ok(RoutedSlots {
            words,
            token_of_slot: tos,
        })
    }

    /// Backward: each routed slot's output gradient to its expert's rank,
    /// the bank's backward on what came (its weight gradients stay here),
    /// each slot's input gradient back into the routing rank's `dxs`. The
    /// rows plan is the forward's (the same rows come).
    async fn experts_backward(
        &self,
        ctx: &GpuContext,
        comm: &crate::train::collective::Comm,
        routed: &RoutedSlots,
        dxs: &Tensor<f32>,
    ) -> Result<()> {
        let rows = self.rows.borrow().clone();
        let bank = rows.plan.train()?;
        let missing = || Error::invalid("expert parallel", "a bank without its backward");
        let ((dys_rb, dys_part), (dx_rb, dx_part)) = (
            self.st.dys.as_ref().ok_or_else(missing)?,
            rows.bank_dx.as_ref().ok_or_else(missing)?,
        );
        let e = self.split.experts;
        let d = dxs.shape[1];
        let dys = dys_rb.read(ctx).await?.f32s(*dys_part);
        ctx.check_errors("expert-parallel backward")?;
        let slots = slot_plan(&routed.words, &routed.token_of_slot, e);
        let got = dispatch(comm, &self.split, &slots, d, |slot, _| {
            &dys[slot * d..(slot + 1) * d]
        })?;
        if got.len() > bank.fwd.rows {
            return Err(Error::invalid(
                "expert parallel",
                format!(
                    "the backward received {} rows, the forward {}",
                    got.len(),
                    bank.fwd.rows
                ),
            ));
        }
        if !got.rows.is_empty() {
            ctx.queue
                .write_buffer(&bank.dy.buffer, 0, bytemuck::cast_slice(&got.rows));
        }
        let (mut enc, mut pass) = open_pass(ctx, "expert bank backward");
        bank.record_backward(&mut pass);
        drop(pass);
        let n = (got.len() * d) as u64;
        dx_rb.record_range(&mut enc, *dx_part, 0, n * 4);
        scoped_submit(ctx, None, enc)?;
        let dx = dx_rb.read(ctx).await?.f32s(*dx_part);
        let give = give_back(
            comm,
            &self.split,
            &slots,
            &got,
            &dx[..got.len() * d],
            routed.token_of_slot.len(),
        )?;
        dxs.write(ctx, &give)
    }
}

/// AdamW of parameter `id` under `opt` (no weight decay where `id` takes none).
fn param_adamw(
    ctx: &GpuContext,
    opt: &OptConfig,
    id: ParamId,
    b: &AdamWBuffers<'_>,
) -> Result<AdamW> {
    AdamW::new(ctx, &opt.adamw_for(id), b)
}

fn not_sharded() -> Error {
    Error::invalid(
        "expert parallel",
        "the model holds all of its experts: build it with Model::expert_parallel",
    )
}

/// Submit `first` (if any) and `enc`, errors caught as the step's.
fn scoped_submit(
    ctx: &GpuContext,
    first: Option<wgpu::CommandBuffer>,
    enc: wgpu::CommandEncoder,
) -> Result<()> {
    ctx.scoped("expert-parallel step", || {
        ctx.queue.submit(first.into_iter().chain([enc.finish()]));
        Ok(())
    })
}

/// A compute pass of its own encoder, not borrowing it (expert parallelism
/// records a step in many submits).
fn open_pass(ctx: &GpuContext, label: &str) -> (wgpu::CommandEncoder, wgpu::ComputePass<'static>) {
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
    let pass = enc
        .begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: None,
        })
        .forget_lifetime();
    (enc, pass)
}

/// A data-parallel step's own buffers: the gate statistics' f of every MoE
/// layer (read back after the forward), the step's readback with every
/// gradient appended (one staging buffer), and one flat buffer that the
/// summed gradients are written to at once and copied from into each
/// gradient; the gradient norm's readback after the update.
struct DataParallel {
    gate: GateFractions,
    /// The step's readback, with the first group's gradients appended.
    rb: StepReadback,
    /// The backward's submits, in order (one without overlap).
    groups: Vec<GradGroup>,
    grad_in: Tensor<f32>,
    clip_rb: Readback,
    clip_part: PartId,
}

/// The first-choice fractions f of every MoE layer's gate statistics, read
/// back after a distributed step's forward and replaced by the global
/// batch's (the balancing loss is not linear in the tokens).
struct GateFractions {
    rb: Readback,
    /// Per MoE layer: its block, its f part and E.
    parts: Vec<(usize, PartId, usize)>,
}

impl GateFractions {
    fn new(ctx: &GpuContext, fwd: &Forward, model: &Model) -> Result<GateFractions> {
        let mut layout = ReadbackLayout::new();
        let mut parts = Vec::new();
        for l in model.cfg.moe_layers() {
            let plan = fwd.graph.blocks[l].ffn.train()?;
            let e = plan.fwd.logits.shape[1];
            parts.push((l, layout.push(&plan.stats().buffer, 0, e as u64 * 4), e));
        }
        Ok(GateFractions {
            rb: layout.build(ctx, "gate statistics readback")?,
            parts,
        })
    }

    /// Record each MoE layer's gate statistics (into an open pass).
    fn record_stats(&self, fwd: &Forward, pass: &mut wgpu::ComputePass<'_>) -> Result<()> {
        for &(l, _, _) in &self.parts {
            fwd.graph.blocks[l].ffn.train()?.record_gate_stats(pass);
        }
        Ok(())
    }

    /// This rank's f of every MoE layer, in layer order (after the submit
    /// that recorded `rb`).
    async fn read(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let w = self.rb.read(ctx).await?;
        Ok(self.parts.iter().flat_map(|&(_, p, _)| w.f32s(p)).collect())
    }

    /// Write `f` (the global batch's, in layer order) in place of each
    /// layer's own.
    fn write(&self, ctx: &GpuContext, fwd: &Forward, f: &[f32]) -> Result<()> {
        let mut at = 0;
        for &(l, _, e) in &self.parts {
            let stats = fwd.graph.blocks[l].ffn.train()?.stats();
            ctx.queue
                .write_buffer(&stats.buffer, 0, bytemuck::cast_slice(&f[at..at + e]));
            at += e;
        }
        Ok(())
    }
}

/// One submit of a data-parallel step's backward and the gradients it
/// finishes: read back as soon as that submit is done and all-reduced while
/// the later submits run on the GPU (the overlap).
struct GradGroup {
    /// The head's backward (final norm, unembedding) comes first.
    head: bool,
    /// These blocks' backward, recorded from the last to the first.
    blocks: std::ops::Range<usize>,
    /// The embedding's backward comes last.
    embedding: bool,
    /// Its own staging buffer; `None` for the first group, whose gradients
    /// ride in the step's readback.
    rb: Option<Readback>,
    /// Each gradient it finishes: its part of the readback and its first
    /// float in `grad_in` (the canonical order).
    grads: Vec<(PartId, usize)>,
}

/// Where the time of a data-parallel step went (seconds) and the bytes
/// this rank sent: the benchmark's numbers.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DataParallelTimes {
    /// Forward (and gate statistics) plus backward on the GPU, with their
    /// readbacks: the time this rank waited for its GPU.
    pub compute_s: f64,
    /// The f and the gradient all-reduces and the complexity gather.
    pub all_reduce_s: f64,
    /// Writing the summed gradients and the update (norm, clip, AdamW).
    pub write_update_s: f64,
    /// Floats of gradient in the flat buffer.
    pub grad_floats: usize,
    /// Bytes this rank sent in the step.
    pub bytes_sent: u64,
    /// Submits of the backward, each followed by the all-reduce of the
    /// gradients it finished (1: no overlap); with expert parallelism, its
    /// segments (one more than the MoE layers).
    pub backward_submits: usize,
    /// The step was expert-parallel: `all_reduce_s` counts every exchange
    /// (the rows' all-to-alls too).
    pub expert_parallel: bool,
}

impl TrainStep {
    pub fn new(ctx: &GpuContext, model: &Model, b: usize, opt: &OptConfig) -> Result<TrainStep> {
        let cfg = &model.cfg;
        opt.adamw.validate()?;
        cfg.check_trainable()?;
        let fwd = Forward::new(ctx, model, b, true, None)?;
        let blocks = &fwd.graph.blocks;
        let z = |name: &str, shape: &[usize]| Tensor::<f32>::zeros(ctx, name, shape);
        // Expert parallelism: each MoE layer's rows plan of this rank's
        // experts (their gradients are its).
        let ex = Exchange::new(ctx, model, &fwd, true)?;

        // Gradients: the FFN's live in its training plan (or the rows plan
        // of this rank's experts). Training reads and writes f32 parameters.
        let params = model
            .params
            .try_map(|_, w| Ok(w.f32("training")?.clone()))?;
        let grads = params.try_map(|id, p| {
            let plan = |l: usize| blocks[l].ffn.train();
            let experts = |l: usize| -> Result<ExpertGrads<'_>> {
                match ex.as_ref().and_then(|x| x.layers[l].as_ref()) {
                    Some(b) => match &b.dw {
                        Some((dw1, dw2, dw3)) => Ok((dw1, dw2, dw3.as_ref())),
                        None => Err(Error::invalid(
                            "expert parallel",
                            "a bank without gradients",
                        )),
                    },
                    None => plan(l)?.expert_grads(),
                }
            };
            Ok(match id {
                ParamId::Block(l, BlockParam::Router) => plan(l)?.dw_router.clone(),
                ParamId::Block(l, BlockParam::W1) => experts(l)?.0.clone(),
                ParamId::Block(l, BlockParam::W3) => experts(l)?
                    .2
                    .cloned()
                    .ok_or_else(|| Error::invalid("model", format!("{id}: no SwiGLU gradient")))?,
                ParamId::Block(l, BlockParam::W2) => experts(l)?.1.clone(),
                _ => z(&format!("grad {id}"), &p.shape)?,
            })
        })?;

        // Backward: the head and the embedding, then each block; the
        // gradient of a block's input is the previous block's FFN dy (or
        // the embedding's gx0).
        let edge = EdgeBackward::new(ctx, model, &params, &fwd.graph, &grads)?;
        let acfg = AttentionConfig {
            b,
            n: cfg.context,
            h: cfg.heads,
            hkv: cfg.kv_heads(),
            window: cfg.sliding_window.unwrap_or(0),
            scale: Some(cfg.attn_scale()),
        };
        let mut back = Vec::with_capacity(cfg.layers);
        for (l, blk) in blocks.iter().enumerate() {
            let gx = match l {
                0 => edge.gx0.clone(),
                _ => blocks[l - 1].ffn.train()?.dy.clone(),
            };
            back.push(BlockBackward::new(
                ctx,
                acfg,
                blk,
                &params.blocks[l],
                &grads.blocks[l],
                gx,
                model.rope.as_ref().map(|r| (r, &fwd.graph.rope_step)),
            )?);
        }

        // Curriculum: each sequence's two-expert fraction per MoE layer.
        let moe_layers = cfg.moe_layers();
        let complexity = z("complexity", &[b, moe_layers.len().max(1)])?;
        let mut complexity_kernels = Vec::with_capacity(moe_layers.len());
        for (col, &l) in moe_layers.iter().enumerate() {
            complexity_kernels.push(SequenceComplexity::new(
                ctx,
                b,
                &blocks[l].ffn.train()?.fwd.topk_ids,
                &complexity,
                col,
            )?);
        }

        // Optimizer: global norm and clip, then AdamW per parameter.
        let clip = z("clip", &[2])?;
        let grad_refs: Vec<&Tensor<f32>> = grads.values().collect();
        let grad_norm = GradNorm::new(ctx, &grad_refs, &clip, opt.clip)?;
        let m = params.try_map(|id, p| z(&format!("m {id}"), &p.shape))?;
        let v = params.try_map(|id, p| z(&format!("v {id}"), &p.shape))?;
        let mut adamw = Vec::with_capacity(grads.len());
        for ((id, p), ((g, mt), vt)) in params
            .iter()
            .zip(grads.values().zip(m.values()).zip(v.values()))
        {
            adamw.push(param_adamw(
                ctx,
                opt,
                id,
                &AdamWBuffers {
                    p,
                    g,
                    m: mt,
                    v: vt,
                    clip: &clip,
                },
            )?);
        }
        let readback = StepReadback::new(ctx, &fwd, &clip, &moe_layers, &complexity)?;
        let mut step = TrainStep {
            fwd,
            edge,
            back,
            complexity,
            complexity_kernels,
            grads,
            m,
            v,
            grad_norm,
            clip,
            adamw,
            readback,
            vocab: cfg.vocab,
            dp: None,
            ep: None,
        };
        if let Some(ex) = ex {
            step.ep = Some(step.expert_parallel(ctx, model, opt, ex)?);
        }
        Ok(step)
    }

    /// What an expert-parallel step adds to the data-parallel one: the
    /// readback of the replicated gradients and this rank's experts'.
    fn expert_parallel(
        &self,
        ctx: &GpuContext,
        model: &Model,
        opt: &OptConfig,
        ex: Exchange,
    ) -> Result<ExpertParallel> {
        let mut replicated = Vec::new();
        let mut bank_grads = Vec::new();
        for (id, g) in self.grads.iter() {
            match model.held(id) {
                Some(_) => bank_grads.push(g.clone()),
                None => replicated.push(g.clone()),
            }
        }
        let extra: Vec<&Tensor<f32>> = replicated.iter().chain(&bank_grads).collect();
        let (rb, parts) = StepReadback::with_extra(
            ctx,
            &self.fwd,
            &self.clip,
            &model.cfg.moe_layers(),
            &self.complexity,
            &extra,
        )?;
        let (rep_parts, bank_parts) = parts.split_at(replicated.len());
        Ok(ExpertParallel {
            ex,
            gate: GateFractions::new(ctx, &self.fwd, model)?,
            rb,
            replicated: rep_parts.iter().copied().zip(replicated).collect(),
            bank_grads: bank_parts.iter().copied().zip(bank_grads).collect(),
            max_norm: opt.clip,
        })
    }

    /// Build what `step_data_parallel` needs (once, before the first step).
    /// `overlap`: the backward is one submit per block (the head with the
    /// last block, the embedding on its own), and each submit's gradients
    /// are all-reduced while the next ones run; otherwise one submit and one
    /// all-reduce of every gradient.
    pub fn enable_data_parallel(
        &mut self,
        ctx: &GpuContext,
        model: &Model,
        overlap: bool,
    ) -> Result<()> {
        if self.ep.is_some() {
            // An expert-parallel step keeps its own exchanges.
            return Ok(());
        }
        let moe_layers = model.cfg.moe_layers();
        // The groups, in the backward's order, and the group that finishes
        // each gradient.
        let layers = self.back.len();
        let mut groups: Vec<GradGroup> = if overlap {
            (0..=layers)
                .map(|i| GradGroup {
                    head: i == 0,
                    blocks: if i < layers {
                        layers - 1 - i..layers - i
                    } else {
                        0..0
                    },
                    embedding: i == layers,
                    rb: None,
                    grads: Vec::new(),
                })
                .collect()
        } else {
            vec![GradGroup {
                head: true,
                blocks: 0..layers,
                embedding: true,
                rb: None,
                grads: Vec::new(),
            }]
        };
        let group_of = |id: ParamId| -> usize {
            if !overlap {
                return 0;
            }
            match id {
                ParamId::WOut | ParamId::NormF => 0,
                ParamId::Block(l, _) => layers - 1 - l,
                ParamId::Wte | ParamId::Wpe => layers,
            }
        };
        let mut members: Vec<Vec<(&Tensor<f32>, usize)>> = vec![Vec::new(); groups.len()];
        let mut at = 0;
        for (id, g) in self.grads.iter() {
            members[group_of(id)].push((g, at));
            at += g.numel();
        }
        let first: Vec<&Tensor<f32>> = members[0].iter().map(|&(g, _)| g).collect();
        let (rb, first_parts) = StepReadback::with_extra(
            ctx,
            &self.fwd,
            &self.clip,
            &moe_layers,
            &self.complexity,
            &first,
        )?;
        groups[0].grads = first_parts
            .into_iter()
            .zip(&members[0])
            .map(|(p, &(_, off))| (p, off))
            .collect();
        for (g, m) in groups.iter_mut().zip(&members).skip(1) {
            let mut layout = ReadbackLayout::new();
            g.grads = m
                .iter()
                .map(|&(t, off)| (layout.push_tensor(t), off))
                .collect();
            g.rb = Some(layout.build(ctx, "gradient readback")?);
        }
        let mut clip_layout = ReadbackLayout::new();
        let clip_part = clip_layout.push_tensor(&self.clip);
        self.dp = Some(DataParallel {
            gate: GateFractions::new(ctx, &self.fwd, model)?,
            rb,
            groups,
            grad_in: Tensor::zeros(ctx, "summed gradients", &[at.max(1)])?,
            clip_rb: clip_layout.build(ctx, "gradient norm readback")?,
            clip_part,
        });
        Ok(())
    }

    /// Bytes of the parameters, their gradients and AdamW moments (under
    /// expert parallelism, this rank's share of the experts').
    pub fn state_bytes(&self, model: &Model) -> u64 {
        let sum = |t: &Params<Tensor<f32>>| t.values().map(Tensor::bytes).sum::<u64>();
        model.bytes() + sum(&self.grads) + sum(&self.m) + sum(&self.v)
    }

    /// Whether the step is expert-parallel (its model holds a share of
    /// the experts: `step_expert_parallel`).
    pub fn is_expert_parallel(&self) -> bool {
        self.ep.is_some()
    }

    /// Expert parallelism: the rows each MoE layer's bank plan holds now
    /// (per block, 0 without a bank). A plan starts at this rank's own
    /// slots (T K) and grows when a step sends it more.
    pub fn expert_rows(&self) -> Vec<usize> {
        self.ep.as_ref().map_or_else(Vec::new, |ep| ep.ex.rows())
    }

    /// Expert parallelism: rebuild each bank's plan for `rows` rows (at
    /// most N T K), what it grows from (tests start small to exercise the
    /// growth).
    pub fn set_expert_rows(&self, ctx: &GpuContext, model: &Model, rows: usize) -> Result<()> {
        let ep = self.ep.as_ref().ok_or_else(not_sharded)?;
        ep.ex.set_rows(ctx, model, rows)
    }

    fn whole_model(&self) -> Result<()> {
        match self.ep {
            Some(_) => Err(Error::invalid(
                "train",
                "the model holds a share of the experts: its steps are step_expert_parallel",
            )),
            None => Ok(()),
        }
    }

    /// The parameters and their AdamW moments (m, v) on the host, whole:
    /// under expert parallelism every rank's experts gathered (collective:
    /// every rank calls it at the same point, with `comm`). `keep`: false
    /// on a rank that only takes part (it keeps one tensor at a time and
    /// returns `None`).
    pub async fn gather_state(
        &self,
        ctx: &GpuContext,
        model: &Model,
        comm: Option<&crate::train::collective::Comm>,
        keep: bool,
    ) -> Result<Option<[HostParams; 3]>> {
        if model.shard.is_none() && !keep {
            return Ok(None);
        }
        let mut kept: [Vec<HostTensor>; 3] = Default::default();
        for (i, tree) in [&self.grads, &self.m, &self.v].into_iter().enumerate() {
            for (id, t) in tree.iter() {
                let held = model.held(id);
                if !keep && held.is_none() {
                    // Only the experts' gathers need this rank.
                    continue;
                }
                // The parameter itself, in place of its gradient.
                let t = match i {
                    0 => model
                        .params
                        .get(id)
                        .ok_or_else(|| Error::invalid("model", format!("no {id}")))?
                        .f32("training")?,
                    _ => t,
                };
                let mut data = t.read(ctx).await?;
                let mut shape = t.shape.clone();
                if let Some((_, e)) = held {
                    let comm = comm.ok_or_else(|| {
                        Error::invalid("expert parallel", "gathering the experts needs the ranks")
                    })?;
                    data = comm.gather(&data)?;
                    shape[0] = e;
                }
                if keep {
                    kept[i].push(HostTensor { shape, data });
                }
            }
        }
        if !keep {
            return Ok(None);
        }
        let trees = kept.map(|v| {
            let mut it = v.into_iter();
            self.grads
                .try_map(|id, _| it.next().ok_or_else(|| Error::invalid("gather", id.name())))
        });
        let [p, m, v] = trees;
        Ok(Some([p?, m?, v?]))
    }

    /// Expert parallelism, the forward of this rank's shard: each MoE
    /// layer's routed rows go to their experts' ranks, this rank runs its
    /// own experts on what every rank sent it, and the outputs come back
    /// into the slot order, where the combine runs. A submit per MoE layer
    /// and side. Returns this shard's mean loss.
    pub async fn forward_expert_parallel(
        &self,
        ctx: &GpuContext,
        model: &Model,
        args: &StepArgs<'_>,
        comm: &crate::train::collective::Comm,
    ) -> Result<f32> {
        let ep = self.ep.as_ref().ok_or_else(not_sharded)?;
        self.upload(ctx, model, args)?;
        self.forward_segments(ctx, comm, model, ep, None).await?;
        let loss = self.fwd.loss_out.read(ctx).await?;
        ctx.check_errors("expert-parallel forward")?;
        Ok(loss[0] / loss[1].max(1.0))
    }

    /// The training forward in segments (`Exchange::forward`). `train`: the
    /// last segment adds the curriculum's complexity (when asked) and each
    /// MoE layer's gate statistics, and reads back the first-choice
    /// fractions.
    async fn forward_segments(
        &self,
        ctx: &GpuContext,
        comm: &crate::train::collective::Comm,
        model: &Model,
        ep: &ExpertParallel,
        train: Option<bool>,
    ) -> Result<Vec<Option<RoutedSlots>>> {
        let tail = |pass: &mut wgpu::ComputePass<'static>| -> Result<()> {
            if let Some(complexity) = train {
                if complexity {
                    for c in &self.complexity_kernels {
                        c.record(pass);
                    }
                }
                ep.gate.record_stats(&self.fwd, pass)?;
            }
            Ok(())
        };
        let tail_enc = |enc: &mut wgpu::CommandEncoder| {
            if train.is_some() {
                ep.gate.rb.record_all(enc);
            }
        };
        ep.ex
            .forward(ctx, comm, model, &self.fwd, &tail, &tail_enc)
            .await
    }

    /// One expert-parallel training step of this rank's shard (B / N
    /// sequences of the global batch): the forward in segments (each MoE
    /// layer's routed rows to their experts' ranks and back), the global
    /// first-choice fractions (as `step_data_parallel`), the backward in
    /// segments (each MoE layer's slot gradients to the experts' ranks, the
    /// input gradients back), then one readback: the replicated gradients
    /// (attention, routers, norms, embeddings, dense FFNs) are summed over
    /// the ranks, this rank's experts' gradients are its own (every rank's
    /// tokens reached them); the global gradient norm (replicated part
    /// once, every rank's experts) sets the clip, and AdamW updates the
    /// replicated parameters and this rank's experts. Returns the global
    /// batch's numbers.
    pub async fn step_expert_parallel(
        &self,
        ctx: &GpuContext,
        model: &Model,
        args: &StepArgs<'_>,
        comm: &crate::train::collective::Comm,
        times: &mut DataParallelTimes,
    ) -> Result<StepStats> {
        let clock = web_time::Instant::now();
        let (sent0, busy0) = (comm.bytes_sent(), comm.exchange_s());
        let Some(ep) = &self.ep else {
            return Err(Error::invalid(
                "train",
                "an expert-parallel step needs a model holding a share of the experts (Model::expert_parallel)",
            ));
        };
        let ranks = comm.size();
        let inv = 1.0 / ranks as f32;
        let complexity = args.complexity;
        self.upload(ctx, model, args)?;
        let blocks = &self.fwd.graph.blocks;

        // 1. Forward; the global first-choice fractions.
        let routed = self
            .forward_segments(ctx, comm, model, ep, Some(complexity))
            .await?;
        let mut f = ep.gate.read(ctx).await?;
        ctx.check_errors("expert-parallel forward")?;
        comm.sum(&mut f)?;
        f.iter_mut().for_each(|x| *x *= inv);
        ep.gate.write(ctx, &self.fwd, &f)?;

        // 2. Backward, a segment per banked MoE layer.
        let (mut enc, mut pass) = open_pass(ctx, "expert-parallel backward");
        self.edge.record_head(&mut pass);
        for l in (0..blocks.len()).rev() {
            match &ep.ex.layers[l] {
                Some(banked) => {
                    let plan = blocks[l].ffn.train()?;
                    let (Some((dys_rb, dys_part)), Some(routed)) = (&banked.st.dys, &routed[l])
                    else {
                        return Err(Error::invalid(
                            "expert parallel",
                            "a bank without its exchange",
                        ));
                    };
                    plan.backward.record_slots_and_gate(&mut pass);
                    drop(pass);
                    // The slots' output gradients, up to the padded rows.
                    let padded = routed.words[RoutingLayout::PADDED_ROWS] as u64;
                    let d = plan.dy.shape[1] as u64;
                    dys_rb.record_range(&mut enc, *dys_part, 0, padded * d * 4);
                    scoped_submit(ctx, None, enc)?;
                    banked
                        .experts_backward(ctx, comm, routed, &plan.backward.scratch.dxs)
                        .await?;
                    (enc, pass) = open_pass(ctx, "expert-parallel backward");
                    plan.backward.record_input_grads(&mut pass);
                }
                None => {
                    if let Ok(plan) = blocks[l].ffn.train() {
                        plan.record_backward_after_stats(&mut pass);
                    }
                }
            }
            self.back[l].record(&mut pass);
        }
        self.edge.record_embedding(&mut pass);
        drop(pass);
        ep.rb.record(&mut enc, complexity);
        for (p, _) in ep.replicated.iter().chain(&ep.bank_grads) {
            ep.rb.rb.record(&mut enc, *p);
        }
        scoped_submit(ctx, None, enc)?;
        let mut words = ep.rb.rb.read(ctx).await?;
        ctx.check_errors("expert-parallel backward")?;

        // 3. Replicated gradients summed (with the loss and P), the
        // routing counts summed, the complexity rows gathered.
        let mut flat: Vec<f32> = Vec::new();
        for (p, _) in &ep.replicated {
            flat.extend(words.f32s(*p));
        }
        let n = flat.len();
        flat.extend(words.f32s(ep.rb.loss).iter().take(2));
        for m in &ep.rb.moe {
            flat.extend(&words.f32s(m.stats)[m.e..2 * m.e]);
        }
        comm.sum(&mut flat)?;
        let (counts, gathered) = ep.rb.reduce_counts(comm, &words, complexity)?;
        // The mean gradients; the global norm: the replicated part (the
        // same on every rank) and every rank's experts.
        let mut sq_replicated = 0.0f64;
        let mut at = 0;
        for (p, g) in &ep.replicated {
            let len = words.u32s(*p).len();
            let part = &mut flat[at..at + len];
            part.iter_mut().for_each(|x| *x *= inv);
            sq_replicated += part.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            g.write(ctx, part)?;
            at += len;
        }
        let mut sq_experts = [0.0f64];
        for (p, g) in &ep.bank_grads {
            let mut v = words.f32s(*p);
            v.iter_mut().for_each(|x| *x *= inv);
            sq_experts[0] += v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            g.write(ctx, &v)?;
        }
        comm.sum(&mut sq_experts)?;
        let norm = (sq_replicated + sq_experts[0]).sqrt() as f32;
        let scale = if !norm.is_finite() {
            0.0
        } else {
            match ep.max_norm {
                Some(max) => (max / (norm + 1e-6)).min(1.0),
                None => 1.0,
            }
        };
        self.clip.write(ctx, &[norm, scale])?;

        // 4. The update.
        let update = web_time::Instant::now();
        let (enc, mut pass) = open_pass(ctx, "expert-parallel update");
        for a in &self.adamw {
            a.record(&mut pass);
        }
        drop(pass);
        scoped_submit(ctx, None, enc)?;
        ctx.wait()?;
        ctx.check_errors("expert-parallel update")?;
        let write_update_s = update.elapsed().as_secs_f64();
        let exchange_s = comm.exchange_s() - busy0;
        *times = DataParallelTimes {
            compute_s: clock.elapsed().as_secs_f64() - exchange_s - write_update_s,
            all_reduce_s: exchange_s,
            write_update_s,
            grad_floats: n,
            bytes_sent: comm.bytes_sent() - sent0,
            backward_submits: 1 + ep.ex.layers.iter().filter(|b| b.is_some()).count(),
            expert_parallel: true,
        };

        ep.rb.globalize(
            &mut words,
            &flat[n..],
            &counts,
            &f,
            inv,
            model.cfg.aux.balance,
        );
        let (b, t) = self.batch();
        let mut s = ep.rb.parse(&words, b * ranks, t * ranks, false);
        s.grad_norm = norm;
        if let Some(v) = gathered {
            let cols = ep.rb.moe.len();
            s.complexity = v.chunks(cols.max(1)).map(|c| c.to_vec()).collect();
        }
        finite(s)
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>, complexity: bool) {
        self.fwd.record(pass);
        if complexity {
            for c in &self.complexity_kernels {
                c.record(pass);
            }
        }
        self.edge.record_head(pass);
        for (blk, bb) in self.fwd.graph.blocks.iter().zip(&self.back).rev() {
            if let Ok(plan) = blk.ffn.train() {
                plan.record_backward(pass);
            }
            bb.record(pass);
        }
        self.edge.record_embedding(pass);
        self.grad_norm.record(pass);
        for a in &self.adamw {
            a.record(pass);
        }
    }

    /// The batch, its token order and the step's learning rate.
    fn upload(&self, ctx: &GpuContext, model: &Model, args: &StepArgs<'_>) -> Result<()> {
        self.fwd.upload(ctx, &model.cfg, args.ids, args.targets)?;
        let (offsets, order) = token_order(args.ids, self.vocab)?;
        self.edge.emb_offsets.write(ctx, &offsets)?;
        self.edge.emb_order.write(ctx, &order)?;
        for a in &self.adamw {
            a.set_step(ctx, args.lr, args.step)?;
        }
        Ok(())
    }

    /// One data-parallel step: this rank's shard of the global batch in
    /// `args` (B / N sequences), the same update on every rank. Three
    /// submits:
    /// 1. the forward and each MoE layer's gate statistics; the first-choice
    ///    fractions f are read back and averaged over the ranks, and the
    ///    global f replaces the local one, so that the load-balancing
    ///    gradient is the global batch's (its loss is not linear in the
    ///    tokens);
    /// 2. the backward; the step's readback and every gradient come back in
    ///    one staging buffer and are summed over the ranks in one flat
    ///    all-reduce (gradients, loss sum and count, mean probabilities), the
    ///    routing counts in a second one (integers) and the curriculum's
    ///    per-sequence complexity gathered;
    /// 3. the mean gradients are written at once to one buffer and copied
    ///    into each gradient; the gradient norm, the clip and AdamW run.
    ///
    /// Each rank's gradient is of its shard's mean loss; the mean over ranks
    /// (equal shards) is the global batch's. Returns the global batch's
    /// numbers, as `step` gives for a one-process run.
    pub async fn step_data_parallel(
        &self,
        ctx: &GpuContext,
        model: &Model,
        args: &StepArgs<'_>,
        comm: &crate::train::collective::Comm,
        times: &mut DataParallelTimes,
    ) -> Result<StepStats> {
        self.whole_model()?;
        let dp = self
            .dp
            .as_ref()
            .ok_or_else(|| Error::invalid("train", "enable_data_parallel was not called"))?;
        let ranks = comm.size();
        let sent0 = comm.bytes_sent();
        let complexity = args.complexity;
        let clock = web_time::Instant::now();
        self.upload(ctx, model, args)?;
        let blocks = &self.fwd.graph.blocks;
        let mut enc = encode(
            ctx,
            "train_step forward",
            |enc| self.fwd.clear(enc),
            |pass| {
                self.fwd.record(pass);
                if complexity {
                    for c in &self.complexity_kernels {
                        c.record(pass);
                    }
                }
                dp.gate.record_stats(&self.fwd, pass)
            },
        )?;
        dp.gate.rb.record_all(&mut enc);
        ctx.submit("train_step forward", enc)?;
        let mut f = dp.gate.read(ctx).await?;
        ctx.check_errors("train_step forward")?;
        let mut compute_s = clock.elapsed().as_secs_f64();

        let clock = web_time::Instant::now();
        comm.sum(&mut f)?;
        let inv = 1.0 / ranks as f32;
        f.iter_mut().for_each(|x| *x *= inv);
        let mut all_reduce_s = clock.elapsed().as_secs_f64();
        dp.gate.write(ctx, &self.fwd, &f)?;

        // The backward, one submit per group, two queued ahead: each group's
        // gradients are summed over the ranks as soon as its submit is done,
        // while the GPU runs the next group. Not more ahead: lavapipe's
        // submit returns at once, but the next one waits until the previous
        // is done, so a third would hold the host until the second is done.
        let submit = |g: &GradGroup| -> Result<wgpu::SubmissionIndex> {
            let mut enc = encode(
                ctx,
                "train_step backward",
                |_| {},
                |pass| {
                    if g.head {
                        self.edge.record_head(pass);
                    }
                    for l in g.blocks.clone().rev() {
                        if let Ok(plan) = blocks[l].ffn.train() {
                            plan.record_backward_after_stats(pass);
                        }
                        self.back[l].record(pass);
                    }
                    if g.embedding {
                        self.edge.record_embedding(pass);
                    }
                    Ok(())
                },
            )?;
            let rb = match &g.rb {
                Some(rb) => rb,
                None => {
                    dp.rb.record(&mut enc, complexity);
                    &dp.rb.rb
                }
            };
            for &(p, _) in &g.grads {
                rb.record(&mut enc, p);
            }
            ctx.submit_indexed("train_step backward", enc)
        };
        const AHEAD: usize = 2;
        let clock = web_time::Instant::now();
        let mut submitted = std::collections::VecDeque::with_capacity(AHEAD);
        for g in dp.groups.iter().take(AHEAD) {
            submitted.push_back(submit(g)?);
        }
        compute_s += clock.elapsed().as_secs_f64();
        let mut write_s = 0.0;
        let mut first = None;
        let mut rest: Vec<f32> = Vec::new();
        let mut counts: Vec<u32> = Vec::new();
        let mut gathered = None;
        let mut grad_floats = 0;
        for (i, g) in dp.groups.iter().enumerate() {
            let clock = web_time::Instant::now();
            let index = submitted.pop_front();
            let words = match &g.rb {
                Some(rb) => rb.read_after(ctx, index).await?,
                None => dp.rb.rb.read_after(ctx, index).await?,
            };
            ctx.check_errors("train_step backward")?;
            compute_s += clock.elapsed().as_secs_f64();

            // One flat all-reduce of the group's gradients; the first group
            // adds the loss (sum, count) and each MoE layer's mean
            // probabilities P, then sums the routing counts and gathers the
            // complexity rows.
            let clock = web_time::Instant::now();
            let mut flat: Vec<f32> = Vec::new();
            for &(p, _) in &g.grads {
                flat.extend(words.f32s(p));
            }
            let n = flat.len();
            grad_floats += n;
            if g.rb.is_none() {
                flat.extend(words.f32s(dp.rb.loss).iter().take(2));
                for m in &dp.rb.moe {
                    flat.extend(&words.f32s(m.stats)[m.e..2 * m.e]);
                }
            }
            comm.sum(&mut flat)?;
            if g.rb.is_none() {
                (counts, gathered) = dp.rb.reduce_counts(comm, &words, complexity)?;
            }
            all_reduce_s += clock.elapsed().as_secs_f64();

            // The mean, into the summed-gradient buffer at each gradient's
            // place (the update's submit copies it out).
            let clock = web_time::Instant::now();
            let mut at = 0;
            for &(p, off) in &g.grads {
                let len = words.u32s(p).len();
                let part = &mut flat[at..at + len];
                part.iter_mut().for_each(|x| *x *= inv);
                ctx.queue.write_buffer(
                    &dp.grad_in.buffer,
                    off as u64 * 4,
                    bytemuck::cast_slice(part),
                );
                at += len;
            }
            if g.rb.is_none() {
                rest = flat[n..].to_vec();
                first = Some(words);
            }
            write_s += clock.elapsed().as_secs_f64();
            if let Some(next) = dp.groups.get(i + AHEAD) {
                let clock = web_time::Instant::now();
                submitted.push_back(submit(next)?);
                compute_s += clock.elapsed().as_secs_f64();
            }
        }
        let Some(mut words) = first else {
            return Err(Error::invalid(
                "train",
                "a data-parallel step without groups",
            ));
        };

        let clock = web_time::Instant::now();
        let mut enc = encode(
            ctx,
            "train_step update",
            |enc| {
                let mut offset = 0u64;
                for g in self.grads.values() {
                    enc.copy_buffer_to_buffer(&dp.grad_in.buffer, offset, &g.buffer, 0, g.bytes());
                    offset += g.bytes();
                }
            },
            |pass| {
                self.grad_norm.record(pass);
                for a in &self.adamw {
                    a.record(pass);
                }
                Ok(())
            },
        )?;
        dp.clip_rb.record_all(&mut enc);
        ctx.submit("train_step update", enc)?;
        let grad_norm = dp.clip_rb.read(ctx).await?.f32_at(dp.clip_part, 0);
        ctx.check_errors("train_step update")?;

        // The global batch's numbers, in the words `parse` reads.
        dp.rb
            .globalize(&mut words, &rest, &counts, &f, inv, model.cfg.aux.balance);
        let (b, t) = self.batch();
        let mut s = dp.rb.parse(&words, b * ranks, t * ranks, false);
        s.grad_norm = grad_norm;
        if let Some(v) = gathered {
            let cols = dp.rb.moe.len();
            s.complexity = v.chunks(cols.max(1)).map(|c| c.to_vec()).collect();
        }
        *times = DataParallelTimes {
            compute_s,
            all_reduce_s,
            write_update_s: write_s + clock.elapsed().as_secs_f64(),
            grad_floats,
            bytes_sent: comm.bytes_sent() - sent0,
            backward_submits: dp.groups.len(),
            expert_parallel: false,
        };
        finite(s)
    }

    /// Sequences per batch B and tokens per batch T = B N.
    pub fn batch(&self) -> (usize, usize) {
        (self.fwd.b, self.fwd.t())
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
        self.whole_model()?;
        let complexity = args.complexity;
        self.upload(ctx, model, args)?;
        let mut enc = encode(
            ctx,
            "train_step",
            |enc| self.fwd.clear(enc),
            |pass| {
                self.record(pass, complexity);
                Ok(())
            },
        )?;
        self.readback.record(&mut enc, complexity);
        ctx.submit("train_step", enc)?;
        let words = self.readback.rb.read(ctx).await?;
        ctx.check_errors("train_step")?;
        let (b, t) = self.batch();
        let s = self.readback.parse(&words, b, t, complexity);
        finite(s)
    }
}

/// A command encoder labelled `label`: `before` records outside any pass
/// (clears, copies), then `pass` records one compute pass.
fn encode(
    ctx: &GpuContext,
    label: &str,
    before: impl FnOnce(&mut wgpu::CommandEncoder),
    pass: impl FnOnce(&mut wgpu::ComputePass<'_>) -> Result<()>,
) -> Result<wgpu::CommandEncoder> {
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
    before(&mut enc);
    {
        let mut p = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: None,
        });
        pass(&mut p)?;
    }
    Ok(enc)
}

/// Forward-only evaluation of batches under an inference gating rule.
pub struct EvalStep {
    fwd: Forward,
    /// The loss (sum, count), then each MoE layer's `topk_ids [T, K]`
    /// (and, when asked for, its router scores `probs [T, E]`).
    readback: Readback,
    loss: PartId,
    routes: Vec<(usize, PartId)>,
    scores: Vec<PartId>,
    /// Expert parallelism (a model holding a share of its experts): the
    /// exchanges of each MoE layer (`loss_expert_parallel`).
    ep: Option<Exchange>,
}

/// What one evaluation batch gives back.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOut {
    /// Sum of the counted tokens' losses (nats) and their count.
    pub loss_sum: f64,
    pub count: f64,
    /// Per MoE layer (layer index, `topk_ids [T, K]` with `UNUSED` for a
    /// slot not taken): the experts of every token.
    pub routes: Vec<(usize, Vec<u32>)>,
    /// Per MoE layer, every token's router scores `probs [T, E]` (empty
    /// unless the step was built `with_scores`).
    pub scores: Vec<Vec<f32>>,
}

impl EvalStep {
    /// `gate`: the MoE layers' rule at evaluation (the paper: top-1).
    pub fn new(
        ctx: &GpuContext,
        model: &Model,
        b: usize,
        gate: impl Into<Gates>,
    ) -> Result<EvalStep> {
        Self::with_scores(ctx, model, b, gate, false)
    }

    /// As `new`; with `scores`, each batch also reads back every MoE
    /// layer's router scores.
    pub fn with_scores(
        ctx: &GpuContext,
        model: &Model,
        b: usize,
        gate: impl Into<Gates>,
        scores: bool,
    ) -> Result<EvalStep> {
        let fwd = Forward::new(ctx, model, b, false, Some(&gate.into()))?;
        let mut layout = ReadbackLayout::new();
        let loss = layout.push_tensor(&fwd.loss_out);
        let routes = model
            .cfg
            .moe_layers()
            .into_iter()
            .map(|l| {
                (
                    l,
                    layout.push_tensor(&fwd.graph.blocks[l].ffn.fwd().topk_ids),
                )
            })
            .collect();
        let scores = if scores {
            model
                .cfg
                .moe_layers()
                .into_iter()
                .map(|l| layout.push_tensor(&fwd.graph.blocks[l].ffn.fwd().probs))
                .collect()
        } else {
            Vec::new()
        };
        let ep = Exchange::new(ctx, model, &fwd, false)?;
        Ok(EvalStep {
            readback: layout.build(ctx, "eval readback")?,
            fwd,
            loss,
            routes,
            scores,
            ep,
        })
    }

    /// Expert parallelism: (sum of token losses, counted tokens) of this
    /// rank's shard of a batch, each MoE layer's routed rows evaluated by
    /// their experts' ranks. Collective: every rank calls it for each
    /// batch, with shards of the same size.
    pub async fn loss_expert_parallel(
        &self,
        ctx: &GpuContext,
        model: &Model,
        ids: &[u32],
        targets: &[u32],
        comm: &crate::train::collective::Comm,
    ) -> Result<(f64, f64)> {
        let ex = self.ep.as_ref().ok_or_else(not_sharded)?;
        self.fwd.upload(ctx, &model.cfg, ids, targets)?;
        ex.forward(ctx, comm, model, &self.fwd, &|_| Ok(()), &|enc| {
            self.readback.record(enc, self.loss)
        })
        .await?;
        let words = self.readback.read(ctx).await?;
        ctx.check_errors("expert-parallel evaluation")?;
        Ok((
            words.f32_at(self.loss, 0) as f64,
            words.f32_at(self.loss, 1) as f64,
        ))
    }

    pub fn batch(&self) -> (usize, usize) {
        (self.fwd.b, self.fwd.t())
    }

    /// (sum of token losses, counted tokens) of one batch.
    pub async fn loss(
        &self,
        ctx: &GpuContext,
        model: &Model,
        ids: &[u32],
        targets: &[u32],
    ) -> Result<(f64, f64)> {
        let out = self.run(ctx, model, ids, targets, false).await?;
        Ok((out.loss_sum, out.count))
    }

    /// The loss and every token's experts of one batch.
    pub async fn loss_and_routes(
        &self,
        ctx: &GpuContext,
        model: &Model,
        ids: &[u32],
        targets: &[u32],
    ) -> Result<EvalOut> {
        self.run(ctx, model, ids, targets, true).await
    }

    async fn run(
        &self,
        ctx: &GpuContext,
        model: &Model,
        ids: &[u32],
        targets: &[u32],
        routes: bool,
    ) -> Result<EvalOut> {
        if self.ep.is_some() {
            return Err(Error::invalid(
                "eval",
                "the model holds a share of the experts: its batches are loss_expert_parallel",
            ));
        }
        self.fwd.upload(ctx, &model.cfg, ids, targets)?;
        let mut enc = encode(
            ctx,
            "eval_step",
            |enc| self.fwd.clear(enc),
            |pass| {
                self.fwd.record(pass);
                Ok(())
            },
        )?;
        self.readback.record(&mut enc, self.loss);
        if routes {
            for &(_, part) in &self.routes {
                self.readback.record(&mut enc, part);
            }
            for &part in &self.scores {
                self.readback.record(&mut enc, part);
            }
        }
        ctx.submit("eval_step", enc)?;
        let words = self.readback.read(ctx).await?;
        ctx.check_errors("eval_step")?;
        Ok(EvalOut {
            loss_sum: words.f32_at(self.loss, 0) as f64,
            count: words.f32_at(self.loss, 1) as f64,
            routes: if routes {
                self.routes
                    .iter()
                    .map(|&(l, part)| (l, words.u32s(part).to_vec()))
                    .collect()
            } else {
                Vec::new()
            },
            scores: if routes {
                self.scores.iter().map(|&p| words.f32s(p)).collect()
            } else {
                Vec::new()
            },
        })
    }
}
