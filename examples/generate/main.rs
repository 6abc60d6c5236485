//! Generation from the library: load a checkpoint (default: the demo in
//! data/demo), build an engine, stream tokens through a callback, then
//! print what the engine measured. See README.md in this folder.
//!
//! Usage: cargo run --release --example generate -- [PROMPT] [CHECKPOINT_DIR]

use amoe::gpu::{AdapterFilter, GpuContext};
use amoe::infer::checkpoint::demo_dir;
use amoe::infer::{Engine, GenConfig, InferCheckpoint, Sampling};
use amoe::kernels::Gating;
use std::io::Write;

fn main() -> amoe::Result<()> {
    let mut args = std::env::args().skip(1);
    let prompt = args
        .next()
        .unwrap_or_else(|| "In the beginning".to_string());
    let dir = args.next().map(Into::into).unwrap_or_else(demo_dir);
    let ck = InferCheckpoint::load(&dir)?;
    let ctx = pollster::block_on(GpuContext::new(&AdapterFilter::from_args(None, None)?))?;
    // Adaptive gating at inference (None: the rule the run validated with).
    let gate = ck.gate(Some(Gating::Adaptive), None)?;
    let mut engine = Engine::new(&ctx, &ck, gate)?;
    let ids = ck.tokenizer.encode(&prompt)?;
    let cfg = GenConfig {
        max_tokens: 48,
        sampling: Sampling {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            seed: 1,
        },
        stop_at_eot: true,
        logits: false,
    };
    print!("{prompt}");
    let g = pollster::block_on(engine.generate(&ctx, &ck.tokenizer, &ids, &cfg, |tok| {
        print!("{}", tok.text);
        let _ = std::io::stdout().flush();
    }))?;
    println!();
    let two = g.tokens.iter().filter(|t| t.max_experts() > 1).count();
    println!(
        "\n{} tokens on {} ({:?} gating): prefill {:.0} tok/s, decode {:.1} tok/s; {} of them used two experts in some layer; {} GPU bytes",
        g.tokens.len(),
        ctx.adapter_label(),
        gate.gating,
        g.prompt_ids.len() as f64 / g.prefill_s,
        g.tokens.len() as f64 / g.decode_s,
        two,
        engine.gpu_bytes()
    );
    Ok(())
}
