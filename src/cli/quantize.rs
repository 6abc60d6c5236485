//! `amoe quantize`: a checkpoint whose expert banks (and with `--quantize
//! all` the attention projections and an untied unembedding) are stored
//! block-quantized, from amoe's own checkpoint, a Hugging Face directory or
//! a GGUF file (`checkpoint::quantized`). `generate`, `eval`, `routes`, `info`,
//! `bench infer` and the page load it like any other.

use super::args::choice;
use amoe::checkpoint::quantized::{write_quantized, Stored};
use amoe::infer::InferCheckpoint;
use amoe::model::QuantScope;
use amoe::quant::QuantFormat;
use amoe::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Clone, Debug)]
pub struct QuantizeArgs {
    /// Checkpoint directory (or a run directory holding checkpoint/), a
    /// Hugging Face model directory or a GGUF file.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Directory to write (created; must be absent or empty unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Format of the expert banks (routed and shared experts).
    #[arg(long, value_parser = choice::<QuantFormat>())]
    pub format: QuantFormat,
    /// What to quantize: the expert banks, or all: also the attention
    /// projections and an untied unembedding.
    #[arg(long, value_name = "WHICH", value_parser = choice::<QuantScope>(), default_value = "experts")]
    pub quantize: QuantScope,
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
        args.quantize,
    )?;
    let packed = report.bytes_of(Stored::Packed(args.format));
    let expert_bytes: u64 = report
        .tensors
        .iter()
        .filter(|t| t.2 == Stored::Packed(args.format))
        .filter(|t| amoe::model::ParamId::parse(&t.0).is_some_and(|id| id.is_expert_bank()))
        .map(|t| t.3)
        .sum();
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
                "quantize": args.quantize.to_string(),
                "tensors": report.tensors.len(),
                "packed_tensors": report.tensors.iter().filter(|t| t.2 == Stored::Packed(args.format)).count(),
                "bytes": total,
                "expert_bytes": expert_bytes,
                "packed_bytes": packed,
                "source_bytes": source,
                "kept_in_floats": report.kept,
            })
        )?;
    } else {
        let mb = |b: u64| b as f64 / 1e6;
        outln!(
            "{} -> {}: {} in {} ({:.2} MB), {} tensors, {:.2} MB in all ({:.2} MB read)",
            ck.source,
            args.out.display(),
            match args.quantize {
                QuantScope::Experts => "expert banks",
                QuantScope::All => "expert banks and projections",
            },
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
