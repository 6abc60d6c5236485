//! `amoe reproduce`: the paper's comparison of gating schemes, its table and plot.

use super::args::{AdapterArgs, ModelArgs};
use super::context;
use super::train::Bar;
use amoe::gpu::GpuContext;
use amoe::train::trainer::{interrupt_flag, Progress, TrainConfig};
use amoe::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

pub fn run(adapter: &AdapterArgs, args: &ReproduceArgs) -> Result<ExitCode> {
    let ctx = context(adapter)?;
    // Training runs: the fastest kernels (see `GpuContext::set_long_running`).
    ctx.set_long_running(true);
    reproduce(&ctx, args)?;
    Ok(ExitCode::SUCCESS)
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

fn reproduce(ctx: &GpuContext, a: &ReproduceArgs) -> Result<amoe::train::reproduce::Report> {
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
        Box::new(Bar {
            bar,
            val: None,
            max_experts: 2,
        })
    };
    let report = pollster::block_on(reproduce(ctx, &rc, &mut make, &stop))?;
    outln!("{}", table(&report))?;
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(p, text).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?;
    }
    outln!("plot: {}", a.out.join("reproduce.svg").display())?;
    Ok(report)
}
