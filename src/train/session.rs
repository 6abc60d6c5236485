//! A training session without files: the configuration, the data ready to
//! train on, the model and its optimizer on the GPU, and the step (batch
//! order, learning-rate schedule, curriculum). `amoe train` (`trainer::Run`)
//! adds metrics files, checkpoints and the plot around it; the browser
//! (`web::Trainer`) runs it on a text from the page. Both take the same step,
//! so a browser step and a native step on the same batch give the same loss.

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::{GateConfig, Gating};
use crate::model::{
    DataParallelTimes, EvalStep, HostParams, Model, ModelConfig, OptConfig, StepArgs, TrainStep,
};
use crate::tokenizer::Tokenizer;
use crate::train::collective::{fnv1a, Comm};
use crate::train::curriculum::Curriculum;
use crate::train::data::{eval_batches, Batch, Batcher, Corpus, Dataset, Document, Domain, Split};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the text comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataSource {
    /// The shipped corpus (data/corpus), one domain or both.
    Shipped(Domain),
    /// The user's text: a file or a directory.
    Path(PathBuf),
}

/// Everything a run needs besides the GPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model (its `vocab` is set from the tokenizer).
    pub model: ModelConfig,
    pub opt: OptConfig,
    pub data: DataSource,
    /// Requested BPE vocabulary (the tokenizer may end smaller on tiny data).
    pub vocab_size: usize,
    /// Sequences per batch B.
    pub batch: usize,
    /// Optimizer steps in total.
    pub steps: u64,
    /// Linear warm-up steps, then cosine decay to 10% of the peak rate.
    pub warmup: u64,
    /// Length of the cosine decay (default: `steps`); past it the rate stays
    /// at its floor. Comparisons give every scheme the same schedule.
    #[serde(default)]
    pub schedule_steps: Option<u64>,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// At most this many validation batches per validation.
    pub eval_batches: usize,
    /// Gating rule of the MoE layers at validation (the paper: top-1).
    pub eval_gating: Gating,
    /// Reorder sequences before each epoch by complexity (adaptive gating).
    pub curriculum: bool,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Stop once the validation loss is at or below this.
    pub target_loss: Option<f32>,
    pub seed: u64,
}

impl Default for TrainConfig {
    /// `amoe train` with no arguments: the small adaptive-gating model on the
    /// shipped corpus (both domains).
    fn default() -> Self {
        TrainConfig {
            model: ModelConfig::default(),
            opt: OptConfig::default(),
            data: DataSource::Shipped(Domain::Both),
            vocab_size: 4096,
            batch: 16,
            steps: 400,
            warmup: 40,
            schedule_steps: None,
            eval_every: 100,
            eval_batches: 8,
            eval_gating: Gating::Top1,
            curriculum: true,
            checkpoint_every: 100,
            target_loss: None,
            seed: 1,
        }
    }
}

/// The largest learning rate `amoe train` takes.
pub const MAX_LR: f32 = 1.0;
/// The largest auxiliary-loss coefficient (balance, z-loss) it takes: the
/// paper's balance is 0.01.
pub const MAX_AUX: f32 = 100.0;
impl TrainConfig {
    /// Learning rate of step `s` (1-based).
    pub fn lr(&self, s: u64) -> f32 {
        let peak = self.opt.adamw.lr;
        if s <= self.warmup {
            return peak * s as f32 / self.warmup.max(1) as f32;
        }
        let span = self
            .schedule_steps
            .unwrap_or(self.steps)
            .saturating_sub(self.warmup)
            .max(1) as f32;
        let p = ((s - self.warmup) as f32 / span).min(1.0);
        peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * p).cos()))
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.steps == 0 {
            return Err(Error::invalid("train", "batch and steps must be >= 1"));
        }
        self.opt.adamw.validate()?;
        // AdamW moves each weight by about lr per step: past 1 every weight
        // leaves any useful range at once (and 1e30 overflows).
        if self.opt.adamw.lr > MAX_LR {
            return Err(Error::invalid(
                "train",
                format!(
                    "learning rate {} > {MAX_LR}: AdamW moves each weight by about the learning rate per step",
                    self.opt.adamw.lr
                ),
            ));
        }
        if let Some(c) = self.opt.clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::invalid(
                    "train",
                    format!(
                        "clip = {c}: a gradient-norm clip must be a number > 0 (0 turns it off)"
                    ),
                ));
            }
        }
        let aux = self.model.aux;
        for (name, v) in [("balance", aux.balance), ("z-loss", aux.z_loss)] {
            if !(v.is_finite() && (0.0..=MAX_AUX).contains(&v)) {
                return Err(Error::invalid(
                    "train",
                    format!("{name} coefficient {v}: must be in [0, {MAX_AUX}]"),
                ));
            }
        }
        self.model.validate()
    }

    fn eval_gate(&self) -> GateConfig {
        GateConfig {
            gating: self.eval_gating,
            ..self.model.gate
        }
    }
}

/// One metrics line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metric {
    /// "train" or "val"
    pub kind: String,
    pub step: u64,
    pub wall_s: f64,
    pub loss: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Mean over MoE layers of the two-expert token fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub two_expert_fraction: Option<f32>,
    /// max / mean of the per-expert slot counts (slots the experts
    /// processed), mean over MoE layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_imbalance: Option<f32>,
    /// With a capacity factor: the fraction of routed slots dropped past
    /// their expert's capacity, mean over MoE layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_fraction: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_s: Option<f64>,
}

/// Data ready to train on: the tokenizer and the packed sequences.
pub struct Prepared {
    pub tokenizer: Tokenizer,
    pub dataset: Dataset,
    pub split_description: String,
}

/// Train (or reuse) the tokenizer on the training documents and pack both
/// splits into sequences of the model's context.
pub fn prepare_split(
    split: &Split,
    cfg: &TrainConfig,
    tokenizer: Option<Tokenizer>,
) -> Result<Prepared> {
    let tokenizer = match tokenizer {
        Some(t) => t,
        None => Tokenizer::train(split.train.iter().map(|d| d.text.as_str()), cfg.vocab_size)?,
    };
    let dataset = Dataset::build(split, &tokenizer, cfg.model.context)?;
    if dataset.train.is_empty() {
        return Err(Error::data(
            split.source.clone(),
            format!(
                "too little training text for one sequence of {} tokens",
                cfg.model.context + 1
            ),
        ));
    }
    Ok(Prepared {
        tokenizer,
        dataset,
        split_description: split.description.clone(),
    })
}

/// One rank of a distributed run: its ranks, and whether the experts are
/// split over them (`Session::new_distributed`).
pub struct Distributed {
    pub comm: Comm,
    pub expert_parallel: bool,
}

/// The model, its optimizer state and the data position of a run.
pub struct Session {
    pub cfg: TrainConfig,
    pub model: Model,
    pub step: TrainStep,
    pub eval: Option<EvalStep>,
    pub data: Prepared,
    pub batcher: Batcher,
    pub curriculum: Curriculum,
    /// Optimizer steps taken.
    pub done: u64,
    /// Seconds spent in steps so far.
    pub wall_s: f64,
    /// Data-parallel training: the ranks of the job (see `new_data_parallel`).
    pub comm: Option<Comm>,
    /// Where the last data-parallel step's time went.
    pub dp_times: DataParallelTimes,
}

impl Session {
    /// Upload `host` and build the training (and validation) step for `cfg`.
    pub fn new(
        ctx: &GpuContext,
        cfg: TrainConfig,
        data: Prepared,
        host: HostParams,
    ) -> Result<Session> {
        Self::build(ctx, cfg, data, host, None)
    }

    /// One rank of a data-parallel run: `cfg.batch` is the global batch B,
    /// and this rank trains on its B / N sequences of each (rows
    /// `rank * B / N ..` of the batch a one-process run would take), with
    /// the gradients summed over the ranks before the same update on every
    /// rank. Every rank must hold the same configuration, data and initial
    /// parameters: checked here by a hash (a clear error naming the ranks
    /// that differ).
    pub fn new_data_parallel(
        ctx: &GpuContext,
        cfg: TrainConfig,
        data: Prepared,
        host: HostParams,
        comm: Comm,
    ) -> Result<Session> {
        Self::new_distributed(
            ctx,
            cfg,
            data,
            host,
            Distributed {
                comm,
                expert_parallel: false,
            },
        )
    }

    /// `new_data_parallel`, or with `dist.expert_parallel` each MoE layer's
    /// experts split over the ranks: each rank holds, trains and updates its
    /// E / N experts of every MoE layer (their parameters, gradients and
    /// AdamW moments: `Model::expert_parallel`), and the routed token rows
    /// are exchanged (all-to-all) in the forward and the backward; the rest
    /// is data-parallel. The ranks must agree (a clear error otherwise).
    pub fn new_distributed(
        ctx: &GpuContext,
        cfg: TrainConfig,
        data: Prepared,
        host: HostParams,
        dist: Distributed,
    ) -> Result<Session> {
        let Distributed {
            comm,
            expert_parallel,
        } = dist;
        comm.check_same("--expert-parallel", u64::from(expert_parallel))?;
        let n = comm.size();
        if n == 0 || !cfg.batch.is_multiple_of(n) {
            return Err(Error::invalid(
                "distributed",
                format!(
                    "the global batch {} does not split evenly over {n} ranks: use a batch that is a multiple of {n}",
                    cfg.batch
                ),
            ));
        }
        let cfg_json = serde_json::to_string(&cfg).unwrap_or_default();
        comm.check_same("the training configuration", fnv1a(cfg_json.as_bytes()))?;
        let mut h = fnv1a(data.tokenizer.to_json().as_bytes());
        for seq in &data.dataset.train {
            h ^= fnv1a(bytemuck::cast_slice(&seq.tokens));
            h = h.rotate_left(5);
        }
        comm.check_same("the data (tokenizer and training sequences)", h)?;
        let mut p = 0u64;
        for (_, t) in host.iter() {
            p ^= fnv1a(bytemuck::cast_slice(&t.data));
            p = p.rotate_left(7);
        }
        comm.check_same("the initial parameters", p)?;
        Self::build(ctx, cfg, data, host, Some((comm, expert_parallel)))
    }

    /// Data-parallel runs: whether the gradients' all-reduce overlaps the
    /// backward (one submit per block, on by default) or waits for all of
    /// it (one submit). The result is the same for 2 ranks and equal to
    /// float reassociation for more. Nothing for a one-process session.
    pub fn set_overlap(&mut self, ctx: &GpuContext, overlap: bool) -> Result<()> {
        if self.comm.is_some() && !self.is_expert_parallel() {
            self.step.enable_data_parallel(ctx, &self.model, overlap)?;
        }
        Ok(())
    }

    /// Whether each MoE layer's experts are split over the ranks.
    pub fn is_expert_parallel(&self) -> bool {
        self.step.is_expert_parallel()
    }

    /// The parameters and their AdamW moments (m, v), whole, on the rank
    /// that writes the run's files (`None` on the others). Collective under
    /// expert parallelism (every rank's experts are gathered): every rank
    /// calls it at the same point.
    pub async fn host_state(&self, ctx: &GpuContext) -> Result<Option<[HostParams; 3]>> {
        let writer = self.comm.as_ref().is_none_or(|c| c.rank() == 0);
        self.step
            .gather_state(ctx, &self.model, self.comm.as_ref(), writer)
            .await
    }

    fn build(
        ctx: &GpuContext,
        cfg: TrainConfig,
        data: Prepared,
        host: HostParams,
        dist: Option<(Comm, bool)>,
    ) -> Result<Session> {
        let (comm, expert_parallel) = match dist {
            Some((c, ep)) => (Some(c), ep),
            None => (None, false),
        };
        let ranks = comm.as_ref().map_or(1, Comm::size);
        let model = match &comm {
            Some(c) if expert_parallel => {
                Model::expert_parallel(ctx, &cfg.model, &host, c.rank(), ranks)?
            }
            _ => Model::new(ctx, &cfg.model, &host)?,
        };
        drop(host);
        let mut step = TrainStep::new(ctx, &model, cfg.batch / ranks, &cfg.opt)?;
        if comm.is_some() {
            step.enable_data_parallel(ctx, &model, true)?;
        }
        // Expert parallelism evaluates each batch on every rank, a shard
        // each (the experts' rows exchanged); data parallelism whole batches.
        let eval_batch = if expert_parallel {
            cfg.batch / ranks
        } else {
            cfg.batch
        };
        let eval = if data.dataset.val.is_empty() {
            None
        } else {
            Some(EvalStep::new(ctx, &model, eval_batch, cfg.eval_gate())?)
        };
        let batcher = Batcher::new(data.dataset.train.len(), cfg.batch, cfg.seed)?;
        // A model without MoE layers keeps a one-layer curriculum it never uses.
        let curriculum = Curriculum::new(
            data.dataset.train.len(),
            cfg.model.moe_layers().len().max(1),
        )?;
        Ok(Session {
            cfg,
            model,
            step,
            eval,
            data,
            batcher,
            curriculum,
            done: 0,
            wall_s: 0.0,
            comm,
            dp_times: DataParallelTimes::default(),
        })
    }

    /// A fresh session on one text, as `amoe train --data FILE` reads a
    /// `.txt` file named `name`: the same split, tokenizer and packing, the
    /// parameters initialized from the seed.
    pub fn from_text(
        ctx: &GpuContext,
        cfg: SessionConfig,
        name: &str,
        text: &str,
    ) -> Result<Session> {
        let mut cfg = cfg.train_config()?;
        let corpus = Corpus::from_documents(
            name,
            vec![Document {
                name: name.to_string(),
                text: text.to_string(),
            }],
        )?;
        let data = prepare_split(&corpus.split()?, &cfg, None)?;
        cfg.model.vocab = data.tokenizer.vocab_size();
        cfg.validate()?;
        let host = HostParams::init(&cfg.model, cfg.seed);
        Session::new(ctx, cfg, data, host)
    }

    /// Whether sequences are reordered by complexity before each epoch.
    pub fn uses_curriculum(&self) -> bool {
        let g = &self.cfg.model.gate;
        self.cfg.curriculum
            && (g.gating == Gating::Adaptive
                || (g.gating == Gating::TopK && g.rule != crate::kernels::ExpertRule::Fixed))
            && !self.cfg.model.moe_layers().is_empty()
    }

    /// The next batch, starting a new epoch (curriculum order or shuffle)
    /// when the current one is done.
    fn next_batch(&mut self) -> Result<Batch> {
        if let Some(b) = self.batcher.next_batch(&self.data.dataset.train)? {
            return Ok(b);
        }
        if self.uses_curriculum() {
            self.batcher.start_epoch(self.curriculum.order())?;
        } else {
            self.batcher.start_epoch_shuffled()?;
        }
        self.batcher
            .next_batch(&self.data.dataset.train)?
            .ok_or_else(|| Error::invalid("train", "an epoch without batches"))
    }

    /// One optimizer step on the next batch; its metric line.
    pub async fn step(&mut self, ctx: &GpuContext) -> Result<Metric> {
        let batch = self.next_batch()?;
        let s = self.done + 1;
        let lr = self.cfg.lr(s);
        let complexity = self.uses_curriculum();
        let clock = web_time::Instant::now();
        let stats = match &self.comm {
            None => {
                let args = StepArgs {
                    ids: &batch.ids,
                    targets: &batch.targets,
                    lr,
                    step: s,
                    complexity,
                };
                self.step.step(ctx, &self.model, &args).await?
            }
            Some(comm) => {
                // This rank's rows of the global batch.
                let rows = batch.ids.len() / comm.size();
                let mine = comm.rank() * rows..(comm.rank() + 1) * rows;
                let args = StepArgs {
                    ids: &batch.ids[mine.clone()],
                    targets: &batch.targets[mine],
                    lr,
                    step: s,
                    complexity,
                };
                if self.step.is_expert_parallel() {
                    self.step
                        .step_expert_parallel(ctx, &self.model, &args, comm, &mut self.dp_times)
                        .await?
                } else {
                    self.step
                        .step_data_parallel(ctx, &self.model, &args, comm, &mut self.dp_times)
                        .await?
                }
            }
        };
        let dt = clock.elapsed().as_secs_f64();
        self.wall_s += dt;
        self.done = s;
        if complexity {
            for (i, &seq) in batch.seq_index.iter().enumerate() {
                if let Some(c) = stats.complexity.get(i) {
                    self.curriculum.record(seq, c)?;
                }
            }
        }
        let two = mean(&stats.two_expert_fraction);
        let imbalance = mean(
            &stats
                .expert_counts
                .iter()
                .map(|c| {
                    let total: u32 = c.iter().sum();
                    let m = total as f32 / c.len().max(1) as f32;
                    c.iter().copied().max().unwrap_or(0) as f32 / m.max(1e-9)
                })
                .collect::<Vec<_>>(),
        );
        let dropped = mean(
            &stats
                .expert_counts
                .iter()
                .zip(&stats.dropped_slots)
                .map(|(c, &dropped)| {
                    let routed = c.iter().sum::<u32>() + dropped;
                    dropped as f32 / routed.max(1) as f32
                })
                .collect::<Vec<_>>(),
        );
        let capped = self.cfg.model.capacity_factor.is_some() && !self.cfg.model.dense;
        Ok(Metric {
            kind: "train".into(),
            step: s,
            wall_s: self.wall_s,
            loss: stats.loss,
            ppl: None,
            lr: Some(lr),
            grad_norm: Some(stats.grad_norm),
            tokens_per_s: Some(batch.ids.len() as f64 / dt.max(1e-9)),
            two_expert_fraction: (!stats.two_expert_fraction.is_empty()).then_some(two),
            expert_imbalance: (!stats.expert_counts.is_empty()).then_some(imbalance),
            dropped_fraction: capped.then_some(dropped),
            step_s: Some(dt),
        })
    }

    /// Mean validation loss under the evaluation gating rule (`None` without
    /// validation data).
    pub async fn validate(&self, ctx: &GpuContext) -> Result<Option<f32>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        let batches = eval_batches(&self.data.dataset.val, self.cfg.batch)?;
        let mut sum = 0.0f64;
        let mut count = 0.0f64;
        // Data parallel: rank r takes batches r, r + N, ...; expert
        // parallel: every batch, rank r its rows r B / N ..; the sums meet.
        let (rank, ranks) = self.comm.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
        for (i, b) in batches
            .iter()
            .take(self.cfg.eval_batches.max(1))
            .enumerate()
        {
            let (s, c) = match &self.comm {
                Some(comm) if self.is_expert_parallel() => {
                    let rows = b.ids.len() / ranks;
                    let mine = rank * rows..(rank + 1) * rows;
                    eval.loss_expert_parallel(
                        ctx,
                        &self.model,
                        &b.ids[mine.clone()],
                        &b.targets[mine],
                        comm,
                    )
                    .await?
                }
                _ if i % ranks != rank => continue,
                _ => eval.loss(ctx, &self.model, &b.ids, &b.targets).await?,
            };
            sum += s;
            count += c;
        }
        if let Some(comm) = &self.comm {
            let mut v = [sum, count];
            comm.sum(&mut v)?;
            [sum, count] = v;
        }
        if !(sum / count.max(1.0)).is_finite() {
            return Err(Error::NonFinite {
                op: "validation",
                msg: "validation loss is NaN or infinite".into(),
            });
        }
        Ok(Some((sum / count.max(1.0)) as f32))
    }

    /// What the session trains: for the browser page's header.
    pub fn describe(&self) -> serde_json::Value {
        let params: usize = self.model.params.values().map(|p| p.numel()).sum();
        serde_json::json!({
            "model": self.cfg.model,
            "params": params,
            "batch": self.cfg.batch,
            "steps": self.cfg.steps,
            "done": self.done,
            "vocab": self.data.tokenizer.vocab_size(),
            "train_sequences": self.data.dataset.train.len(),
            "val_sequences": self.data.dataset.val.len(),
            "train_tokens": self.data.dataset.train_tokens,
            "val_tokens": self.data.dataset.val_tokens,
            "split": self.data.split_description,
        })
    }
}

/// What the browser page may set for a session on its text; the rest is
/// `amoe train`'s default. Field names follow the CLI flags.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    pub context: usize,
    pub ffn: usize,
    pub experts: usize,
    pub vocab: usize,
    pub batch: usize,
    pub steps: u64,
    pub warmup: u64,
    pub lr: f32,
    pub seed: u64,
    /// A [`TrainGating`](crate::train::TrainGating) name ("dense" | "top1" | "top2" | "adaptive"), as `--gating`.
    pub gating: String,
    pub threshold: f32,
    pub curriculum: bool,
    /// As `--capacity-factor` (absent or null: dropless).
    pub capacity_factor: Option<f32>,
}

impl Default for SessionConfig {
    /// A model small enough to train in a tab on a software adapter.
    fn default() -> Self {
        let t = TrainConfig::default();
        SessionConfig {
            d: 32,
            layers: 2,
            heads: 2,
            context: 32,
            ffn: 64,
            experts: 4,
            vocab: 512,
            batch: 8,
            steps: 200,
            warmup: 20,
            lr: t.opt.adamw.lr,
            seed: t.seed,
            gating: "adaptive".into(),
            threshold: t.model.gate.threshold,
            curriculum: t.curriculum,
            capacity_factor: None,
        }
    }
}

impl SessionConfig {
    /// `amoe train`'s defaults with these settings.
    pub fn train_config(&self) -> Result<TrainConfig> {
        let mut t = TrainConfig::default();
        t.model.d = self.d;
        t.model.layers = self.layers;
        t.model.heads = self.heads;
        t.model.context = self.context;
        t.model.ffn = self.ffn;
        t.model.experts = self.experts;
        let gating = self.gating.parse::<crate::train::TrainGating>()?;
        if gating == crate::train::TrainGating::TopK {
            return Err(crate::Error::invalid(
                "gating",
                "the page trains dense, top1, top2 or adaptive models (a top-k router: amoe train --gating topk --max-experts K)",
            ));
        }
        (t.model.dense, t.model.gate.gating) = gating.split();
        // As `amoe train`: a top-2 model weighs a lone expert 1.
        if t.model.gate.gating == Gating::Top2 {
            t.model.gate.single_weight = crate::kernels::SingleWeight::One;
        }
        t.model.gate.threshold = self.threshold;
        t.vocab_size = self.vocab;
        t.batch = self.batch;
        t.steps = self.steps;
        t.warmup = self.warmup;
        t.opt.adamw.lr = self.lr;
        t.seed = self.seed;
        t.curriculum = self.curriculum;
        t.model.capacity_factor = self.capacity_factor;
        t.model.validate()?;
        Ok(t)
    }
}

fn mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f32>() / v.len() as f32
    }
}
