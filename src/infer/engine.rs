//! The inference engine: a checkpoint on the GPU, its K/V caches, a decode
//! pass (T = 1) built once and prefill passes (T = prompt length) built per
//! length and kept, and the generation loop.
//!
//! Prefill runs the training forward's kernels (flash attention, the grouped
//! expert path) and appends every token's keys and
//! values to the caches; decode embeds one token at the position held in a
//! GPU `step` buffer, appends its K/V and attends over the cache
//! (`kv_attention`), and runs the experts as mat-vecs. Both end in one
//! readback: each MoE layer's experts and weights per token, then logits.
//!
//! Context window: a prompt longer than the context is an error. When
//! generation fills the window, the last half of the tokens is prefilled
//! again at positions 0.. (a sliding window; the model was trained with
//! absolute positions, so the cache cannot just be shifted) and decoding
//! goes on; [`Generation::slides`] counts how often.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Staging, Tensor};
use crate::infer::checkpoint::InferCheckpoint;
use crate::infer::sampling::{Sampler, Sampling};
use crate::kernels::add::Add;
use crate::kernels::attention::{AttentionConfig, AttentionForward, AttentionForwardBuffers};
use crate::kernels::embedding::check_ids;
use crate::kernels::kv_cache::{
    check_span, KvAppend, KvAttention, KvCache, KvEmbed, KvEmbedBuffers, KvShape, KvStep,
};
use crate::kernels::matmul::{Matmul, Trans};
use crate::kernels::rmsnorm::{RmsNormForward, RmsNormForwardBuffers};
use crate::kernels::{GateConfig, UNUSED};
use crate::model::transformer::mm;
use crate::model::{Model, ModelConfig};
use crate::moe::{MoeLayer, MoePlan, Path};
use crate::tokenizer::Tokenizer;
use crate::util::Stopwatch;
use serde::Serialize;

/// One MoE layer's choice for one token.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerRoute {
    /// Transformer layer index.
    pub layer: usize,
    /// The experts used, first choice first (1 or 2).
    pub experts: Vec<u32>,
    /// Their combine weights.
    pub weights: Vec<f32>,
}

/// What one prefill or decode call gives back.
#[derive(Clone, Debug)]
pub struct StepOut {
    /// Logits, `rows` x V: the last token's, or every token's on request.
    pub logits: Vec<f32>,
    pub rows: usize,
    /// Per token of the call, each MoE layer's route.
    pub routes: Vec<Vec<LayerRoute>>,
}

impl StepOut {
    /// The last row of logits.
    pub fn last(&self) -> &[f32] {
        let v = self.logits.len() / self.rows.max(1);
        &self.logits[(self.rows - 1) * v..]
    }
}

enum Attn {
    /// Prefill from position 0: self-attention over the call's own rows.
    Flash(AttentionForward),
    /// Decode: the call's queries over the cache.
    Cached(KvAttention),
}

// Tensors are held so that they live as long as the launchers binding them.
#[allow(dead_code)]
struct Layer {
    a: Tensor<f32>,
    rstd1: Tensor<f32>,
    qkv: Tensor<f32>,
    o: Tensor<f32>,
    lse: Option<Tensor<f32>>,
    proj: Tensor<f32>,
    xm: Tensor<f32>,
    rstd2: Tensor<f32>,
    x_next: Tensor<f32>,
    plan: MoePlan,
    norm1: RmsNormForward,
    qkv_mm: Matmul,
    append: KvAppend,
    attn: Attn,
    proj_mm: Matmul,
    add1: Add,
    norm2: RmsNormForward,
    add2: Add,
}

/// Every buffer and launcher of one call shape (T tokens), built once.
#[allow(dead_code)]
struct Pass {
    t: usize,
    ids: Tensor<u32>,
    x0: Tensor<f32>,
    embed: KvEmbed,
    layers: Vec<Layer>,
    xf: Tensor<f32>,
    rstdf: Tensor<f32>,
    norm_f: RmsNormForward,
    logits: Tensor<f32>,
    out_mm: Matmul,
    /// [routing of every MoE layer: ids [T, K], weights [T, K]][logits]
    readback: Staging,
}

struct Shared<'a> {
    cfg: &'a ModelConfig,
    model: &'a Model,
    layers: &'a [MoeLayer],
    caches: &'a [KvCache],
    step: &'a KvStep,
}

impl Pass {
    fn new(ctx: &GpuContext, s: &Shared<'_>, t: usize, prefill: bool) -> Result<Pass> {
        let cfg = s.cfg;
        let (v, d, n, h) = (cfg.vocab, cfg.d, cfg.context, cfg.heads);
        let dh = d / h;
        let z = |name: &str, shape: &[usize]| Tensor::<f32>::zeros(ctx, name, shape);
        let ids = Tensor::<u32>::zeros(ctx, "ids", &[t])?;
        let x0 = z("x0", &[t, d])?;
        let embed = KvEmbed::new(
            ctx,
            &KvEmbedBuffers {
                step: s.step,
                ids: &ids,
                wte: s.model.param("wte")?,
                wpe: s.model.param("wpe")?,
                x: &x0,
            },
        )?;
        let kv = KvShape { t, h, dh, n };
        let mut layers = Vec::with_capacity(cfg.layers);
        let mut x = x0.clone();
        for (l, moe) in s.layers.iter().enumerate() {
            let p = |name: &str| s.model.param(&format!("layers.{l}.{name}"));
            let a = z("a", &[t, d])?;
            let rstd1 = z("rstd1", &[t])?;
            let qkv = z("qkv", &[t, 3 * d])?;
            let o = z("o", &[t, d])?;
            let proj = z("proj", &[t, d])?;
            let xm = z("xm", &[t, d])?;
            let rstd2 = z("rstd2", &[t])?;
            let x_next = z("x", &[t, d])?;
            // Prefill: the grouped path (route, permute, grouped GEMMs);
            // decode: a mat-vec per selected expert.
            let path = if prefill { Path::Grouped } else { Path::Decode };
            let plan = moe.plan(ctx, t, path)?;
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
            let append = KvAppend::new(ctx, &kv, s.step, &qkv, &s.caches[l])?;
            let (attn, lse) = if prefill {
                let lse = z("attn_lse", &[1, h, t])?;
                let f = AttentionForward::new(
                    ctx,
                    AttentionConfig { b: 1, n: t, h },
                    &AttentionForwardBuffers {
                        qkv: &qkv,
                        o: &o,
                        lse: &lse,
                    },
                )?;
                (Attn::Flash(f), Some(lse))
            } else {
                let c = KvAttention::new(ctx, &kv, s.step, &qkv, &s.caches[l], &o)?;
                (Attn::Cached(c), None)
            };
            let proj_mm = mm(ctx, (t, d, d), Trans::NN, 0.0, &o, p("wo")?, &proj)?;
            let add1 = Add::new(ctx, &x, &proj, &xm)?;
            let norm2 = RmsNormForward::new(
                ctx,
                cfg.eps,
                &RmsNormForwardBuffers {
                    x: &xm,
                    g: p("norm2")?,
                    y: &plan.x,
                    rstd: &rstd2,
                },
            )?;
            let add2 = Add::new(ctx, &xm, &plan.y, &x_next)?;
            x = x_next.clone();
            layers.push(Layer {
                a,
                rstd1,
                qkv,
                o,
                lse,
                proj,
                xm,
                rstd2,
                x_next,
                plan,
                norm1,
                qkv_mm,
                append,
                attn,
                proj_mm,
                add1,
                norm2,
                add2,
            });
        }
        let xf = z("xf", &[t, d])?;
        let rstdf = z("rstdf", &[t])?;
        let norm_f = RmsNormForward::new(
            ctx,
            cfg.eps,
            &RmsNormForwardBuffers {
                x: &x,
                g: s.model.param("norm_f")?,
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
            s.model.param("w_out")?,
            &logits,
        )?;
        let routing: usize = cfg
            .moe_layers()
            .iter()
            .map(|&l| 2 * t * s.layers[l].cfg.k())
            .sum();
        let readback = Staging::new(ctx, "infer_readback", ((routing + t * v) * 4) as u64)?;
        Ok(Pass {
            t,
            ids,
            x0,
            embed,
            layers,
            xf,
            rstdf,
            norm_f,
            logits,
            out_mm,
            readback,
        })
    }

    /// Record, submit, read back. The caller has written `ids` and the step.
    async fn run(&self, ctx: &GpuContext, s: &Shared<'_>, all_logits: bool) -> Result<StepOut> {
        let (t, v) = (self.t, s.cfg.vocab);
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("infer_step"),
            });
        for l in &self.layers {
            l.plan.clear(&mut enc);
        }
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("infer_step"),
                timestamp_writes: None,
            });
            self.embed.record(&mut pass);
            for l in &self.layers {
                l.norm1.record(&mut pass);
                l.qkv_mm.record(&mut pass);
                l.append.record(&mut pass);
                match &l.attn {
                    Attn::Flash(f) => f.record(&mut pass),
                    Attn::Cached(c) => c.record(&mut pass),
                }
                l.proj_mm.record(&mut pass);
                l.add1.record(&mut pass);
                l.norm2.record(&mut pass);
                l.plan.record_pass(&mut pass);
                l.add2.record(&mut pass);
            }
            self.norm_f.record(&mut pass);
            self.out_mm.record(&mut pass);
        }
        let rb = &self.readback;
        let mut off = 0u64;
        let moe = s.cfg.moe_layers();
        for &l in &moe {
            let plan = &self.layers[l].plan;
            for (b, bytes) in [
                (&plan.topk_ids.buffer, plan.topk_ids.bytes()),
                (&plan.topk_weights.buffer, plan.topk_weights.bytes()),
            ] {
                rb.copy_from(&mut enc, b, 0, off, bytes);
                off += bytes;
            }
        }
        let rows = if all_logits { t } else { 1 };
        let row_bytes = (v * 4) as u64;
        rb.copy_from(
            &mut enc,
            &self.logits.buffer,
            (t - rows) as u64 * row_bytes,
            off,
            rows as u64 * row_bytes,
        );
        ctx.queue.submit(Some(enc.finish()));
        let words = rb
            .read::<u32>(ctx, off as usize / 4 + rows * v, "routes and logits")
            .await?;
        ctx.check_errors("infer_step")?;
        let mut routes = vec![Vec::with_capacity(moe.len()); t];
        let mut w = 0usize;
        for &l in &moe {
            let k = self.layers[l].plan.topk_ids.shape[1];
            let ids = &words[w..w + t * k];
            let wts = &words[w + t * k..w + 2 * t * k];
            w += 2 * t * k;
            for (i, r) in routes.iter_mut().enumerate() {
                let mut lr = LayerRoute {
                    layer: l,
                    experts: Vec::with_capacity(k),
                    weights: Vec::with_capacity(k),
                };
                for j in 0..k {
                    let e = ids[i * k + j];
                    if e != UNUSED {
                        lr.experts.push(e);
                        lr.weights.push(f32::from_bits(wts[i * k + j]));
                    }
                }
                r.push(lr);
            }
        }
        let logits: Vec<f32> = words[w..].iter().map(|&b| f32::from_bits(b)).collect();
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                op: "infer_step",
                msg: format!("logit {} of row {} is {}", i % v, i / v, logits[i]),
            });
        }
        Ok(StepOut {
            logits,
            rows,
            routes,
        })
    }
}

/// Generation settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GenConfig {
    /// Tokens to generate (>= 1).
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Stop when the model writes the end-of-text token.
    pub stop_at_eot: bool,
    /// Keep each token's logits (the row it was chosen from) in `GenToken`.
    pub logits: bool,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            max_tokens: 64,
            sampling: Sampling::greedy(),
            stop_at_eot: true,
            logits: false,
        }
    }
}

/// One generated token.
#[derive(Clone, Debug, Serialize)]
pub struct GenToken {
    pub id: u32,
    /// Its text alone (a piece of a multi-byte character decodes to U+FFFD).
    pub text: String,
    /// Each MoE layer's experts and weights for this token.
    pub routes: Vec<LayerRoute>,
    /// The logits the token was chosen from (with `GenConfig::logits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
}

impl GenToken {
    /// Experts used in the layer that used the most (1 or 2).
    pub fn max_experts(&self) -> usize {
        self.routes
            .iter()
            .map(|r| r.experts.len())
            .max()
            .unwrap_or(1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    EndOfText,
}

/// A finished generation.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Routes of the prompt's tokens (prefill).
    pub prompt_routes: Vec<Vec<LayerRoute>>,
    pub tokens: Vec<GenToken>,
    /// The generated text (decoded as a whole).
    pub text: String,
    pub stop: StopReason,
    /// Seconds of the prefill call and of all decode calls.
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Times the context window filled and its last half was prefilled again.
    pub slides: usize,
}

impl Generation {
    pub fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

/// Where the window restarts when a token would land at position `n`:
/// `Some(new start)` keeping the last `n / 2` tokens of `len`, or `None`
/// while it fits. Shared with the CPU twin.
pub fn slide(start: usize, len: usize, n: usize) -> Option<usize> {
    (len - start >= n).then(|| len - n / 2)
}

/// Check a prompt: not empty, within the context, ids in the vocabulary.
pub fn check_prompt(cfg: &ModelConfig, ids: &[u32]) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::invalid(
            "generate",
            "empty prompt (give at least one token of text)",
        ));
    }
    if ids.len() > cfg.context {
        return Err(Error::Limit {
            what: "prompt tokens (the model's context window)".into(),
            needed: ids.len() as u64,
            max: cfg.context as u64,
        });
    }
    check_ids(ids, cfg.vocab)
}

/// A checkpoint on the GPU, ready to generate.
pub struct Engine {
    pub cfg: ModelConfig,
    pub gate: GateConfig,
    model: Model,
    layers: Vec<MoeLayer>,
    caches: Vec<KvCache>,
    step: KvStep,
    decode: Pass,
    /// Prefill passes by length, most recent last.
    prefill: Vec<Pass>,
    pos: usize,
}

/// Prefill shapes kept at once.
const PREFILL_KEEP: usize = 4;

impl Engine {
    /// Upload `ck` and build the decode pass under `gate`.
    pub fn new(ctx: &GpuContext, ck: &InferCheckpoint, gate: GateConfig) -> Result<Engine> {
        let cfg = ck.cfg.clone();
        let model = Model::new(ctx, &cfg, &ck.host)?;
        let dh = cfg.d / cfg.heads;
        let caches = (0..cfg.layers)
            .map(|_| KvCache::new(ctx, cfg.heads, cfg.context, dh))
            .collect::<Result<Vec<_>>>()?;
        let step = KvStep::new(ctx, cfg.context)?;
        if !cfg.moe_layers().is_empty() {
            gate.validate(cfg.experts)?;
        }
        let layers = model.ffn_with_gate(Some(gate));
        let decode = Pass::new(
            ctx,
            &Shared {
                cfg: &cfg,
                model: &model,
                layers: &layers,
                caches: &caches,
                step: &step,
            },
            1,
            false,
        )?;
        Ok(Engine {
            cfg,
            gate,
            model,
            layers,
            caches,
            step,
            decode,
            prefill: Vec::new(),
            pos: 0,
        })
    }

    /// Switch the MoE layers' rule (same weights); the cache is reset.
    pub fn set_gate(&mut self, ctx: &GpuContext, gate: GateConfig) -> Result<()> {
        if !self.cfg.moe_layers().is_empty() {
            gate.validate(self.cfg.experts)?;
        }
        self.layers = self.model.ffn_with_gate(Some(gate));
        self.gate = gate;
        self.prefill.clear();
        self.decode = Pass::new(ctx, &self.shared(), 1, false)?;
        self.pos = 0;
        Ok(())
    }

    fn shared(&self) -> Shared<'_> {
        Shared {
            cfg: &self.cfg,
            model: &self.model,
            layers: &self.layers,
            caches: &self.caches,
            step: &self.step,
        }
    }

    /// Tokens in the cache (the position of the next decode).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes of the parameters and of the K/V caches on the GPU.
    pub fn gpu_bytes(&self) -> u64 {
        let params: u64 = self.model.params.iter().map(|p| p.value.bytes()).sum();
        params + self.caches.iter().map(KvCache::bytes).sum::<u64>()
    }

    /// The index of the prefill pass for `t` tokens, built (pipelines
    /// compiled, buffers allocated) if it is not kept yet.
    fn prefill_pass(&mut self, ctx: &GpuContext, t: usize) -> Result<usize> {
        if let Some(i) = self.prefill.iter().position(|p| p.t == t) {
            return Ok(i);
        }
        if self.prefill.len() >= PREFILL_KEEP {
            self.prefill.remove(0);
        }
        let p = Pass::new(ctx, &self.shared(), t, true)?;
        self.prefill.push(p);
        Ok(self.prefill.len() - 1)
    }

    /// Start a sequence: run `ids` from position 0, filling the caches.
    /// Returns the last token's logits, or every token's with `all_logits`.
    pub async fn prefill(
        &mut self,
        ctx: &GpuContext,
        ids: &[u32],
        all_logits: bool,
    ) -> Result<StepOut> {
        check_prompt(&self.cfg, ids)?;
        let t = ids.len();
        let i = self.prefill_pass(ctx, t)?;
        self.step.set(ctx, 0, t)?;
        let pass = &self.prefill[i];
        pass.ids.write(ctx, ids)?;
        self.pos = 0;
        let out = pass.run(ctx, &self.shared(), all_logits).await?;
        self.pos = t;
        Ok(out)
    }

    /// Append one token at the current position and return its logits.
    pub async fn decode(&mut self, ctx: &GpuContext, id: u32) -> Result<StepOut> {
        check_ids(&[id], self.cfg.vocab)?;
        check_span(self.pos, 1, self.cfg.context)?;
        self.step.set(ctx, self.pos, 1)?;
        self.decode.ids.write(ctx, &[id])?;
        let out = self.decode.run(ctx, &self.shared(), false).await?;
        self.pos += 1;
        Ok(out)
    }

    /// Generate from `prompt`, calling `on_token` as each token is ready.
    pub async fn generate(
        &mut self,
        ctx: &GpuContext,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        cfg: &GenConfig,
        mut on_token: impl FnMut(&GenToken),
    ) -> Result<Generation> {
        check_prompt(&self.cfg, prompt)?;
        if cfg.max_tokens == 0 {
            return Err(Error::invalid("generate", "max tokens is 0"));
        }
        let mut sampler = Sampler::new(cfg.sampling)?;
        let n = self.cfg.context;
        // Build the prefill pass first: the timing is the GPU's, not the
        // shader compiler's.
        self.prefill_pass(ctx, prompt.len())?;
        let clock = Stopwatch::start();
        let first = self.prefill(ctx, prompt, false).await?;
        let prefill_s = clock.seconds();
        let prompt_routes = first.routes;
        let mut logits = first.logits;
        let mut seq = prompt.to_vec();
        let mut start = 0usize;
        let mut slides = 0usize;
        let mut tokens = Vec::new();
        let mut stop = StopReason::MaxTokens;
        let clock = Stopwatch::start();
        for _ in 0..cfg.max_tokens {
            let id = sampler.sample(&logits)?;
            if cfg.stop_at_eot && id == tokenizer.eot_id() {
                stop = StopReason::EndOfText;
                break;
            }
            if let Some(s) = slide(start, seq.len(), n) {
                start = s;
                slides += 1;
                if start < seq.len() {
                    self.prefill(ctx, &seq[start..], false).await?;
                } else {
                    self.pos = 0;
                }
            }
            let out = self.decode(ctx, id).await?;
            seq.push(id);
            let tok = GenToken {
                id,
                text: tokenizer.decode(&[id])?,
                routes: out.routes.into_iter().next().unwrap_or_default(),
                logits: cfg.logits.then(|| logits.clone()),
            };
            on_token(&tok);
            tokens.push(tok);
            logits = out.logits;
        }
        let decode_s = clock.seconds();
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        Ok(Generation {
            prompt_ids: prompt.to_vec(),
            prompt_routes,
            text: tokenizer.decode(&ids)?,
            tokens,
            stop,
            prefill_s,
            decode_s,
            slides,
        })
    }
}
