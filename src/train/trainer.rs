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
use crate::model::{HostParams, ModelConfig};
use crate::tokenizer::Tokenizer;
use crate::train::curriculum::Curriculum;
use crate::train::data::{shipped_dir, Batcher, BatcherState, Corpus};
use crate::train::metrics::JsonlWriter;
use crate::train::plot::{plot_loss, Series};
pub use crate::train::session::{
    prepare_split, DataSource, Distributed, Metric, Prepared, Session, TrainConfig,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    /// Mean used expert slots past the first per token (for top-2 and
    /// adaptive gating the two-expert fraction).
    pub two_expert_fraction: f32,
    /// The most experts a token may take (the gate's K; 0 for a dense model).
    pub max_experts: usize,
    pub interrupted: bool,
    /// Stopped (and saved) at `pause_at` (`--stop-at`): `--resume` goes on.
    pub paused: bool,
    /// A data-parallel run: where its steps' time went (means per step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<DataParallelSummary>,
    pub out: PathBuf,
}

/// Means per step of a data-parallel run, on the rank that reports them
/// (rank 0; every rank does the same work).
#[derive(Clone, Debug, Default, Serialize)]
pub struct DataParallelSummary {
    pub ranks: usize,
    pub steps: u64,
    /// Forward, gate statistics and backward on this rank's shard, with
    /// their readbacks (s).
    pub compute_s: f64,
    /// The all-reduces (gate statistics, then gradients with the step's
    /// numbers, routing counts) and the complexity gather (s).
    pub all_reduce_s: f64,
    /// Writing the summed gradients and the update: norm, clip, AdamW (s).
    pub write_update_s: f64,
    /// Gradient floats in the flat all-reduce.
    pub grad_floats: usize,
    /// Bytes this rank sent per step.
    pub bytes_sent: f64,
    /// Submits of the backward, each one's gradients all-reduced while the
    /// next ones run (1: no overlap).
    pub backward_submits: usize,
    /// Experts split over the ranks (`all_reduce_s` then counts the rows'
    /// all-to-alls too).
    pub expert_parallel: bool,
    /// Bytes of the parameters, their gradients and AdamW moments on this
    /// rank's GPU (with the experts split, its share of them).
    pub state_bytes: u64,
    /// Bytes of every tensor alive on this rank's GPU after its last step:
    /// the state, the activations, the exchanges' buffers.
    pub tensor_bytes: u64,
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

/// Load the corpus, train (or reuse) the tokenizer, pack sequences.
pub fn prepare(cfg: &TrainConfig, tokenizer: Option<Tokenizer>) -> Result<Prepared> {
    let corpus = match &cfg.data {
        DataSource::Shipped(domain) => Corpus::shipped(shipped_dir(), *domain)?,
        DataSource::Path(p) => Corpus::load(p)?,
    };
    prepare_split(&corpus.split()?, cfg, tokenizer)
}

/// A run in progress: model, steps, data position.
/// The session (model, optimizer, data position) is reached through `Deref`:
/// `run.model`, `run.done`, ...
pub struct Run {
    pub session: Session,
    best_val: Option<f32>,
    pub out: PathBuf,
    /// Stop (save, as on Ctrl-C) once this many steps are done.
    pub pause_at: Option<u64>,
}

impl std::ops::Deref for Run {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

impl std::ops::DerefMut for Run {
    fn deref_mut(&mut self) -> &mut Session {
        &mut self.session
    }
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

impl Run {
    /// A fresh run writing into `out`.
    pub fn new(ctx: &GpuContext, cfg: TrainConfig, out: &Path) -> Result<Run> {
        Self::new_on(ctx, cfg, out, None)
    }

    /// A fresh run, or with `dist` one rank of a distributed run (see
    /// `Session::new_distributed`): only rank 0 writes into `out`.
    pub fn new_on(
        ctx: &GpuContext,
        mut cfg: TrainConfig,
        out: &Path,
        dist: Option<Distributed>,
    ) -> Result<Run> {
        let data = prepare(&cfg, None)?;
        cfg.model.vocab = data.tokenizer.vocab_size();
        cfg.validate()?;
        let host = HostParams::init(&cfg.model, cfg.seed);
        Self::assemble(ctx, cfg, data, host, None, out, dist)
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
        Self::assemble(ctx, cfg, data, host, None, out, None)
    }

    /// Continue the run saved in `dir` (a run directory or its checkpoint).
    pub fn resume(ctx: &GpuContext, dir: &Path, steps: Option<u64>) -> Result<Run> {
        Self::resume_on(ctx, dir, steps, None)
    }

    /// `resume`, or with `dist` as one rank of a distributed run: the
    /// checkpoint holds no trace of the rank count or of the experts'
    /// split (the data position is the global batches', the model whole),
    /// so a run resumes on any number of ranks, split or not.
    pub fn resume_on(
        ctx: &GpuContext,
        dir: &Path,
        steps: Option<u64>,
        dist: Option<Distributed>,
    ) -> Result<Run> {
        // A checkpoint directory (it holds state.json), else a run
        // directory whose checkpoint/ `checkpoint::load` reads (or, after an
        // interrupted save, the newest whole one beside it).
        let ck_dir = if dir.join("state.json").exists() {
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
        let mut ck = checkpoint::load::<ModelConfig, RunState>(&ck_dir)?;
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
        let host = HostParams::from_named(
            &cfg.model,
            &ck.dir.join(checkpoint::MODEL_FILE).display().to_string(),
            std::mem::take(&mut ck.model),
        )?;
        let data = prepare(&cfg, Some(tokenizer))?;
        let mut run = Self::assemble(ctx, cfg, data, host, Some(&ck.optimizer), &out, dist)?;
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
        dist: Option<Distributed>,
    ) -> Result<Run> {
        let writer = dist.as_ref().is_none_or(|d| d.comm.rank() == 0);
        let session = match dist {
            None => Session::new(ctx, cfg, data, host)?,
            Some(d) => Session::new_distributed(ctx, cfg, data, host, d)?,
        };
        if let Some(opt) = optimizer {
            let step = &session.step;
            for ((id, p), (m, v)) in session
                .model
                .params
                .iter()
                .zip(step.m.values().zip(step.v.values()))
            {
                for (prefix, t) in [("m.", m), ("v.", v)] {
                    let name = format!("{prefix}{id}");
                    let nt = checkpoint::find(opt, &name).ok_or_else(|| {
                        Error::checkpoint("optimizer.safetensors", format!("missing {name}"))
                    })?;
                    // Under expert parallelism, this rank's experts of
                    // the whole tensor.
                    let held = session.model.held(id);
                    let mut want = p.shape().to_vec();
                    if let Some((_, e)) = &held {
                        want[0] = *e;
                    }
                    if nt.shape != want {
                        return Err(Error::checkpoint(
                            "optimizer.safetensors",
                            format!("{name}: shape {:?}, expected {want:?}", nt.shape),
                        ));
                    }
                    match held {
                        Some((r, e)) => {
                            let per = nt.data.len() / e;
                            t.write(ctx, &nt.data[r.start * per..r.end * per])?
                        }
                        None => t.write(ctx, &nt.data)?,
                    }
                }
            }
        }
        if writer {
            std::fs::create_dir_all(out).map_err(|e| Error::Io {
                path: out.display().to_string(),
                source: e,
            })?;
        }
        Ok(Run {
            session,
            best_val: None,
            out: out.to_path_buf(),
            pause_at: None,
        })
    }

    /// Whether this process writes the run's files: a one-process run, or
    /// rank 0 of a data-parallel one.
    pub fn writes(&self) -> bool {
        self.comm.as_ref().is_none_or(|c| c.rank() == 0)
    }

    /// Mean validation loss under the evaluation gating rule.
    pub async fn validate(&self, ctx: &GpuContext) -> Result<Option<f32>> {
        self.session.validate(ctx).await
    }

    /// Save the checkpoint atomically (rank 0 of a distributed run; the
    /// others take part in gathering the experts, when they are split, and
    /// return `None`). Collective: every rank calls it at the same point.
    pub async fn save(&self, ctx: &GpuContext) -> Result<Option<PathBuf>> {
        let Some([host, m, v]) = self.session.host_state(ctx).await? else {
            return Ok(None);
        };
        let ids: Vec<_> = host.iter().map(|(id, _)| id).collect();
        let model: Vec<NamedTensor> = ids
            .iter()
            .zip(host.into_values())
            .map(|(id, t)| NamedTensor::new(id.name(), t.shape, t.data))
            .collect::<Result<_>>()?;
        let mut optimizer = Vec::with_capacity(2 * model.len());
        for (id, (m, v)) in ids
            .iter()
            .zip(m.into_values().into_iter().zip(v.into_values()))
        {
            optimizer.push(NamedTensor::new(format!("m.{id}"), m.shape, m.data)?);
            optimizer.push(NamedTensor::new(format!("v.{id}"), v.shape, v.data)?);
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
        Ok(Some(dir))
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
        let mut metrics = match (self.writes(), self.done > 0) {
            (false, _) => None,
            (true, true) => Some(JsonlWriter::append(&metrics_path)?),
            (true, false) => Some(JsonlWriter::create(&metrics_path)?),
        };
        progress.start(self.cfg.steps, self.done);
        let mut last_loss = f32::NAN;
        let mut last_val = None;
        let mut target_reached = None;
        let mut step_times = Vec::new();
        let mut two_sum = 0.0f64;
        let mut interrupted = false;
        let mut paused = false;
        let mut dp: Option<DataParallelSummary> = None;
        while self.done < self.cfg.steps {
            let mut stopping = stop.load(Ordering::SeqCst);
            if let Some(c) = &self.comm {
                // A stop on any rank stops every rank at this step.
                stopping = c.any(stopping)?;
            }
            if stopping {
                interrupted = true;
                break;
            }
            if self.pause_at.is_some_and(|p| self.done >= p) {
                paused = true;
                break;
            }
            let s = self.done + 1;
            let m = match self.session.step(ctx).await {
                Ok(m) => m,
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
            step_times.push(m.step_s.unwrap_or(0.0));
            if let Some(c) = &self.session.comm {
                let t = self.session.dp_times;
                let d = dp.get_or_insert_with(|| DataParallelSummary {
                    ranks: c.size(),
                    state_bytes: self.session.step.state_bytes(&self.session.model),
                    ..Default::default()
                });
                d.tensor_bytes = ctx.tensor_bytes();
                d.steps += 1;
                d.compute_s += t.compute_s;
                d.all_reduce_s += t.all_reduce_s;
                d.write_update_s += t.write_update_s;
                d.grad_floats = t.grad_floats;
                d.backward_submits = t.backward_submits;
                d.expert_parallel = t.expert_parallel;
                d.bytes_sent += t.bytes_sent as f64;
            }
            two_sum += m.two_expert_fraction.unwrap_or(0.0) as f64;
            last_loss = m.loss;
            if let Some(w) = &mut metrics {
                w.write(&m)?;
            }
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
                        dropped_fraction: None,
                        step_s: None,
                    };
                    if let Some(w) = &mut metrics {
                        w.write(&vm)?;
                    }
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
                // Collective: every rank's experts are gathered.
                self.save(ctx).await?;
            }
        }
        if let Some(dir) = self.save(ctx).await? {
            progress.message(&format!("checkpoint saved in {}", dir.display()));
        }
        progress.finish();
        if self.writes() {
            self.plot()?;
        }
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
            max_experts: if self.cfg.model.dense {
                0
            } else {
                self.cfg.model.gate.max_k()
            },
            interrupted,
            paused,
            data_parallel: dp.map(|mut d| {
                let n = d.steps.max(1) as f64;
                d.compute_s /= n;
                d.all_reduce_s /= n;
                d.write_update_s /= n;
                d.bytes_sent /= n;
                d
            }),
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

/// A flag set by Ctrl-C (the run saves and exits at the next step boundary).
pub fn interrupt_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
