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
use crate::gpu::{GpuContext, PartId, Readback, ReadbackLayout};
use crate::infer::checkpoint::InferCheckpoint;
use crate::infer::sampling::{Sampler, Sampling};
use crate::kernels::embedding::check_ids;
use crate::kernels::kv_cache::{check_span, KvCache, KvStep};
use crate::kernels::{GateConfig, Gates, UNUSED};
use crate::model::graph::{Graph, KvRefs, Mode};
use crate::model::{DtypeChoice, Model, ModelConfig, StorageChoice};
use crate::moe::MoeLayer;
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

/// One MoE layer's part of a pass's readback.
struct RouteParts {
    layer: usize,
    k: usize,
    ids: PartId,
    weights: PartId,
}

/// Every buffer and launcher of one call shape (T tokens), built once: the
/// model graph in prefill or decode mode, and its readback.
struct Pass {
    graph: Graph,
    /// [routing of every MoE layer: ids [T, K], weights [T, K]][logits [T, V]]
    readback: Readback,
    routes: Vec<RouteParts>,
    logits: PartId,
}

impl Pass {
    fn new(ctx: &GpuContext, engine: &EngineState, t: usize, prefill: bool) -> Result<Pass> {
        let kv = KvRefs {
            caches: &engine.caches,
            step: &engine.step,
        };
        let mode = if prefill {
            Mode::Prefill(kv)
        } else {
            Mode::Decode(kv)
        };
        let graph = Graph::new(ctx, &engine.model, &engine.layers, t, mode)?;
        let mut layout = ReadbackLayout::new();
        let mut routes = Vec::new();
        for l in engine.cfg().moe_layers() {
            let plan = graph.blocks[l].ffn.fwd();
            routes.push(RouteParts {
                layer: l,
                k: plan.topk_ids.shape[1],
                ids: layout.push_tensor(&plan.topk_ids),
                weights: layout.push_tensor(&plan.topk_weights),
            });
        }
        let logits = layout.push_tensor(&graph.head.logits);
        let readback = layout.build(ctx, "infer_readback")?;
        Ok(Pass {
            graph,
            readback,
            routes,
            logits,
        })
    }

    fn t(&self) -> usize {
        self.graph.t
    }

    /// Record, submit, read back. The caller has written `ids` and the step.
    async fn run(&self, ctx: &GpuContext, v: usize, all_logits: bool) -> Result<StepOut> {
        let t = self.t();
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("infer_step"),
            });
        self.graph.clear(&mut enc);
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("infer_step"),
                timestamp_writes: None,
            });
            self.graph.record(&mut pass);
        }
        let rb = &self.readback;
        for r in &self.routes {
            rb.record(&mut enc, r.ids);
            rb.record(&mut enc, r.weights);
        }
        // The last row, or every row.
        let rows = if all_logits { t } else { 1 };
        let row_bytes = (v * 4) as u64;
        rb.record_range(
            &mut enc,
            self.logits,
            (t - rows) as u64 * row_bytes,
            rows as u64 * row_bytes,
        );
        ctx.submit("infer_step", enc)?;
        let words = rb.read(ctx).await?;
        ctx.check_errors("infer_step")?;
        let mut routes = vec![Vec::with_capacity(self.routes.len()); t];
        for r in &self.routes {
            let (ids, wts, k) = (words.u32s(r.ids), words.u32s(r.weights), r.k);
            for (i, out) in routes.iter_mut().enumerate() {
                let mut lr = LayerRoute {
                    layer: r.layer,
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
                out.push(lr);
            }
        }
        let logits: Vec<f32> = words.u32s(self.logits)[..rows * v]
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect();
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
        return Err(Error::invalid(
            "generate",
            format!(
                "a prompt of {} tokens is longer than the model's context of {} tokens{}",
                ids.len(),
                cfg.context,
                if cfg.rope.is_some() {
                    " (give a shorter prompt, or a longer --context)"
                } else {
                    " (give a shorter prompt)"
                }
            ),
        ));
    }
    check_ids(ids, cfg.vocab)
}

/// What every pass of an engine binds: the model, its FFN layers under the
/// current gate, the K/V caches and the step buffer.
struct EngineState {
    model: Model,
    layers: Vec<MoeLayer>,
    caches: Vec<KvCache>,
    step: KvStep,
}

impl EngineState {
    fn cfg(&self) -> &ModelConfig {
        &self.model.cfg
    }
}

/// A checkpoint on the GPU, ready to generate: the caches, the passes per
/// length, the readback and sampling.
pub struct Engine {
    pub cfg: ModelConfig,
    /// The MoE layers' rule (the first MoE layer's, with per-layer thresholds).
    pub gate: GateConfig,
    /// With its per-layer thresholds, if any.
    pub gates: Gates,
    state: EngineState,
    decode: Pass,
    /// Prefill passes by length, most recent last.
    prefill: Vec<Pass>,
    pos: usize,
    /// Ids that end a generation (the checkpoint's).
    stop_ids: Vec<u32>,
}

/// The most tokens one generation may ask for (a typo such as
/// `--max-tokens 18446744073709551615` would otherwise run for ever).
pub const MAX_GENERATE_TOKENS: usize = 1 << 20;

/// Prefill shapes kept at once.
const PREFILL_KEEP: usize = 4;

impl Engine {
    /// Upload `ck` (weights stored as `--dtype auto` picks) and build the
    /// decode pass under `gate`.
    pub fn new(ctx: &GpuContext, ck: &InferCheckpoint, gate: impl Into<Gates>) -> Result<Engine> {
        Self::with_dtype(ctx, ck, gate, DtypeChoice::Auto)
    }

    /// Upload `ck` with its weights stored as `storage` resolves to (a
    /// `DtypeChoice`, or a `StorageChoice` that also quantizes the experts).
    pub fn with_dtype(
        ctx: &GpuContext,
        ck: &InferCheckpoint,
        gate: impl Into<Gates>,
        storage: impl Into<StorageChoice>,
    ) -> Result<Engine> {
        let gates: Gates = gate.into();
        let cfg = ck.cfg.clone();
        let model = Model::with_dtype(ctx, &cfg, &ck.weights, ck.weights.resolve_storage(storage))?;
        let caches = (0..cfg.layers)
            .map(|_| KvCache::new(ctx, cfg.kv_heads(), cfg.context, cfg.head_dim()))
            .collect::<Result<Vec<_>>>()?;
        let step = KvStep::new(ctx, cfg.context)?;
        let moe_layers = cfg.moe_layers().len();
        if moe_layers > 0 {
            gates.validate(cfg.experts, moe_layers)?;
        }
        let layers = model.ffn_with_gate(Some(&gates));
        let state = EngineState {
            model,
            layers,
            caches,
            step,
        };
        let decode = Pass::new(ctx, &state, 1, false)?;
        Ok(Engine {
            cfg,
            gate: gates.layer(0),
            gates,
            state,
            decode,
            prefill: Vec::new(),
            pos: 0,
            stop_ids: ck.stop_ids.clone(),
        })
    }

    /// Switch the MoE layers' rule (same weights); the cache is reset.
    pub fn set_gate(&mut self, ctx: &GpuContext, gate: impl Into<Gates>) -> Result<()> {
        let gates: Gates = gate.into();
        let moe_layers = self.cfg.moe_layers().len();
        if moe_layers > 0 {
            gates.validate(self.cfg.experts, moe_layers)?;
        }
        self.state.layers = self.state.model.ffn_with_gate(Some(&gates));
        self.gate = gates.layer(0);
        self.gates = gates;
        self.prefill.clear();
        self.decode = Pass::new(ctx, &self.state, 1, false)?;
        self.pos = 0;
        Ok(())
    }

    /// The model on the GPU (for a batched evaluation with the same weights).
    pub fn model(&self) -> &Model {
        &self.state.model
    }

    /// How the weights are stored on the GPU.
    pub fn storage(&self) -> crate::model::Storage {
        self.state.model.storage
    }

    /// Bytes of the model's weights on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        self.state.model.bytes()
    }

    /// Tokens in the cache (the position of the next decode).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes of the parameters and of the K/V caches on the GPU.
    pub fn gpu_bytes(&self) -> u64 {
        self.state.model.bytes() + self.state.caches.iter().map(KvCache::bytes).sum::<u64>()
    }

    /// Prompt lengths whose prefill passes, together, use every kernel
    /// variant a prefill of this model can take: the matmul core switches
    /// at 4 and 16 tokens, the MoE layers from the decode mat-vecs to the
    /// grouped GEMMs past `moe::DECODE_MAX_T` tokens, and the expert GEMM's
    /// core at 48 rows per expert (`ExpertSpec::choose`). Up to the context.
    pub fn warm_lengths(&self) -> Vec<usize> {
        let cfg = &self.cfg;
        let (e, k) = (cfg.experts.max(1), self.gate.max_k().max(1));
        let d = crate::moe::DECODE_MAX_T;
        let mut v: Vec<usize> = [2, d, d + 1, (48 * e).div_ceil(k)]
            .into_iter()
            .map(|t| t.clamp(1, cfg.context))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Build the prefill pass of `t` tokens and let it go: its pipelines
    /// stay compiled (the context's cache), its buffers are freed. What
    /// the page's warm-up does for every length of `warm_lengths`, so that
    /// no prompt waits for a compile.
    pub fn compile_prefill(&self, ctx: &GpuContext, t: usize) -> Result<()> {
        check_span(0, t, self.cfg.context)?;
        Pass::new(ctx, &self.state, t, true).map(drop)
    }

    /// The index of the prefill pass for `t` tokens, built (pipelines
    /// compiled, buffers allocated) if it is not kept yet.
    fn prefill_pass(&mut self, ctx: &GpuContext, t: usize) -> Result<usize> {
        if let Some(i) = self.prefill.iter().position(|p| p.t() == t) {
            return Ok(i);
        }
        if self.prefill.len() >= PREFILL_KEEP {
            self.prefill.remove(0);
        }
        let p = Pass::new(ctx, &self.state, t, true)?;
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
        self.state.step.set(ctx, 0, t)?;
        let pass = &self.prefill[i];
        pass.graph.ids.write(ctx, ids)?;
        self.pos = 0;
        let out = pass.run(ctx, self.cfg.vocab, all_logits).await?;
        self.pos = t;
        Ok(out)
    }

    /// Append one token at the current position and return its logits.
    pub async fn decode(&mut self, ctx: &GpuContext, id: u32) -> Result<StepOut> {
        check_ids(&[id], self.cfg.vocab)?;
        check_span(self.pos, 1, self.cfg.context)?;
        self.state.step.set(ctx, self.pos, 1)?;
        self.decode.graph.ids.write(ctx, &[id])?;
        let out = self.decode.run(ctx, self.cfg.vocab, false).await?;
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
        if cfg.max_tokens > MAX_GENERATE_TOKENS {
            return Err(Error::invalid(
                "generate",
                format!(
                    "max tokens {} is more than {MAX_GENERATE_TOKENS}: past the context the model only slides its window, so ask for what you will read",
                    cfg.max_tokens
                ),
            ));
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
            if cfg.stop_at_eot && self.stop_ids.contains(&id) {
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
