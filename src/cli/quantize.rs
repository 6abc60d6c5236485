//! `amoe quantize`: a checkpoint whose expert banks are stored
//! block-quantized, from amoe's own checkpoint or a Hugging Face directory
//! (`checkpoint::quantized`). `generate`, `eval`, `routes`, `info`,
//! `bench infer` and the page load it like any other.

use super::args::choice;
use amoe::checkpoint::quantized::{write_quantized, Stored};
use amoe::infer::InferCheckpoint;
use amoe::quant::QuantFormat;
use amoe::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Clone, Debug)]
pub struct QuantizeArgs {
    /// Checkpoint directory (or a run directory holding checkpoint/), or a
    /// Hugging Face model directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Directory to write (created; must be absent or empty unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Format of the expert banks (routed and shared experts).
    #[arg(long, value_parser = choice::<QuantFormat>())]
    pub format: QuantFormat,
    /// Replace the contents of a non-empty --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &QuantizeArgs) -> Result<ExitCode> {
    if super::export::within(&args.checkpoint, &args.out)
        || super::export::within(&args.checkpoint.join("checkpoint"), &args.out)
    {
        return Err(Error::invalid(
            "quantize",
            format!(
                "--out {} holds the checkpoint {} itself: write elsewhere",
                args.out.display(),
                args.checkpoint.display()
            ),
        ));
    }
    let ck = InferCheckpoint::load(&args.checkpoint)?;
    let report = write_quantized(
        &args.out,
        args.overwrite,
        &ck.cfg,
        &ck.weights,
        &ck.tokenizer,
        &ck.inference_state(),
        args.format,
    )?;
    let packed = report.bytes_of(Stored::Packed(args.format));
    let total = report.bytes();
    let source: u64 = ck
        .weights
        .iter()
        .flat_map(|(_, t)| t.sources())
        .map(|s| s.bytes().len() as u64)
        .sum();
    if args.json {
        outln!(
            "{}",
            serde_json::json!({
                "checkpoint": ck.source,
                "out": args.out.display().to_string(),
                "format": args.format.to_string(),
                "tensors": report.tensors.len(),
                "packed_tensors": report.tensors.iter().filter(|t| t.2 == Stored::Packed(args.format)).count(),
                "bytes": total,
                "expert_bytes": packed,
                "source_bytes": source,
                "kept_in_floats": report.kept,
            })
        )?;
    } else {
        let mb = |b: u64| b as f64 / 1e6;
        outln!(
            "{} -> {}: expert banks in {} ({:.2} MB), {} tensors, {:.2} MB in all ({:.2} MB read)",
            ck.source,
            args.out.display(),
            args.format,
            mb(packed),
            report.tensors.len(),
            mb(total),
            mb(source)
        )?;
        for k in &report.kept {
            outln!("  {k}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
