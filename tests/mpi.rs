//! `amoe train --distributed` under `mpirun -np 2` (both ranks on the first
//! adapter of this machine, with the kernels that compile fastest) against a one-process `amoe train` with the same
//! global batch: the same checkpoint within float reassociation, resumed
//! across rank counts, a rank killed mid-run, and bad input. Needs the `mpi`
//! feature and Open MPI's `mpirun` (the test command installs both).
#![cfg(all(feature = "mpi", target_os = "linux"))]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_amoe");

/// A tiny adaptive-gating run (the curriculum on) on a few sonnets.
fn tiny(data: &Path, steps: u64) -> Vec<String> {
    [
        "--d",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--experts",
        "4",
        "--ffn",
        "32",
        "--context",
        "16",
        "--batch",
        "4",
        "--vocab",
        "300",
        "--warmup",
        "2",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--checkpoint-every",
        "2",
        "--gating",
        "adaptive",
        "--backend",
        "vulkan",
        "--quick-start",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--data".into(),
        data.display().to_string(),
        "--steps".into(),
        steps.to_string(),
    ])
    .collect()
}

/// `mpirun` with what a root CI container needs (two slots on any machine).
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string()]);
    if nix_root() {
        c.arg("--allow-run-as-root");
    }
    // Shared memory and loopback only: no network probing in a container.
    c.args([
        "--mca",
        "btl",
        "self,vader",
        "--mca",
        "btl_vader_single_copy_mechanism",
        "none",
    ]);
    c
}

fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn one(args: &[String], out: &Path) -> Output {
    ok(
        Command::new(BIN)
            .arg("train")
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap(),
        "amoe train",
    )
}

fn ranks(np: usize, args: &[String], out: &Path) -> Output {
    ok(
        mpirun(np)
            .arg(BIN)
            .args(["train", "--distributed"])
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap(),
        "mpirun amoe train --distributed",
    )
}

/// The checkpoint's tensors, by name.
fn tensors(run: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(run.join("checkpoint/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, bytemuck::pod_collect_to_vec(t.data())))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn max_diff(a: &Path, b: &Path) -> f32 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    ta.iter()
        .zip(&tb)
        .flat_map(|((na, x), (nb, y))| {
            assert_eq!(na, nb);
            x.iter().zip(y).map(|(u, v)| (u - v).abs())
        })
        .fold(0.0, f32::max)
}

fn losses(run: &Path) -> Vec<(String, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                format!("{} {}", v["kind"].as_str().unwrap(), v["step"]),
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn two_ranks_resume_across_rank_counts_and_survive_a_killed_rank() {
    let dir = common::Scratch::new("amoe-mpi", "runs");
    let data = common::sonnets(&dir, 40);
    let six = tiny(&data, 6);
    let clock = Instant::now();
    let a = dir.join("one");
    one(&six, &a);
    let b = dir.join("two");
    let out = ranks(2, &six, &b);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 1 of 2") && err.contains("2 sequences of each global batch of 4"),
        "{err}"
    );
    // Only rank 0 printed the summary.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("steps in")
            .count(),
        1
    );
    let d = max_diff(&a, &b);
    eprintln!(
        "[{:.0} s] 2 ranks vs 1 process, 6 steps: max |param diff| {d:.2e}",
        clock.elapsed().as_secs_f64()
    );
    assert!(d <= 1e-5, "2 ranks differ from one process by {d}");
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), lb.len(), "metrics lines: {la:?} vs {lb:?}");
    for ((ka, x), (kb, y)) in la.iter().zip(&lb) {
        assert_eq!(ka, kb);
        assert!((x - y).abs() <= 1e-4 * x.abs(), "{ka}: {x} vs {y}");
    }

    // Stopped at step 3 on two ranks, resumed on one; and the other way.
    let c = dir.join("two-then-one");
    let mut stop = six.clone();
    stop.extend(["--stop-at".to_string(), "3".to_string()]);
    ranks(2, &stop, &c);
    ok(
        Command::new(BIN)
            .args(["train", "--backend", "vulkan", "--quick-start", "--resume"])
            .arg(&c)
            .output()
            .unwrap(),
        "amoe train --resume",
    );
    let d = max_diff(&a, &c);
    assert!(d <= 1e-5, "2 ranks then 1 differ from one process by {d}");
    let e = dir.join("one-then-two");
    one(&stop, &e);
    ok(
        mpirun(2)
            .arg(BIN)
            .args([
                "train",
                "--distributed",
                "--backend",
                "vulkan",
                "--quick-start",
                "--resume",
            ])
            .arg(&e)
            .output()
            .unwrap(),
        "mpirun amoe train --distributed --resume",
    );
    let d = max_diff(&a, &e);
    assert!(d <= 1e-5, "1 rank then 2 differ from one process by {d}");
    eprintln!(
        "[{:.0} s] resumed across rank counts",
        clock.elapsed().as_secs_f64()
    );

    // Experts split over the ranks: the same run; its checkpoint holds
    // every rank's experts; stopped and resumed either way (the AdamW
    // moments of each rank's experts go into and come out of it).
    let ep: Vec<String> = six
        .iter()
        .cloned()
        .chain(["--expert-parallel".to_string()])
        .collect();
    let f = dir.join("two-experts-split");
    let out = ranks(2, &ep, &f);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("experts split over 2 ranks"), "{said}");
    let d = max_diff(&a, &f);
    assert!(
        d <= 1e-5,
        "experts split over 2 ranks differ from one process by {d}"
    );
    let g = dir.join("split-then-one");
    let mut ep_stop = ep.clone();
    ep_stop.extend(["--stop-at".to_string(), "3".to_string()]);
    ranks(2, &ep_stop, &g);
    ok(
        Command::new(BIN)
            .args(["train", "--backend", "vulkan", "--quick-start", "--resume"])
            .arg(&g)
            .output()
            .unwrap(),
        "amoe train --resume of an expert-parallel run",
    );
    let d = max_diff(&a, &g);
    assert!(d <= 1e-5, "split experts then 1 process differ by {d}");
    let h = dir.join("one-then-split");
    one(&stop, &h);
    ok(
        mpirun(2)
            .arg(BIN)
            .args([
                "train",
                "--distributed",
                "--expert-parallel",
                "--backend",
                "vulkan",
                "--quick-start",
                "--resume",
            ])
            .arg(&h)
            .output()
            .unwrap(),
        "mpirun amoe train --distributed --expert-parallel --resume",
    );
    let d = max_diff(&a, &h);
    assert!(d <= 1e-5, "1 process then split experts differ by {d}");
    eprintln!(
        "[{:.0} s] experts split over 2 ranks: the same run, resumed either way",
        clock.elapsed().as_secs_f64()
    );

    // A rank killed mid-run: the job ends within a bounded time with an
    // error, the last checkpoint loads, and resuming it on one process
    // ends where the uninterrupted run did.
    let k = dir.join("killed");
    let long = with(&tiny(&data, 30), "--checkpoint-every", "1");
    let a30 = dir.join("one-30");
    one(&long, &a30);
    let mut child = mpirun(2)
        .arg(BIN)
        .args(["train", "--distributed"])
        .args(&long)
        .arg("--out")
        .arg(&k)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !k.join("checkpoint/state.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = rank_pid(&k, 1).expect("rank 1's process");
    let rank0 = rank_pid(&k, 0).expect("rank 0's process");
    unsafe_kill(victim);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the job did not end within 2 minutes of a rank's death"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a job whose rank died exited 0");
    // Rank 0 waited on the dead rank: it must be gone too, within its
    // watchdog's grace (10 s plus three steps).
    while running(rank0) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "rank 0 still runs 2 minutes after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = start.elapsed();
    amoe::infer::InferCheckpoint::load(&k).expect("the last checkpoint loads");
    let killed_at = losses(&k)
        .iter()
        .filter(|(k, _)| k.starts_with("train"))
        .count();
    ok(
        Command::new(BIN)
            .args(["train", "--backend", "vulkan", "--quick-start", "--resume"])
            .arg(&k)
            .output()
            .unwrap(),
        "amoe train --resume after a killed rank",
    );
    let d = max_diff(&a30, &k);
    eprintln!(
        "rank 1 killed after {killed_at} steps: the job ended {:.1} s later ({status}); resumed on one process: max |param diff| {d:.2e}; {:.0} s in all",
        ended.as_secs_f64(),
        clock.elapsed().as_secs_f64()
    );
    assert!(
        d <= 1e-5,
        "the resumed run differs from the uninterrupted one by {d}"
    );
}

/// `args` with `flag`'s value replaced.
fn with(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut v = args.to_vec();
    let i = v.iter().position(|a| a == flag).unwrap();
    v[i + 1] = value.to_string();
    v
}

/// The pid of the `amoe` process of `rank` whose command line names `out`.
fn rank_pid(out: &Path, rank: usize) -> Option<i32> {
    let want = out.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.starts_with(BIN) || !cmd.contains(&want) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let r = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == r.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Whether `pid` runs (not a zombie: an ended rank whose launcher has gone
/// may wait a while to be reaped).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        !matches!(state, Some("Z") | Some("X"))
    })
}

fn unsafe_kill(pid: i32) {
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn distributed_without_a_launcher_or_with_disagreeing_ranks_is_refused() {
    let dir = common::Scratch::new("amoe-mpi", "bad");
    let data = common::sonnets(&dir, 40);
    let out = Command::new(BIN)
        .args(["train", "--distributed"])
        .args(tiny(&data, 2))
        .arg("--out")
        .arg(dir.join("x"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--distributed needs an MPI launcher"), "{err}");
    assert!(!dir.join("x").exists(), "a refused run wrote its --out");

    // Rank 1 is given another learning rate (MPMD launch: one command per rank).
    let args = tiny(&data, 2);
    let start = Instant::now();
    let out = mpirun(1)
        .arg(BIN)
        .args(["train", "--distributed"])
        .args(&args)
        .arg("--out")
        .arg(dir.join("y"))
        .args([
            ":",
            "-np",
            "1",
            BIN,
            "train",
            "--distributed",
            "--lr",
            "0.002",
        ])
        .args(&args)
        .arg("--out")
        .arg(dir.join("y"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("rank(s) 1 disagree with rank 0 on the training configuration"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(300));

    // Experts split on rank 1 only.
    let out = mpirun(1)
        .arg(BIN)
        .args(["train", "--distributed"])
        .args(&args)
        .arg("--out")
        .arg(dir.join("w"))
        .args([
            ":",
            "-np",
            "1",
            BIN,
            "train",
            "--distributed",
            "--expert-parallel",
        ])
        .args(&args)
        .arg("--out")
        .arg(dir.join("w"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("rank(s) 1 disagree with rank 0 on --expert-parallel"),
        "{err}"
    );

    // Resumed with another --eval-every on rank 1: the checkpoint agrees,
    // the flags given on resuming do not (validation is collective).
    let run = dir.join("z");
    one(&tiny(&data, 2), &run);
    let resume = |extra: &[&str]| -> Vec<String> {
        ["train", "--distributed", "--resume"]
            .iter()
            .map(|s| s.to_string())
            .chain([run.display().to_string()])
            .chain(
                ["--steps", "4", "--backend", "vulkan", "--quick-start"]
                    .iter()
                    .chain(extra)
                    .map(|s| s.to_string()),
            )
            .collect()
    };
    let out = mpirun(1)
        .arg(BIN)
        .args(resume(&[]))
        .args([":", "-np", "1", BIN])
        .args(resume(&["--eval-every", "1"]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("rank(s) 1 disagree with rank 0 on the resumed run's flags"),
        "{err}"
    );
}
