//! The training run behind `amoe train`: data and tokenizer, the model on the
//! GPU, the step loop with the curriculum, validation, metrics, checkpoints
//! (atomic, exactly resumable) and the loss plot. Native only.
//!
//! A run directory holds `metrics.jsonl` (one line per step and per
//! validation), `loss.svg`, and the checkpoint `checkpoint/` (safetensors +
//! config.json + tokenizer.json + state.json). `--resume DIR` continues from
//! the checkpoint with the same data order, optimizer state and curriculum,
//! so a resumed run ends with the parameters an uninterrupted one would have.

use crate::checkpoint::{self, CheckpointData, NamedTensor};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::{GateConfig, Gating};
use crate::model::{EvalStep, HostParams, Model, ModelConfig, OptConfig, StepArgs, TrainStep};
use crate::train::curriculum::Curriculum;
use crate::train::data::{
    eval_batches, shipped_dir, Batcher, BatcherState, Corpus, Dataset, Domain,
};
use crate::train::metrics::JsonlWriter;
use crate::train::plot::{plot_loss, Series};
use crate::train::Tokenizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
        self.model.validate()
    }

    fn eval_gate(&self) -> GateConfig {
        GateConfig {
            gating: self.eval_gating,
            ..self.model.gate
        }
    }
}

/// What `state.json` keeps for an exact resume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunState {
    pub step: u64,
    pub batcher: BatcherState,
    pub curriculum: Curriculum,
    /// Training wall time so far (s), so that the curve continues.
    pub wall_s: f64,
    pub train: TrainConfig,
    pub best_val: Option<f32>,
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
    /// max / mean of the per-expert token counts, mean over MoE layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_imbalance: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_s: Option<f64>,
}

/// How a run ended.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub wall_s: f64,
    pub final_train_loss: f32,
    pub val_loss: Option<f32>,
    pub val_ppl: Option<f32>,
    /// Wall time and step at which the target validation loss was reached.
    pub target_reached: Option<(f64, u64)>,
    pub mean_step_s: f64,
    pub two_expert_fraction: f32,
    pub interrupted: bool,
    pub out: PathBuf,
}

/// What the loop reports as it goes (the CLI draws a progress bar).
pub trait Progress {
    fn start(&mut self, total: u64, done: u64);
    fn step(&mut self, m: &Metric);
    fn val(&mut self, m: &Metric);
    fn message(&mut self, msg: &str);
    fn finish(&mut self);
}

/// A `Progress` that does nothing (tests, benchmarks).
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: u64, _: u64) {}
    fn step(&mut self, _: &Metric) {}
    fn val(&mut self, _: &Metric) {}
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// Data ready to train on: the tokenizer and the packed sequences.
pub struct Prepared {
    pub tokenizer: Tokenizer,
    pub dataset: Dataset,
    pub split_description: String,
}

/// Load the corpus, train (or reuse) the tokenizer, pack sequences.
pub fn prepare(cfg: &TrainConfig, tokenizer: Option<Tokenizer>) -> Result<Prepared> {
    let corpus = match &cfg.data {
        DataSource::Shipped(domain) => Corpus::shipped(shipped_dir(), *domain)?,
        DataSource::Path(p) => Corpus::load(p)?,
    };
    let split = corpus.split()?;
    let tokenizer = match tokenizer {
        Some(t) => t,
        None => Tokenizer::train(split.train.iter().map(|d| d.text.as_str()), cfg.vocab_size)?,
    };
    let dataset = Dataset::build(&split, &tokenizer, cfg.model.context)?;
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
        split_description: split.description,
    })
}

/// A run in progress: model, steps, data position.
pub struct Run {
    pub cfg: TrainConfig,
    pub model: Model,
    pub step: TrainStep,
    eval: Option<EvalStep>,
    pub data: Prepared,
    batcher: Batcher,
    pub curriculum: Curriculum,
    pub done: u64,
    wall_s: f64,
    best_val: Option<f32>,
    pub out: PathBuf,
    /// Stop (save, as on Ctrl-C) once this many steps are done.
    pub pause_at: Option<u64>,
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

impl Run {
    /// A fresh run writing into `out`.
    pub fn new(ctx: &GpuContext, mut cfg: TrainConfig, out: &Path) -> Result<Run> {
        let data = prepare(&cfg, None)?;
        cfg.model.vocab = data.tokenizer.vocab_size();
        cfg.validate()?;
        let host = HostParams::init(&cfg.model, cfg.seed);
        Self::assemble(ctx, cfg, data, host, None, out)
    }

    /// A fresh run from given parameters and tokenizer (fine-tuning a
    /// converted model, comparisons that share one tokenizer).
    pub fn from_parts(
        ctx: &GpuContext,
        mut cfg: TrainConfig,
        tokenizer: Tokenizer,
        host: HostParams,
        out: &Path,
    ) -> Result<Run> {
        cfg.model.vocab = tokenizer.vocab_size();
        cfg.validate()?;
        let data = prepare(&cfg, Some(tokenizer))?;
        Self::assemble(ctx, cfg, data, host, None, out)
    }

    /// Continue the run saved in `dir` (a run directory or its checkpoint).
    pub fn resume(ctx: &GpuContext, dir: &Path, steps: Option<u64>) -> Result<Run> {
        let ck_dir = if dir.join("state.json").exists() || dir.join(".checkpoint.old").exists() {
            dir.to_path_buf()
        } else {
            checkpoint_dir(dir)
        };
        let out = if ck_dir == dir {
            dir.parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| dir.to_path_buf())
        } else {
            dir.to_path_buf()
        };
        let ck = checkpoint::load::<ModelConfig, RunState>(&ck_dir)?;
        let mut state = ck.state.clone();
        if let Some(s) = steps {
            state.train.steps = s;
        }
        let mut cfg = state.train.clone();
        if ck.config != cfg.model {
            return Err(Error::checkpoint(
                ck_dir.join("config.json").display().to_string(),
                "config.json does not match the run's model in state.json",
            ));
        }
        let tokenizer = Tokenizer::from_json(&ck.tokenizer_json)?;
        if tokenizer.vocab_size() != ck.config.vocab {
            return Err(Error::checkpoint(
                ck_dir.join("tokenizer.json").display().to_string(),
                format!(
                    "tokenizer has {} tokens but the model's vocabulary is {}",
                    tokenizer.vocab_size(),
                    ck.config.vocab
                ),
            ));
        }
        cfg.model = ck.config.clone();
        let expected: Vec<(String, Vec<usize>)> = cfg
            .model
            .param_shapes()
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        let exp: Vec<(&str, &[usize])> = expected
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        ck.check_model(&exp)?;
        let host = HostParams {
            tensors: ck
                .model
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone(), t.data.clone()))
                .collect(),
        };
        let host = reorder(&cfg.model, host)?;
        let data = prepare(&cfg, Some(tokenizer))?;
        let mut run = Self::assemble(ctx, cfg, data, host, Some(&ck.optimizer), &out)?;
        run.batcher = Batcher::from_state(state.batcher, run.data.dataset.train.len())?;
        run.curriculum = state.curriculum;
        run.done = state.step;
        run.wall_s = state.wall_s;
        run.best_val = state.best_val;
        Ok(run)
    }

    fn assemble(
        ctx: &GpuContext,
        cfg: TrainConfig,
        data: Prepared,
        host: HostParams,
        optimizer: Option<&[NamedTensor]>,
        out: &Path,
    ) -> Result<Run> {
        let model = Model::new(ctx, &cfg.model, &host)?;
        let step = TrainStep::new(ctx, &model, cfg.batch, &cfg.opt)?;
        if let Some(opt) = optimizer {
            for (i, p) in model.params.iter().enumerate() {
                for (prefix, t) in [("m.", &step.m[i]), ("v.", &step.v[i])] {
                    let name = format!("{prefix}{}", p.name);
                    let nt = checkpoint::find(opt, &name).ok_or_else(|| {
                        Error::checkpoint("optimizer.safetensors", format!("missing {name}"))
                    })?;
                    if nt.shape != p.value.shape {
                        return Err(Error::checkpoint(
                            "optimizer.safetensors",
                            format!("{name}: shape {:?}, expected {:?}", nt.shape, p.value.shape),
                        ));
                    }
                    t.write(ctx, &nt.data)?;
                }
            }
        }
        let eval = if data.dataset.val.is_empty() {
            None
        } else {
            Some(EvalStep::new(ctx, &model, cfg.batch, cfg.eval_gate())?)
        };
        let batcher = Batcher::new(data.dataset.train.len(), cfg.batch, cfg.seed)?;
        // A model without MoE layers keeps a one-layer curriculum it never uses.
        let curriculum = Curriculum::new(
            data.dataset.train.len(),
            cfg.model.moe_layers().len().max(1),
        )?;
        std::fs::create_dir_all(out).map_err(|e| Error::Io {
            path: out.display().to_string(),
            source: e,
        })?;
        Ok(Run {
            cfg,
            model,
            step,
            eval,
            data,
            batcher,
            curriculum,
            done: 0,
            wall_s: 0.0,
            best_val: None,
            out: out.to_path_buf(),
            pause_at: None,
        })
    }

    /// Mean validation loss under the evaluation gating rule.
    pub async fn validate(&self, ctx: &GpuContext) -> Result<Option<f32>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        let batches = eval_batches(&self.data.dataset.val, self.cfg.batch)?;
        let mut sum = 0.0f64;
        let mut count = 0.0f64;
        for b in batches.iter().take(self.cfg.eval_batches.max(1)) {
            let (s, c) = eval.loss(ctx, &self.model, &b.ids, &b.targets).await?;
            sum += s;
            count += c;
        }
        if !(sum / count.max(1.0)).is_finite() {
            return Err(Error::NonFinite {
                op: "validation",
                msg: "validation loss is NaN or infinite".into(),
            });
        }
        Ok(Some((sum / count.max(1.0)) as f32))
    }

    /// Save the checkpoint atomically.
    pub async fn save(&self, ctx: &GpuContext) -> Result<PathBuf> {
        let host = self.model.download(ctx).await?;
        let model: Vec<NamedTensor> = host
            .tensors
            .into_iter()
            .map(|(n, s, d)| NamedTensor::new(n, s, d))
            .collect::<Result<_>>()?;
        let mut optimizer = Vec::with_capacity(2 * self.model.params.len());
        for (i, p) in self.model.params.iter().enumerate() {
            optimizer.push(NamedTensor::new(
                format!("m.{}", p.name),
                p.value.shape.clone(),
                self.step.m[i].read(ctx).await?,
            )?);
            optimizer.push(NamedTensor::new(
                format!("v.{}", p.name),
                p.value.shape.clone(),
                self.step.v[i].read(ctx).await?,
            )?);
        }
        let state = RunState {
            step: self.done,
            batcher: self.batcher.state().clone(),
            curriculum: self.curriculum.clone(),
            wall_s: self.wall_s,
            train: self.cfg.clone(),
            best_val: self.best_val,
        };
        let dir = checkpoint_dir(&self.out);
        checkpoint::save(
            &dir,
            &CheckpointData {
                model: &model,
                optimizer: &optimizer,
                config: &self.cfg.model,
                tokenizer_json: &self.data.tokenizer.to_json(),
                state: &state,
            },
        )?;
        Ok(dir)
    }

    /// The next batch, starting a new epoch (curriculum order or shuffle)
    /// when the current one is done.
    fn next_batch(&mut self) -> Result<crate::train::data::Batch> {
        if let Some(b) = self.batcher.next_batch(&self.data.dataset.train)? {
            return Ok(b);
        }
        let use_curriculum = self.cfg.curriculum
            && self.cfg.model.gate.gating == Gating::Adaptive
            && !self.cfg.model.moe_layers().is_empty();
        if use_curriculum {
            self.batcher.start_epoch(self.curriculum.order())?;
        } else {
            self.batcher.start_epoch_shuffled()?;
        }
        self.batcher
            .next_batch(&self.data.dataset.train)?
            .ok_or_else(|| Error::invalid("train", "an epoch without batches"))
    }

    /// Train until `cfg.steps` (or the target loss, or `stop`), logging to
    /// `out/metrics.jsonl` and saving checkpoints.
    pub async fn train(
        &mut self,
        ctx: &GpuContext,
        progress: &mut dyn Progress,
        stop: &AtomicBool,
    ) -> Result<RunSummary> {
        let metrics_path = self.out.join("metrics.jsonl");
        let mut metrics = if self.done > 0 {
            JsonlWriter::append(&metrics_path)?
        } else {
            JsonlWriter::create(&metrics_path)?
        };
        let complexity = self.cfg.curriculum
            && self.cfg.model.gate.gating == Gating::Adaptive
            && !self.cfg.model.moe_layers().is_empty();
        progress.start(self.cfg.steps, self.done);
        let (_, t) = self.step.batch();
        let mut last_loss = f32::NAN;
        let mut last_val = None;
        let mut target_reached = None;
        let mut step_times = Vec::new();
        let mut two_sum = 0.0f64;
        let mut interrupted = false;
        while self.done < self.cfg.steps {
            if stop.load(Ordering::SeqCst) || self.pause_at.is_some_and(|p| self.done >= p) {
                interrupted = true;
                break;
            }
            let batch = self.next_batch()?;
            let s = self.done + 1;
            let lr = self.cfg.lr(s);
            let clock = web_time::Instant::now();
            let args = StepArgs {
                ids: &batch.ids,
                targets: &batch.targets,
                lr,
                step: s,
                complexity,
            };
            let stats = match self.step.step(ctx, &self.model, &args).await {
                Ok(st) => st,
                Err(e @ Error::NonFinite { .. }) => {
                    progress.finish();
                    return Err(Error::NonFinite {
                        op: "train",
                        msg: format!(
                            "step {s}: {e}. Training stopped; the last good checkpoint is in {}",
                            checkpoint_dir(&self.out).display()
                        ),
                    });
                }
                Err(e) => return Err(e),
            };
            let dt = clock.elapsed().as_secs_f64();
            self.wall_s += dt;
            step_times.push(dt);
            self.done = s;
            if complexity {
                for (i, &seq) in batch.seq_index.iter().enumerate() {
                    if let Some(c) = stats.complexity.get(i) {
                        self.curriculum.record(seq, c)?;
                    }
                }
            }
            let two = mean(&stats.two_expert_fraction);
            two_sum += two as f64;
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
            last_loss = stats.loss;
            let m = Metric {
                kind: "train".into(),
                step: s,
                wall_s: self.wall_s,
                loss: stats.loss,
                ppl: None,
                lr: Some(lr),
                grad_norm: Some(stats.grad_norm),
                tokens_per_s: Some(t as f64 / dt.max(1e-9)),
                two_expert_fraction: (!stats.two_expert_fraction.is_empty()).then_some(two),
                expert_imbalance: (!stats.expert_counts.is_empty()).then_some(imbalance),
                step_s: Some(dt),
            };
            metrics.write(&m)?;
            progress.step(&m);
            let eval_now = (self.cfg.eval_every > 0 && s.is_multiple_of(self.cfg.eval_every))
                || s == self.cfg.steps;
            if eval_now {
                if let Some(v) = self.validate(ctx).await? {
                    last_val = Some(v);
                    self.best_val = Some(self.best_val.map_or(v, |b| b.min(v)));
                    let vm = Metric {
                        kind: "val".into(),
                        step: s,
                        wall_s: self.wall_s,
                        loss: v,
                        ppl: Some(v.exp()),
                        lr: None,
                        grad_norm: None,
                        tokens_per_s: None,
                        two_expert_fraction: None,
                        expert_imbalance: None,
                        step_s: None,
                    };
                    metrics.write(&vm)?;
                    progress.val(&vm);
                    if let Some(target) = self.cfg.target_loss {
                        if v <= target && target_reached.is_none() {
                            target_reached = Some((self.wall_s, s));
                            progress.message(&format!(
                                "target validation loss {target} reached at step {s}"
                            ));
                            break;
                        }
                    }
                }
            }
            if self.cfg.checkpoint_every > 0
                && s.is_multiple_of(self.cfg.checkpoint_every)
                && s < self.cfg.steps
            {
                self.save(ctx).await?;
            }
        }
        let dir = self.save(ctx).await?;
        progress.message(&format!("checkpoint saved in {}", dir.display()));
        progress.finish();
        self.plot()?;
        let n = step_times.len().max(1) as f64;
        Ok(RunSummary {
            steps: self.done,
            wall_s: self.wall_s,
            final_train_loss: last_loss,
            val_loss: last_val,
            val_ppl: last_val.map(f32::exp),
            target_reached,
            mean_step_s: step_times.iter().sum::<f64>() / n,
            two_expert_fraction: (two_sum / n) as f32,
            interrupted,
            out: self.out.clone(),
        })
    }

    /// `out/loss.svg` from `out/metrics.jsonl`: train and validation loss vs wall time.
    pub fn plot(&self) -> Result<()> {
        let rows: Vec<Metric> = crate::train::metrics::read_jsonl(self.out.join("metrics.jsonl"))?;
        let series = |kind: &str| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|m| m.kind == kind)
                .map(|m| (m.wall_s, m.loss as f64))
                .collect()
        };
        plot_loss(
            self.out.join("loss.svg"),
            &[
                Series::new("train", series("train")),
                Series::new("validation", series("val")),
            ],
        )
    }
}

fn mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f32>() / v.len() as f32
    }
}

/// Put checkpoint tensors in the config's parameter order.
fn reorder(cfg: &ModelConfig, host: HostParams) -> Result<HostParams> {
    let mut out = Vec::new();
    for (name, _, _) in cfg.param_shapes() {
        let t = host
            .tensors
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| Error::checkpoint("model.safetensors", format!("missing {name}")))?;
        out.push(t.clone());
    }
    Ok(HostParams { tensors: out })
}

/// A flag set by Ctrl-C (the run saves and exits at the next step boundary).
pub fn interrupt_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
