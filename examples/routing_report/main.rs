//! A routing report from the library: run a text through a checkpoint under
//! adaptive gating and print, per MoE layer, the two-expert fraction and the
//! busiest experts, then the words that most often take two experts.
//! See README.md in this folder.
//!
//! Usage: cargo run --release --example routing_report -- [TEXT_FILE] [CHECKPOINT_DIR]

use amoe::gpu::{AdapterFilter, GpuContext};
use amoe::infer::checkpoint::demo_dir;
use amoe::infer::routes::analyze;
use amoe::infer::{Engine, InferCheckpoint};
use amoe::kernels::Gating;

const DEFAULT_TEXT: &str = "In the beginning God created the heaven and the earth. \
And the earth was without form, and void; and darkness was upon the face of the deep. \
And the Spirit of God moved upon the face of the waters. And God said, Let there be light: \
and there was light. And God saw the light, that it was good: and God divided the light \
from the darkness. To be, or not to be, that is the question: Whether 'tis nobler in the \
mind to suffer the slings and arrows of outrageous fortune, or to take arms against a sea \
of troubles, and by opposing end them.";

fn main() -> amoe::Result<()> {
    let mut args = std::env::args().skip(1);
    let text = match args.next() {
        Some(path) => std::fs::read_to_string(&path).map_err(|source| amoe::Error::Io {
            path: path.clone(),
            source,
        })?,
        None => DEFAULT_TEXT.to_string(),
    };
    let dir = args.next().map(Into::into).unwrap_or_else(demo_dir);
    let ck = InferCheckpoint::load(&dir)?;
    let ctx = pollster::block_on(GpuContext::new(&AdapterFilter::from_args(None, None)?))?;
    let gate = ck.gate(Some(Gating::Adaptive), None)?;
    let mut engine = Engine::new(&ctx, &ck, gate)?;
    let ids = ck.tokenizer.encode(&text)?;
    let r = pollster::block_on(analyze(
        &mut engine,
        &ctx,
        &ck.tokenizer,
        &ids,
        2,
        |_, _| {},
    ))?;
    println!(
        "{} tokens on {}, adaptive gating (threshold {}): {:.1}% of (token, layer) routes used two experts",
        r.tokens,
        ctx.adapter_label(),
        r.threshold,
        100.0 * r.two_expert_fraction
    );
    for l in &r.layers {
        let mut load: Vec<(usize, f64)> = l.expert_load.iter().cloned().enumerate().collect();
        load.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<String> = load
            .iter()
            .take(3)
            .map(|(e, x)| format!("e{e} {:.0}%", 100.0 * x))
            .collect();
        println!(
            "layer {}: two experts for {:.1}% of tokens; busiest experts {}",
            l.layer,
            100.0 * l.two_expert_fraction,
            top.join(", ")
        );
    }
    println!("\nwords that most often take two experts:");
    for w in r.most_two_expert_words.iter().take(8) {
        println!(
            "  {:<14} x{:<3} {:.0}%",
            w.word,
            w.count,
            100.0 * w.two_expert_fraction
        );
    }
    println!("words seen twice or more that never did:");
    for w in r.never_two_expert_words.iter().take(8) {
        println!("  {:<14} x{}", w.word, w.count);
    }
    Ok(())
}
