//! The `amoe` command line: devices, conformance, benchmarks, training.

mod infer_cmd;
mod train_cmd;

use amoe::conformance::{self, AdapterReport};
use amoe::gpu::{self, AdapterFilter, GpuContext};
use amoe::{Error, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "amoe",
    version,
    about = "Mixture-of-Experts on any GPU through WebGPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Default)]
struct AdapterArgs {
    /// Backend: vulkan, metal, dx12, gl or browser (default: env AMOE_BACKEND, else all).
    #[arg(long)]
    backend: Option<String>,
    /// Adapter index as listed by `amoe devices`.
    #[arg(long)]
    adapter: Option<usize>,
}

impl AdapterArgs {
    fn filter(&self) -> Result<AdapterFilter> {
        AdapterFilter::from_args(self.backend.as_deref(), self.adapter)
    }
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter: backend, name, type, driver, features, limits.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check every GPU kernel against its CPU twin on every adapter (or the chosen one).
    Conformance {
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Only this kernel family (matmul, gate, route, expert, combine, decode,
        /// embedding, rmsnorm, attention, cross_entropy, adamw, add, moe_backward, kv_cache,
        /// complexity).
        #[arg(long)]
        kernel: Option<String>,
        /// Also write the results as JSON to this file ("-" for stdout).
        #[arg(long)]
        json: Option<String>,
    },
    /// Train an MoE language model (defaults: the small adaptive-gating model on the shipped corpus).
    Train {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<train_cmd::TrainArgs>,
    },
    /// The paper's comparison: dense, top1, top2, adaptive, adaptive without curriculum,
    /// fine-tuned from a dense model to top2's validation loss (Table 3 layout).
    Reproduce {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<train_cmd::ReproduceArgs>,
    },
    /// Continue a prompt with a trained checkpoint (default: the demo checkpoint),
    /// streaming tokens; optionally colored by one vs two experts.
    Generate {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<infer_cmd::GenerateArgs>,
    },
    /// Routing analysis over a text: per MoE layer the two-expert fraction and the
    /// load per expert; the words that most often take two experts and those that never do.
    Routes {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<infer_cmd::RoutesArgs>,
    },
    /// Benchmarks that print numbers (JSON).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Roofline, dense matmul, MoE layer forward, grouped/dense ratio.
    Kernels {
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Write the JSON to this file as well as stdout.
        #[arg(long)]
        json: Option<String>,
        /// Smaller shapes, for a quick look (not comparable with full runs).
        #[arg(long)]
        quick: bool,
    },
    /// Prefill and decode tokens/s for top1, top2 and adaptive, and GPU bytes
    /// (default checkpoint: the demo).
    Infer {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: infer_cmd::BenchInferArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Devices { json } => devices(json),
        Command::Conformance {
            adapter,
            kernel,
            json,
        } => conformance_cmd(&adapter, kernel.as_deref(), json.as_deref()),
        Command::Train { adapter, args } => train(&adapter, &args),
        Command::Reproduce { adapter, args } => reproduce(&adapter, &args),
        Command::Generate { adapter, args } => {
            with_ctx(&adapter, |ctx| infer_cmd::generate(ctx, &args))
        }
        Command::Routes { adapter, args } => {
            with_ctx(&adapter, |ctx| infer_cmd::routes(ctx, &args))
        }
        Command::Bench { what } => match what {
            BenchWhat::Infer { adapter, args } => with_ctx(&adapter, |ctx| {
                eprintln!("== bench infer on {}", ctx.adapter_label());
                let text = infer_cmd::bench_infer(ctx, &args)?;
                println!("{text}");
                if let Some(path) = &args.json {
                    write_file(path, &text)?;
                }
                Ok(())
            }),
            BenchWhat::Kernels {
                adapter,
                json,
                quick,
            } => bench_kernels(&adapter, json.as_deref(), quick),
        },
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn with_ctx(adapter: &AdapterArgs, f: impl FnOnce(&GpuContext) -> Result<()>) -> Result<ExitCode> {
    let ctx = pollster::block_on(GpuContext::new(&adapter.filter()?))?;
    f(&ctx)?;
    Ok(ExitCode::SUCCESS)
}

fn train(adapter: &AdapterArgs, args: &train_cmd::TrainArgs) -> Result<ExitCode> {
    // A bad flag is reported before any adapter or data is touched.
    if args.resume.is_none() {
        args.config()?;
    }
    let ctx = pollster::block_on(GpuContext::new(&adapter.filter()?))?;
    let s = train_cmd::train(&ctx, args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "{} steps in {:.1} s ({:.3} s/step), final train loss {:.4}, validation loss {}, two-expert fraction {:.1}%{}",
            s.steps,
            s.wall_s,
            s.mean_step_s,
            s.final_train_loss,
            s.val_loss
                .map(|v| format!("{v:.4} (perplexity {:.2})", v.exp()))
                .unwrap_or_else(|| "n/a".into()),
            100.0 * s.two_expert_fraction,
            if s.interrupted { ", interrupted" } else { "" }
        );
        println!(
            "run directory {}: metrics.jsonl, loss.svg, checkpoint/",
            s.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn reproduce(adapter: &AdapterArgs, args: &train_cmd::ReproduceArgs) -> Result<ExitCode> {
    let ctx = pollster::block_on(GpuContext::new(&adapter.filter()?))?;
    train_cmd::reproduce(&ctx, args)?;
    Ok(ExitCode::SUCCESS)
}

fn write_file(path: &str, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_string(),
        source,
    })
}

fn devices(json: bool) -> Result<ExitCode> {
    let adapters = pollster::block_on(gpu::list_adapters());
    if json {
        println!("{}", serde_json::to_string_pretty(&adapters)?);
        return Ok(ExitCode::SUCCESS);
    }
    if adapters.is_empty() {
        return Err(Error::NoAdapter(
            "wgpu found none (on Linux without a GPU: apt-get install mesa-vulkan-drivers libvulkan1)".into(),
        ));
    }
    for a in &adapters {
        let l = &a.limits;
        println!(
            "[{}] {} / {} ({})",
            a.index, a.backend, a.name, a.device_type
        );
        println!("    driver: {} {}", a.driver, a.driver_info);
        let wanted: Vec<&str> = ["SHADER_F16", "SUBGROUP", "TIMESTAMP_QUERY"]
            .into_iter()
            .filter(|f| a.features.iter().any(|x| x == f))
            .collect();
        println!(
            "    amoe features: {}",
            if wanted.is_empty() {
                "none (f32, no-subgroup paths)".to_string()
            } else {
                wanted.join(", ")
            }
        );
        println!(
            "    limits: storage binding {} MiB, buffer {} MiB, {} storage buffers/stage, {} KiB workgroup memory, {} invocations/workgroup, {} workgroups/dim, subgroup {}..{}",
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_storage_buffers_per_shader_stage,
            l.max_compute_workgroup_storage_size / 1024,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension,
            l.min_subgroup_size,
            l.max_subgroup_size,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn fmt_err(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.2e}")
    }
}

fn conformance_cmd(
    args: &AdapterArgs,
    family: Option<&str>,
    json: Option<&str>,
) -> Result<ExitCode> {
    if let Some(f) = family {
        if !conformance::FAMILIES.contains(&f) {
            return Err(Error::invalid(
                "conformance",
                format!(
                    "unknown kernel family {f:?}; expected one of {}",
                    conformance::FAMILIES.join(", ")
                ),
            ));
        }
    }
    let cases = conformance::cases(family);
    let ctxs = pollster::block_on(GpuContext::all(&args.filter()?))?;
    let mut reports: Vec<AdapterReport> = Vec::new();
    let (kw, cw) = cases
        .iter()
        .map(|c| c.names())
        .fold((6, 4), |(kw, cw), (k, c)| {
            (kw.max(k.len()), cw.max(c.len()))
        });
    for ctx in &ctxs {
        println!("== {} ({} cases)", ctx.adapter_label(), cases.len());
        println!(
            "{:<kw$} {:<cw$} {:>9} {:>9} {:>8} {:>6}",
            "kernel", "case", "max_abs", "max_rel", "GFLOP/s", "result"
        );
        let report = pollster::block_on(conformance::run_cases(ctx, &cases, |r| {
            println!(
                "{:<kw$} {:<cw$} {:>9} {:>9} {:>8} {:>6}",
                r.kernel,
                r.case,
                fmt_err(r.max_abs_err),
                fmt_err(r.max_rel_err),
                r.gflops.map(|g| format!("{g:.2}")).unwrap_or_default(),
                if r.pass { "pass" } else { "FAIL" }
            );
            if let Some(n) = r.note.as_ref().filter(|_| !r.pass) {
                println!("    {n}");
            }
            let _ = std::io::stdout().flush();
        }));
        let failed = report.kernels.iter().filter(|k| !k.pass).count();
        // One line per reason, not per case.
        let mut reasons: Vec<(&str, usize)> = Vec::new();
        for why in &report.not_applicable {
            let reason = why.split_once("]: ").map_or(why.as_str(), |(_, r)| r);
            match reasons.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => reasons.push((reason, 1)),
            }
        }
        for (reason, n) in reasons {
            println!("n/a ({n} cases): {reason}");
        }
        println!(
            "-- {}: {} passed, {} failed, {} not applicable on this adapter",
            ctx.adapter_label(),
            report.kernels.len() - failed,
            failed,
            report.not_applicable.len()
        );
        reports.push(report);
    }
    let ok = reports.iter().all(|r| r.pass());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&serde_json::json!({ "adapters": reports }))?;
        if path == "-" {
            println!("{text}");
        } else {
            write_file(path, &text)?;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench_kernels(args: &AdapterArgs, json: Option<&str>, quick: bool) -> Result<ExitCode> {
    let ctxs = pollster::block_on(GpuContext::all(&args.filter()?))?;
    let mut out = Vec::new();
    for ctx in &ctxs {
        eprintln!("== bench on {}", ctx.adapter_label());
        let r = pollster::block_on(amoe::bench::bench_kernels(ctx, quick, |msg| {
            eprintln!("   {msg}")
        }))?;
        out.push(r);
    }
    let text = serde_json::to_string_pretty(&if out.len() == 1 {
        serde_json::to_value(&out[0])?
    } else {
        serde_json::json!({ "adapters": out })
    })?;
    println!("{text}");
    if let Some(path) = json {
        write_file(path, &text)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// clap checks flag names only when a subcommand is parsed: check them all here.
    #[test]
    fn every_subcommand_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
