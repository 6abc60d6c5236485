//! `amoe export`: a checkpoint written in another format. `--format hf`: a
//! Hugging Face model directory in the Mixtral, Llama or Mistral layout
//! (`checkpoint::hf_export`), which transformers and amoe's own loader read.

use amoe::checkpoint::hf_export::{export, write_hf_dir};
use amoe::infer::InferCheckpoint;
use amoe::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Formats `amoe export` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A Hugging Face model directory: config.json, generation_config.json,
    /// model.safetensors (f32), tokenizer.json, tokenizer_config.json,
    /// special_tokens_map.json; Mixtral (MoE), Llama or Mistral (dense) layout.
    Hf,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ExportArgs {
    /// Output format.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Checkpoint directory (or a run directory holding checkpoint/).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Directory to write (created; must be absent or empty unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the contents of a non-empty --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// Whether `a` is `b` or inside it (both made absolute where they exist).
pub(super) fn within(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a.starts_with(b),
        _ => false,
    }
}

pub fn run(args: &ExportArgs) -> Result<ExitCode> {
    match args.format {
        Format::Hf => {}
    }
    // The checkpoint directory, or the one inside a run directory.
    let holds = |dir: &Path| within(dir, &args.out);
    if holds(&args.checkpoint) || holds(&args.checkpoint.join("checkpoint")) {
        return Err(Error::invalid(
            "export",
            format!(
                "--out {} holds the checkpoint {} itself: write the export elsewhere",
                args.out.display(),
                args.checkpoint.display()
            ),
        ));
    }
    let ck = InferCheckpoint::load(&args.checkpoint)?;
    let hf = export(&ck.cfg, &ck.host()?, &ck.tokenizer)?;
    write_hf_dir(&args.out, &hf, args.overwrite)?;
    let cfg = &ck.cfg;
    let params: usize = hf.tensors.iter().map(|t| t.data.len()).sum();
    let router = match hf.config.get("num_experts_per_tok") {
        Some(k) => format!(
            ", {} experts, top-{k} renormalized (the rule it was trained with)",
            cfg.experts
        ),
        None => String::new(),
    };
    outln!(
        "{} -> {}: Hugging Face {} ({}), {} layers{router}, {} tensors, {:.2}M parameters (f32)",
        ck.source,
        args.out.display(),
        hf.family,
        hf.architecture(),
        cfg.layers,
        hf.tensors.len(),
        params as f64 / 1e6,
    )?;
    Ok(ExitCode::SUCCESS)
}
