//! The `amoe` binary end to end: what a user types, what they get back.

mod common;

use std::process::Command;

fn amoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amoe"))
        .args(args)
        .output()
        .expect("the amoe binary runs")
}

/// The toy model of the training tests: D 32, 1 layer, 2 heads, E 4, F 32,
/// context 16, batch 4 (the vocabulary is each test's own).
const TOY_MODEL: [&str; 14] = [
    "--d",
    "32",
    "--layers",
    "1",
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
];

/// `amoe` with `head`, the toy model's flags, then `tail`.
fn amoe_toy(head: &[&str], tail: &[&str]) -> std::process::Output {
    let args: Vec<&str> = head.iter().chain(&TOY_MODEL).chain(tail).copied().collect();
    amoe(&args)
}

#[test]
fn devices_json_lists_every_adapter_with_limits() {
    let out = amoe(&["devices", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let list = v.as_array().expect("a list of adapters");
    let n = common::for_each_adapter(|_| {});
    assert_eq!(list.len(), n, "devices lists the adapters the tests run on");
    for a in list {
        for key in [
            "backend",
            "name",
            "device_type",
            "driver",
            "features",
            "limits",
        ] {
            assert!(a.get(key).is_some(), "adapter entry lacks {key}: {a}");
        }
        assert!(
            a["limits"]["max_storage_buffer_binding_size"]
                .as_u64()
                .unwrap_or(0)
                > 0
        );
    }
}

#[test]
fn conformance_prints_table_and_json_and_passes() {
    if common::for_each_adapter(|_| {}) == 0 {
        return;
    }
    let dir = std::env::temp_dir().join(format!("amoe-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("conf.json");
    let out = amoe(&[
        "conformance",
        "--kernel",
        "gate",
        "--json",
        path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "conformance failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("max_abs") && stdout.contains("pass"),
        "table missing:\n{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let adapters = v["adapters"].as_array().expect("adapters list");
    assert!(!adapters.is_empty());
    for a in adapters {
        assert!(a["backend"].is_string() && a["name"].is_string());
        let kernels = a["kernels"].as_array().expect("kernels list");
        assert!(!kernels.is_empty());
        for k in kernels {
            for key in ["kernel", "case", "max_abs_err", "max_rel_err", "pass"] {
                assert!(k.get(key).is_some(), "result lacks {key}: {k}");
            }
            assert_eq!(k["pass"], true, "{k}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_arguments_give_clear_errors_not_panics() {
    let out = amoe(&["conformance", "--backend", "quantum"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown backend") && !err.contains("panicked"),
        "{err}"
    );

    let out = amoe(&["conformance", "--kernel", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown kernel family"));

    let out = amoe(&["conformance", "--adapter", "999"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no GPU adapter") && !err.contains("panicked"),
        "{err}"
    );
}

/// `amoe train --capacity-factor F --activation swiglu`: slots are dropped
/// and reported in the metrics, the factor and the activation are saved with
/// the checkpoint, `amoe generate` runs the SwiGLU model it wrote, and a bad
/// factor is a clear error.
#[test]
fn train_with_a_capacity_factor_and_swiglu_then_generate() {
    let out = amoe(&["train", "--capacity-factor", "0", "--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("capacity factor 0") && !err.contains("panicked"),
        "{err}"
    );
    if !std::env::var("CI").is_ok_and(|v| v == "true")
        && std::env::var("AMOE_REQUIRE_ADAPTERS").is_err()
        && amoe(&["devices", "--json"]).stdout.len() < 10
    {
        return;
    }
    let dir = std::env::temp_dir().join(format!("amoe-cli-capacity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/web/assets/sonnets.txt");
    let out = amoe_toy(
        &[
            "train",
            "--backend",
            "vulkan",
            "--data",
            data,
            "--gating",
            "top2",
            "--capacity-factor",
            "0.5",
            "--activation",
            "swiglu",
        ],
        &[
            "--vocab",
            "300",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--eval-every",
            "3",
            "--eval-batches",
            "1",
            "--json",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let train: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["kind"] == "train")
        .collect();
    assert_eq!(train.len(), 3);
    for m in &train {
        // Top-2 at half the slots a balanced router needs: at least half of
        // the routed slots find their expert full.
        let d = m["dropped_fraction"].as_f64().unwrap();
        assert!((0.5..1.0).contains(&d), "dropped fraction {d}: {m}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint/config.json")).unwrap())
            .unwrap();
    let saved = cfg["model"]["capacity_factor"]
        .as_f64()
        .or_else(|| cfg["capacity_factor"].as_f64());
    assert_eq!(saved, Some(0.5), "{cfg}");
    let act = cfg["model"]["activation"].clone();
    let act = if act.is_null() {
        cfg["activation"].clone()
    } else {
        act
    };
    assert_eq!(act, "swiglu", "{cfg}");
    let ckpt = dir.join("checkpoint");
    let out = amoe(&[
        "generate",
        "--backend",
        "vulkan",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--prompt",
        "Shall I",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `amoe reproduce` end to end at toy scale: pretraining, conversion, five
/// schemes, the table, the JSON of the issue and the plot.
#[test]
fn reproduce_runs_every_scheme_and_writes_the_report() {
    if !std::env::var("CI").is_ok_and(|v| v == "true")
        && std::env::var("AMOE_REQUIRE_ADAPTERS").is_err()
    {
        // Needs an adapter; the CI run has one (lavapipe).
        if amoe(&["devices", "--json"]).stdout.len() < 10 {
            return;
        }
    }
    let dir = std::env::temp_dir().join(format!("amoe-cli-reproduce-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let json = dir.join("report.json");
    let out = amoe_toy(
        &["reproduce", "--backend", "vulkan"],
        &[
            "--vocab",
            "512",
            "--pretrain-steps",
            "3",
            "--budget",
            "4",
            "--cap",
            "4",
            "--eval-every",
            "2",
            "--eval-batches",
            "2",
            "--json",
            json.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reproduce failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for scheme in [
        "dense",
        "top1",
        "top2",
        "adaptive",
        "adaptive_no_curriculum",
    ] {
        assert!(stdout.contains(scheme), "table lacks {scheme}:\n{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for key in [
        "scheme",
        "time_to_target_s",
        "normalized_time",
        "steps_to_target",
        "mean_step_s",
        "flops_per_token",
        "two_expert_fraction",
        "val_ppl",
        "reached_target",
    ] {
        assert!(rows[0].get(key).is_some(), "row lacks {key}");
    }
    let top2 = rows.iter().find(|r| r["scheme"] == "top2").unwrap();
    assert_eq!(top2["reached_target"], true);
    assert!((top2["normalized_time"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert!(report.get("step_time_over_flops").is_some());
    assert!(dir.join("reproduce.svg").exists());
    // 20 MB of runs: leave nothing behind in the temporary directory.
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generate_json_gives_tokens_ids_and_routes_for_every_adapter() {
    let mut backends = Vec::new();
    common::for_each_adapter(|ctx| backends.push(ctx.backend()));
    for backend in &backends {
        let out = amoe(&[
            "generate",
            "--backend",
            backend,
            "--prompt",
            "And the LORD said",
            "--max-tokens",
            "6",
            "--gating",
            "adaptive",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
        assert_eq!(v["gating"], "adaptive");
        let tokens = v["tokens"].as_array().expect("tokens");
        assert!(!tokens.is_empty() && tokens.len() <= 6);
        assert_eq!(v["ids"].as_array().unwrap().len(), tokens.len());
        for t in tokens {
            let routes = t["routes"].as_array().expect("routes per token");
            assert!(!routes.is_empty());
            for r in routes {
                let k = r["experts"].as_array().unwrap().len();
                assert!(k == 1 || k == 2, "{r}");
                assert_eq!(r["weights"].as_array().unwrap().len(), k);
            }
        }
        assert!(v["decode_tps"].as_f64().unwrap() > 0.0);
        assert!(tokens.iter().all(|t| t.get("logits").is_none()));
    }
}

/// `--logits` adds the row each token was chosen from: greedy picks its argmax.
#[test]
fn generate_json_logits_are_the_rows_greedy_picked_from() {
    let out = amoe(&[
        "generate",
        "--prompt",
        "And the LORD said",
        "--max-tokens",
        "4",
        "--no-stop",
        "--json",
        "--logits",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let tokens = v["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 4);
    for t in tokens {
        let row: Vec<f64> = t["logits"]
            .as_array()
            .expect("logits per token")
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(row.len(), 2048, "the demo's vocabulary");
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(t["id"].as_u64().unwrap() as usize, best);
    }
}

#[test]
fn generate_and_routes_reject_bad_input_with_a_message() {
    let missing = std::env::temp_dir().join("amoe-no-such-checkpoint");
    let long = "word ".repeat(400);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["generate", "--prompt", ""], "empty prompt"),
        (
            vec!["generate", "--prompt", "x", "--max-tokens", "0"],
            "max-tokens",
        ),
        (
            vec![
                "generate",
                "--prompt",
                "x",
                "--gating",
                "adaptive",
                "--threshold",
                "1.5",
            ],
            "threshold 1.5",
        ),
        (
            vec!["generate", "--prompt", "x", "--temperature=-1"],
            "temperature",
        ),
        (
            vec!["generate", "--prompt", &long],
            "longer than the model's context",
        ),
        (vec!["generate", "--prompt", "x", "--logits"], "--json"),
        (
            vec![
                "generate",
                "--prompt",
                "x",
                "--checkpoint",
                missing.to_str().unwrap(),
            ],
            "no such checkpoint",
        ),
        (
            vec!["routes", "--checkpoint", missing.to_str().unwrap()],
            "no such checkpoint",
        ),
    ];
    for (args, want) in cases {
        let out = amoe(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `amoe info` on the demo: the counts add up, the bytes are f32 storage
/// of every parameter plus the caches, and the text names the adapter.
#[test]
fn info_reports_parameters_and_bytes_on_every_adapter() {
    let mut backends = Vec::new();
    common::for_each_adapter(|ctx| backends.push(ctx.backend()));
    for backend in &backends {
        let out = amoe(&[
            "info",
            "--backend",
            backend,
            "--json",
            "--gating",
            "adaptive",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
        let p = &v["params"];
        let n = |x: &serde_json::Value| x.as_u64().unwrap();
        assert_eq!(v["gating"], "adaptive");
        assert_eq!(v["experts_per_token"], serde_json::json!([1, 2]));
        assert!(n(&p["active_min"]) < n(&p["active_max"]));
        assert!(n(&p["active_max"]) < n(&p["total"]));
        assert!(n(&p["experts"]) + n(&p["embeddings"]) < n(&p["total"]));
        assert_eq!(n(&v["bytes"]["params"]), 4 * n(&p["total"]));
        assert_eq!(v["fits"], true);
        assert!(v["adapter"].as_str().unwrap().starts_with(backend.as_str()));
        let text = amoe(&["info", "--backend", backend, "--gating", "top1"]);
        assert!(text.status.success());
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("(1 expert(s) per MoE layer)") && text.contains("fits"),
            "{text}"
        );
    }
    let bad = amoe(&["info", "--checkpoint", "/nonexistent/run"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/run"));
}

/// `--dtype`: `auto` keeps amoe's own f32 checkpoint in f32 and stores a
/// bf16 Hugging Face model in f16; `f16` halves the bytes of the matmul
/// weights (the gains, biases and router stay f32); a bad name lists the
/// good ones.
#[test]
fn dtype_picks_the_weight_storage() {
    let info = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["info", "--json"];
        all.extend_from_slice(args);
        let out = amoe(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("valid JSON")
    };
    let bytes = |v: &serde_json::Value| v["bytes"]["params"].as_u64().unwrap();
    let demo = info(&[]);
    assert_eq!(demo["dtype"], "f32");
    let demo16 = info(&["--dtype", "f16"]);
    assert_eq!(demo16["dtype"], "f16");
    let total = demo["params"]["total"].as_u64().unwrap();
    assert_eq!(bytes(&demo), 4 * total);
    // The demo's norms, router and positions (f32) are a few thousand
    // values: f16 takes a little over half.
    assert!(bytes(&demo16) > 2 * total && bytes(&demo16) < 2 * total + total / 5);
    let mixtral = "tests/fixtures/hf/mixtral";
    assert_eq!(info(&["--checkpoint", mixtral])["dtype"], "f16");
    assert_eq!(
        info(&["--checkpoint", mixtral, "--dtype", "f32"])["dtype"],
        "f32"
    );
    let bad = amoe(&["info", "--dtype", "f8"]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("auto") && err.contains("f16"), "{err}");
    // Experts quantized on load: the expert banks in 8.5 or 4.5 bits a
    // value, the rest as --dtype says.
    let experts = demo["params"]["experts"].as_u64().unwrap();
    for (format, bits) in [("q8", 8.5), ("q4", 4.5)] {
        let q = info(&["--quantize-on-load", format]);
        assert_eq!(
            (&q["dtype"], &q["experts_dtype"]),
            (&"f32".into(), &format.into())
        );
        let saved = (bytes(&demo) - bytes(&q)) as f64;
        let want = experts as f64 * (4.0 - bits / 8.0);
        assert!(
            (saved - want).abs() < 0.01 * want,
            "{format}: {saved} bytes saved, {want} expected"
        );
    }
    // By part, and per storage a user can pick, before loading.
    let parts = &demo["bytes"]["parts"];
    let sum: u64 = ["experts", "attention", "embeddings", "other"]
        .iter()
        .map(|k| parts[k].as_u64().unwrap())
        .sum();
    assert_eq!(sum, bytes(&demo));
    let formats = demo["formats"].as_array().unwrap();
    let totals: Vec<u64> = formats
        .iter()
        .map(|f| f["total"].as_u64().unwrap())
        .collect();
    assert_eq!(totals.len(), 6);
    // f32 > f16 > q8 experts > q4 experts; --quantize all takes less again.
    assert!(totals[..4].windows(2).all(|w| w[0] > w[1]), "{totals:?}");
    assert!(totals[4] < totals[2] && totals[5] < totals[3], "{totals:?}");
    assert_eq!(formats[5]["projections_dtype"], "q4");
    assert!(formats.iter().all(|f| f["fits"] == true));
    assert_eq!(
        formats[3]["total"].as_u64().unwrap(),
        info(&["--dtype", "f16", "--quantize-on-load", "q4"])["bytes"]["params"]
            .as_u64()
            .unwrap()
            + demo["bytes"]["kv_cache"].as_u64().unwrap()
    );
    let bad = amoe(&["info", "--quantize-on-load", "q3"]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("q8") && err.contains("q4"), "{err}");
    // --quantize says what --quantize-on-load covers: alone it is refused.
    let bad = amoe(&["info", "--quantize", "all"]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--quantize-on-load"), "{err}");
    let all = info(&["--quantize-on-load", "q4", "--quantize", "all"]);
    assert_eq!(
        (
            &all["dtype"],
            &all["experts_dtype"],
            &all["projections_dtype"]
        ),
        (&"f32".into(), &"q4".into(), &"q4".into())
    );
    // Generation with f16 weights, and with q4 experts, runs and prints text.
    for storage in [["--dtype", "f16"], ["--quantize-on-load", "q4"]] {
        let mut args = vec!["generate", "--checkpoint", mixtral];
        args.extend(storage);
        args.extend([
            "--prompt",
            "the",
            "--max-tokens",
            "4",
            "--backend",
            "vulkan",
        ]);
        let out = amoe(&args);
        assert!(
            out.status.success(),
            "{storage:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `amoe eval` on a text: a JSON report whose numbers agree with each
/// other; a stride past the context and a text of one token are errors.
/// `amoe quantize` of a Hugging Face directory (f16, shared experts, an
/// end-of-sequence id from generation_config.json): what `info` and
/// `generate` make of the result is what quantizing on load makes of the
/// source; bad requests are refused before anything is written.
#[test]
fn quantize_writes_a_checkpoint_that_loads_in_its_format() {
    let src = "tests/fixtures/hf/qwen2_moe";
    let dir = std::env::temp_dir().join(format!("amoe-cli-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("q4");
    let out_s = out.to_str().unwrap();
    let ok = |args: &[&str]| -> serde_json::Value {
        let o = amoe(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("valid JSON")
    };
    let q = ok(&[
        "quantize",
        "--checkpoint",
        src,
        "--out",
        out_s,
        "--format",
        "q4",
        "--json",
    ]);
    // Three MoE layers of w1, w3, w2, routed and shared: 12 banks (the
    // dense first layer's FFN is one expert: 3 more).
    assert_eq!(q["packed_tensors"], 15, "{q}");
    assert!(q["bytes"].as_u64().unwrap() < q["source_bytes"].as_u64().unwrap());
    let info = ok(&["info", "--json", "--checkpoint", out_s]);
    let on_load = ok(&[
        "info",
        "--json",
        "--checkpoint",
        src,
        "--quantize-on-load",
        "q4",
    ]);
    assert_eq!(
        (&info["dtype"], &info["experts_dtype"]),
        (&"f16".into(), &"q4".into())
    );
    assert_eq!(info["bytes"], on_load["bytes"]);
    assert_eq!(info["model_type"], "qwen2_moe");
    let gen = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec![
            "generate",
            "--prompt",
            "hello world",
            "--max-tokens",
            "12",
            "--json",
        ];
        all.extend_from_slice(args);
        ok(&all)["ids"].as_array().unwrap().clone()
    };
    let from_file = gen(&["--checkpoint", out_s]);
    assert_eq!(
        from_file,
        gen(&["--checkpoint", src, "--quantize-on-load", "q4"])
    );
    // A q4 file asked for q8 on load: its values, quantized again.
    assert!(!gen(&["--checkpoint", out_s, "--quantize-on-load", "q8"]).is_empty());
    // --quantize all: the attention projections and the (untied)
    // unembedding too, as quantizing them on load does.
    let all = dir.join("q4-all");
    let all_s = all.to_str().unwrap();
    let q = ok(&[
        "quantize",
        "--checkpoint",
        src,
        "--out",
        all_s,
        "--format",
        "q4",
        "--quantize",
        "all",
        "--json",
    ]);
    // 15 banks, wqkv and wo of 3 layers, w_out.
    assert_eq!(q["packed_tensors"], 22, "{q}");
    assert_eq!(q["kept_in_floats"], serde_json::json!([]), "{q}");
    let on_load_all = ["--quantize-on-load", "q4", "--quantize", "all"];
    let info = ok(&["info", "--json", "--checkpoint", all_s]);
    let mut args = vec!["info", "--json", "--checkpoint", src];
    args.extend(on_load_all);
    assert_eq!(info["projections_dtype"], "q4");
    assert_eq!(info["bytes"], ok(&args)["bytes"]);
    let mut args = vec!["--checkpoint", src];
    args.extend(on_load_all);
    assert_eq!(gen(&["--checkpoint", all_s]), gen(&args));
    let refused = |args: &[&str], want: &str| {
        let o = amoe(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    let again = [
        "quantize",
        "--checkpoint",
        src,
        "--out",
        out_s,
        "--format",
        "q8",
    ];
    refused(&again, "not empty (pass --overwrite");
    refused(
        &[
            "quantize",
            "--checkpoint",
            out_s,
            "--out",
            out_s,
            "--format",
            "q8",
        ],
        "holds the checkpoint",
    );
    refused(
        &[
            "quantize",
            "--checkpoint",
            src,
            "--out",
            out_s,
            "--format",
            "q3",
        ],
        "q4",
    );
    // --overwrite replaces it: now q8.
    let mut over = again.to_vec();
    over.push("--overwrite");
    assert!(amoe(&over).status.success());
    assert_eq!(
        ok(&["info", "--json", "--checkpoint", out_s])["experts_dtype"],
        "q8"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_reports_perplexity_and_experts_per_token() {
    let dir = std::env::temp_dir().join(format!("amoe_cli_eval_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "And God said, Let there be light: and there was light. ".repeat(20),
    )
    .unwrap();
    let json = dir.join("eval.json");
    let (t, j) = (text.to_str().unwrap(), json.to_str().unwrap());
    let out = amoe(&[
        "eval", "--data", t, "--gating", "adaptive", "--stride", "32", "--json", j,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("perplexity") && stdout.contains("mean experts per token"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["gating"], "adaptive");
    assert_eq!(v["stride"], 32);
    // "--json -": the same report alone on standard output (valid JSON).
    let out = amoe(&[
        "eval", "--data", t, "--gating", "adaptive", "--stride", "32", "--json", "-",
    ]);
    assert!(out.status.success());
    let on_stdout: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json -: JSON on stdout");
    assert_eq!(on_stdout["loss"], v["loss"]);
    assert!(!std::path::Path::new("-").exists());
    assert_eq!(
        v["scored"].as_u64().unwrap() + 1,
        v["tokens"].as_u64().unwrap()
    );
    let (loss, ppl) = (
        v["loss"].as_f64().unwrap(),
        v["perplexity"].as_f64().unwrap(),
    );
    assert!(loss > 0.0 && (ppl - loss.exp()).abs() < 1e-6 * ppl);
    let layers = v["experts_per_token"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    for l in layers {
        let m = l["mean_experts"].as_f64().unwrap();
        assert!((1.0..=2.0).contains(&m), "{l}");
    }
    for (args, want) in [
        (vec!["eval", "--data", t, "--stride", "1000"], "stride 1000"),
        (vec!["eval", "--data", t, "--max-tokens", "1"], "at least 2"),
    ] {
        let out = amoe(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A top-k model's expert count per token: each rule takes between 1 and
/// k experts on average, --max-experts caps k; bad choices are errors
/// naming the flag.
#[test]
fn expert_rules_set_the_experts_per_token_of_a_top_k_model() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf/qwen3_moe");
    let dir = std::env::temp_dir().join(format!("amoe_cli_rules_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("eval.json");
    let j = json.to_str().unwrap();
    let eval = |extra: &[&str]| -> (f64, Vec<f64>, String) {
        let mut args = vec![
            "eval",
            "--checkpoint",
            fixture,
            "--max-tokens",
            "300",
            "--json",
            j,
        ];
        args.extend(extra);
        let out = amoe(&args);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let means = v["experts_per_token"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mean_experts"].as_f64().unwrap())
            .collect();
        (
            v["loss"].as_f64().unwrap(),
            means,
            v["gate"].as_str().unwrap().to_string(),
        )
    };
    let (_, k8, desc) = eval(&[]);
    assert!(k8.iter().all(|&m| m == 8.0), "{k8:?}");
    assert_eq!(desc, "top-8");
    for (rule, mid) in [("gap", "0.02"), ("ratio", "0.5"), ("mass", "0.5")] {
        let (_, m, desc) = eval(&["--rule", rule, "--threshold", mid]);
        assert!(m.iter().all(|&m| m > 1.0 && m < 8.0), "{rule}: {m:?}");
        assert!(desc.contains(rule), "{desc}");
    }
    // The extremes of every rule are the fixed top-1 and top-k bit for
    // bit: the gate conformance's `same as fixed top-k` cases.
    let (_, m, _) = eval(&["--max-experts", "3"]);
    assert!(m.iter().all(|&m| m == 3.0), "{m:?}");
    for (args, want) in [
        (vec!["--rule", "gap"], "--threshold"),
        (vec!["--max-experts", "0"], "max-experts"),
        (vec!["--max-experts", "17"], "max-experts"),
        (vec!["--rule", "mass", "--threshold", "0"], "(0, 1]"),
        (vec!["--rule", "ratio", "--threshold", "NaN"], "threshold"),
        (
            vec![
                "--rule",
                "ratio",
                "--threshold",
                "0.5",
                "--gating",
                "adaptive",
            ],
            "top-k",
        ),
        (vec!["--rule", "most"], "rule"),
    ] {
        let mut a = vec!["eval", "--checkpoint", fixture, "--max-tokens", "100"];
        a.extend(&args);
        let out = amoe(&a);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Output that cannot be written (a full disk: /dev/full) is an error with
/// a non-zero status, in text and in JSON mode, not a silent success or a
/// panic.
#[cfg(target_os = "linux")]
#[test]
fn generate_into_a_full_disk_fails_with_an_error() {
    for extra in [&[][..], &["--json"][..]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full opens");
        let out = Command::new(env!("CARGO_BIN_EXE_amoe"))
            .args(["generate", "--prompt", "And God said", "--max-tokens", "3"])
            .args(extra)
            .stdout(full)
            .output()
            .expect("the amoe binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains("standard output"), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
}

/// Every command that prints: into a full disk, an error naming standard
/// output (status 2), never a panic; into a pipe its reader closed early,
/// a quiet end with the status of a process a closed pipe ends (141).
#[cfg(target_os = "linux")]
#[test]
fn printing_commands_end_cleanly_on_a_full_disk_and_a_closed_pipe() {
    use std::io::Read;
    use std::process::Stdio;
    let bin = env!("CARGO_BIN_EXE_amoe");
    for args in [
        &["devices"][..],
        &["devices", "--json"][..],
        &["info"][..],
        &["info", "--checkpoint", "tests/fixtures/hf/llama", "--json"][..],
        &["conformance", "--kernel", "add"][..],
        &["eval", "--max-tokens", "300"][..],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full opens");
        let out = Command::new(bin)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(full)
            .output()
            .expect("the amoe binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("standard output"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // `amoe conformance | head -1`: the reader goes after one line.
    let mut child = Command::new(bin)
        .args(["conformance", "--kernel", "add"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the amoe binary runs");
    let mut first = [0u8; 8];
    child
        .stdout
        .take()
        .expect("piped")
        .read_exact(&mut first)
        .expect("a first line");
    // The read end is dropped here: the next write meets a closed pipe.
    let out = child.wait_with_output().expect("it ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("standard output"),
        "{err}"
    );
}

/// Flags that could only make a run go on for ever or silently wrong are
/// refused up front, naming the flag (issue: a learning rate of 1e30, a NaN
/// balance coefficient, a negative z-loss, a NaN clip that turned clipping
/// off, a generation of 2^64 - 1 tokens).
#[test]
fn absurd_training_and_generation_flags_are_refused_up_front() {
    let bin = env!("CARGO_BIN_EXE_amoe");
    for (args, want) in [
        (&["train", "--lr", "1e30"][..], "learning rate"),
        (
            &["train", "--balance", "NaN"][..],
            "balance coefficient NaN",
        ),
        (&["train", "--z-loss=-1"][..], "z-loss coefficient -1"),
        (&["train", "--balance", "1e30"][..], "balance coefficient"),
        (&["train", "--clip", "NaN"][..], "clip = NaN"),
        (
            &[
                "generate",
                "--prompt",
                "And",
                "--max-tokens",
                "18446744073709551615",
            ][..],
            "max tokens",
        ),
    ] {
        let dir = std::env::temp_dir().join(format!("amoe_absurd_{}", std::process::id()));
        let out = Command::new(bin)
            .args(args)
            .args(if args[0] == "train" {
                vec![
                    "--steps".to_string(),
                    "1".into(),
                    "--out".into(),
                    dir.display().to_string(),
                ]
            } else {
                vec![]
            })
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("the amoe binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!dir.join("checkpoint").exists(), "{args:?} trained");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A run directory is not clobbered: `train --out` into a directory that
/// holds anything is refused unless `--overwrite` (which replaces it), and
/// a directory a live process is writing (its lock) is refused even then.
#[test]
fn train_refuses_an_occupied_run_directory() {
    let bin = env!("CARGO_BIN_EXE_amoe");
    let dir = std::env::temp_dir().join(format!("amoe_occupied_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), "{\"kind\":\"train\"}\n").unwrap();
    let small = [
        "train",
        "--steps",
        "1",
        "--d",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--experts",
        "2",
        "--ffn",
        "32",
        "--context",
        "16",
        "--batch",
        "2",
        "--vocab",
        "300",
        "--data",
        "web/assets/sonnets.txt",
        "--eval-batches",
        "1",
        "--out",
    ];
    let run = |extra: &[&str]| {
        Command::new(bin)
            .args(small)
            .arg(&dir)
            .args(extra)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("the amoe binary runs")
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is not empty") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
        "{\"kind\":\"train\"}\n",
        "the old run was touched"
    );
    // A live writer (this test process) holds the lock: refused.
    std::fs::write(dir.join(".amoe-train.lock"), std::process::id().to_string()).unwrap();
    let out = run(&["--overwrite"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("another run"), "{err}");
    // A stale lock (no such process) and --overwrite: a fresh run.
    std::fs::write(dir.join(".amoe-train.lock"), "4000000000").unwrap();
    let out = run(&["--overwrite"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("checkpoint").join("model.safetensors").exists());
    assert!(!dir.join(".amoe-train.lock").exists(), "the lock stays");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny model on the sonnets for runs that a signal ends (D 32, 1 layer,
/// 2 experts, context 16, batch 2; no evaluation).
const LONG_TINY_RUN: [&str; 22] = [
    "--d",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--experts",
    "2",
    "--ffn",
    "32",
    "--context",
    "16",
    "--batch",
    "2",
    "--vocab",
    "300",
    "--data",
    "web/assets/sonnets.txt",
    "--eval-batches",
    "1",
    "--eval-every",
    "100000",
];

/// SIGTERM (what a scheduler or `kill` sends) saves and stops a run as
/// Ctrl-C does: a checkpoint that loads, status 130.
#[cfg(target_os = "linux")]
#[test]
fn sigterm_saves_and_stops_a_run() {
    let bin = env!("CARGO_BIN_EXE_amoe");
    let dir = std::env::temp_dir().join(format!("amoe_sigterm_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = Command::new(bin)
        .args(["train", "--steps", "100000"])
        .args(LONG_TINY_RUN)
        .arg("--out")
        .arg(&dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the amoe binary runs");
    // Wait for training steps (metrics lines), at most 5 minutes.
    let start = std::time::Instant::now();
    while std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(true, |m| m.lines().count() < 2)
    {
        assert!(
            start.elapsed().as_secs() < 300,
            "no training step within 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(ok.success());
    let out = child.wait_with_output().expect("it ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    amoe::infer::InferCheckpoint::load(&dir).expect("the saved checkpoint loads");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGKILL at random moments of a run that saves after every step (so many
/// kills land inside a save) never leaves a run that does not load: 20
/// kills at seeded random times, each followed by a load of the run and a
/// `--resume` of it, which is the next run killed. (On GL: its pipelines
/// come from Mesa's disk cache after the first start; the backend is not
/// what this checks.)
#[cfg(target_os = "linux")]
#[test]
fn sigkill_at_random_moments_never_leaves_a_run_that_does_not_load() {
    use std::time::{Duration, Instant};
    let bin = env!("CARGO_BIN_EXE_amoe");
    let dir = std::env::temp_dir().join(format!("amoe_sigkill_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap().to_string();
    let model: Vec<&str> = LONG_TINY_RUN
        .iter()
        .copied()
        .chain(["--checkpoint-every", "1", "--backend", "gl"])
        .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let started = Instant::now();
    let mut kills = 0;
    let mut steps_seen = Vec::new();
    while kills < 20 {
        let mut cmd = Command::new(bin);
        if kills == 0 {
            cmd.args(["train", "--steps", "100000"])
                .args(&model)
                .args(["--out", &d]);
        } else {
            cmd.args([
                "train",
                "--resume",
                &d,
                "--steps",
                "100000",
                "--backend",
                "gl",
            ]);
        }
        let mut child = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the amoe binary runs");
        if kills == 0 {
            // The first kill waits for the first save: before it there is
            // no run to load.
            while !dir.join("checkpoint").join("state.json").exists() {
                assert!(
                    started.elapsed() < Duration::from_secs(300),
                    "no checkpoint within 5 minutes"
                );
                assert!(child.try_wait().unwrap().is_none(), "the run ended early");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(Duration::from_millis(next() % 1500));
        child.kill().expect("SIGKILL");
        child.wait().expect("it ends");
        kills += 1;
        let ck = amoe::infer::InferCheckpoint::load(&dir).unwrap_or_else(|e| {
            let listing: Vec<String> = std::fs::read_dir(&dir)
                .map(|r| {
                    r.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            panic!("after kill {kills}: the run does not load: {e} (run directory: {listing:?})")
        });
        drop(ck);
        let m = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
        steps_seen.push(m.lines().count());
    }
    // The kills fell on a run that made progress (and so on saves).
    assert!(
        steps_seen.last() > steps_seen.first(),
        "no progress between kills: {steps_seen:?}"
    );
    eprintln!(
        "20 SIGKILLs in {:.1} s, metrics lines after each: {steps_seen:?}",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A prompt of one space is a prompt (it encodes to one token), not "empty".
#[test]
fn a_space_is_a_prompt() {
    let out = Command::new(env!("CARGO_BIN_EXE_amoe"))
        .args(["generate", "--prompt", " ", "--max-tokens", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the amoe binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--resume` continues a run as it was: flags that would change the model,
/// the data or the optimizer are refused by name (they were silently
/// ignored); the schedule flags apply.
#[test]
fn resume_refuses_flags_that_would_change_the_run() {
    let bin = env!("CARGO_BIN_EXE_amoe");
    let dir = std::env::temp_dir().join(format!("amoe_resume_flags_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let small = [
        "train",
        "--steps",
        "2",
        "--d",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--experts",
        "2",
        "--ffn",
        "32",
        "--context",
        "16",
        "--batch",
        "2",
        "--vocab",
        "300",
        "--data",
        "web/assets/sonnets.txt",
        "--eval-batches",
        "1",
        "--out",
    ];
    let run = |args: &[&str]| {
        Command::new(bin)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("the amoe binary runs")
    };
    let d = dir.to_str().unwrap();
    let out = run(&[&small[..], &[d]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "train", "--resume", d, "--lr", "0.01", "--d=64", "--out", "/tmp/x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--lr, --d, --out would change it"), "{err}");
    let out = run(&["train", "--resume", d, "--steps", "3", "--eval-every", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("\"step\":3") && l.contains("\"val\"")),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run whose save was killed between its two renames (no `checkpoint/`,
/// a whole `.checkpoint.old` and a whole new `.checkpoint.tmp`): generate
/// reads the newest whole checkpoint and says so, and `--resume` continues
/// from it and leaves the run directory in order. (On GL: its pipelines
/// build in a fraction of lavapipe's time, and the backend is not what
/// this checks.)
#[test]
fn a_run_killed_between_the_renames_of_a_save_still_loads() {
    let dir = std::env::temp_dir().join(format!("amoe_killed_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let base = [
        "train",
        "--steps",
        "2",
        "--vocab",
        "300",
        "--data",
        "web/assets/sonnets.txt",
        "--eval-batches",
        "1",
        "--backend",
        "gl",
        "--out",
        d,
    ];
    let out = amoe_toy(&base, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The state the kill leaves: the previous checkpoint moved aside, the
    // new one complete in .tmp.
    std::fs::rename(dir.join("checkpoint"), dir.join(".checkpoint.old")).unwrap();
    std::fs::create_dir(dir.join(".checkpoint.tmp")).unwrap();
    for f in std::fs::read_dir(dir.join(".checkpoint.old")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(".checkpoint.tmp").join(f.file_name())).unwrap();
    }
    for what in [d.to_string(), format!("{d}/checkpoint")] {
        let out = amoe(&[
            "generate",
            "--checkpoint",
            &what,
            "--prompt",
            "Shall I",
            "--max-tokens",
            "3",
            "--backend",
            "gl",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {err}");
        assert!(
            err.contains("interrupted") && err.contains(".checkpoint.tmp"),
            "{what}: {err}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_amoe"))
        .args(["train", "--resume", d, "--steps", "3", "--backend", "gl"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(dir.join("checkpoint").join("state.json").exists());
    assert!(!dir.join(".checkpoint.old").exists() && !dir.join(".checkpoint.tmp").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--gating topk --max-experts K` trains a fixed top-K router and
/// `--gating adaptive --max-experts K --rule R` a per-token count of up to
/// K; the summary gives experts per token, the checkpoint serves with its
/// rule; flags that do not go together are refused before anything runs.
#[test]
fn top_k_and_rule_training_then_eval() {
    for (args, want) in [
        (vec!["--gating", "top2", "--rule", "gap"], "--rule"),
        (
            vec!["--gating", "top1", "--max-experts", "3"],
            "--max-experts",
        ),
        (vec!["--gating", "topk", "--max-experts", "9"], "k = 9"),
        (vec!["--gating", "topk", "--max-experts", "5"], "experts"),
        (vec!["--rule", "fixed", "--max-experts", "3"], "topk"),
        (vec!["--rule", "mass", "--threshold", "0"], "(0, 1]"),
    ] {
        let mut a = vec!["train", "--steps", "1"];
        a.extend(&args);
        let out = amoe_toy(&a, &["--out", "/nonexistent/amoe-never-written"]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let dir = std::env::temp_dir().join(format!("amoe-cli-topk-{}", std::process::id()));
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/web/assets/sonnets.txt");
    for (gating, want_desc) in [
        (vec!["--gating", "topk", "--max-experts", "3"], "top-3"),
        (
            vec![
                "--gating",
                "adaptive",
                "--max-experts",
                "3",
                "--rule",
                "ratio",
                "--threshold",
                "0.6",
            ],
            "top-3, ratio rule r = 0.6",
        ),
    ] {
        let _ = std::fs::remove_dir_all(&dir);
        let mut head = vec!["train", "--backend", "vulkan", "--data", data];
        head.extend(&gating);
        let out = amoe_toy(
            &head,
            &[
                "--vocab",
                "300",
                "--steps",
                "3",
                "--warmup",
                "1",
                "--eval-every",
                "3",
                "--eval-batches",
                "1",
                "--json",
                "--out",
                dir.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{gating:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s["max_experts"], 3, "{s}");
        let extra = s["two_expert_fraction"].as_f64().unwrap();
        if want_desc == "top-3" {
            assert_eq!(extra, 2.0, "every token takes 3 experts");
        } else {
            assert!(
                extra > 0.0 && extra < 2.0,
                "the rule varies the count: {extra}"
            );
        }
        let json = dir.join("eval.json");
        let out = amoe(&[
            "eval",
            "--backend",
            "vulkan",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--data",
            data,
            "--max-tokens",
            "200",
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(v["gate"], want_desc);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `amoe calibrate` writes per-layer thresholds that `--calibration`
/// applies (eval measures what the file says); `amoe eval --sweep` gives the
/// fixed top-1 .. top-k and each rule's points, as JSON and an SVG plot.
/// Bad files and flags are refused with what is wrong.
#[test]
fn calibrate_then_sweep_a_top_k_model() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf/qwen3_moe");
    let dir = std::env::temp_dir().join(format!("amoe_cli_calibrate_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cal = dir.join("cal.json");
    let c = cal.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = amoe(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    run(&[
        "calibrate",
        "--checkpoint",
        fixture,
        "--max-tokens",
        "300",
        "--rule",
        "ratio",
        "--target-experts",
        "3",
        "--out",
        c,
    ]);
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&cal).unwrap()).unwrap();
    let layers = file["layers"].as_array().unwrap();
    assert!(!layers.is_empty());
    let mean = file["mean_experts"].as_f64().unwrap();
    assert!(
        (mean - 3.0).abs() < 0.5,
        "measured {mean} for a target of 3"
    );
    let json = dir.join("eval.json");
    let j = json.to_str().unwrap();
    run(&[
        "eval",
        "--checkpoint",
        fixture,
        "--max-tokens",
        "300",
        "--calibration",
        c,
        "--json",
        j,
    ]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(
        v["gate"].as_str().unwrap().contains("per-layer thresholds"),
        "{}",
        v["gate"]
    );
    for (l, e) in layers
        .iter()
        .zip(v["experts_per_token"].as_array().unwrap())
    {
        let (want, got) = (
            l["mean_experts"].as_f64().unwrap(),
            e["mean_experts"].as_f64().unwrap(),
        );
        assert!(
            (want - got).abs() < 1e-9,
            "the file's {want} vs eval's {got}"
        );
    }
    // A file for another model, a broken file, flags that it overrides.
    let other = dir.join("other.json");
    let mut f = file.clone();
    f["experts"] = 64.into();
    std::fs::write(&other, f.to_string()).unwrap();
    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{\"format\": \"amoe-calibration\"").unwrap();
    let (o, b) = (other.to_str().unwrap(), broken.to_str().unwrap());
    for (args, want) in [
        (vec!["--calibration", o], "64 experts"),
        (vec!["--calibration", b], "not an amoe calibration file"),
        (
            vec!["--calibration", c, "--rule", "gap"],
            "leave out --rule",
        ),
        (vec!["--calibration", "/nonexistent/cal.json"], "cal.json"),
        (vec!["--sweep", "rule=fixed"], "gap, ratio or mass"),
        (vec!["--sweep", "rule=most"], "not a rule"),
        (vec!["--sweep", "gap", "--points", "0"], "--points 0"),
        (vec!["--plot", "x.svg"], "--sweep"),
    ] {
        let mut a = vec!["eval", "--checkpoint", fixture, "--max-tokens", "100"];
        a.extend(&args);
        let out = amoe(&a);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // The demo is not a top-k model.
    for args in [
        vec!["eval", "--calibration", c],
        vec!["eval", "--sweep", "ratio"],
        vec!["calibrate", "--rule", "gap", "--target-experts", "1.5"],
    ] {
        let out = amoe(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("top-k"), "{args:?}: {err}");
    }
    let svg = dir.join("sweep.svg");
    run(&[
        "eval",
        "--checkpoint",
        fixture,
        "--max-tokens",
        "200",
        "--sweep",
        "rule=gap,mass",
        "--points",
        "2",
        "--decode-tokens",
        "2",
        "--json",
        j,
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let fixed = v["fixed"].as_array().unwrap();
    assert_eq!(fixed.len(), 8);
    for (j, p) in fixed.iter().enumerate() {
        assert_eq!(p["mean_experts"].as_f64().unwrap(), (j + 1) as f64);
        assert!(p["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let rules = v["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 4);
    for p in rules {
        let m = p["mean_experts"].as_f64().unwrap();
        assert!(m > 1.0 && m < 8.0, "{p}");
        assert!(p["perplexity"].as_f64().unwrap().is_finite());
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.contains("gap rule"),
        "{}",
        &plot[..100.min(plot.len())]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
