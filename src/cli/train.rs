//! `amoe train`: flags, the progress bar, Ctrl-C, the summary.

use super::args::{choice, on_off, AdapterArgs, ModelArgs};
use super::context;
use amoe::gpu::GpuContext;
use amoe::kernels::{ExpertRule, GapMode, GateConfig, Gating, SingleWeight};
use amoe::train::collective::Comm;
use amoe::train::data::Domain;
use amoe::train::trainer::{
    interrupt_flag, DataSource, Metric, Progress, Run, RunSummary, TrainConfig,
};
use amoe::train::TrainGating;
use amoe::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;

#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Gating rule of the FFN layers.
    #[arg(long, value_parser = choice::<TrainGating>(), default_value = "adaptive")]
    pub gating: TrainGating,
    /// Adaptive gating: a token takes its second expert when the gap is <= this.
    #[arg(long, default_value_t = 0.1)]
    pub threshold: f32,
    /// How the adaptive gap is measured.
    #[arg(long, value_parser = choice::<GapMode>(), default_value = "top2")]
    pub gap: GapMode,
    /// Weight of a token routed to one expert.
    #[arg(long, value_parser = choice::<SingleWeight>(), default_value = "raw")]
    pub weight: SingleWeight,
    /// Experts a token may take: adaptive's cap (2: the paper's rule;
    /// more: the top-k router's gap rule, or --rule's, over that many), or
    /// topk's k (default 2).
    #[arg(long, value_name = "K")]
    pub max_experts: Option<usize>,
    /// Adaptive with a cap: which rule decides how many of the ranked
    /// experts a token takes (gap: p(i-1) - p(i) <= T; ratio: p(i) / p1 >= T;
    /// mass: the experts taken hold less than T of the probability).
    #[arg(long, value_parser = choice::<ExpertRule>())]
    pub rule: Option<ExpertRule>,
    /// Gating rule at validation (default: top1 as in the paper; a top-k
    /// router its own rule).
    #[arg(long, value_parser = choice::<Gating>())]
    pub eval_gating: Option<Gating>,
    /// Order each epoch's sequences by their two-expert complexity (adaptive only).
    #[arg(long, value_parser = on_off(), action = clap::ArgAction::Set, default_value = "on")]
    pub curriculum: bool,
    /// Load-balancing loss coefficient.
    #[arg(long, default_value_t = 0.01)]
    pub balance: f32,
    /// Router z-loss coefficient (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub z_loss: f32,
    /// Switch-style expert capacity while training: each expert takes at most
    /// ceil(F * tokens * K / experts) slots of a batch (K = 2 for top2 and adaptive),
    /// first choices first; the rest are dropped. Default: no limit (dropless).
    #[arg(long, value_name = "F")]
    pub capacity_factor: Option<f32>,
    /// Training text: a file or directory (.txt, .md, .jsonl, .jsonl.gz). Default: the shipped corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Part of the shipped corpus: shakespeare, kjv or both.
    #[arg(long, default_value = "both")]
    pub domain: String,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long)]
    pub clip: Option<f32>,
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Validate every this many steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Save a checkpoint every this many steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Stop at this validation loss.
    #[arg(long)]
    pub target_loss: Option<f32>,
    /// Run directory (metrics.jsonl, loss.svg, checkpoint/).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue the run in this directory (same data order and optimizer state;
    /// with --steps the run is extended and the learning-rate schedule follows the new total).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Take the kernels that compile fastest instead of those that run
    /// fastest (a smoke test, a run of a few steps): on lavapipe each
    /// subgroup GEMM core costs 1-4 s to compile in every process.
    #[arg(long)]
    pub quick_start: bool,
    /// Save and stop once the run reaches this step, keeping the schedule
    /// of --steps (a job with a time limit: --resume continues it, on any
    /// number of ranks).
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Replace what a non-empty --out holds (without it, a directory that
    /// holds anything is refused: --resume continues a run).
    #[arg(long)]
    pub overwrite: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// One rank of a data-parallel run under an MPI launcher
    /// (`mpirun -np N amoe train --distributed ...`): each rank takes B / N
    /// sequences of every global batch of --batch B; rank 0 writes --out.
    /// Needs a build with the `mpi` feature.
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: sum the gradients only once the whole backward
    /// is done (one submit), instead of each block's while the earlier
    /// blocks' backward still runs.
    #[arg(long)]
    pub no_overlap: bool,
    /// With --distributed: split each MoE layer's experts over the ranks
    /// (E / N each, E a multiple of N): each rank holds, trains and updates
    /// only its experts, and the ranks exchange the routed token rows.
    #[arg(long)]
    pub expert_parallel: bool,
}

impl TrainArgs {
    /// `--max-experts` and `--rule`: a top-k router for `--gating topk`,
    /// or for adaptive gating past the paper's two experts or under another
    /// rule (renormalized over the experts taken; a lone expert weighs 1).
    /// Adaptive with K = 2 and the gap rule stays the paper's gating.
    fn top_k(&self, gate: &mut GateConfig) -> Result<()> {
        let adaptive = self.gating == TrainGating::Adaptive;
        if !adaptive && self.rule.is_some() {
            return Err(Error::invalid(
                "rule",
                format!("--rule decides a per-token expert count: it goes with --gating adaptive, not {}", self.gating),
            ));
        }
        if !adaptive && self.gating != TrainGating::TopK && self.max_experts.is_some() {
            return Err(Error::invalid(
                "max-experts",
                format!(
                    "--max-experts goes with --gating adaptive or topk, not {}",
                    self.gating
                ),
            ));
        }
        let k = self.max_experts.unwrap_or(2);
        let rule = match self.gating {
            TrainGating::TopK => ExpertRule::Fixed,
            _ => self.rule.unwrap_or(ExpertRule::Gap),
        };
        if adaptive && rule == ExpertRule::Fixed {
            return Err(Error::invalid(
                "rule",
                "--rule fixed takes every expert: that is --gating topk --max-experts K",
            ));
        }
        let paper = adaptive && k == 2 && rule == ExpertRule::Gap;
        if paper || !(adaptive || self.gating == TrainGating::TopK) {
            return Ok(());
        }
        *gate = GateConfig {
            rule,
            threshold: gate.threshold,
            gap: gate.gap,
            ..GateConfig::top_k(k, true, amoe::kernels::RouterScore::Softmax)
        };
        Ok(())
    }

    pub fn config(&self) -> Result<TrainConfig> {
        let mut c = TrainConfig::default();
        let m = &mut c.model;
        (m.dense, m.gate.gating) = self.gating.split();
        m.gate.threshold = self.threshold;
        m.gate.gap = self.gap;
        m.gate.single_weight = self.weight;
        self.top_k(&mut m.gate)?;
        m.aux.balance = self.balance;
        m.aux.z_loss = self.z_loss;
        m.capacity_factor = self.capacity_factor;
        self.model.apply(&mut c);
        for (field, arg) in [
            (&mut c.steps, self.steps),
            (&mut c.warmup, self.warmup),
            (&mut c.eval_every, self.eval_every),
            (&mut c.checkpoint_every, self.checkpoint_every),
        ] {
            if let Some(v) = arg {
                *field = v;
            }
        }
        if let Some(v) = self.weight_decay {
            c.opt.adamw.weight_decay = v;
        }
        if let Some(clip) = self.clip {
            // 0 turns clipping off; NaN or a negative value stays, for
            // validation to refuse.
            c.opt.clip = (clip != 0.0).then_some(clip);
        }
        c.target_loss = self.target_loss;
        c.eval_gating = self.eval_gating.unwrap_or(match c.model.gate.gating {
            Gating::TopK => Gating::TopK,
            _ => Gating::Top1,
        });
        c.curriculum = self.curriculum;
        c.data = match &self.data {
            Some(p) => DataSource::Path(p.clone()),
            None => DataSource::Shipped(self.domain.parse::<Domain>()?),
        };
        // A model trained with renormalized top-2 weights is evaluated the same way.
        if c.model.gate.gating == Gating::Top2 && self.weight == SingleWeight::RawP1 {
            c.model.gate.single_weight = SingleWeight::One;
        }
        c.model.validate()?;
        Ok(c)
    }
}

/// The progress bar: loss, tokens/s, two-expert fraction, expert load.
pub(super) struct Bar {
    pub(super) bar: ProgressBar,
    pub(super) val: Option<f32>,
    /// The gate's K: past 2, the bar shows experts per token.
    pub(super) max_experts: usize,
}

/// The run's expert use in words: the two-expert fraction of top-2 and
/// adaptive gating, or the mean experts per token of a wider router.
fn experts_in_words(extra: f32, max_experts: usize) -> String {
    if max_experts > 2 {
        format!("{:.2} experts per token", 1.0 + extra)
    } else {
        format!("two-expert fraction {:.1}%", 100.0 * extra)
    }
}

impl Progress for Bar {
    fn start(&mut self, total: u64, done: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
    }
    fn step(&mut self, m: &Metric) {
        self.bar.set_position(m.step);
        let mut msg = format!(
            "loss {:.3}  {:.0} tok/s",
            m.loss,
            m.tokens_per_s.unwrap_or(0.0)
        );
        if let Some(f) = m.two_expert_fraction {
            if self.max_experts > 2 {
                msg.push_str(&format!("  experts/token {:.2}", 1.0 + f));
            } else {
                msg.push_str(&format!("  2-expert {:.0}%", 100.0 * f));
            }
        }
        if let Some(i) = m.expert_imbalance {
            msg.push_str(&format!("  load max/mean {i:.2}"));
        }
        if let Some(d) = m.dropped_fraction {
            msg.push_str(&format!("  dropped {:.1}%", 100.0 * d));
        }
        if let Some(v) = self.val {
            msg.push_str(&format!("  val {v:.3} (ppl {:.1})", v.exp()));
        }
        self.bar.set_message(msg);
    }
    fn val(&mut self, m: &Metric) {
        self.val = Some(m.loss);
        self.bar.println(format!(
            "step {:>6}  validation loss {:.4}  perplexity {:.2}",
            m.step,
            m.loss,
            m.loss.exp()
        ));
    }
    fn message(&mut self, msg: &str) {
        self.bar.println(msg);
    }
    fn finish(&mut self) {
        self.bar.finish();
    }
}

/// The lock a run holds on its directory while it writes there.
const LOCK_FILE: &str = ".amoe-train.lock";

/// `out` may take a new run: absent, empty, or --overwrite (then emptied).
fn check_out(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::invalid(
            "train",
            format!("--out {}: a file, not a directory", out.display()),
        ));
    }
    let entries = match std::fs::read_dir(out) {
        Ok(rd) => rd.filter_map(|e| e.ok()).count(),
        Err(_) => 0,
    };
    if entries > 0 && !overwrite {
        return Err(Error::invalid(
            "train",
            format!(
                "--out {} is not empty (a run's metrics.jsonl and checkpoint/ would be replaced): \
                 --resume {0} continues that run, --overwrite replaces it, or pick another --out",
                out.display()
            ),
        ));
    }
    Ok(())
}

/// Whether process `pid` runs: it exists (Linux: in /proc) and has not
/// ended (a zombie, ended but not yet reaped by its parent, e.g. an MPI
/// rank whose launcher has gone, holds nothing).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X"))
}

/// Hold `dir` for this run: a lock file with our pid, refused while a live
/// process holds it (a stale one, of a process that is gone, is taken
/// over). Released when dropped.
struct DirLock(PathBuf);

impl DirLock {
    fn take(dir: &Path) -> Result<DirLock> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join(LOCK_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let pid: Option<u32> = text.trim().parse().ok();
            let alive = pid.is_some_and(process_alive);
            if alive && pid != Some(std::process::id()) {
                return Err(Error::invalid(
                    "train",
                    format!(
                        "{}: another run (process {}) is writing here; wait for it, or stop it",
                        dir.display(),
                        pid.unwrap_or_default()
                    ),
                ));
            }
        }
        std::fs::write(&path, std::process::id().to_string()).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(DirLock(path))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Flags `--resume` applies to the run it continues: the rest of its
/// configuration (model, data, optimizer, gating, seed) is the run's own.
const RESUME_FLAGS: &[&str] = &[
    "resume",
    "steps",
    "eval-every",
    "eval-batches",
    "checkpoint-every",
    "target-loss",
    "json",
    "distributed",
    "no-overlap",
    "expert-parallel",
    "stop-at",
    "quick-start",
    "backend",
    "adapter",
];

/// The `--flags` given on the command line after `train`.
fn given_flags() -> Vec<String> {
    std::env::args()
        .skip_while(|a| a != "train")
        .skip(1)
        .filter_map(|a| {
            let f = a.strip_prefix("--")?;
            Some(f.split('=').next().unwrap_or(f).to_string())
        })
        .collect()
}

/// With `--resume`: refuse flags that would change what the run is (it
/// continues as it was configured), naming them.
fn check_resume_flags(given: &[String]) -> Result<()> {
    let mut cannot: Vec<String> = given
        .iter()
        .filter(|f| !RESUME_FLAGS.contains(&f.as_str()))
        .map(|f| format!("--{f}"))
        .collect();
    cannot.dedup();
    if cannot.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(
        "train",
        format!(
            "--resume continues a run as it was configured; {} would change it (a resumed run takes only {}; start a new run with --out to change the rest)",
            cannot.join(", "),
            RESUME_FLAGS[1..6]
                .iter()
                .map(|f| format!("--{f}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

pub fn run(adapter: &AdapterArgs, args: &TrainArgs) -> Result<ExitCode> {
    if !args.distributed && (args.expert_parallel || args.no_overlap) {
        return Err(Error::invalid(
            "train",
            format!(
                "--{} is a choice of a --distributed run (mpirun -np N amoe train --distributed {} ...)",
                if args.expert_parallel {
                    "expert-parallel"
                } else {
                    "no-overlap"
                },
                if args.expert_parallel {
                    "--expert-parallel"
                } else {
                    "--no-overlap"
                }
            ),
        ));
    }
    if !args.distributed {
        return run_on(adapter, args, None);
    }
    // Bad flags first, before the job's ranks wait on each other.
    if args.resume.is_none() {
        args.config()?;
    }
    let comm = super::distributed::join()?;
    let rank = comm.rank();
    match run_on(adapter, args, Some(comm)) {
        Ok(code) => Ok(code),
        Err(e) => {
            // The other ranks would wait for this one forever: end the job.
            let line = format!("error: rank {rank}: {e}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            super::distributed::abort(2)
        }
    }
}

fn run_on(adapter: &AdapterArgs, args: &TrainArgs, comm: Option<Comm>) -> Result<ExitCode> {
    // Rank 0 of a data-parallel run writes the run directory; the others
    // only read (the data, a checkpoint to resume).
    let writer = comm.as_ref().is_none_or(|c| c.rank() == 0);
    if !writer {
        let ctx = context(adapter)?;
        ctx.set_long_running(!args.quick_start);
        let s = train(&ctx, args, comm)?;
        return Ok(if s.interrupted {
            ExitCode::from(130)
        } else {
            ExitCode::SUCCESS
        });
    }
    // A bad flag or an occupied --out is reported before any adapter or
    // data is touched.
    let dir = match &args.resume {
        None => {
            args.config()?;
            check_out(&args.out, args.overwrite)?;
            args.out.clone()
        }
        Some(d) => {
            check_resume_flags(&given_flags())?;
            d.clone()
        }
    };
    let _lock = DirLock::take(&dir)?;
    if args.resume.is_none() && args.overwrite {
        // Everything but our lock goes: the new run writes a fresh directory.
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name() == LOCK_FILE {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })?;
        }
    }
    let ctx = context(adapter)?;
    // A run of many steps: the fastest kernels, even where they take longer
    // to compile (lavapipe's subgroup GEMM cores), unless --quick-start.
    ctx.set_long_running(!args.quick_start);
    let s = train(&ctx, args, comm)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&s)?)?;
    } else {
        outln!(
            "{} steps in {:.1} s ({:.3} s/step), final train loss {:.4}, validation loss {}, {}{}",
            s.steps,
            s.wall_s,
            s.mean_step_s,
            s.final_train_loss,
            s.val_loss
                .map(|v| format!("{v:.4} (perplexity {:.2})", v.exp()))
                .unwrap_or_else(|| "n/a".into()),
            experts_in_words(s.two_expert_fraction, s.max_experts),
            if s.interrupted {
                ", interrupted".to_string()
            } else if s.paused {
                format!(
                    ", stopped at step {} (--stop-at; --resume continues)",
                    s.steps
                )
            } else {
                String::new()
            }
        )?;
        if let Some(d) = &s.data_parallel {
            outln!(
                "{} over {} ranks, per step: waiting for the GPU {:.3} s, {} {:.3} s, write and update {:.3} s; {:.2} MB sent by rank 0 ({} gradient floats summed); {}; rank 0's GPU holds {:.1} MB of parameters, gradients and moments, {:.1} MB of tensors in all",
                if d.expert_parallel {
                    "experts split"
                } else {
                    "data parallel"
                },
                d.ranks,
                d.compute_s,
                if d.expert_parallel {
                    "exchanges (token rows, gradients)"
                } else {
                    "all-reduce"
                },
                d.all_reduce_s,
                d.write_update_s,
                d.bytes_sent / 1e6,
                d.grad_floats,
                match d.backward_submits {
                    n if d.expert_parallel => format!("the backward in {n} segments"),
                    1 => "the all-reduce after the backward (--no-overlap)".to_string(),
                    n => format!("the all-reduce overlapping the backward ({n} submits)"),
                },
                d.state_bytes as f64 / 1e6,
                d.tensor_bytes as f64 / 1e6
            )?;
        }
        outln!(
            "run directory {}: metrics.jsonl, loss.svg, checkpoint/",
            s.out.display()
        )?;
    }
    // Interrupted (Ctrl-C: saved, then stopped): the status of a process
    // SIGINT ended, so that scripts do not take it for a finished run.
    Ok(if s.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

fn train(ctx: &GpuContext, args: &TrainArgs, comm: Option<Comm>) -> Result<RunSummary> {
    let ranks = comm.as_ref().map(|c| (c.rank(), c.size()));
    let dist = comm.map(|comm| amoe::train::trainer::Distributed {
        comm,
        expert_parallel: args.expert_parallel,
    });
    let mut run = match &args.resume {
        Some(dir) => {
            // After a save interrupted between its renames, say which
            // checkpoint the run continues from.
            let ck = if dir.join("state.json").exists() {
                dir.clone()
            } else {
                dir.join("checkpoint")
            };
            if !ck.exists() {
                if let Ok(Some(whole)) = amoe::checkpoint::whole_checkpoint(&ck) {
                    eprintln!(
                        "note: {}: the last save was interrupted; continuing from the newest whole checkpoint, {}",
                        dir.display(),
                        whole.display()
                    );
                }
            }
            let mut run = Run::resume_on(ctx, dir, args.steps, dist)?;
            // What a resumed run may change (see RESUME_FLAGS).
            let c = &mut run.cfg;
            if let Some(v) = args.eval_every {
                c.eval_every = v;
            }
            if let Some(v) = args.checkpoint_every {
                c.checkpoint_every = v;
            }
            if let Some(v) = args.model.eval_batches {
                c.eval_batches = v;
            }
            if args.target_loss.is_some() {
                c.target_loss = args.target_loss;
            }
            // The ranks compared their checkpoints' configuration; compare
            // the flags given on resuming too (validation is collective).
            if let Some(comm) = &run.session.comm {
                let json = serde_json::to_string(&run.cfg).unwrap_or_default();
                comm.check_same(
                    "the resumed run's flags (--eval-every, --eval-batches, --checkpoint-every, --target-loss, --steps)",
                    amoe::train::collective::fnv1a(json.as_bytes()),
                )?;
            }
            run
        }
        None => Run::new_on(ctx, args.config()?, &args.out, dist)?,
    };
    run.session.set_overlap(ctx, !args.no_overlap)?;
    run.pause_at = args.stop_at;
    let c = &run.cfg;
    if let Some((rank, size)) = ranks {
        // One write: stderr is unbuffered, and the ranks' lines would
        // interleave piece by piece.
        let line = format!(
            "rank {rank} of {size} on {}: {} sequences of each global batch of {}\n",
            ctx.adapter_label(),
            c.batch / size,
            c.batch
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        if rank != 0 {
            let stop = interrupt_flag();
            let flag = stop.clone();
            let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
            super::distributed::stop_watchdog(stop.clone(), rank);
            return pollster::block_on(run.train(ctx, &mut amoe::train::trainer::Quiet, &stop));
        }
    }
    eprintln!(
        "amoe train on {}: {} params, {} layers (MoE in {:?}), {} positions{}, D={} E={} F={}, gating {}{}, B={} N={}, {} train / {} val sequences, vocab {}",
        ctx.adapter_label(),
        c.model.num_params(),
        c.model.layers,
        c.model.moe_layers(),
        c.model.positions(),
        c.model.axes().iter().map(|a| format!(", {a}")).collect::<String>(),
        c.model.d,
        c.model.experts,
        c.model.ffn,
        match c.model.gate.gating {
            Gating::TopK if !c.model.dense => c.model.gate.describe(),
            _ => TrainGating::of(c.model.dense, c.model.gate.gating).to_string(),
        },
        if c.model.gate.gating == Gating::Adaptive && !c.model.dense {
            format!(" (threshold {}, curriculum {})", c.model.gate.threshold, if c.curriculum { "on" } else { "off" })
        } else {
            String::new()
        } + &match c.model.capacity_factor {
            Some(f) if !c.model.dense => format!(", capacity factor {f}"),
            _ => String::new(),
        },
        c.batch,
        c.model.context,
        run.data.dataset.train.len(),
        run.data.dataset.val.len(),
        c.model.vocab,
    );
    if run.done > 0 {
        eprintln!("resuming at step {} of {}", run.done, c.steps);
    }
    let stop = interrupt_flag();
    let flag = stop.clone();
    // A second Ctrl-C exits at once (the checkpoint on disk stays whole).
    let handler = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: saving a checkpoint at the end of this step (Ctrl-C again to quit now)"
        );
    });
    if let Err(e) = handler {
        eprintln!("warning: Ctrl-C handler not installed ({e})");
    }
    if let Some((rank, _)) = ranks {
        super::distributed::stop_watchdog(stop.clone(), rank);
    }
    let bar = ProgressBar::new(run.cfg.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .map_err(|e| Error::invalid("train", e.to_string()))?,
    );
    let max_experts = run.cfg.model.gate.max_k();
    let mut progress = Bar {
        bar,
        val: None,
        max_experts,
    };
    let summary = pollster::block_on(run.train(ctx, &mut progress, &stop))?;
    Ok(summary)
}
