//! `amoe generate`, `amoe routes` and `amoe bench infer`: flags, streaming
//! output, routing colors, tables.

use amoe::gpu::GpuContext;
use amoe::infer::checkpoint::demo_dir;
use amoe::infer::routes::{analyze, RoutesReport};
use amoe::infer::{Engine, GenConfig, GenToken, Generation, InferCheckpoint, LayerRoute, Sampling};
use amoe::kernels::Gating;
use amoe::train::data::{shipped_dir, Corpus, Domain};
use amoe::{Error, Result};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// Gating rule of the MoE layers at inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InferGating {
    Top1,
    Top2,
    Adaptive,
}

impl From<InferGating> for Gating {
    fn from(g: InferGating) -> Gating {
        match g {
            InferGating::Top1 => Gating::Top1,
            InferGating::Top2 => Gating::Top2,
            InferGating::Adaptive => Gating::Adaptive,
        }
    }
}

/// Which checkpoint and which rule.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelPick {
    /// Checkpoint directory (or a run directory holding checkpoint/).
    /// Default: the demo checkpoint in data/demo.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Gating of the MoE layers (default for generate: what the checkpoint was
    /// validated with; for routes: what it was trained with).
    #[arg(long, value_enum)]
    pub gating: Option<InferGating>,
    /// Adaptive threshold in [0, 1] (default: the training's).
    #[arg(long)]
    pub threshold: Option<f32>,
}

impl ModelPick {
    pub fn load(&self) -> Result<InferCheckpoint> {
        let dir = self.checkpoint.clone().unwrap_or_else(|| {
            let local = PathBuf::from("data/demo");
            if local.join("config.json").exists() {
                local
            } else {
                demo_dir()
            }
        });
        InferCheckpoint::load(dir)
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelPick,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this cumulative probability (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep going past the end-of-text token.
    #[arg(long)]
    pub no_stop: bool,
    /// Color each token by whether it used one or two experts.
    #[arg(long)]
    pub show_routing: bool,
    /// With --show-routing: list each token's experts and weights per MoE layer.
    #[arg(long, short)]
    pub verbose: bool,
    /// Print JSON (tokens, ids, per-token routing) instead of text.
    #[arg(long)]
    pub json: bool,
    /// With --json: each token's logits too (the row it was chosen from), for
    /// comparing two runtimes, e.g. the browser build against this one.
    #[arg(long, requires = "json")]
    pub logits: bool,
}

/// ANSI colors for 0 / some / most MoE layers using two experts.
struct Painter {
    color: bool,
}

impl Painter {
    fn new() -> Self {
        Painter {
            color: std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal(),
        }
    }

    fn paint(&self, text: &str, routes: &[LayerRoute]) -> String {
        let two = routes.iter().filter(|r| r.experts.len() > 1).count();
        if two == 0 || routes.is_empty() {
            return text.to_string();
        }
        let most = 2 * two > routes.len();
        if self.color {
            let code = if most { "1;31" } else { "33" };
            format!("\x1b[{code}m{text}\x1b[0m")
        } else if most {
            format!("[[{text}]]")
        } else {
            format!("[{text}]")
        }
    }

    fn legend(&self) -> &'static str {
        if self.color {
            "plain: one expert in every MoE layer; \x1b[33myellow\x1b[0m: two experts in some layers; \x1b[1;31mred\x1b[0m: two experts in most layers"
        } else {
            "plain: one expert in every MoE layer; [x]: two experts in some layers; [[x]]: two experts in most layers"
        }
    }
}

fn route_line(routes: &[LayerRoute]) -> String {
    routes
        .iter()
        .map(|r| {
            let parts: Vec<String> = r
                .experts
                .iter()
                .zip(&r.weights)
                .map(|(e, w)| format!("e{e} {w:.2}"))
                .collect();
            format!("L{}: {}", r.layer, parts.join(" + "))
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

#[derive(Serialize)]
struct GenerateJson<'a> {
    adapter: String,
    checkpoint: &'a str,
    gating: String,
    threshold: f32,
    sampling: Sampling,
    prompt: &'a str,
    prompt_ids: &'a [u32],
    prompt_routes: &'a [Vec<LayerRoute>],
    tokens: &'a [GenToken],
    ids: Vec<u32>,
    text: &'a str,
    stop: amoe::infer::StopReason,
    slides: usize,
    prefill_tps: f64,
    decode_tps: f64,
}

pub fn generate(ctx: &GpuContext, args: &GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    sampling.validate()?;
    if args.max_tokens == 0 {
        return Err(Error::invalid("generate", "--max-tokens 0: nothing to do"));
    }
    if args.prompt.trim().is_empty() {
        return Err(Error::invalid(
            "generate",
            "empty prompt (give --prompt some text)",
        ));
    }
    let ck = args.model.load()?;
    let gate = ck.gate(args.model.gating.map(Gating::from), args.model.threshold)?;
    let prompt_ids = ck.tokenizer.encode(&args.prompt)?;
    let mut engine = Engine::new(ctx, &ck, gate)?;
    let cfg = GenConfig {
        max_tokens: args.max_tokens,
        sampling,
        stop_at_eot: !args.no_stop,
        logits: args.logits,
    };
    let painter = Painter::new();
    let stream = !args.json;
    let mut out = std::io::stdout().lock();
    if stream && !args.show_routing {
        let _ = write!(out, "{}", args.prompt);
        let _ = out.flush();
    }
    let mut ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let tk = &ck.tokenizer;
    let g: Generation = pollster::block_on(engine.generate(ctx, tk, &prompt_ids, &cfg, |t| {
        if !stream {
            return;
        }
        if args.show_routing {
            // Colored output is printed whole at the end, prompt included.
            return;
        }
        ids.push(t.id);
        // Print whole characters only: a token can end mid-character.
        if let Ok(text) = tk.decode(&ids) {
            if !text.ends_with('\u{FFFD}') {
                if let Some(new) = text.get(printed..) {
                    let _ = write!(out, "{new}");
                    let _ = out.flush();
                    printed = text.len();
                }
            }
        }
    }))?;
    let gating = format!("{:?}", gate.gating).to_lowercase();
    let prefill_tps = g.prompt_ids.len() as f64 / g.prefill_s.max(1e-9);
    let decode_tps = g.tokens.len() as f64 / g.decode_s.max(1e-9);
    if args.json {
        let j = GenerateJson {
            adapter: ctx.adapter_label(),
            checkpoint: &ck.source,
            gating,
            threshold: gate.threshold,
            sampling,
            prompt: &args.prompt,
            prompt_ids: &g.prompt_ids,
            prompt_routes: &g.prompt_routes,
            tokens: &g.tokens,
            ids: g.ids(),
            text: &g.text,
            stop: g.stop,
            slides: g.slides,
            prefill_tps,
            decode_tps,
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    if args.show_routing {
        for (&id, r) in g.prompt_ids.iter().zip(&g.prompt_routes) {
            let _ = write!(out, "{}", painter.paint(&tk.decode(&[id])?, r));
        }
        for t in &g.tokens {
            let _ = write!(out, "{}", painter.paint(&t.text, &t.routes));
        }
    } else if let Some(rest) = g.text.get(printed..) {
        let _ = write!(out, "{rest}");
    }
    let _ = writeln!(out);
    if args.show_routing {
        let _ = writeln!(out, "\n{}", painter.legend());
        if args.verbose {
            let _ = writeln!(out);
            let all = g
                .prompt_ids
                .iter()
                .zip(&g.prompt_routes)
                .map(|(&id, r)| (id, r))
                .chain(g.tokens.iter().map(|t| (t.id, &t.routes)));
            for (id, r) in all {
                let _ = writeln!(
                    out,
                    "{:>6} {:<16} {}",
                    id,
                    format!("{:?}", tk.decode(&[id])?),
                    route_line(r)
                );
            }
        }
    }
    drop(out);
    eprintln!(
        "{} tokens: prefill {} tokens at {:.0} tok/s, decode {:.1} tok/s, {} on {}{}",
        g.tokens.len(),
        g.prompt_ids.len(),
        prefill_tps,
        decode_tps,
        if gate.gating == Gating::Adaptive {
            format!("gating adaptive (threshold {})", gate.threshold)
        } else {
            format!("gating {gating}")
        },
        ctx.adapter_label(),
        match g.slides {
            0 => String::new(),
            s => format!(", context window slid {s} time(s)"),
        }
    );
    Ok(())
}

#[derive(clap::Args, Clone, Debug)]
pub struct RoutesArgs {
    #[command(flatten)]
    pub model: ModelPick,
    /// Text to analyze: a file or directory (.txt, .md, .jsonl, .jsonl.gz).
    /// Default: the held-out part of the shipped corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Analyze at most this many tokens.
    #[arg(long, default_value_t = 16384)]
    pub max_tokens: usize,
    /// Words seen fewer times are left out of the word lists.
    #[arg(long, default_value_t = 5)]
    pub min_count: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn routes(ctx: &GpuContext, args: &RoutesArgs) -> Result<()> {
    if args.max_tokens == 0 {
        return Err(Error::invalid("routes", "--max-tokens 0: nothing to do"));
    }
    let ck = args.model.load()?;
    // Default rule: the one the model was trained with (top-1 routes
    // every token to one expert, which would show nothing).
    let gating = args
        .model
        .gating
        .map(Gating::from)
        .unwrap_or(ck.cfg.gate.gating);
    let gate = ck.gate(Some(gating), args.model.threshold)?;
    let docs = match &args.data {
        Some(p) => Corpus::load(p)?.docs,
        None => Corpus::shipped(shipped_dir(), Domain::Both)?.split()?.val,
    };
    let mut ids = Vec::new();
    for d in &docs {
        if ids.len() >= args.max_tokens {
            break;
        }
        ids.extend(ck.tokenizer.encode(&d.text)?);
        ids.push(ck.tokenizer.eot_id());
    }
    ids.truncate(args.max_tokens);
    let mut engine = Engine::new(ctx, &ck, gate)?;
    let quiet = args.json || !std::io::stderr().is_terminal();
    let report = pollster::block_on(analyze(
        &mut engine,
        ctx,
        &ck.tokenizer,
        &ids,
        args.min_count,
        |done, total| {
            if !quiet {
                eprint!("\r{done}/{total} tokens");
            }
        },
    ))?;
    if !quiet {
        eprintln!();
    }
    if args.json {
        #[derive(Serialize)]
        struct J<'a> {
            adapter: String,
            checkpoint: &'a str,
            #[serde(flatten)]
            report: &'a RoutesReport,
        }
        let j = J {
            adapter: ctx.adapter_label(),
            checkpoint: &ck.source,
            report: &report,
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print_routes(&report, &ck.source, &ctx.adapter_label());
    }
    Ok(())
}

fn print_routes(r: &RoutesReport, source: &str, adapter: &str) {
    println!(
        "{} tokens of text through {source} on {adapter}, gating {} (threshold {})",
        r.tokens, r.gating, r.threshold
    );
    println!(
        "two-expert fraction over all MoE layers: {:.1}%\n",
        100.0 * r.two_expert_fraction
    );
    let e = r.layers.first().map_or(0, |l| l.expert_load.len());
    print!(
        "{:<6} {:>8}  load per expert (% of routed pairs)",
        "layer", "2-expert"
    );
    println!();
    print!("{:<6} {:>8} ", "", "");
    for i in 0..e {
        print!(" {:>5}", format!("e{i}"));
    }
    println!();
    for l in &r.layers {
        print!("{:<6} {:>7.1}% ", l.layer, 100.0 * l.two_expert_fraction);
        for x in &l.expert_load {
            print!(" {:>5.1}", 100.0 * x);
        }
        println!();
    }
    println!(
        "\nwords that most often take two experts (seen >= {} times):",
        r.min_count
    );
    println!("{:<20} {:>6} {:>9}", "word", "count", "2-expert");
    for w in &r.most_two_expert_words {
        println!(
            "{:<20} {:>6} {:>8.1}%",
            w.word,
            w.count,
            100.0 * w.two_expert_fraction
        );
    }
    println!("\nfrequent words that never took two experts:");
    println!("{:<20} {:>6}", "word", "count");
    for w in &r.never_two_expert_words {
        println!("{:<20} {:>6}", w.word, w.count);
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchInferArgs {
    #[command(flatten)]
    pub model: ModelPick,
    /// Prompt tokens of the prefill (from the held-out shipped text; at most the context).
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// Tokens of the decode loop.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Write the JSON to this file as well as stdout.
    #[arg(long)]
    pub json: Option<String>,
}

pub fn bench_infer(ctx: &GpuContext, args: &BenchInferArgs) -> Result<String> {
    let ck = args.model.load()?;
    let n = ck.cfg.context;
    // Leave room to decode after the prompt (a context of 1 leaves none).
    let p = args
        .prompt_tokens
        .unwrap_or(n / 2)
        .clamp(1, n.saturating_sub(1).max(1));
    let val = Corpus::shipped(shipped_dir(), Domain::Both)?.split()?.val;
    let mut ids = Vec::new();
    for d in &val {
        ids.extend(ck.tokenizer.encode(&d.text)?);
        if ids.len() >= p {
            break;
        }
    }
    if ids.len() < p {
        return Err(Error::invalid(
            "bench infer",
            format!("held-out text has only {} tokens", ids.len()),
        ));
    }
    ids.truncate(p);
    let gatings = match args.model.gating {
        Some(g) => vec![g.into()],
        None => vec![Gating::Top1, Gating::Top2, Gating::Adaptive],
    };
    let r = pollster::block_on(amoe::bench::bench_infer(
        ctx,
        &ck,
        &ids,
        args.decode_tokens,
        &gatings,
        |m| eprintln!("   {m}"),
    ))?;
    Ok(serde_json::to_string_pretty(&r)?)
}
