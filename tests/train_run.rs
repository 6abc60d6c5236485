//! A whole training run on the GPU with a tiny model and a small text file:
//! checkpoints round-trip exactly, a resumed run ends with the parameters of
//! an uninterrupted one (data order, optimizer state and curriculum
//! included), and bad checkpoints or data give typed errors.

mod common;

use amoe::gpu::GpuContext;
use amoe::kernels::Gating;
use amoe::train::trainer::{DataSource, Quiet, Run, TrainConfig};
use amoe::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// A scratch directory, removed when the test ends (passed or failed).
fn tmp(name: &str) -> common::Scratch {
    common::Scratch::new("amoe-train-run", name)
}

fn text_file(dir: &Path) -> PathBuf {
    let lines = [
        "The quick brown fox jumps over the lazy dog.",
        "A journey of a thousand miles begins with a single step.",
        "All that glitters is not gold; all who wander are not lost.",
        "To be, or not to be: that is the question.",
        "In the beginning was the word, and the word was with God.",
    ];
    let mut s = String::new();
    for i in 0..2 {
        for l in &lines {
            s.push_str(&format!("{l} ({i})\n"));
        }
    }
    let p = dir.join("corpus.txt");
    std::fs::write(&p, s).unwrap();
    p
}

fn tiny(data: PathBuf, steps: u64) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.d = 32;
    c.model.layers = 2;
    c.model.heads = 2;
    c.model.context = 16;
    c.model.ffn = 32;
    c.model.experts = 4;
    c.model.gate.gating = Gating::Adaptive;
    c.model.gate.threshold = 0.5;
    c.vocab_size = 300;
    c.batch = 4;
    c.steps = steps;
    c.warmup = 2;
    c.eval_every = 3;
    c.eval_batches = 2;
    c.checkpoint_every = 0;
    c.data = DataSource::Path(data);
    c
}

fn train(ctx: &GpuContext, run: &mut Run) {
    let stop = AtomicBool::new(false);
    pollster::block_on(run.train(ctx, &mut Quiet, &stop)).unwrap();
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir = tmp("resume");
    let data = text_file(&dir);
    common::for_each_adapter(|ctx| {
        let a_dir = dir.join(format!("a-{}", ctx.backend()));
        let b_dir = dir.join(format!("b-{}", ctx.backend()));
        let mut a = Run::new(ctx, tiny(data.clone(), 8), &a_dir).unwrap();
        let per_epoch = a.data.dataset.train.len().div_ceil(4);
        assert!(
            per_epoch < 8,
            "the run must cross an epoch (curriculum order): {per_epoch} batches per epoch"
        );
        train(ctx, &mut a);
        let want = pollster::block_on(a.model.download(ctx)).unwrap();

        // Interrupted after 4 of the 8 steps (as Ctrl-C does), then resumed.
        let mut b = Run::new(ctx, tiny(data.clone(), 8), &b_dir).unwrap();
        b.pause_at = Some(4);
        train(ctx, &mut b);
        drop(b);
        let mut b = Run::resume(ctx, &b_dir, None).unwrap();
        assert_eq!(b.done, 4);
        train(ctx, &mut b);
        let got = pollster::block_on(b.model.download(ctx)).unwrap();
        assert_eq!(
            got, want,
            "resumed parameters differ from the uninterrupted run"
        );
    });
}

#[test]
fn checkpoint_round_trip_is_exact_and_bad_checkpoints_are_typed_errors() {
    let dir = tmp("ckpt");
    let data = text_file(&dir);
    common::for_each_adapter(|ctx| {
        let out = dir.join(format!("run-{}", ctx.backend()));
        let mut run = Run::new(ctx, tiny(data.clone(), 2), &out).unwrap();
        train(ctx, &mut run);
        let saved = pollster::block_on(run.model.download(ctx)).unwrap();
        let m_saved = pollster::block_on(run.step.m.blocks[0].wqkv.read(ctx)).unwrap();
        let back = Run::resume(ctx, &out, None).unwrap();
        assert_eq!(pollster::block_on(back.model.download(ctx)).unwrap(), saved);
        assert_eq!(
            pollster::block_on(back.step.m.blocks[0].wqkv.read(ctx)).unwrap(),
            m_saved
        );
        assert!(out.join("metrics.jsonl").exists() && out.join("loss.svg").exists());

        // A truncated tensor file.
        let ck = out.join("checkpoint");
        let bad = dir.join(format!("bad-{}", ctx.backend()));
        copy_dir(&ck, &bad.join("checkpoint"));
        let f = bad.join("checkpoint/model.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            Run::resume(ctx, &bad, None),
            Err(Error::Checkpoint { .. })
        ));

        // A config whose shapes do not match the tensors.
        copy_dir(&ck, &bad.join("checkpoint"));
        let cfg_path = bad.join("checkpoint/config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["d"] = serde_json::json!(64);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        assert!(Run::resume(ctx, &bad, None).is_err());

        // A tokenizer of another vocabulary.
        copy_dir(&ck, &bad.join("checkpoint"));
        let other = amoe::tokenizer::Tokenizer::train(["abc def ghi"].iter(), 257).unwrap();
        std::fs::write(bad.join("checkpoint/tokenizer.json"), other.to_json()).unwrap();
        assert!(matches!(
            Run::resume(ctx, &bad, None),
            Err(Error::Checkpoint { .. })
        ));
    });
}

#[test]
fn missing_or_empty_corpus_is_a_typed_error() {
    let dir = tmp("data");
    common::for_each_adapter(|ctx| {
        let missing = tiny(dir.join("nope.txt"), 1);
        assert!(matches!(
            Run::new(ctx, missing, &dir.join("o1")),
            Err(Error::Data { .. } | Error::Io { .. })
        ));
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "  \n").unwrap();
        assert!(Run::new(ctx, tiny(empty, 1), &dir.join("o2")).is_err());
    });
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tmp("nan");
    let data = text_file(&dir);
    common::for_each_adapter(|ctx| {
        let out = dir.join(format!("run-{}", ctx.backend()));
        let mut run = Run::new(ctx, tiny(data.clone(), 4), &out).unwrap();
        run.pause_at = Some(2);
        train(ctx, &mut run);
        // Poison the unembedding: the next loss is NaN.
        run.pause_at = None;
        let w_out = run.model.params.w_out.as_ref().unwrap();
        w_out.write(ctx, &vec![f32::NAN; w_out.numel()]).unwrap();
        let stop = AtomicBool::new(false);
        let r = pollster::block_on(run.train(ctx, &mut Quiet, &stop));
        match r {
            Err(Error::NonFinite { msg, .. }) => assert!(msg.contains("step 3"), "{msg}"),
            other => panic!(
                "expected a NonFinite error, got {:?}",
                other.map(|s| s.steps)
            ),
        }
        let back = Run::resume(ctx, &out, None).unwrap();
        assert_eq!(back.done, 2);
        let host = pollster::block_on(back.model.download(ctx)).unwrap();
        assert!(host.values().all(|t| t.data.iter().all(|x| x.is_finite())));
    });
}

/// The browser's training session on a text equals `amoe train --data FILE`
/// on a file of that name: same split, tokenizer, batches, parameters and
/// steps (the browser test then compares the page against the binary).
#[test]
fn session_on_text_equals_run_on_file() {
    use amoe::train::session::{Session, SessionConfig};
    let dir = tmp("session");
    let data = text_file(&dir);
    let text = std::fs::read_to_string(&data).unwrap();
    let sc = SessionConfig {
        d: 32,
        layers: 2,
        heads: 2,
        context: 16,
        ffn: 32,
        experts: 4,
        vocab: 300,
        batch: 4,
        steps: 3,
        warmup: 2,
        threshold: 0.5,
        ..SessionConfig::default()
    };
    let mut cfg = sc.train_config().unwrap();
    cfg.data = DataSource::Path(data.clone());
    cfg.eval_every = 0;
    common::for_each_adapter(|ctx| {
        let mut run = Run::new(ctx, cfg.clone(), &dir.join(ctx.backend())).unwrap();
        let mut s = Session::from_text(ctx, sc.clone(), "corpus.txt", &text).unwrap();
        assert_eq!(s.data.tokenizer.to_json(), run.data.tokenizer.to_json());
        assert_eq!(s.data.dataset.train, run.data.dataset.train);
        for _ in 0..3 {
            let a = pollster::block_on(run.session.step(ctx)).unwrap();
            let b = pollster::block_on(s.step(ctx)).unwrap();
            assert_eq!((a.step, a.loss, a.lr), (b.step, b.loss, b.lr));
            assert_eq!(a.two_expert_fraction, b.two_expert_fraction);
        }
        let ha = pollster::block_on(run.model.download(ctx)).unwrap();
        let hb = pollster::block_on(s.model.download(ctx)).unwrap();
        assert_eq!(ha, hb);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn session_config_errors_are_typed() {
    use amoe::train::session::SessionConfig;
    let bad = SessionConfig {
        gating: "top3".into(),
        ..SessionConfig::default()
    };
    assert!(matches!(bad.train_config(), Err(Error::Choice { .. })));
    let bad = SessionConfig {
        heads: 3,
        ..SessionConfig::default()
    };
    assert!(bad.train_config().is_err());
    let parsed: Result<SessionConfig, _> = serde_json::from_str(r#"{"stepz": 3}"#);
    assert!(parsed.is_err(), "unknown fields are refused");
}
