//! The browser API (wasm-bindgen), compiled for wasm32 only: the same crate,
//! kernels and pipeline as the native CLI, on the browser's WebGPU adapter.
//!
//! JavaScript sees three classes (see web/app.js for a user):
//! - `Gpu`: `await Gpu.request()` asks for an adapter and a device with the
//!   adapter's limits; `conformance()` runs the kernel checks.
//! - `Generator`: a checkpoint from its files' bytes; `generate()` streams
//!   tokens with their routing, `score()` gives teacher-forced logits.
//! - `Trainer`: a model trained in the tab on a text, step by step.
//!
//! Results cross the boundary as JSON strings (the page parses them) or typed
//! arrays. Every error is a JavaScript exception with the message of the
//! crate's typed `Error`; a method called while the same object is busy with
//! an earlier call rejects with a message instead of aliasing its state.

// Each object's state sits in a RefCell that an async method borrows for its
// whole run, on purpose: a second call while the first runs finds it borrowed
// (`try_borrow*`) and rejects with "busy" instead of interleaving GPU work.
#![allow(clippy::await_holding_refcell_ref)]

use crate::error::Error;
use crate::gpu::{AdapterFilter, GpuContext};
use crate::infer::{Engine, GenConfig, InferCheckpoint, Sampling};
use crate::kernels::Gating;
use crate::train::session::{Session, SessionConfig};
use serde::Deserialize;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(s: &str);
}

/// Runs when the module is instantiated: a panic (a bug) is written to the
/// console with its message before the trap, so that it can be reported.
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        console_error(&format!("amoe panicked (a bug, please report): {info}"));
    }));
}

fn js(e: Error) -> JsValue {
    JsError::new(&e.to_string()).into()
}

fn js_msg(msg: impl AsRef<str>) -> JsValue {
    JsError::new(msg.as_ref()).into()
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, JsValue> {
    serde_json::to_string(v).map_err(|e| js(e.into()))
}

fn busy(what: &str) -> JsValue {
    js_msg(format!(
        "{what} is busy with an earlier call: wait for it to finish"
    ))
}

/// Let the browser run its event loop (input, painting) before going on: a
/// macrotask (`setTimeout(0)`), which a resolved promise is not. Long runs of
/// GPU work in the page (the conformance cases) yield between their steps.
pub(crate) async fn yield_to_browser() {
    let p = js_sys::Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        let timeout = js_sys::Reflect::get(&global, &JsValue::from_str("setTimeout"))
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        match timeout {
            Some(f) => {
                let _ = f.call2(&global, &resolve, &JsValue::from(0));
            }
            None => {
                let _ = resolve.call0(&JsValue::NULL);
            }
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(p).await;
}

/// The browser's WebGPU adapter and a device on it.
#[wasm_bindgen]
pub struct Gpu {
    ctx: Rc<GpuContext>,
    /// How the page names the adapter (wgpu does not read the browser's
    /// adapter info; the page does, from `GPUAdapter.info`).
    label: Option<String>,
}

#[wasm_bindgen]
impl Gpu {
    /// Request an adapter and a device with the adapter's limits and the
    /// optional features it has (shader-f16, subgroups, timestamps).
    /// `label` names the adapter in results (e.g. from `GPUAdapter.info`).
    /// Rejects with a message when the browser has no WebGPU adapter.
    pub async fn request(label: Option<String>) -> Result<Gpu, JsValue> {
        let mut ctx = GpuContext::new(&AdapterFilter::default())
            .await
            .map_err(js)?;
        let label = label.filter(|l| !l.trim().is_empty());
        // wgpu reads only the adapter's description, often empty: results
        // and messages that name the adapter use the page's label then.
        if ctx.info.name.trim().is_empty() {
            if let Some(l) = &label {
                ctx.info.name = l.clone();
            }
        }
        Ok(Gpu {
            ctx: Rc::new(ctx),
            label,
        })
    }

    /// "webgpu/<adapter>", as results name the adapter.
    #[wasm_bindgen(getter)]
    pub fn adapter(&self) -> String {
        let name = match (&self.label, self.ctx.info.name.as_str()) {
            (Some(l), _) => l.clone(),
            (None, "") => "unnamed browser adapter".to_string(),
            (None, n) => n.to_string(),
        };
        format!("webgpu/{name}")
    }

    /// Why the device was lost (`undefined` while it works). After a loss,
    /// request a new `Gpu` and load the model again.
    #[wasm_bindgen(getter)]
    pub fn lost(&self) -> Option<String> {
        self.ctx.lost()
    }

    /// Destroy the device, as a driver reset would: for testing how a page
    /// recovers from a lost device.
    #[wasm_bindgen(js_name = destroyDevice)]
    pub fn destroy_device(&self) {
        self.ctx.device.destroy();
    }

    /// JSON: the adapter's description, features and the limits that matter.
    pub fn info(&self) -> Result<String, JsValue> {
        let c = &self.ctx;
        json(&serde_json::json!({
            "adapter": self.adapter(),
            "vendor": c.info.vendor,
            "driver": c.info.driver,
            "driver_info": c.info.driver_info,
            "shader_f16": c.has_f16(),
            "subgroups": c.has_subgroups(),
            "max_storage_buffer_binding_size": c.limits.max_storage_buffer_binding_size,
            "max_buffer_size": c.limits.max_buffer_size,
            "max_compute_invocations_per_workgroup": c.limits.max_compute_invocations_per_workgroup,
            "max_compute_workgroup_storage_size": c.limits.max_compute_workgroup_storage_size,
        }))
    }

    /// `amoe bench infer --shape SHAPE --shape-layers LAYERS` in the page:
    /// a model of a published family's layer shapes (`granite-1b-a400m`,
    /// `olmoe-1b-7b`) with random weights, `vocab` tokens (default: the
    /// model's), stored as `storage` says (as `Generator.load`'s dtype),
    /// timed over a prefill of `prompt_tokens` and `decode_tokens` greedy
    /// decode steps under its own top-k. Resolves to the same JSON as the
    /// command's.
    #[wasm_bindgen(js_name = benchShape)]
    pub fn bench_shape(
        &self,
        shape: String,
        layers: usize,
        vocab: Option<usize>,
        storage: Option<String>,
        prompt_tokens: usize,
        decode_tokens: usize,
    ) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        let adapter = self.adapter();
        wasm_bindgen_futures::future_to_promise(async move {
            let shape: crate::bench::BenchShape = shape.parse().map_err(js)?;
            let storage = storage_choice(storage.as_deref())?;
            let tokenizer = crate::tokenizer::Tokenizer::train(["random weights"].into_iter(), 260)
                .map_err(js)?;
            let context = (prompt_tokens + decode_tokens + 1).max(2);
            let ck = shape
                .checkpoint(layers, context, vocab, tokenizer)
                .map_err(js)?;
            // Ids spread over the vocabulary (no text: the weights are random).
            let ids: Vec<u32> = (0..prompt_tokens.max(1))
                .map(|i| ((i * 7919 + 11) % ck.cfg.vocab) as u32)
                .collect();
            let gate = ck.gate(None, None).map_err(js)?;
            let r = crate::bench::bench_infer(
                &ctx,
                &ck,
                &ids,
                decode_tokens,
                &[gate.into()],
                storage,
                |_| {},
            )
            .await
            .map_err(js)?;
            ctx.settled_errors("the benchmark").await.map_err(js)?;
            Ok(JsValue::from_str(&json(&crate::bench::InferBench {
                adapter,
                ..r
            })?))
        })
    }

    /// The kernel families, in the order `conformance` runs them.
    pub fn families() -> Vec<String> {
        crate::conformance::FAMILIES
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Run the kernel conformance checks (every family, or one), calling
    /// `on_row(json)` after each case; resolves to the report's JSON (the
    /// same fields as `amoe conformance --json`).
    pub fn conformance(
        &self,
        family: Option<String>,
        on_row: Option<js_sys::Function>,
    ) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        let adapter = self.adapter();
        wasm_bindgen_futures::future_to_promise(async move {
            if let Some(f) = &family {
                if !crate::conformance::FAMILIES.contains(&f.as_str()) {
                    return Err(js_msg(format!(
                        "no kernel family {f:?} (families: {})",
                        crate::conformance::FAMILIES.join(", ")
                    )));
                }
            }
            let mut cases = crate::conformance::cases(family.as_deref());
            // The register-blocked GEMM core with f16 or block-quantized B
            // never completes on Chromium's SwiftShader (the device goes
            // quiet; lavapipe and llvmpipe run it), and no adapter is given
            // it for such weights (`MatmulSpec::choose_for`): those cases
            // are listed as skipped, not run. Every other f16 and quantized
            // case runs.
            let never_chosen = |c: &crate::conformance::Case| {
                matches!(c, crate::conformance::Case::Matmul(m)
                    if m.b != crate::gpu::Dtype::F32
                        && m.spec.variant == crate::kernels::matmul::MatmulVariant::Blocked)
            };
            let skipped: Vec<String> = cases
                .iter()
                .filter(|c| never_chosen(c))
                .map(|c| {
                    let (k, n) = c.names();
                    format!(
                        "{k} [{n}]: the blocked core is never chosen for f16 or quantized weights"
                    )
                })
                .collect();
            cases.retain(|c| !never_chosen(c));
            let report = crate::conformance::run_cases(&ctx, &cases, |r| {
                if let (Some(f), Ok(s)) = (&on_row, serde_json::to_string(r)) {
                    let _ = f.call1(&JsValue::NULL, &JsValue::from_str(&s));
                }
            })
            .await;
            Ok(JsValue::from_str(&json(&serde_json::json!({
                "adapter": adapter,
                "pass": report.pass(),
                "report": report,
                "skipped": skipped,
            }))?))
        })
    }
}

/// Generation options from the page (JSON); missing fields take defaults.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GenOptions {
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
    /// "top1" | "top2" | "adaptive" (default: the run's evaluation gating).
    gating: Option<String>,
    threshold: Option<f32>,
    /// A top-k model's per-token rule: "fixed" | "gap" | "ratio" | "mass"
    /// (its parameter: `threshold`).
    rule: Option<String>,
    /// The most experts a token takes (default: the model's k).
    max_experts: Option<usize>,
    stop_at_eot: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            gating: None,
            threshold: None,
            rule: None,
            max_experts: None,
            stop_at_eot: true,
        }
    }
}

impl GenOptions {
    /// Options from the page's JSON ("" = every default).
    fn parse(json: &str) -> Result<GenOptions, JsValue> {
        if json.trim().is_empty() {
            return Ok(GenOptions::default());
        }
        serde_json::from_str(json).map_err(|e| js_msg(format!("generation options: {e}")))
    }
}

struct GenState {
    ck: InferCheckpoint,
    engine: Engine,
}

impl GenState {
    /// Switch the engine to the options' gating rule (if it differs).
    fn use_gate(
        &mut self,
        ctx: &GpuContext,
        o: &GenOptions,
    ) -> Result<crate::kernels::GateConfig, JsValue> {
        let gating = o
            .gating
            .as_deref()
            .map(str::parse::<Gating>)
            .transpose()
            .map_err(js)?;
        let rule = o
            .rule
            .as_deref()
            .map(str::parse::<crate::kernels::ExpertRule>)
            .transpose()
            .map_err(js)?;
        let count = crate::infer::checkpoint::ExpertCount {
            rule,
            max_experts: o.max_experts,
        };
        let gate = self
            .ck
            .gate_counted(gating, o.threshold, count)
            .map_err(js)?;
        if gate != self.engine.gate {
            self.engine.set_gate(ctx, gate).map_err(js)?;
        }
        Ok(gate)
    }
}

/// A checkpoint on the GPU, ready to generate.
/// The storage a page's `dtype` string asks for: "auto" (also None),
/// "f32", "f16", "q8" / "q4" (the expert banks block-quantized as they
/// load) or "q8 all" / "q4 all" (also the attention projections and an
/// untied unembedding); the other matmul weights as "auto" stores them.
fn storage_choice(dtype: Option<&str>) -> Result<crate::model::StorageChoice, JsValue> {
    Ok(match dtype {
        None => crate::model::DtypeChoice::Auto.into(),
        Some(d) => {
            let (q, scope) = d.split_once(' ').unwrap_or((d, "experts"));
            match q.parse::<crate::quant::QuantFormat>() {
                Ok(q) => crate::model::StorageChoice {
                    dtype: crate::model::DtypeChoice::Auto,
                    quant: Some(q),
                    scope: scope.parse().map_err(js)?,
                },
                Err(_) => d.parse::<crate::model::DtypeChoice>().map_err(js)?.into(),
            }
        }
    })
}

#[wasm_bindgen]
pub struct Generator {
    ctx: Rc<GpuContext>,
    state: Rc<RefCell<GenState>>,
}

impl Generator {
    /// `dtype`: how the matmul weights are stored ("auto", "f32", "f16";
    /// None is "auto"), or "q8" / "q4": the expert banks block-quantized as
    /// they load, "q8 all" / "q4 all": also the attention projections and
    /// an untied unembedding; the other matmul weights as "auto" stores
    /// them.
    fn from_checkpoint(
        ctx: Rc<GpuContext>,
        ck: InferCheckpoint,
        dtype: Option<String>,
    ) -> Result<Generator, JsValue> {
        let dtype = storage_choice(dtype.as_deref())?;
        let gate = ck.gate(None, None).map_err(js)?;
        let engine = ctx
            .scoped("loading the checkpoint", || {
                Engine::with_dtype(&ctx, &ck, gate, dtype)
            })
            .map_err(js)?;
        ctx.check_errors("loading the checkpoint").map_err(js)?;
        // The weights are on the GPU: let the files' bytes go.
        let ck = InferCheckpoint {
            weights: ck.weights.released(),
            ..ck
        };
        Ok(Generator {
            ctx,
            state: Rc::new(RefCell::new(GenState { ck, engine })),
        })
    }
}

#[wasm_bindgen]
impl Generator {
    /// Upload a checkpoint from its files: config.json, model.safetensors,
    /// tokenizer.json and, optionally, state.json. `source` names it in
    /// messages; `dtype` ("auto", "f32" or "f16"; omitted: "auto") is how
    /// the matmul weights are stored, "q8" or "q4" stores the expert banks
    /// block-quantized (the rest as "auto"). Every mismatch or corruption
    /// is an exception.
    pub fn load(
        gpu: &Gpu,
        source: &str,
        config: &[u8],
        model: Vec<u8>,
        tokenizer: &[u8],
        state: Option<Vec<u8>>,
        dtype: Option<String>,
    ) -> Result<Generator, JsValue> {
        let tokenizer = std::str::from_utf8(tokenizer).map_err(|_| {
            js(Error::checkpoint(
                format!("{source}/tokenizer.json"),
                "not UTF-8 text",
            ))
        })?;
        // Read lazily: the upload converts one tensor at a time, and the
        // file's bytes are the only copy of the weights in this tab.
        let tensors = crate::checkpoint::parse_raw(
            &format!("{source}/model.safetensors"),
            crate::checkpoint::FileBytes::new(model),
        )
        .map_err(js)?;
        let ck = InferCheckpoint::from_parts(source, config, tensors, tokenizer, state.as_deref())
            .map_err(js)?;
        Self::from_checkpoint(Rc::new(gpu.ctx.handle()), ck, dtype)
    }

    /// Upload a GGUF file's model (llama.cpp's format; see
    /// `checkpoint::gguf`): `bytes` is the file. `dtype` as for `load`.
    /// Every unsupported architecture or tensor type, truncation or
    /// mismatch is an exception naming the file.
    #[wasm_bindgen(js_name = loadGguf)]
    pub fn load_gguf(
        gpu: &Gpu,
        source: &str,
        bytes: Vec<u8>,
        dtype: Option<String>,
    ) -> Result<Generator, JsValue> {
        let m =
            crate::checkpoint::gguf::load_gguf(source, crate::checkpoint::FileBytes::new(bytes))
                .map_err(js)?;
        let ck = InferCheckpoint::from_hf(m, source).map_err(js)?;
        Self::from_checkpoint(Rc::new(gpu.ctx.handle()), ck, dtype)
    }

    /// Upload a Hugging Face model from the files a user picked or dropped:
    /// `names[i]` is the file name of `blobs[i]` (a `Uint8Array`):
    /// `config.json`, `tokenizer.json`, `generation_config.json` (optional)
    /// and `model.safetensors` or `model.safetensors.index.json` with the
    /// shards it names. `dtype` as for `load` ("auto" stores a bf16 or
    /// f16 model's matmul weights in f16). Every missing file, mismatch or
    /// corruption is an exception naming the file.
    #[wasm_bindgen(js_name = loadHf)]
    pub fn load_hf(
        gpu: &Gpu,
        source: &str,
        names: Vec<String>,
        blobs: js_sys::Array,
        dtype: Option<String>,
    ) -> Result<Generator, JsValue> {
        use crate::checkpoint::hf::{load_hf_parts, HfFiles, GENERATION_CONFIG_FILE};
        use crate::checkpoint::{
            parse_raw, parse_shards, FileBytes, CONFIG_FILE, MODEL_FILE, SHARD_INDEX_FILE,
            TOKENIZER_FILE,
        };
        if names.len() != blobs.length() as usize {
            return Err(js(Error::invalid(
                "loading a model",
                format!("{} names for {} files", names.len(), blobs.length()),
            )));
        }
        // One copy of each file in this tab's memory; the safetensors
        // files are read lazily from it.
        let files: std::collections::HashMap<&str, FileBytes> = names
            .iter()
            .zip(blobs.iter())
            .map(|(n, b)| {
                (
                    n.as_str(),
                    FileBytes::new(js_sys::Uint8Array::new(&b).to_vec()),
                )
            })
            .collect();
        let at = |name: &str| format!("{source}/{name}");
        let get = |name: &str| -> Result<(String, &[u8]), JsValue> {
            files
                .get(name)
                .map(|b| (at(name), b.bytes()))
                .ok_or_else(|| {
                    js(Error::checkpoint(
                        at(name),
                        "missing (pick every file of the model's folder)",
                    ))
                })
        };
        let config = get(CONFIG_FILE)?;
        let tokenizer = get(TOKENIZER_FILE)?;
        let generation = files
            .get(GENERATION_CONFIG_FILE)
            .map(|b| (at(GENERATION_CONFIG_FILE), b.bytes()));
        let m = load_hf_parts(
            HfFiles {
                config: (&config.0, config.1),
                generation: generation.as_ref().map(|(s, b)| (s.as_str(), *b)),
                tokenizer: (&tokenizer.0, tokenizer.1),
            },
            |_| {
                if let Some(b) = files.get(MODEL_FILE) {
                    let src = at(MODEL_FILE);
                    return Ok((src.clone(), parse_raw(&src, b.clone())?));
                }
                let index = files.get(SHARD_INDEX_FILE).ok_or_else(|| {
                    Error::checkpoint(
                        at(MODEL_FILE),
                        format!("missing, and no {SHARD_INDEX_FILE} either"),
                    )
                })?;
                let src = at(SHARD_INDEX_FILE);
                let tensors = parse_shards(&src, index.bytes(), |shard| {
                    let s = at(shard);
                    let b = files.get(shard).ok_or_else(|| {
                        Error::checkpoint(&s, "missing (a shard the index names)")
                    })?;
                    Ok((s.clone(), parse_raw(&s, b.clone())?))
                })?;
                Ok((src, tensors))
            },
        )
        .map_err(js)?;
        let ck = InferCheckpoint::from_hf(m, source).map_err(js)?;
        Self::from_checkpoint(Rc::new(gpu.ctx.handle()), ck, dtype)
    }

    /// JSON: the model's config, parameter count, GPU bytes and default gating.
    pub fn info(&self) -> Result<String, JsValue> {
        let st = self.state.try_borrow().map_err(|_| busy("the model"))?;
        let params: usize = st.ck.weights.numel();
        json(&serde_json::json!({
            "source": st.ck.source,
            "config": st.ck.cfg,
            "params": params,
            "gpu_bytes": st.engine.gpu_bytes(),
            "bytes": st.ck.cfg.gpu_bytes(st.engine.storage()),
            "dtype": st.engine.storage().matmul.name(),
            "experts_dtype": st.engine.storage().experts.name(),
            "projections_dtype": st.engine.storage().projections.name(),
            "eval_gating": st.ck.eval_gating,
            "threshold": st.ck.cfg.gate.threshold,
            "model_type": st.ck.model_type,
            "positions": st.ck.cfg.positions(),
            "axes": st.ck.cfg.axes(),
        }))
    }

    /// Compile every pipeline a generation can use now, not inside the
    /// first generation's timing (on a software adapter that takes
    /// seconds): the prefill passes of `Engine::warm_lengths` (built, not
    /// run: a prompt of any length then waits for no compile), and a
    /// two-token prefill and one decode step run.
    pub fn warm(&self) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        let state = self.state.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut st = state.try_borrow_mut().map_err(|_| busy("the model"))?;
            let st = &mut *st;
            for t in st.engine.warm_lengths() {
                st.engine.compile_prefill(&ctx, t).map_err(js)?;
            }
            let eot = st.ck.tokenizer.eot_id();
            let n = st.engine.cfg.context.min(2);
            st.engine
                .prefill(&ctx, &vec![eot; n], false)
                .await
                .map_err(js)?;
            if st.engine.cfg.context > n {
                st.engine.decode(&ctx, eot).await.map_err(js)?;
            }
            ctx.settled_errors("warm-up").await.map_err(js)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, JsValue> {
        let st = self.state.try_borrow().map_err(|_| busy("the model"))?;
        st.ck.tokenizer.encode(text).map_err(js)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: Vec<u32>) -> Result<String, JsValue> {
        let st = self.state.try_borrow().map_err(|_| busy("the model"))?;
        st.ck.tokenizer.decode(&ids).map_err(js)
    }

    /// Generate from `prompt` with `options` (JSON: max_tokens, temperature,
    /// top_k, top_p, seed, gating, threshold, stop_at_eot), calling
    /// `on_token(json)` with each token (id, text, routes) as it is ready.
    /// Resolves to the generation's JSON with prefill and decode tokens/s.
    pub fn generate(
        &self,
        prompt: String,
        options: &str,
        on_token: Option<js_sys::Function>,
    ) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        let state = self.state.clone();
        let options = options.to_string();
        wasm_bindgen_futures::future_to_promise(async move {
            let o = GenOptions::parse(&options)?;
            let mut st = state.try_borrow_mut().map_err(|_| busy("the model"))?;
            let st = &mut *st;
            let sampling = Sampling {
                temperature: o.temperature,
                top_k: o.top_k,
                top_p: o.top_p,
                seed: o.seed,
            };
            sampling.validate().map_err(js)?;
            let gate = st.use_gate(&ctx, &o)?;
            if prompt.trim().is_empty() {
                return Err(js_msg("empty prompt: type some text to start from"));
            }
            let ids = st.ck.tokenizer.encode(&prompt).map_err(js)?;
            let cfg = GenConfig {
                max_tokens: o.max_tokens,
                sampling,
                stop_at_eot: o.stop_at_eot,
                logits: false,
            };
            let g = st
                .engine
                .generate(&ctx, &st.ck.tokenizer, &ids, &cfg, |t| {
                    if let (Some(f), Ok(s)) = (&on_token, serde_json::to_string(t)) {
                        let _ = f.call1(&JsValue::NULL, &JsValue::from_str(&s));
                    }
                })
                .await
                .map_err(js)?;
            ctx.settled_errors("generate").await.map_err(js)?;
            let prompt_text: Vec<String> = ids
                .iter()
                .map(|&i| st.ck.tokenizer.decode(&[i]).unwrap_or_default())
                .collect();
            // Experts per (token, MoE layer) while decoding.
            let routes: Vec<usize> = g
                .tokens
                .iter()
                .flat_map(|t| t.routes.iter().map(|r| r.experts.len()))
                .collect();
            let mean_experts = routes.iter().sum::<usize>() as f64 / routes.len().max(1) as f64;
            Ok(JsValue::from_str(&json(&serde_json::json!({
                "gating": gate.gating,
                "threshold": gate.threshold,
                "gate": gate.describe(),
                "max_experts": gate.max_k(),
                "mean_experts": mean_experts,
                "prompt_ids": g.prompt_ids,
                "prompt_text": prompt_text,
                "prompt_routes": g.prompt_routes,
                "tokens": g.tokens,
                "ids": g.ids(),
                "text": g.text,
                "stop": g.stop,
                "slides": g.slides,
                "prefill_tps": g.prompt_ids.len() as f64 / g.prefill_s.max(1e-9),
                "decode_tps": g.tokens.len() as f64 / g.decode_s.max(1e-9),
            }))?))
        })
    }

    /// Teacher-forced logits: prefill `prompt`, then decode `ids` one by one;
    /// resolves to a Float32Array of `ids.length` rows of V logits, row i
    /// being the logits the model gives before `ids[i]` (what greedy
    /// generation would pick from). Gating as in `options` (JSON or "").
    pub fn score(&self, prompt: String, ids: Vec<u32>, options: &str) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        let state = self.state.clone();
        let options = options.to_string();
        wasm_bindgen_futures::future_to_promise(async move {
            let o = GenOptions::parse(&options)?;
            let mut st = state.try_borrow_mut().map_err(|_| busy("the model"))?;
            let st = &mut *st;
            st.use_gate(&ctx, &o)?;
            let prompt_ids = st.ck.tokenizer.encode(&prompt).map_err(js)?;
            let n = st.engine.cfg.context;
            if prompt_ids.len() + ids.len() > n {
                return Err(js(Error::Limit {
                    what: "prompt plus scored tokens (the model's context window)".into(),
                    needed: (prompt_ids.len() + ids.len()) as u64,
                    max: n as u64,
                }));
            }
            let mut out = Vec::with_capacity(ids.len() * st.engine.cfg.vocab);
            let mut logits = st
                .engine
                .prefill(&ctx, &prompt_ids, false)
                .await
                .map_err(js)?
                .logits;
            for (i, &id) in ids.iter().enumerate() {
                out.extend_from_slice(&logits);
                if i + 1 < ids.len() {
                    logits = st.engine.decode(&ctx, id).await.map_err(js)?.logits;
                }
            }
            ctx.settled_errors("score").await.map_err(js)?;
            Ok(js_sys::Float32Array::from(&out[..]).into())
        })
    }
}

/// A model trained in the tab: the same training step as `amoe train`.
#[wasm_bindgen]
pub struct Trainer {
    ctx: Rc<GpuContext>,
    session: Rc<RefCell<Session>>,
}

#[wasm_bindgen]
impl Trainer {
    /// Tokenize `text` (a BPE trained on it), pack sequences, initialize a
    /// model and its optimizer from `config` (JSON; see `SessionConfig`:
    /// model, batch, steps, warmup, lr, seed, vocab_size, gating,
    /// threshold, curriculum). `name` is the document's name (the split
    /// and messages use it), as a file name is natively.
    pub fn create(gpu: &Gpu, name: &str, text: &str, config: &str) -> Result<Trainer, JsValue> {
        let cfg: SessionConfig = if config.trim().is_empty() {
            SessionConfig::default()
        } else {
            serde_json::from_str(config).map_err(|e| js_msg(format!("training options: {e}")))?
        };
        // The trainer's own handle: its GPU errors are its own, not the
        // generators' that share the device (and theirs are not its).
        let ctx = Rc::new(gpu.ctx.handle());
        let session = ctx
            .scoped("building the training step", || {
                Session::from_text(&ctx, cfg, name, text)
            })
            .map_err(js)?;
        ctx.check_errors("building the training step").map_err(js)?;
        Ok(Trainer {
            ctx,
            session: Rc::new(RefCell::new(session)),
        })
    }

    /// JSON: the training setup (model config, parameter count, tokens,
    /// sequences, vocabulary).
    pub fn info(&self) -> Result<String, JsValue> {
        let s = self.session.try_borrow().map_err(|_| busy("the trainer"))?;
        json(&s.describe())
    }

    /// One optimizer step; resolves to its metric's JSON (step, loss, lr,
    /// grad_norm, tokens_per_s, two_expert_fraction, expert_imbalance, step_s).
    pub fn step(&self) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        let session = self.session.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut s = session.try_borrow_mut().map_err(|_| busy("the trainer"))?;
            let m = s.step(&ctx).await.map_err(js)?;
            ctx.settled_errors("training step").await.map_err(js)?;
            Ok(JsValue::from_str(&json(&m)?))
        })
    }

    /// Mean validation loss on the held-out tail of the text.
    pub fn validate(&self) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        let session = self.session.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let s = session.try_borrow().map_err(|_| busy("the trainer"))?;
            let v = s.validate(&ctx).await.map_err(js)?;
            Ok(v.map(|x| JsValue::from_f64(x as f64))
                .unwrap_or(JsValue::NULL))
        })
    }

    /// The trained model as a `Generator` (weights copied from the GPU).
    pub fn generator(&self) -> js_sys::Promise {
        let ctx = self.ctx.clone();
        let session = self.session.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let ck = {
                let s = session.try_borrow().map_err(|_| busy("the trainer"))?;
                session_checkpoint(&s, &ctx, "trained in this tab")
                    .await
                    .map_err(js)?
            };
            Ok(Generator::from_checkpoint(Rc::new(ctx.handle()), ck, None)?.into())
        })
    }
}

/// A session's current parameters with its tokenizer, ready for inference.
/// Built here, above both `train` and `infer`, so neither imports the other.
async fn session_checkpoint(
    s: &Session,
    ctx: &GpuContext,
    source: &str,
) -> crate::error::Result<InferCheckpoint> {
    let host = s.model.download(ctx).await?;
    Ok(InferCheckpoint {
        cfg: s.cfg.model.clone(),
        weights: host.into_lazy(),
        stop_ids: vec![s.data.tokenizer.eot_id()],
        tokenizer: s.data.tokenizer.clone(),
        eval_gating: s.cfg.eval_gating,
        source: source.to_string(),
        model_type: None,
    })
}
