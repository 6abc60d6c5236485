//! The README's table of bad input ("What bad input gets"): every row is a
//! case here, run against the binary, and must end as the row says (exit
//! status and the words of its message). The table in the README is this
//! list rendered, so the two cannot drift: after changing the list, run
//! `AMOE_BLESS=1 cargo test --test bad_input` to rewrite the README's table.
//!
//! None of these cases reaches a GPU kernel: each is refused (or recovered)
//! before, in well under a second.

// The cases use mkfifo and /dev/full.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BEGIN: &str = "<!-- bad-input table: kept by tests/bad_input.rs -->";
const END: &str = "<!-- end of the bad-input table -->";

struct Case {
    /// What the user gives (the table's first column).
    input: &'static str,
    /// The command as the table shows it.
    shown: &'static str,
    /// The arguments, given the case's scratch directory.
    args: fn(&Path) -> Vec<String>,
    /// Files the case needs in its scratch directory.
    setup: fn(&Path),
    /// Where standard output goes: a pipe, or the full device.
    stdout_full: bool,
    exit: i32,
    /// On standard error (the message's key words).
    says: &'static str,
}

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo")
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn at(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

fn nothing(_: &Path) {}

/// A copy of the demo checkpoint in `dir/ck`.
fn demo_copy(dir: &Path) -> PathBuf {
    let ck = dir.join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "state.json",
    ] {
        std::fs::copy(demo().join(f), ck.join(f)).unwrap();
    }
    ck
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            input: "a learning rate of 1e30",
            shown: "amoe train --lr 1e30",
            args: |d| s(&["train", "--lr", "1e30", "--out", &at(d, "run")]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "learning rate 1000000000000000000000000000000 > 1",
        },
        Case {
            input: "a NaN balance coefficient",
            shown: "amoe train --balance NaN",
            args: |d| s(&["train", "--balance", "NaN", "--out", &at(d, "run")]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "balance coefficient NaN",
        },
        Case {
            input: "a negative z-loss coefficient",
            shown: "amoe train --z-loss=-1",
            args: |d| s(&["train", "--z-loss=-1", "--out", &at(d, "run")]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "z-loss coefficient -1",
        },
        Case {
            input: "data-parallel training outside an MPI launcher",
            shown: "amoe train --distributed",
            args: |d| s(&["train", "--distributed", "--out", &at(d, "run")]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "--distributed needs an MPI launcher",
        },
        Case {
            input: "experts split over the ranks of no distributed run",
            shown: "amoe train --expert-parallel",
            args: |d| s(&["train", "--expert-parallel", "--out", &at(d, "run")]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "--expert-parallel is a choice of a --distributed run",
        },
        Case {
            input: "a NaN clipping norm",
            shown: "amoe train --clip NaN",
            args: |d| s(&["train", "--clip", "NaN", "--out", &at(d, "run")]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "clip = NaN",
        },
        Case {
            input: "a model width of a billion",
            shown: "amoe train --d 1000000000",
            args: |d| s(&["train", "--d", "1000000000", "--out", &at(d, "run")]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "head_dim = 250000000: must be a multiple of 4 up to 256",
        },
        Case {
            input: "a model width of 2^62 (overflows a size)",
            shown: "amoe train --d 4611686018427387904",
            args: |d| {
                s(&[
                    "train",
                    "--d",
                    "4611686018427387904",
                    "--out",
                    &at(d, "run"),
                ])
            },
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "head_dim = 1152921504606846976",
        },
        Case {
            input: "`--out` naming a file",
            shown: "amoe train --out FILE",
            args: |d| s(&["train", "--out", &at(d, "file")]),
            setup: |d| std::fs::write(d.join("file"), "x").unwrap(),
            stdout_full: false,
            exit: 2,
            says: "a file, not a directory",
        },
        Case {
            input: "`--out` holding another run (or anything)",
            shown: "amoe train --out DIR",
            args: |d| s(&["train", "--out", &at(d, "run")]),
            setup: |d| {
                std::fs::create_dir_all(d.join("run")).unwrap();
                std::fs::write(d.join("run/notes.txt"), "mine").unwrap();
            },
            stdout_full: false,
            exit: 2,
            says: "is not empty",
        },
        Case {
            input: "training data from a FIFO",
            shown: "amoe train --data FIFO",
            args: |d| s(&["train", "--data", &at(d, "fifo"), "--out", &at(d, "run")]),
            setup: |d| {
                let ok = Command::new("mkfifo")
                    .arg(d.join("fifo"))
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "mkfifo");
            },
            stdout_full: false,
            exit: 2,
            says: "unsupported file type",
        },
        Case {
            input: "2^64 - 1 tokens to generate",
            shown: "amoe generate --prompt x --max-tokens 18446744073709551615",
            args: |_| {
                s(&[
                    "generate",
                    "--prompt",
                    "x",
                    "--max-tokens",
                    "18446744073709551615",
                ])
            },
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "max tokens 18446744073709551615 is more than 1048576",
        },
        Case {
            input: "an empty prompt",
            shown: "amoe generate --prompt ''",
            args: |_| s(&["generate", "--prompt", ""]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "empty prompt",
        },
        Case {
            input: "a prompt longer than the model's context",
            shown: "amoe generate --prompt '(400 words)'",
            args: |_| vec!["generate".into(), "--prompt".into(), "word ".repeat(400)],
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "longer than the model's context",
        },
        Case {
            input: "a threshold outside [0, 1]",
            shown: "amoe generate --prompt x --gating adaptive --threshold 1.5",
            args: |_| {
                s(&[
                    "generate",
                    "--prompt",
                    "x",
                    "--gating",
                    "adaptive",
                    "--threshold",
                    "1.5",
                ])
            },
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "threshold 1.5 is outside [0, 1]",
        },
        Case {
            input: "a negative temperature",
            shown: "amoe generate --prompt x --temperature=-1",
            args: |_| s(&["generate", "--prompt", "x", "--temperature=-1"]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "temperature",
        },
        Case {
            input: "a checkpoint that is not there",
            shown: "amoe generate --checkpoint NO-SUCH-DIR --prompt x",
            args: |d| s(&["generate", "--checkpoint", &at(d, "none"), "--prompt", "x"]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "no such checkpoint",
        },
        Case {
            input: "config.json with 100000 layers",
            shown: "amoe generate --checkpoint CK --prompt x",
            args: |d| s(&["generate", "--checkpoint", &at(d, "ck"), "--prompt", "x"]),
            setup: |d| {
                let ck = demo_copy(d);
                edit_json(&ck.join("config.json"), |c| c["layers"] = 100000.into());
            },
            stdout_full: false,
            exit: 2,
            says: "layers = 100000: at most 4096",
        },
        Case {
            input: "model.safetensors cut in half",
            shown: "amoe generate --checkpoint CK --prompt x",
            args: |d| s(&["generate", "--checkpoint", &at(d, "ck"), "--prompt", "x"]),
            setup: |d| {
                let p = demo_copy(d).join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            },
            stdout_full: false,
            exit: 2,
            says: "not a valid safetensors file (truncated or corrupt?)",
        },
        Case {
            input: "tokenizer.json giving two tokens one id",
            shown: "amoe generate --checkpoint CK --prompt x",
            args: |d| s(&["generate", "--checkpoint", &at(d, "ck"), "--prompt", "x"]),
            setup: |d| {
                let ck = demo_copy(d);
                edit_json(&ck.join("tokenizer.json"), |t| {
                    let v = t["model"]["vocab"].as_object_mut().unwrap();
                    let (a, b) = (
                        v.keys().nth(300).unwrap().clone(),
                        v.keys().nth(301).unwrap().clone(),
                    );
                    let id = v[&b].clone();
                    v.insert(a, id);
                });
            },
            stdout_full: false,
            exit: 2,
            says: "share id",
        },
        Case {
            input: "a GGUF file cut after 3000 bytes",
            shown: "amoe generate --checkpoint CUT.gguf --prompt x",
            args: |d| {
                s(&[
                    "generate",
                    "--checkpoint",
                    &at(d, "cut.gguf"),
                    "--prompt",
                    "x",
                ])
            },
            setup: |d| {
                let b = std::fs::read(
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("tests/fixtures/gguf/olmoe-q4_0.gguf"),
                )
                .unwrap();
                std::fs::write(d.join("cut.gguf"), &b[..3000]).unwrap();
            },
            stdout_full: false,
            exit: 2,
            says: "GGUF: tokenizer.ggml.tokens is 512, more than the 2244 bytes left can hold",
        },
        Case {
            input: "a run whose save was killed between its renames",
            shown: "amoe info --checkpoint RUN",
            args: |d| s(&["info", "--checkpoint", &at(d, "run")]),
            setup: |d| {
                let ck = demo_copy(d);
                std::fs::create_dir_all(d.join("run")).unwrap();
                std::fs::rename(ck, d.join("run/.checkpoint.old")).unwrap();
            },
            stdout_full: false,
            exit: 0,
            says: "the last save was interrupted; reading the newest whole checkpoint",
        },
        Case {
            input: "`--quantize` with an unknown scope",
            shown: "amoe generate --prompt x --quantize q4",
            args: |_| s(&["generate", "--prompt", "x", "--quantize", "q4"]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "invalid value 'q4' for '--quantize <WHICH>'",
        },
        Case {
            input: "an unknown backend",
            shown: "amoe conformance --backend quantum",
            args: |_| s(&["conformance", "--backend", "quantum"]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "unknown backend",
        },
        Case {
            input: "an unknown kernel family",
            shown: "amoe conformance --kernel nonsense",
            args: |_| s(&["conformance", "--kernel", "nonsense"]),
            setup: nothing,
            stdout_full: false,
            exit: 2,
            says: "unknown kernel family",
        },
        Case {
            input: "a full disk for standard output",
            shown: "amoe devices > /dev/full",
            args: |_| s(&["devices"]),
            setup: nothing,
            stdout_full: true,
            exit: 2,
            says: "standard output: No space left on device",
        },
    ]
}

/// The README's table, rendered from `cases`.
fn table(cases: &[Case]) -> String {
    let mut t = String::from("| bad input | command | outcome |\n|---|---|---|\n");
    for c in cases {
        t.push_str(&format!(
            "| {} | `{}` | exit {}: \"{}\" |\n",
            c.input,
            c.shown,
            c.exit,
            c.says.replace('|', "\\|")
        ));
    }
    t
}

#[test]
fn every_row_of_the_readme_bad_input_table_holds() {
    let cases = cases();
    let root = std::env::temp_dir().join(format!("amoe-bad-input-{}", std::process::id()));
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let dir = root.join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        (c.setup)(&dir);
        let stdout = if c.stdout_full {
            Stdio::from(std::fs::File::create("/dev/full").unwrap())
        } else {
            Stdio::piped()
        };
        let out = Command::new(env!("CARGO_BIN_EXE_amoe"))
            .args((c.args)(&dir))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .expect("the amoe binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(c.exit) || !err.contains(c.says) || err.contains("panicked") {
            failures.push(format!(
                "{} (`{}`): exit {:?}, stderr: {}",
                c.input,
                c.shown,
                out.status.code(),
                err.trim()
            ));
        }
        // Bounded messages: a line a person can read.
        if err.len() > 2000 {
            failures.push(format!("{}: a {}-byte message", c.input, err.len()));
        }
        if c.exit != 0 {
            assert!(
                !dir.join("run/checkpoint").exists(),
                "{}: it trained anyway",
                c.input
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The README shows exactly these cases.
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else {
        panic!("README.md has no bad-input table between {BEGIN} and {END}");
    };
    let have = &readme[b + BEGIN.len()..e];
    let want = format!("\n{}", table(&cases));
    if have != want {
        if std::env::var_os("AMOE_BLESS").is_some() {
            let new = format!("{}{}{}", &readme[..b + BEGIN.len()], want, &readme[e..]);
            std::fs::write(&readme_path, new).unwrap();
        } else {
            panic!(
                "README.md's bad-input table is not the tested list \
                 (AMOE_BLESS=1 cargo test --test bad_input rewrites it); it should be:\n{want}"
            );
        }
    }
}
