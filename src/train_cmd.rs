//! `amoe train`: flags, the progress bar, Ctrl-C, the summary.

use amoe::gpu::GpuContext;
use amoe::kernels::{Activation, GapMode, Gating, SingleWeight};
use amoe::train::data::Domain;
use amoe::train::trainer::{
    interrupt_flag, DataSource, Metric, Progress, Run, RunSummary, TrainConfig,
};
use amoe::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// Gating of the FFN layers during training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GatingArg {
    /// Dense FFNs (the baseline without experts).
    Dense,
    Top1,
    Top2,
    Adaptive,
}

/// Activation of the FFNs (experts and dense).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ActivationArg {
    /// gelu(x W1) W2
    Gelu,
    /// (silu(x W1) * (x W3)) W2: a third weight matrix per expert
    Swiglu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalGatingArg {
    Top1,
    Top2,
    Adaptive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GapArg {
    /// p1 - p2 on the full softmax.
    Softmax,
    /// (p1 - p2) / (p1 + p2).
    Top2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightArg {
    /// A one-expert token is weighted by its raw probability p1.
    Raw,
    /// Weights renormalized over the selected experts (a one-expert token gets 1).
    Renorm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Model shape and run sizes shared by `train` and `reproduce`.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Sequences per batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Context length N.
    #[arg(long)]
    pub context: Option<usize>,
    /// Model width D.
    #[arg(long)]
    pub d: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// Experts per MoE layer E.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Hidden width of each expert F.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Every n-th FFN is an MoE layer.
    #[arg(long)]
    pub moe_every: Option<usize>,
    /// FFN activation [default: gelu].
    #[arg(long, value_enum)]
    pub activation: Option<ActivationArg>,
    /// BPE vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Validation batches per validation.
    #[arg(long)]
    pub eval_batches: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl ModelArgs {
    /// Overwrite what was given.
    pub fn apply(&self, c: &mut TrainConfig) {
        let m = &mut c.model;
        macro_rules! set {
            ($($field:expr => $arg:expr),* $(,)?) => { $(if let Some(v) = $arg { $field = v; })* };
        }
        set!(
            m.context => self.context,
            m.d => self.d,
            m.layers => self.layers,
            m.heads => self.heads,
            m.experts => self.experts,
            m.ffn => self.ffn,
            m.moe_every => self.moe_every,
            c.batch => self.batch,
            c.vocab_size => self.vocab,
            c.opt.adamw.lr => self.lr,
            c.eval_batches => self.eval_batches,
            c.seed => self.seed,
            m.activation => self.activation.map(|a| match a {
                ActivationArg::Gelu => Activation::Gelu,
                ActivationArg::Swiglu => Activation::SwiGlu,
            }),
        );
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Gating rule of the FFN layers.
    #[arg(long, value_enum, default_value = "adaptive")]
    pub gating: GatingArg,
    /// Adaptive gating: a token takes its second expert when the gap is <= this.
    #[arg(long, default_value_t = 0.1)]
    pub threshold: f32,
    /// How the adaptive gap is measured.
    #[arg(long, value_enum, default_value = "top2")]
    pub gap: GapArg,
    /// Weight of a token routed to one expert.
    #[arg(long, value_enum, default_value = "raw")]
    pub weight: WeightArg,
    /// Gating rule at validation (the paper evaluates with top-1).
    #[arg(long, value_enum, default_value = "top1")]
    pub eval_gating: EvalGatingArg,
    /// Order each epoch's sequences by their two-expert complexity (adaptive only).
    #[arg(long, value_enum, default_value = "on")]
    pub curriculum: OnOff,
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
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

impl TrainArgs {
    pub fn config(&self) -> Result<TrainConfig> {
        let mut c = TrainConfig::default();
        let m = &mut c.model;
        m.dense = self.gating == GatingArg::Dense;
        m.gate.gating = match self.gating {
            GatingArg::Dense | GatingArg::Top1 => Gating::Top1,
            GatingArg::Top2 => Gating::Top2,
            GatingArg::Adaptive => Gating::Adaptive,
        };
        m.gate.threshold = self.threshold;
        m.gate.gap = match self.gap {
            GapArg::Softmax => GapMode::Softmax,
            GapArg::Top2 => GapMode::Top2,
        };
        m.gate.single_weight = match self.weight {
            WeightArg::Raw => SingleWeight::RawP1,
            WeightArg::Renorm => SingleWeight::One,
        };
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
            c.opt.clip = (clip > 0.0).then_some(clip);
        }
        c.target_loss = self.target_loss;
        c.eval_gating = match self.eval_gating {
            EvalGatingArg::Top1 => Gating::Top1,
            EvalGatingArg::Top2 => Gating::Top2,
            EvalGatingArg::Adaptive => Gating::Adaptive,
        };
        c.curriculum = self.curriculum == OnOff::On;
        c.data = match &self.data {
            Some(p) => DataSource::Path(p.clone()),
            None => DataSource::Shipped(self.domain.parse::<Domain>()?),
        };
        // A model trained with renormalized top-2 weights is evaluated the same way.
        if c.model.gate.gating == Gating::Top2 && self.weight == WeightArg::Raw {
            c.model.gate.single_weight = SingleWeight::One;
        }
        c.model.validate()?;
        Ok(c)
    }
}

/// The progress bar: loss, tokens/s, two-expert fraction, expert load.
struct Bar {
    bar: ProgressBar,
    val: Option<f32>,
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
            msg.push_str(&format!("  2-expert {:.0}%", 100.0 * f));
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

pub fn train(ctx: &GpuContext, args: &TrainArgs) -> Result<RunSummary> {
    let mut run = match &args.resume {
        Some(dir) => Run::resume(ctx, dir, args.steps)?,
        None => Run::new(ctx, args.config()?, &args.out)?,
    };
    let c = &run.cfg;
    eprintln!(
        "amoe train on {}: {} params, {} layers (MoE in {:?}), D={} E={} F={}, gating {}{}, B={} N={}, {} train / {} val sequences, vocab {}",
        ctx.adapter_label(),
        c.model.num_params(),
        c.model.layers,
        c.model.moe_layers(),
        c.model.d,
        c.model.experts,
        c.model.ffn,
        if c.model.dense { "dense" } else { c.model.gate.gating.name() },
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
    let bar = ProgressBar::new(run.cfg.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .map_err(|e| Error::invalid("train", e.to_string()))?,
    );
    let mut progress = Bar { bar, val: None };
    let summary = pollster::block_on(run.train(ctx, &mut progress, &stop))?;
    Ok(summary)
}

#[derive(clap::Args, Clone, Debug)]
pub struct ReproduceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Steps of dense pretraining on Shakespeare.
    #[arg(long, default_value_t = 300)]
    pub pretrain_steps: u64,
    /// Top-2's fine-tuning budget on the KJV Bible (its final validation loss is the target).
    #[arg(long, default_value_t = 200)]
    pub budget: u64,
    /// Step cap of the other schemes.
    #[arg(long, default_value_t = 400)]
    pub cap: u64,
    /// Validate (and check the target) every this many steps.
    #[arg(long, default_value_t = 20)]
    pub eval_every: u64,
    /// Run the comparison without the dense start.
    #[arg(long)]
    pub from_scratch: bool,
    /// Reuse a pretrained dense run directory (from an earlier reproduce) instead of pretraining.
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory of the runs, the table and the plot.
    #[arg(long, default_value = "runs/reproduce")]
    pub out: PathBuf,
    /// Adaptive threshold.
    #[arg(long, default_value_t = 0.1)]
    pub threshold: f32,
}

pub fn reproduce(ctx: &GpuContext, a: &ReproduceArgs) -> Result<amoe::train::reproduce::Report> {
    use amoe::train::reproduce::{check_out, reproduce, table, ReproduceConfig};
    check_out(&a.out)?;
    let mut base = TrainConfig::default();
    a.model.apply(&mut base);
    base.model.gate.threshold = a.threshold;
    base.eval_every = a.eval_every;
    base.checkpoint_every = 0;
    base.warmup = (a.budget / 10).max(1);
    let rc = ReproduceConfig {
        base,
        pretrain_steps: a.pretrain_steps,
        budget: a.budget,
        cap: a.cap,
        from_scratch: a.from_scratch,
        pretrained: a.pretrained.clone(),
        out: a.out.clone(),
    };
    let stop = interrupt_flag();
    let flag = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    }) {
        eprintln!("warning: Ctrl-C handler not installed ({e})");
    }
    let mut make = |name: &str| -> Box<dyn Progress> {
        eprintln!("== {name}");
        let bar = ProgressBar::new(0);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
        {
            bar.set_style(style);
        }
        Box::new(Bar { bar, val: None })
    };
    let report = pollster::block_on(reproduce(ctx, &rc, &mut make, &stop))?;
    println!("{}", table(&report));
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(p, text).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?;
    }
    println!("plot: {}", a.out.join("reproduce.svg").display());
    Ok(report)
}
