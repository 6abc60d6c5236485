//! CPU twin of the GPU training step (`model::transformer::TrainStep`):
//! the same forward, backward, gradient-norm clipping and AdamW, composed
//! only from the kernel twins in `crate::reference` in the order the GPU
//! records them. Generic over the float type: the tests below check the
//! twin's gradient of the whole objective against central finite
//! differences in f64; `tests/model_twin.rs` checks one GPU step against it
//! in f32.
//!
//! The objective whose gradient the step takes is the GPU's:
//! `sum_t ce_t / T` (T = B N, ignored targets count in T but add 0) plus
//! every MoE layer's balancing and z losses (`moe_train::aux_losses`, which
//! enter through the router in `moe_layer_backward`). The reported loss is
//! the mean cross-entropy over the counted targets, as `StepStats::loss`.

use crate::error::{Error, Result};
use crate::kernels::adamw::GRAD_NORM_CHUNK;
use crate::kernels::embedding::{check_ids, token_order};
use crate::kernels::matmul::Trans;
use crate::kernels::{Activation, GateConfig, UNUSED};
use crate::model::config::ModelConfig;
use crate::model::params::{BlockParam, HostTensor, ParamId};
use crate::model::transformer::{HostParams, OptConfig};
use crate::moe::MoeConfig;
use crate::reference::adamw::{adamw_step, grad_norm_finish, grad_norm_partial, AdamWStep};
use crate::reference::add::add_forward;
use crate::reference::attention::{
    attention_backward_gqa, attention_forward_gqa, AttnShape, GqaShape,
};
use crate::reference::cross_entropy::{
    cross_entropy_forward, cross_entropy_forward_backward, loss_sum,
};
use crate::reference::embedding::{
    embedding_backward_wpe, embedding_backward_wte, embedding_forward,
};
use crate::reference::matmul::matmul;
use crate::reference::moe_train::{
    aux_losses, moe_layer_backward, moe_layer_forward, AuxConfig, MoeCache, MoeParams,
};
use crate::reference::qk::rope;
use crate::reference::rmsnorm::{rmsnorm_backward, rmsnorm_backward_gain, rmsnorm_forward};
use num_traits::Float;

/// What one block's forward keeps (the GPU's `Block` tensors).
#[derive(Clone, Debug)]
pub struct BlockTrace<F> {
    /// x [T, D]: the block's input
    pub x: Vec<F>,
    /// a [T, D] = rmsnorm(x, g1), rstd1 [T]
    pub a: Vec<F>,
    pub rstd1: Vec<F>,
    /// qkv [T, 3D]
    pub qkv: Vec<F>,
    /// o [T, D], lse [B, H, N]: attention output and its log-sum-exp
    pub o: Vec<F>,
    pub lse: Vec<F>,
    /// xm [T, D] = x + o Wo
    pub xm: Vec<F>,
    /// m [T, D] = rmsnorm(xm, g2) (the FFN input), rstd2 [T]
    pub m: Vec<F>,
    pub rstd2: Vec<F>,
    /// The FFN's forward (routing, expert activations, y).
    pub ffn: MoeCache<F>,
    /// The FFN's gate and auxiliary-loss coefficients.
    pub ffn_cfg: MoeConfig,
    pub aux: AuxConfig,
}

/// The forward of one batch.
#[derive(Clone, Debug)]
pub struct Trace<F> {
    pub b: usize,
    pub t: usize,
    pub blocks: Vec<BlockTrace<F>>,
    /// x_L [T, D]: the last block's output
    pub x_out: Vec<F>,
    /// xf [T, D] = rmsnorm(x_L, g_f), rstdf [T]
    pub xf: Vec<F>,
    pub rstdf: Vec<F>,
    /// logits [T, V]
    pub logits: Vec<F>,
    /// Per-token cross-entropy [T] (0 for an ignored target).
    pub ce: Vec<F>,
}

/// Gradients of the objective, and its parts.
#[derive(Clone, Debug)]
pub struct Grads<F> {
    /// `sum_t ce_t / T + sum over MoE layers of (balance + z)`.
    pub objective: F,
    /// Per layer: (balance loss, z loss), coefficients applied (0 for dense).
    pub aux: Vec<(F, F)>,
    /// One gradient per parameter, in canonical order (`Params::iter`).
    pub grads: Vec<Vec<F>>,
    pub trace: Trace<F>,
}

/// AdamW moments of every parameter, in canonical order.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamState {
    /// Zeros, as `TrainStep::new` allocates them.
    pub fn new(cfg: &ModelConfig) -> AdamState {
        let z: Vec<Vec<f32>> = cfg
            .param_specs()
            .values()
            .map(|s| vec![0.0; s.numel()])
            .collect();
        AdamState { m: z.clone(), v: z }
    }
}

/// What one CPU step reports (the twin of `StepStats`, plus the gradients).
#[derive(Clone, Debug)]
pub struct CpuStepStats {
    /// Mean cross-entropy over the counted targets.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// The clip factor AdamW applied to every gradient.
    pub clip_scale: f32,
    /// Per MoE layer: the load-balancing loss (coefficient applied).
    pub balance_loss: Vec<f32>,
    /// Per MoE layer: slots each expert processed (within its capacity).
    pub expert_counts: Vec<Vec<u32>>,
    /// Per MoE layer: slots dropped past their expert's capacity.
    pub dropped_slots: Vec<u32>,
    /// Per sequence: its two-expert fraction in each MoE layer (the
    /// curriculum's complexity vectors).
    pub complexity: Vec<Vec<f32>>,
    /// Gradients before clipping, in canonical order.
    pub grads: HostParams,
}

fn cast<F: Float>(x: f64) -> F {
    F::from(x).unwrap_or_else(F::nan)
}

/// Position of each parameter in canonical order.
struct Index {
    ids: Vec<ParamId>,
}

impl Index {
    fn new(cfg: &ModelConfig) -> Index {
        Index {
            ids: cfg.param_specs().iter().map(|(id, _)| id).collect(),
        }
    }

    fn get(&self, id: ParamId) -> Result<usize> {
        self.ids
            .iter()
            .position(|&x| x == id)
            .ok_or_else(|| Error::invalid("model twin", format!("no parameter {id}")))
    }

    fn layer(&self, l: usize, p: BlockParam) -> Result<usize> {
        self.get(ParamId::Block(l, p))
    }
}

fn check_params<F>(cfg: &ModelConfig, params: &[Vec<F>]) -> Result<()> {
    let want = cfg.param_specs();
    if want.len() != params.len() {
        return Err(Error::shape(
            "model twin parameters",
            format!("{} tensors", want.len()),
            format!("{} tensors", params.len()),
        ));
    }
    for ((id, spec), p) in want.iter().zip(params) {
        if p.len() != spec.numel() {
            return Err(Error::shape(
                "model twin parameters",
                format!("{id} {:?}", spec.shape),
                format!("{} values", p.len()),
            ));
        }
    }
    Ok(())
}

fn check_batch(cfg: &ModelConfig, ids: &[u32], targets: Option<&[u32]>, b: usize) -> Result<()> {
    let t = b * cfg.context;
    if b == 0 {
        return Err(Error::invalid("model twin", "batch of 0 sequences"));
    }
    if ids.len() != t || targets.is_some_and(|x| x.len() != t) {
        return Err(Error::shape(
            "model twin batch",
            format!("ids and targets of B N = {t} tokens"),
            format!("{} ids", ids.len()),
        ));
    }
    check_ids(ids, cfg.vocab)?;
    if let Some(bad) = targets
        .unwrap_or(&[])
        .iter()
        .find(|&&x| x != UNUSED && x as usize >= cfg.vocab)
    {
        return Err(Error::invalid(
            "model twin batch",
            format!("target id {bad} >= vocabulary {}", cfg.vocab),
        ));
    }
    Ok(())
}

/// The attention of the model: its heads, kv heads, window and score scale.
fn gqa_shape(cfg: &ModelConfig, b: usize) -> GqaShape {
    let s = AttnShape {
        b,
        n: cfg.context,
        h: cfg.heads,
        dh: cfg.head_dim(),
    };
    GqaShape {
        hkv: cfg.kv_heads(),
        window: cfg.sliding_window.unwrap_or(0),
        // amoe's own scale in f64, as the multi-head twin always took it.
        scale: cfg.attn_scale.map_or(GqaShape::mha(s).scale, |x| x as f64),
        s,
    }
}

/// The parameters as a plain list in another float type.
pub fn to_float<F: Float>(p: &HostParams) -> Vec<Vec<F>> {
    p.values()
        .map(|t| {
            t.data
                .iter()
                .map(|&x| F::from(x).unwrap_or_else(F::nan))
                .collect()
        })
        .collect()
}

/// The forward of `ids [B N]`, every FFN under its training gate, or with
/// `eval_gate` replacing the gate of the MoE layers (as `EvalStep`).
pub fn forward<F: Float>(
    cfg: &ModelConfig,
    params: &[Vec<F>],
    ids: &[u32],
    targets: &[u32],
    b: usize,
    eval_gate: Option<GateConfig>,
) -> Result<Trace<F>> {
    cfg.validate()?;
    check_params(cfg, params)?;
    check_batch(cfg, ids, Some(targets), b)?;
    let ix = Index::new(cfg);
    let (v, d, n, h) = (cfg.vocab, cfg.d, cfg.context, cfg.heads);
    let t = b * n;
    let eps = cast::<F>(cfg.eps as f64);
    let (hkv, dh) = (cfg.kv_heads(), cfg.head_dim());
    let (qw, qkv_w) = (cfg.q_width(), cfg.qkv_width());
    let gqa = gqa_shape(cfg, b);
    let (one, zero) = (F::one(), F::zero());
    let wpe = match cfg.rope {
        Some(_) => None,
        None => Some(&params[ix.get(ParamId::Wpe)?][..]),
    };
    let rope_tables = cfg.rope.map(|r| r.tables(n, dh));
    let mut x = embedding_forward(
        ids,
        &params[ix.get(ParamId::Wte)?],
        wpe,
        F::one(),
        t,
        v,
        n,
        d,
    );
    let mut blocks = Vec::with_capacity(cfg.layers);
    for l in 0..cfg.layers {
        let p = |s: BlockParam| -> Result<&[F]> { Ok(&params[ix.layer(l, s)?]) };
        let mut ffn_cfg = cfg.ffn_config(l);
        if let Some(g) = eval_gate.filter(|_| ffn_cfg.e > 1) {
            // Evaluation is dropless, as on the GPU.
            ffn_cfg.gate = g;
            ffn_cfg.capacity_factor = None;
        }
        let (a, rstd1) = rmsnorm_forward(&x, p(BlockParam::Norm1)?, eps, t, d);
        let mut qkv = matmul(
            &a,
            p(BlockParam::Wqkv)?,
            t,
            qkv_w,
            d,
            Trans::NN,
            one,
            zero,
            None,
        );
        if let Some((cos, sin)) = &rope_tables {
            // Sequences of N from position 0, as the GPU's batch graph.
            rope(&mut qkv, (h, hkv), dh, cos, sin, 0, n, 1.0);
        }
        let (o, lse) = attention_forward_gqa(&qkv, gqa);
        let proj = matmul(&o, p(BlockParam::Wo)?, t, d, qw, Trans::NN, one, zero, None);
        let xm = add_forward(&x, &proj);
        let (m, rstd2) = rmsnorm_forward(&xm, p(BlockParam::Norm2)?, eps, t, d);
        let w = MoeParams {
            w_router: p(BlockParam::Router)?.to_vec(),
            w1: p(BlockParam::W1)?.to_vec(),
            w3: match cfg.activation {
                Activation::SwiGlu => p(BlockParam::W3)?.to_vec(),
                Activation::Gelu => Vec::new(),
            },
            w2: p(BlockParam::W2)?.to_vec(),
        };
        let ffn = moe_layer_forward(&ffn_cfg, &w, &m, t)?;
        let x_next = add_forward(&xm, &ffn.y);
        blocks.push(BlockTrace {
            x,
            a,
            rstd1,
            qkv,
            o,
            lse,
            xm,
            m,
            rstd2,
            ffn,
            ffn_cfg,
            aux: cfg.aux_config(l),
        });
        x = x_next;
    }
    let (xf, rstdf) = rmsnorm_forward(&x, &params[ix.get(ParamId::NormF)?], eps, t, d);
    let logits = matmul(
        &xf,
        &params[ix.get(ParamId::WOut)?],
        t,
        v,
        d,
        Trans::NN,
        one,
        zero,
        None,
    );
    let ce = cross_entropy_forward(&logits, targets, t, v);
    Ok(Trace {
        b,
        t,
        blocks,
        x_out: x,
        xf,
        rstdf,
        logits,
        ce,
    })
}

/// Mean cross-entropy of one batch over its counted targets (what
/// `EvalStep::loss` gives as sum / count), under `eval_gate` if given.
pub fn forward_loss(
    cfg: &ModelConfig,
    params: &HostParams,
    ids: &[u32],
    targets: &[u32],
    b: usize,
    eval_gate: Option<GateConfig>,
) -> Result<f32> {
    let tr = forward::<f32>(cfg, &to_float(params), ids, targets, b, eval_gate)?;
    let [sum, count] = loss_sum(&tr.ce, targets, cfg.vocab);
    Ok(sum / count.max(1.0))
}

/// The objective of the training step and its gradient with respect to
/// every parameter, in the GPU's order of operations.
pub fn loss_and_grads<F: Float>(
    cfg: &ModelConfig,
    params: &[Vec<F>],
    ids: &[u32],
    targets: &[u32],
    b: usize,
) -> Result<Grads<F>> {
    let tr = forward(cfg, params, ids, targets, b, None)?;
    let ix = Index::new(cfg);
    let (v, d, n) = (cfg.vocab, cfg.d, cfg.context);
    let t = tr.t;
    let (one, zero) = (F::one(), F::zero());
    let (h, hkv, dh) = (cfg.heads, cfg.kv_heads(), cfg.head_dim());
    let (qw, qkv_w) = (cfg.q_width(), cfg.qkv_width());
    let gqa = gqa_shape(cfg, b);
    let mut grads: Vec<Vec<F>> = params.iter().map(|p| vec![zero; p.len()]).collect();
    let scale = one / cast::<F>(t as f64);

    // Head: the loss gradient written over the logits, then W_out and the
    // final norm.
    let mut dlogits = tr.logits.clone();
    cross_entropy_forward_backward(&mut dlogits, targets, t, v, scale);
    let w_out = &params[ix.get(ParamId::WOut)?];
    let dxf = matmul(&dlogits, w_out, t, d, v, Trans::NT, one, zero, None);
    grads[ix.get(ParamId::WOut)?] = matmul(&tr.xf, &dlogits, d, v, t, Trans::TN, one, zero, None);
    let gf = &params[ix.get(ParamId::NormF)?];
    let mut gy = rmsnorm_backward(&tr.x_out, gf, &dxf, &tr.rstdf, t, d);
    grads[ix.get(ParamId::NormF)?] = rmsnorm_backward_gain(&tr.x_out, &dxf, &tr.rstdf, t, d);

    let mut aux = Vec::with_capacity(cfg.layers);
    for (l, blk) in tr.blocks.iter().enumerate().rev() {
        let p = |s: BlockParam| -> Result<&[F]> { Ok(&params[ix.layer(l, s)?]) };
        let w = MoeParams {
            w_router: p(BlockParam::Router)?.to_vec(),
            w1: p(BlockParam::W1)?.to_vec(),
            w3: match cfg.activation {
                Activation::SwiGlu => p(BlockParam::W3)?.to_vec(),
                Activation::Gelu => Vec::new(),
            },
            w2: p(BlockParam::W2)?.to_vec(),
        };
        let (_, _, bal, z) = aux_losses(&blk.ffn, blk.ffn_cfg.e, blk.ffn_cfg.k(), &blk.aux);
        aux.push((bal, z));
        let fg = moe_layer_backward(&blk.ffn_cfg, &w, &blk.m, &blk.ffn, &gy, &blk.aux);
        grads[ix.layer(l, BlockParam::Router)?] = fg.dw_router;
        grads[ix.layer(l, BlockParam::W1)?] = fg.dw1;
        if cfg.activation == Activation::SwiGlu {
            grads[ix.layer(l, BlockParam::W3)?] = fg.dw3;
        }
        grads[ix.layer(l, BlockParam::W2)?] = fg.dw2;
        let g2 = p(BlockParam::Norm2)?;
        let tmp = rmsnorm_backward(&blk.xm, g2, &fg.dx, &blk.rstd2, t, d);
        grads[ix.layer(l, BlockParam::Norm2)?] =
            rmsnorm_backward_gain(&blk.xm, &fg.dx, &blk.rstd2, t, d);
        let gxm = add_forward(&gy, &tmp);
        let dout = matmul(
            &gxm,
            p(BlockParam::Wo)?,
            t,
            qw,
            d,
            Trans::NT,
            one,
            zero,
            None,
        );
        grads[ix.layer(l, BlockParam::Wo)?] =
            matmul(&blk.o, &gxm, qw, d, t, Trans::TN, one, zero, None);
        let mut dqkv = attention_backward_gqa(&blk.qkv, &blk.o, &dout, &blk.lse, gqa);
        if let Some(r) = &cfg.rope {
            // The gradient of the raw projection: the rotation turned back.
            let (cos, sin) = r.tables(n, dh);
            rope(&mut dqkv, (h, hkv), dh, &cos, &sin, 0, n, -1.0);
        }
        let da = matmul(
            &dqkv,
            p(BlockParam::Wqkv)?,
            t,
            d,
            qkv_w,
            Trans::NT,
            one,
            zero,
            None,
        );
        grads[ix.layer(l, BlockParam::Wqkv)?] =
            matmul(&blk.a, &dqkv, d, qkv_w, t, Trans::TN, one, zero, None);
        let tmp1 = rmsnorm_backward(&blk.x, p(BlockParam::Norm1)?, &da, &blk.rstd1, t, d);
        grads[ix.layer(l, BlockParam::Norm1)?] =
            rmsnorm_backward_gain(&blk.x, &da, &blk.rstd1, t, d);
        gy = add_forward(&gxm, &tmp1);
    }
    aux.reverse();
    let (offsets, order) = token_order(ids, v)?;
    grads[ix.get(ParamId::Wte)?] = embedding_backward_wte(&gy, &offsets, &order, v, d);
    if cfg.rope.is_none() {
        grads[ix.get(ParamId::Wpe)?] = embedding_backward_wpe(&gy, t, n, d);
    }

    let ce_sum = tr.ce.iter().fold(zero, |a, &x| a + x);
    let objective = aux.iter().fold(ce_sum * scale, |a, &(bal, z)| a + bal + z);
    Ok(Grads {
        objective,
        aux,
        grads,
        trace: tr,
    })
}

/// One training step on the CPU, the twin of `TrainStep::step`: gradients,
/// the global norm clipped to `opt.clip`, AdamW (weight decay only where
/// `ParamId::decay` says so) at optimizer step `step` (1-based) with rate
/// `lr`, updating `params` and `state` in place. A non-finite loss or norm
/// is `Error::NonFinite` and leaves both as they were.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    cfg: &ModelConfig,
    params: &mut HostParams,
    state: &mut AdamState,
    ids: &[u32],
    targets: &[u32],
    b: usize,
    opt: &OptConfig,
    lr: f32,
    step: u64,
) -> Result<CpuStepStats> {
    params.validate(cfg)?;
    opt.adamw.validate()?;
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::invalid(
            "adamw",
            format!("learning rate {lr} must be >= 0"),
        ));
    }
    if step == 0 {
        return Err(Error::invalid("adamw", "steps count from 1"));
    }
    let specs = cfg.param_specs();
    if state.m.len() != specs.len() || state.v.len() != specs.len() {
        return Err(Error::shape(
            "model twin optimizer state",
            format!("{} tensors", specs.len()),
            format!("{} and {}", state.m.len(), state.v.len()),
        ));
    }
    let g = loss_and_grads::<f32>(cfg, &to_float(params), ids, targets, b)?;
    let [sum, count] = loss_sum(&g.trace.ce, targets, cfg.vocab);
    let loss = sum / count.max(1.0);

    let mut partials = Vec::new();
    for gr in &g.grads {
        partials.extend(grad_norm_partial(gr, GRAD_NORM_CHUNK as usize));
    }
    let clip = grad_norm_finish(&partials, opt.clip);
    if !loss.is_finite() || !clip[0].is_finite() {
        return Err(Error::NonFinite {
            op: "train_step twin",
            msg: format!(
                "loss {loss}, gradient norm {}: the step was skipped",
                clip[0]
            ),
        });
    }
    for (i, (((id, _), gr), p)) in specs
        .iter()
        .zip(&g.grads)
        .zip(params.values_mut())
        .enumerate()
    {
        let c = opt.adamw_for(id);
        // The GPU's per-step constants (bias corrections in f64, cast).
        let k = c.params(lr, step, 0, 0);
        let s = AdamWStep {
            lr: k.lr,
            beta1: k.beta1,
            beta2: k.beta2,
            eps: k.eps,
            weight_decay: k.weight_decay,
            bc1: k.bc1,
            bc2: k.bc2,
        };
        let (m, v) = (&mut state.m[i], &mut state.v[i]);
        if m.len() != gr.len() || v.len() != gr.len() {
            return Err(Error::shape(
                "model twin optimizer state",
                format!("{} values", gr.len()),
                format!("{} and {}", m.len(), v.len()),
            ));
        }
        adamw_step(&mut p.data, gr, m, v, &clip, &s);
    }

    let mut balance_loss = Vec::new();
    let mut expert_counts = Vec::new();
    let mut dropped_slots = Vec::new();
    let mut complexity = vec![Vec::new(); b];
    for l in cfg.moe_layers() {
        let blk = &g.trace.blocks[l];
        let per_seq = crate::reference::complexity::sequence_complexity(
            &blk.ffn.topk_ids,
            b,
            cfg.context,
            blk.ffn_cfg.k(),
        );
        for (row, v) in complexity.iter_mut().zip(per_seq) {
            row.push(v);
        }
        let e = blk.ffn_cfg.e;
        balance_loss.push(g.aux[l].0);
        let mut counts = vec![0u32; e];
        let mut dropped = 0u32;
        for (&i, &kept) in blk.ffn.topk_ids.iter().zip(&blk.ffn.kept) {
            if kept {
                counts[i as usize] += 1;
            } else if (i as usize) < e {
                dropped += 1;
            }
        }
        expert_counts.push(counts);
        dropped_slots.push(dropped);
    }
    let mut values = g.grads.into_iter();
    let grads = specs.try_map(|id, spec| {
        Ok(HostTensor {
            shape: spec.shape.clone(),
            data: values
                .next()
                .ok_or_else(|| Error::invalid("model twin", format!("no gradient for {id}")))?,
        })
    })?;
    Ok(CpuStepStats {
        loss,
        grad_norm: clip[0],
        clip_scale: clip[1],
        balance_loss,
        expert_counts,
        dropped_slots,
        complexity,
        grads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{GapMode, Gating};
    use crate::util::Rng;

    fn tiny(gating: Gating, dense: bool) -> ModelConfig {
        ModelConfig {
            vocab: 11,
            d: 8,
            layers: 2,
            heads: 2,
            context: 5,
            ffn: 6,
            experts: 3,
            moe_every: 1,
            activation: crate::kernels::Activation::Gelu,
            dense,
            gate: GateConfig {
                gating,
                threshold: 0.3,
                gap: GapMode::Top2,
                ..GateConfig::default()
            },
            aux: AuxConfig {
                balance: 0.3,
                z_loss: 0.05,
            },
            capacity_factor: None,
            eps: 1e-5,
            ..ModelConfig::default()
        }
    }

    fn batch(cfg: &ModelConfig, b: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
        let mut rng = Rng::new(seed);
        let t = b * cfg.context;
        let ids = (0..t).map(|_| rng.below(cfg.vocab) as u32).collect();
        // One ignored target: counted in T, contributes 0.
        let mut targets: Vec<u32> = (0..t).map(|_| rng.below(cfg.vocab) as u32).collect();
        targets[3] = UNUSED;
        (ids, targets)
    }

    /// Routing of every layer (a perturbation that changes it makes the
    /// objective non-differentiable there).
    fn routing(tr: &Trace<f64>) -> Vec<Vec<u32>> {
        tr.blocks.iter().map(|b| b.ffn.topk_ids.clone()).collect()
    }

    /// The twin's gradient of the objective against central differences, in
    /// f64, for a spread of elements of every parameter.
    fn check_fd(cfg: &ModelConfig, seed: u64) {
        let b = 2;
        let (ids, targets) = batch(cfg, b, seed);
        let mut host = HostParams::init(cfg, seed);
        // Gains away from 1 so that their gradients are generic.
        let mut rng = Rng::new(seed + 100);
        for (id, t) in host.iter_mut() {
            if matches!(
                id,
                ParamId::NormF | ParamId::Block(_, BlockParam::Norm1 | BlockParam::Norm2)
            ) {
                for x in t.data.iter_mut() {
                    *x = 0.7 + 0.6 * rng.uniform();
                }
            }
            if matches!(id, ParamId::Block(_, BlockParam::Router)) {
                // Spread router logits so that routing is not near a tie.
                for x in t.data.iter_mut() {
                    *x *= 6.0;
                }
            }
        }
        let params = to_float::<f64>(&host);
        let g = loss_and_grads::<f64>(cfg, &params, &ids, &targets, b).unwrap();
        let base_routing = routing(&g.trace);
        if !cfg.dense && cfg.gate.gating == Gating::Adaptive {
            let two = base_routing
                .iter()
                .flat_map(|r| r.chunks(2))
                .filter(|r| r[1] != UNUSED)
                .count();
            let all = base_routing.len() * b * cfg.context;
            assert!(two > 0 && two < all, "two-expert tokens: {two} of {all}");
        }
        if cfg.capacity_factor.is_some() {
            let dropped = g.trace.blocks.iter().all(|blk| {
                let f = &blk.ffn;
                f.topk_ids
                    .iter()
                    .zip(&f.kept)
                    .any(|(&i, &k)| i != UNUSED && !k)
            });
            assert!(dropped, "the capacity drops no slot in some layer");
        }
        let h = 1e-6;
        let eval = |p: &[Vec<f64>]| -> (f64, Vec<Vec<u32>>) {
            let g = loss_and_grads::<f64>(cfg, p, &ids, &targets, b).unwrap();
            (g.objective, routing(&g.trace))
        };
        let mut checked = 0;
        let mut q = params.clone();
        for (pi, (name, _)) in cfg.param_specs().iter().enumerate() {
            let len = params[pi].len();
            // About 9 elements per tensor, spread over it.
            let stride = (len / 9).max(1);
            for i in (0..len).step_by(stride) {
                let keep = q[pi][i];
                q[pi][i] = keep + h;
                let (up, r_up) = eval(&q);
                q[pi][i] = keep - h;
                let (down, r_down) = eval(&q);
                q[pi][i] = keep;
                if r_up != base_routing || r_down != base_routing {
                    continue;
                }
                let fd = (up - down) / (2.0 * h);
                let an = g.grads[pi][i];
                assert!(
                    (an - fd).abs() <= 1e-7 + 1e-5 * fd.abs(),
                    "{name}[{i}]: twin {an} vs finite difference {fd}"
                );
                checked += 1;
            }
        }
        assert!(checked > 150, "only {checked} elements checked");
    }

    #[test]
    fn gradient_matches_finite_differences_top1() {
        check_fd(&tiny(Gating::Top1, false), 1);
    }

    #[test]
    fn gradient_matches_finite_differences_top2() {
        check_fd(&tiny(Gating::Top2, false), 2);
    }

    #[test]
    fn gradient_matches_finite_differences_adaptive() {
        check_fd(&tiny(Gating::Adaptive, false), 3);
    }

    #[test]
    fn gradient_matches_finite_differences_top2_with_capacity() {
        // 2 sequences of 5 tokens, K = 2, E = 3: ceil(0.5 * 20 / 3) = 4
        // slots per expert, so some are dropped.
        let cfg = ModelConfig {
            capacity_factor: Some(0.5),
            ..tiny(Gating::Top2, false)
        };
        check_fd(&cfg, 5);
    }

    #[test]
    fn gradient_matches_finite_differences_swiglu() {
        let swiglu = |gating, dense| ModelConfig {
            activation: crate::kernels::Activation::SwiGlu,
            ..tiny(gating, dense)
        };
        check_fd(&swiglu(Gating::Adaptive, false), 6);
        check_fd(&swiglu(Gating::Top1, true), 7);
    }

    #[test]
    fn gradient_matches_finite_differences_rope() {
        // Rotary positions (no wpe): the rotation enters q and k, and the
        // backward turns it back.
        let cfg = ModelConfig {
            rope: Some(crate::model::config::Rope {
                theta: 100.0,
                scaling: None,
            }),
            ..tiny(Gating::Top2, false)
        };
        check_fd(&cfg, 7);
    }

    #[test]
    fn gradient_matches_finite_differences_gqa_window() {
        // GQA 2/1 with a head width of its own, a window of 3 and rotary
        // positions.
        let cfg = ModelConfig {
            kv_heads: Some(1),
            head_dim: Some(8),
            sliding_window: Some(3),
            rope: Some(crate::model::config::Rope {
                theta: 100.0,
                scaling: None,
            }),
            ..tiny(Gating::Top2, false)
        };
        check_fd(&cfg, 8);
    }

    #[test]
    fn gradient_matches_finite_differences_dense() {
        check_fd(&tiny(Gating::Top1, true), 4);
    }

    #[test]
    fn step_moves_every_parameter_and_clips() {
        // Without the auxiliary losses, so that the step descends the
        // cross-entropy that the check below measures.
        let cfg = ModelConfig {
            aux: AuxConfig {
                balance: 0.0,
                z_loss: 0.0,
            },
            ..tiny(Gating::Adaptive, false)
        };
        let b = 2;
        let (ids, targets) = batch(&cfg, b, 9);
        let mut p = HostParams::init(&cfg, 9);
        let before = p.clone();
        let mut st = AdamState::new(&cfg);
        let opt = OptConfig {
            clip: Some(1e-3),
            ..OptConfig::default()
        };
        // A step small enough that the first-order decrease dominates (Adam
        // moves every parameter by about lr on its first step).
        let s = train_step(&cfg, &mut p, &mut st, &ids, &targets, b, &opt, 1e-3, 1).unwrap();
        assert!(s.grad_norm > 1e-3 && (s.clip_scale - 1e-3 / s.grad_norm).abs() < 1e-6);
        assert!((s.loss - (cfg.vocab as f32).ln()).abs() < 0.5, "{}", s.loss);
        assert_eq!(s.balance_loss.len(), 2);
        let moved = p
            .values()
            .zip(before.values())
            .flat_map(|(a, b)| a.data.iter().zip(&b.data))
            .filter(|(x, y)| x != y)
            .count();
        assert!(moved > cfg.num_params() / 2, "{moved} moved");
        let eval = forward_loss(&cfg, &p, &ids, &targets, b, None).unwrap();
        assert!(eval < s.loss, "loss {} -> {eval}", s.loss);
        // Wrong batch sizes are typed errors.
        assert!(train_step(&cfg, &mut p, &mut st, &ids[1..], &targets, b, &opt, 1e-2, 2).is_err());
    }
}
