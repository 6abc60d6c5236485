//! The `amoe` command line: the clap definition, dispatch and the helpers every command
//! shares. One module per command; argument groups used by several live in `args`.

/// `print!` to standard output as a `Result`: a closed pipe or a full disk
/// is an error (`Error::Io` on "standard output"), never a panic.
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!($($t)*)) };
}

/// `println!` as [`out!`].
macro_rules! outln {
    () => { $crate::cli::write_out(format_args!("\n")) };
    ($($t:tt)*) => { $crate::cli::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

mod args;
mod bench;
mod calibrate;
mod conformance;
mod devices;
mod distributed;
mod eval;
mod export;
mod generate;
mod info;
mod quantize;
mod reproduce;
mod routes;
mod train;

use amoe::gpu::GpuContext;
use amoe::{Error, Result};
use args::AdapterArgs;
use clap::{Parser, Subcommand};
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

#[derive(Subcommand)]
enum Command {
    /// List every adapter: backend, name, type, driver, features, limits.
    Devices {
        #[command(flatten)]
        args: devices::DevicesArgs,
    },
    /// Check every GPU kernel against its CPU twin on every adapter (or the chosen one).
    Conformance {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: conformance::ConformanceArgs,
    },
    /// Train an MoE language model (defaults: the small adaptive-gating model on the shipped corpus).
    Train {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<train::TrainArgs>,
    },
    /// The paper's comparison: dense, top1, top2, adaptive, adaptive without curriculum,
    /// fine-tuned from a dense model to top2's validation loss (Table 3 layout).
    Reproduce {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<reproduce::ReproduceArgs>,
    },
    /// Continue a prompt with a trained checkpoint (default: the demo checkpoint),
    /// streaming tokens; optionally colored by one vs two experts.
    Generate {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<generate::GenerateArgs>,
    },
    /// Routing analysis over a text: per MoE layer the two-expert fraction and the
    /// load per expert; the words that most often take two experts and those that never do.
    Routes {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<routes::RoutesArgs>,
    },
    /// Perplexity over a text (windows of the context, a stride), tokens/s and the
    /// mean experts per token of each MoE layer.
    Eval {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<eval::EvalArgs>,
    },
    /// Per-layer thresholds of a per-token expert rule (--rule gap, ratio or
    /// mass) for a top-k model, so that the mean experts per token over a
    /// text is --target-experts; written as JSON for --calibration.
    Calibrate {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<calibrate::CalibrateArgs>,
    },
    /// What a checkpoint is (architecture, parameters in total and active per
    /// token) and what it takes on the chosen adapter, before loading it there.
    Info {
        #[command(flatten)]
        adapter: AdapterArgs,
        #[command(flatten)]
        args: Box<info::InfoArgs>,
    },
    /// Write a checkpoint in another format: --format hf gives a Hugging Face model
    /// directory (Mixtral layout for MoE models, Llama or Mistral for dense ones).
    Export {
        #[command(flatten)]
        args: export::ExportArgs,
    },
    /// Write a checkpoint whose expert banks are block-quantized (q8 or q4):
    /// from amoe's own checkpoint or a Hugging Face directory; every
    /// command and the page load it like any other.
    Quantize {
        #[command(flatten)]
        args: quantize::QuantizeArgs,
    },
    /// Benchmarks that print numbers (JSON).
    Bench {
        #[command(subcommand)]
        what: bench::BenchWhat,
    },
}

/// Parse the command line, run the command; an error is printed and exits with 2.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Devices { args } => devices::run(&args),
        Command::Conformance { adapter, args } => conformance::run(&adapter, &args),
        Command::Train { adapter, args } => train::run(&adapter, &args),
        Command::Reproduce { adapter, args } => reproduce::run(&adapter, &args),
        Command::Generate { adapter, args } => generate::run(&adapter, &args),
        Command::Routes { adapter, args } => routes::run(&adapter, &args),
        Command::Eval { adapter, args } => eval::run(&adapter, &args),
        Command::Calibrate { adapter, args } => calibrate::run(&adapter, &args),
        Command::Info { adapter, args } => info::run(&adapter, &args),
        Command::Export { args } => export::run(&args),
        Command::Quantize { args } => quantize::run(&args),
        Command::Bench { what } => bench::run(what),
    };
    match r {
        Ok(code) => code,
        // A reader that stopped reading (`amoe conformance | head -1`):
        // end quietly, with the status of a process a closed pipe ends.
        Err(Error::Io { path, source })
            if path == STDOUT && source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("error: {}", bounded(&e.to_string()));
            ExitCode::from(2)
        }
    }
}

/// The longest error message printed whole; past it, the start and a count.
const MAX_MESSAGE: usize = 4000;

fn bounded(msg: &str) -> String {
    if msg.len() <= MAX_MESSAGE {
        return msg.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ... ({} more bytes)", &msg[..end], msg.len() - end)
}

/// How errors name standard output.
const STDOUT: &str = "standard output";

/// Write to standard output and flush; an I/O error names standard output.
pub(crate) fn write_out(args: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    let mut w = std::io::stdout().lock();
    w.write_fmt(args)
        .and_then(|()| w.flush())
        .map_err(|source| Error::Io {
            path: STDOUT.into(),
            source,
        })
}

/// The one adapter the flags pick.
/// A one-line notice on a terminal's stderr when the first result is slow
/// to come: a first run of a model on an adapter compiles its kernels (the
/// driver keeps them in its disk cache for later runs). Nothing is printed
/// when the result comes within `after`, or when stderr is not a terminal.
/// Dropping it (the first result came) stops it.
pub(crate) struct SlowStart {
    done: Option<std::sync::mpsc::Sender<()>>,
}

impl SlowStart {
    pub(crate) fn notice(after: std::time::Duration, msg: &'static str) -> SlowStart {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return SlowStart { done: None };
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(after) {
                eprintln!("{msg}");
            }
        });
        SlowStart { done: Some(tx) }
    }
}

impl Drop for SlowStart {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

fn context(adapter: &AdapterArgs) -> Result<GpuContext> {
    pollster::block_on(GpuContext::new(&adapter.filter()?))
}

/// Every adapter the flags pick.
fn contexts(adapter: &AdapterArgs) -> Result<Vec<GpuContext>> {
    pollster::block_on(GpuContext::all(&adapter.filter()?))
}

/// Run `f` on the one adapter the flags pick.
fn with_ctx(adapter: &AdapterArgs, f: impl FnOnce(&GpuContext) -> Result<()>) -> Result<ExitCode> {
    f(&context(adapter)?)?;
    Ok(ExitCode::SUCCESS)
}

/// Write a JSON report to the file `path`, or to standard output when it
/// is "-" (the `--json` flags of the reporting commands).
fn write_json(path: &str, text: &str) -> Result<()> {
    if path == "-" {
        outln!("{text}")
    } else {
        write_file(path, text)
    }
}

fn write_file(path: &str, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    /// clap checks flag names only when a subcommand is parsed: check them all here.
    #[test]
    fn every_subcommand_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// An error message is printed whole up to a bound, then cut (on a
    /// character boundary) with the count of what was left out.
    #[test]
    fn long_messages_are_bounded() {
        assert_eq!(super::bounded("short"), "short");
        let long = "é".repeat(10_000);
        let b = super::bounded(&long);
        assert!(b.len() < super::MAX_MESSAGE + 40, "{}", b.len());
        assert!(b.ends_with("more bytes)"), "{b}");
    }
}
