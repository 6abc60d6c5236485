//! `amoe generate`: flags, streaming output, routing colors, JSON.

use super::args::{AdapterArgs, ModelPick};
use super::with_ctx;
use amoe::gpu::GpuContext;
use amoe::infer::{Engine, GenConfig, GenToken, Generation, LayerRoute, Sampling};
use amoe::kernels::Gating;
use amoe::{Error, Result};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

pub fn run(adapter: &AdapterArgs, args: &GenerateArgs) -> Result<ExitCode> {
    with_ctx(adapter, |ctx| generate(ctx, args))
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

fn generate(ctx: &GpuContext, args: &GenerateArgs) -> Result<()> {
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
    // " " is a prompt (one token); only no text at all is none.
    if args.prompt.is_empty() {
        return Err(Error::invalid(
            "generate",
            "empty prompt (give --prompt some text)",
        ));
    }
    let ck = args.model.load()?;
    let gates = args.model.gates(&ck, args.model.gating)?;
    let gate = gates.gate;
    let prompt_ids = ck.tokenizer.encode(&args.prompt)?;
    let mut slow = Some(super::SlowStart::notice(
        std::time::Duration::from_secs(2),
        "compiling kernels (a first run on this adapter; the driver's cache makes later runs start at once)...",
    ));
    let mut engine = Engine::with_dtype(ctx, &ck, gates, args.model.storage())?;
    let cfg = GenConfig {
        max_tokens: args.max_tokens,
        sampling,
        stop_at_eot: !args.no_stop,
        logits: args.logits,
    };
    let painter = Painter::new();
    let stream = !args.json;
    let mut out = Out::new();
    if stream && !args.show_routing {
        out.put(&args.prompt);
    }
    let mut ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let tk = &ck.tokenizer;
    let g: Generation = pollster::block_on(engine.generate(ctx, tk, &prompt_ids, &cfg, |t| {
        slow.take();
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
                    out.put(new);
                    printed = text.len();
                }
            }
        }
    }))?;
    drop(slow);
    let gating = gate.gating.to_string();
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
        out.put(format!("{}\n", serde_json::to_string_pretty(&j)?));
        return out.finish();
    }
    if args.show_routing {
        for (&id, r) in g.prompt_ids.iter().zip(&g.prompt_routes) {
            out.put(painter.paint(&tk.decode(&[id])?, r));
        }
        for t in &g.tokens {
            out.put(painter.paint(&t.text, &t.routes));
        }
    } else if let Some(rest) = g.text.get(printed..) {
        out.put(rest);
    }
    out.put("\n");
    if args.show_routing {
        out.put(format!("\n{}\n", painter.legend()));
        if args.verbose {
            out.put("\n");
            let all = g
                .prompt_ids
                .iter()
                .zip(&g.prompt_routes)
                .map(|(&id, r)| (id, r))
                .chain(g.tokens.iter().map(|t| (t.id, &t.routes)));
            for (id, r) in all {
                out.put(format!(
                    "{:>6} {:<16} {}\n",
                    id,
                    format!("{:?}", tk.decode(&[id])?),
                    route_line(r)
                ));
            }
        }
    }
    out.finish()?;
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

/// Standard output for streamed text: each piece written and flushed at
/// once; the first failure (a closed pipe, a full disk) is kept, nothing
/// more is written, and `finish` reports it as an error.
struct Out {
    w: std::io::StdoutLock<'static>,
    err: Option<std::io::Error>,
}

impl Out {
    fn new() -> Out {
        Out {
            w: std::io::stdout().lock(),
            err: None,
        }
    }

    fn put(&mut self, text: impl std::fmt::Display) {
        if self.err.is_none() {
            if let Err(e) = write!(self.w, "{text}").and_then(|()| self.w.flush()) {
                self.err = Some(e);
            }
        }
    }

    fn finish(self) -> Result<()> {
        match self.err {
            None => Ok(()),
            Some(source) => Err(Error::Io {
                path: "standard output".into(),
                source,
            }),
        }
    }
}
