// The amoe page: loads the wasm build of the crate (web/pkg, made by
// scripts/web.sh), checks for WebGPU, then offers generation, training and the
// kernel conformance checks. Everything the page computes runs in the crate's
// WGSL kernels on the browser's WebGPU adapter.
//
// `window.amoeApp` exposes the state (the GPU, the loaded generator, the last
// generation and conformance report) for the browser test and for debugging.
import init, { Gpu, Generator, Trainer } from "./pkg/amoe.js";

const $ = (id) => document.getElementById(id);

const app = {
  ready: null,
  state: "starting",
  gpu: null,
  generator: null,
  source: null, // how the current generator was loaded: { kind: "demo" } | { kind: "files", files } | { kind: "trained" }
  trainer: null,
  lastGeneration: null,
  lastConformance: null,
  trainLog: [],
  errors: [],
  wasm: { Gpu, Generator, Trainer },
};
window.amoeApp = app;

function setStatus(text, state) {
  $("status").textContent = text;
  if (state) $("status").dataset.state = state;
}

/** Let the browser paint what was just written before a long synchronous
 * call (compiling kernels blocks the page's thread). */
function paint() {
  return new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
}

function message(e) {
  return (e && e.message) || String(e);
}

/** Show an error under a panel; if the device is gone, offer a restart. */
function showError(id, e) {
  const msg = message(e);
  app.errors.push(msg);
  const el = $(id);
  el.textContent = msg;
  el.hidden = false;
  // The browser tells of a lost device asynchronously, often after the
  // failed call that ran into it: look now and a little later.
  checkLost();
  setTimeout(checkLost, 250);
  setTimeout(checkLost, 1000);
}

function checkLost() {
  const why = app.gpu && app.gpu.lost;
  if (!why || !$("gpu-lost").hidden) return;
  $("gpu-lost-why").textContent =
    `${why.replace(/\.+$/, "")}. The page cannot use the GPU until it gets a new device; your settings and text stay.`;
  $("gpu-lost").hidden = false;
  setStatus("The GPU device was lost: restart it below.", "lost");
}

function clearError(id) {
  $(id).hidden = true;
  $(id).textContent = "";
}

function setBusy(busy) {
  for (const id of ["generate", "load-demo", "train", "conformance", "ckpt-files"]) {
    $(id).disabled = busy || !app.gpu;
  }
  $("use-trained").disabled = busy || !app.trainer;
}

// ---------------------------------------------------------------- start

function showNoGpu(why) {
  $("nogpu-why").textContent = why;
  $("nogpu").hidden = false;
  $("panels").dataset.disabled = "true";
  setStatus("WebGPU is not available: see below.", "no-webgpu");
}

/** The adapter's name as the browser tells it (wgpu does not read it). */
async function adapterLabel() {
  try {
    const a = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    const i = a && a.info;
    if (!i) return undefined;
    return [i.vendor, i.architecture, i.device, i.description].filter((x) => x).join(" ") || undefined;
  } catch {
    return undefined;
  }
}

async function startGpu() {
  if (!("gpu" in navigator)) {
    showNoGpu("This browser exposes no WebGPU API here (navigator.gpu is missing).");
    return false;
  }
  try {
    app.gpu = await Gpu.request(await adapterLabel());
  } catch (e) {
    showNoGpu(`The browser has WebGPU but gave no usable adapter: ${message(e)}`);
    return false;
  }
  $("nogpu").hidden = true;
  $("gpu-lost").hidden = true;
  $("panels").dataset.disabled = "false";
  $("adapter").textContent = app.gpu.adapter;
  return true;
}

async function main() {
  await init();
  for (const f of Gpu.families()) {
    const o = document.createElement("option");
    o.value = o.textContent = f;
    $("conf-family").append(o);
  }
  if (!(await startGpu())) return "no-webgpu";
  setBusy(false);
  setStatus("Loading the demo checkpoint…", "loading");
  await loadDemo();
  return app.state;
}

// ---------------------------------------------------------------- model

async function fetchBytes(url, optional = false) {
  const r = await fetch(url);
  if (!r.ok) {
    if (optional) return undefined;
    throw new Error(`${url}: HTTP ${r.status}`);
  }
  return new Uint8Array(await r.arrayBuffer());
}

/** The weight storage the model panel's select asks for ("auto", "f32",
 * "f16", or "q8" / "q4": the experts block-quantized as they load, "q8 all"
 * / "q4 all": also the attention projections and an untied unembedding). */
function storage() {
  return $("storage")?.value || "auto";
}

function mib(bytes) {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function describeModel(g) {
  const i = JSON.parse(g.info());
  const c = i.config;
  const moe = c.dense ? "dense FFN" : `${c.experts} experts per MoE layer`;
  const axes = i.axes.length ? `, ${i.axes.join(", ")}` : "";
  const gating = i.model_type
    ? `its own top-${c.gate.k} router (${c.gate.renorm ? "renormalized" : "raw"} weights)`
    : `trained with ${c.gate.gating} gating (threshold ${Number(c.gate.threshold.toPrecision(6))}), evaluated with ${i.eval_gating}`;
  $("model-info").textContent =
    `${i.source}${i.model_type ? ` (Hugging Face ${i.model_type})` : ""}: ${(i.params / 1e6).toFixed(2)}M parameters, ` +
    `d=${c.d}, ${c.layers} layers, ${moe}, ${i.positions} positions${axes}, context ${c.context}, ` +
    `vocabulary ${c.vocab}; ${gating}; ${mib(i.gpu_bytes)} on the GPU (${i.dtype} weights${i.experts_dtype && i.experts_dtype !== i.dtype ? `, ${i.experts_dtype} experts` : ''}${i.projections_dtype && i.projections_dtype !== i.dtype ? `, ${i.projections_dtype} projections` : ''}: ` +
    `experts ${mib(i.bytes.parts.experts)}, attention ${mib(i.bytes.parts.attention)}, ` +
    `embeddings ${mib(i.bytes.parts.embeddings)}, KV cache ${mib(i.bytes.kv_cache)}).`;
  return i;
}

/** Replace the generator only once the new one loaded: a bad file keeps the
 *  old model. The shaders compile first, so that generation times the GPU. */
async function useGenerator(g, source) {
  const before = $("status").textContent;
  setStatus("Compiling the kernels for this model (the first time can take a minute on a software GPU)…", "loading");
  await paint();
  try {
    await g.warm();
  } catch (e) {
    g.free();
    throw e;
  } finally {
    setStatus(before);
  }
  if (app.generator && app.generator !== g) app.generator.free();
  app.generator = g;
  app.source = source;
  if (source.kind !== "trained" && app.sampledPreview) {
    // The trained model's sampled preview is not another model's default.
    $("temperature").value = "0";
    $("top-k").value = "0";
    app.sampledPreview = false;
  }
  app.modelInfo = describeModel(g);
  // What the page is about: a model trained with adaptive gating generates
  // with it (its checkpoint may evaluate with top-1, "as trained"); a
  // pretrained top-k model with its own router.
  const c = app.modelInfo.config;
  $("gating").value = !app.modelInfo.model_type && c.gate && c.gate.gating === "adaptive" ? "adaptive" : "";
  explainGating();
}

/** Say what the gating select's choice does for the loaded model. */
function explainGating() {
  const i = app.modelInfo;
  const v = $("gating").value;
  const asTrained = !i
    ? "the checkpoint's own gating"
    : i.model_type
      ? `the model's own router: its top-${i.config.gate.k} experts per token`
      : `the checkpoint's evaluation gating (${i.eval_gating})`;
  const text = {
    "": `As trained: ${asTrained}.`,
    adaptive:
      "Adaptive (the method): every token takes its router's top expert, and a second one only where the router " +
      "is unsure, when the top two router probabilities differ by less than the threshold. Orange tokens took two.",
    top1: "Top-1: every token takes its single top expert (the cheapest rule).",
    top2: "Top-2: every token takes its top two experts, weighted by the router (twice the expert work).",
    topk: "Top-k: a pretrained model's own routing, k experts per token from its config.",
  }[v];
  $("gating-hint").textContent = text || "";
}

/** Say in the model panel what is loading; `done(ok)` puts back the old
 * description when the load failed. */
function modelLoading(what) {
  const el = $("model-info");
  const before = el.textContent;
  el.textContent = `Loading ${what}…`;
  el.dataset.state = "loading";
  return (ok) => {
    delete el.dataset.state;
    if (!ok) el.textContent = before;
  };
}

async function loadDemo() {
  clearError("model-error");
  setBusy(true);
  const done = modelLoading("the demo checkpoint");
  let ok = false;
  try {
    const [config, model, tokenizer, state] = await Promise.all([
      fetchBytes("demo/config.json"),
      fetchBytes("demo/model.safetensors"),
      fetchBytes("demo/tokenizer.json"),
      fetchBytes("demo/state.json", true),
    ]);
    await useGenerator(Generator.load(app.gpu, "demo", config, model, tokenizer, state, storage()), { kind: "demo" });
    ok = true;
    app.state = "ready";
    setStatus("Ready.", "ready");
  } catch (e) {
    showError("model-error", `The demo checkpoint did not load: ${message(e)}`);
    app.state = "ready-without-model";
    setStatus("Ready, without a model: load a checkpoint.", "ready");
  } finally {
    done(ok);
    setBusy(false);
  }
}

const CKPT_FILES = ["config.json", "model.safetensors", "tokenizer.json"];

/** A Hugging Face folder: config.json names a model_type. */
async function isHfFolder(files) {
  if (!files["config.json"]) return false;
  try {
    const c = JSON.parse(await files["config.json"].text());
    return typeof c.model_type === "string";
  } catch {
    return false;
  }
}

async function loadHfFiles(fileList, files) {
  setBusy(true);
  const done = modelLoading("the Hugging Face model");
  let ok = false;
  try {
    const names = Object.keys(files);
    const blobs = [];
    for (const n of names) blobs.push(new Uint8Array(await files[n].arrayBuffer()));
    const name = files["config.json"].webkitRelativePath?.split("/")[0] || "picked files";
    const g = Generator.loadHf(app.gpu, name, names, blobs, storage());
    await useGenerator(g, { kind: "files", files: fileList });
    ok = true;
    return true;
  } catch (e) {
    showError("model-error", `That model did not load; the previous model stays. ${message(e)}`);
    return false;
  } finally {
    done(ok);
    setBusy(false);
  }
}

/** One GGUF file (llama.cpp's format). */
async function loadGgufFile(fileList, file) {
  setBusy(true);
  const done = modelLoading(file.name);
  let ok = false;
  try {
    const g = Generator.loadGguf(app.gpu, file.name, new Uint8Array(await file.arrayBuffer()), storage());
    await useGenerator(g, { kind: "files", files: fileList });
    ok = true;
    return true;
  } catch (e) {
    showError("model-error", `That GGUF file did not load; the previous model stays. ${message(e)}`);
    return false;
  } finally {
    done(ok);
    setBusy(false);
  }
}

async function loadFiles(fileList) {
  clearError("model-error");
  const files = {};
  for (const f of fileList) files[f.name] = f;
  const gguf = Object.values(files).filter((f) => f.name.toLowerCase().endsWith(".gguf"));
  if (gguf.length === 1) return loadGgufFile(fileList, gguf[0]);
  if (await isHfFolder(files)) return loadHfFiles(fileList, files);
  const missing = CKPT_FILES.filter((n) => !files[n]);
  if (missing.length) {
    const got = Object.keys(files).join(", ") || "nothing";
    showError(
      "model-error",
      `Not a checkpoint: missing ${missing.join(", ")} (got ${got}). Pick config.json, ` +
        `model.safetensors and tokenizer.json from one checkpoint folder (state.json is optional).`,
    );
    return false;
  }
  setBusy(true);
  const done = modelLoading("the checkpoint");
  let ok = false;
  try {
    const bytes = async (n) => (files[n] ? new Uint8Array(await files[n].arrayBuffer()) : undefined);
    const name = files["model.safetensors"].webkitRelativePath?.split("/")[0] || "picked files";
    const g = Generator.load(
      app.gpu,
      name,
      await bytes("config.json"),
      await bytes("model.safetensors"),
      await bytes("tokenizer.json"),
      await bytes("state.json"),
      storage(),
    );
    await useGenerator(g, { kind: "files", files: fileList });
    ok = true;
    return true;
  } catch (e) {
    showError("model-error", `That checkpoint did not load; the previous model stays. ${message(e)}`);
    return false;
  } finally {
    done(ok);
    setBusy(false);
  }
}

// ---------------------------------------------------------------- generate

function routeText(t) {
  const layers = t.routes
    .map((r) => `layer ${r.layer}: ` + r.experts.map((e, j) => `expert ${e} (${r.weights[j].toFixed(3)})`).join(" + "))
    .join("\n");
  return `token ${t.id} ${JSON.stringify(t.text)}\n${layers}`;
}

// Experts a token used: the most over its MoE layers.
function tokenExperts(t) {
  return t.routes.reduce((m, r) => Math.max(m, r.experts.length), 0);
}

function tokenSpan(t, prompt) {
  const s = document.createElement("span");
  const n = tokenExperts(t);
  s.className = `tok ${n > 1 ? "two" : "one"}${prompt ? " prompt" : ""}`;
  if (n > 2) {
    // Three to eight experts: the "more" color, stronger with more.
    s.style.background = `color-mix(in srgb, var(--many) ${Math.min(100, 30 + 10 * n)}%, var(--two))`;
  }
  s.dataset.experts = n;
  s.textContent = t.text;
  // Shown by the token tip (hover, or tap on a touch screen): see showTip.
  s.dataset.route = routeText(t);
  s.dataset.id = t.id;
  return s;
}

/** The routing of a token under the pointer (or tapped): a tip that shows at
 * once, on touch screens too, unlike a title tooltip. */
function showTip(span) {
  const tip = $("tok-tip");
  if (!span || !span.dataset.route) {
    tip.hidden = true;
    return;
  }
  tip.textContent = span.dataset.route;
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const top = r.bottom + window.scrollY + 4;
  const left = Math.min(r.left + window.scrollX, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
  tip.style.top = `${top}px`;
  tip.style.left = `${Math.max(window.scrollX + 4, left)}px`;
}

function genOptions() {
  const num = (id) => Number($(id).value);
  const o = {
    max_tokens: num("max-tokens"),
    temperature: num("temperature"),
    top_k: num("top-k"),
    top_p: num("top-p"),
    seed: num("seed"),
  };
  if ($("gating").value) o.gating = $("gating").value;
  if ($("threshold").value !== "") o.threshold = num("threshold");
  if ($("rule").value) o.rule = $("rule").value;
  if ($("max-experts").value !== "") o.max_experts = num("max-experts");
  return o;
}

async function generate() {
  clearError("gen-error");
  if (!app.generator) {
    showError("gen-error", "No model: load the demo checkpoint or pick a checkpoint first.");
    return null;
  }
  const out = $("output");
  out.textContent = "";
  out.dataset.state = "running";
  $("gen-stats").textContent = "";
  const prompt = $("prompt").value;
  const head = document.createElement("span");
  head.className = "tok prompt";
  head.textContent = prompt;
  out.append(head);
  setBusy(true);
  let n = 0;
  let used = 0;
  let routes = 0;
  const started = performance.now();
  try {
    const json = await app.generator.generate(prompt, JSON.stringify(genOptions()), (tj) => {
      const t = JSON.parse(tj);
      out.append(tokenSpan(t, false));
      n += 1;
      for (const r of t.routes) {
        used += r.experts.length;
        routes += 1;
      }
      const mean = routes ? ` · ${(used / routes).toFixed(2)} experts per token` : "";
      const rate = (n / ((performance.now() - started) / 1000)).toFixed(1);
      $("gen-stats").textContent = `${n} tokens…${mean} · ${rate} tok/s`;
    });
    const g = JSON.parse(json);
    // The prompt, now with its routing.
    const spans = g.prompt_ids.map((id, i) =>
      tokenSpan({ id, text: g.prompt_text[i], routes: g.prompt_routes[i] || [] }, true),
    );
    head.replaceWith(...spans);
    const two = g.tokens.filter((t) => t.routes.some((r) => r.experts.length > 1)).length;
    const use = g.max_experts > 2
      ? `${g.mean_experts.toFixed(2)} of ${g.max_experts} experts per token on average`
      : `${two} of ${g.tokens.length} took two experts in some layer`;
    $("gen-stats").textContent =
      `${g.tokens.length} tokens (${g.stop === "end_of_text" ? "end of text" : "max tokens"}), ` +
      `${g.gate}, ${use} · ` +
      `prefill ${g.prefill_tps.toFixed(1)} tok/s · decode ${g.decode_tps.toFixed(1)} tok/s · ${app.gpu.adapter}`;
    app.lastGeneration = g;
    out.dataset.state = "done";
    return g;
  } catch (e) {
    out.dataset.state = "error";
    showError("gen-error", message(e));
    return null;
  } finally {
    setBusy(false);
  }
}

// ---------------------------------------------------------------- train

let stopTraining = false;

function drawChart(log) {
  const c = $("loss-chart");
  const ctx = c.getContext("2d");
  const W = c.width, H = c.height, L = 48, R = 48, T = 12, B = 26;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px sans-serif";
  ctx.strokeStyle = "#ccd";
  ctx.strokeRect(L, T, W - L - R, H - T - B);
  if (!log.length) {
    if (app.trainPhase && app.trainPhase !== "idle") {
      ctx.fillStyle = "#555";
      ctx.font = "14px sans-serif";
      const say = { preparing: "Training the tokenizer and building the model…", compiling: "Compiling the training kernels (step 1)…" };
      ctx.fillText(say[app.trainPhase] || "", L + 16, T + (H - T - B) / 2);
    }
    return;
  }
  const steps = log[log.length - 1].step;
  const losses = log.map((m) => m.loss);
  const lo = Math.min(...losses), hi = Math.max(...losses);
  const x = (s) => L + ((W - L - R) * (s - 1)) / Math.max(1, steps - 1);
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / Math.max(1e-6, hi - lo));
  const yf = (f) => T + (H - T - B) * (1 - f);
  const line = (color, pts) => {
    ctx.strokeStyle = color;
    ctx.beginPath();
    pts.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
    ctx.stroke();
  };
  line("#1f5fbf", log.map((m) => [x(m.step), y(m.loss)]));
  const two = log.filter((m) => m.two_expert_fraction != null);
  if (two.length) line("#e08a00", two.map((m) => [x(m.step), yf(m.two_expert_fraction)]));
  ctx.fillStyle = "#1f5fbf";
  ctx.fillText(hi.toFixed(2), 4, T + 8);
  ctx.fillText(lo.toFixed(2), 4, H - B);
  ctx.fillText("loss", 4, H / 2);
  ctx.fillStyle = "#e08a00";
  ctx.fillText("1.0", W - R + 6, T + 8);
  ctx.fillText("0", W - R + 6, H - B);
  ctx.fillText("2-expert", W - R + 2, H / 2);
  ctx.fillStyle = "#555";
  ctx.fillText(`step ${steps}`, W - R - 50, H - 8);
}

async function trainText() {
  if ($("train-source").value === "pasted") {
    const t = $("train-text").value;
    if (!t.trim()) throw new Error("The text box is empty: paste some text, or pick the bundled sonnets.");
    return { name: "pasted.txt", text: t };
  }
  const r = await fetch("assets/sonnets.txt");
  if (!r.ok) throw new Error(`assets/sonnets.txt: HTTP ${r.status}`);
  return { name: "sonnets.txt", text: await r.text() };
}

/** Where a training run is: idle, preparing (tokenizer, model), compiling
 * (step 1), training. The chart and the panel's data-phase show it. */
function setTrainPhase(phase) {
  app.trainPhase = phase;
  $("train-panel").dataset.phase = phase;
  if (!app.trainLog.length) drawChart([]);
}

async function train() {
  clearError("train-error");
  stopTraining = false;
  setBusy(true);
  $("train-stop").disabled = false;
  app.trainLog = [];
  drawChart([]);
  try {
    const { name, text } = await trainText();
    const steps = Number($("train-steps").value);
    setTrainPhase("preparing");
    $("train-stats").textContent = "Training the tokenizer and building the model…";
    await paint();
    if (app.trainer) app.trainer.free();
    app.trainer = null;
    const t = Trainer.create(app.gpu, name, text, JSON.stringify({ steps, gating: $("train-gating").value }));
    app.trainer = t;
    const info = JSON.parse(t.info());
    for (let s = 0; s < steps && !stopTraining; s++) {
      if (s === 0) {
        // The first step builds every training kernel: on a software GPU
        // (SwiftShader) that is a minute or more, and the tab cannot redraw
        // until it is done. Say so before it starts.
        setTrainPhase("compiling");
        $("train-stats").textContent =
          "Step 1 compiles the training kernels: about a minute or two on a software GPU, seconds on a real one. " +
          "The page does not respond until it is done.";
        await paint();
      }
      const m = JSON.parse(await t.step());
      if (s === 0) setTrainPhase("training");
      app.trainLog.push(m);
      drawChart(app.trainLog);
      const two = m.two_expert_fraction == null ? "" : `, two-expert fraction ${m.two_expert_fraction.toFixed(3)}`;
      $("train-stats").textContent =
        `step ${m.step}/${steps}: loss ${m.loss.toFixed(3)}${two}, ${m.tokens_per_s.toFixed(0)} tokens/s ` +
        `(${(info.params / 1e3).toFixed(0)}k parameters, ${info.train_tokens} training tokens, vocabulary ${info.vocab})`;
    }
    const val = await t.validate();
    if (val != null) $("train-stats").textContent += ` · validation loss ${val.toFixed(3)} (perplexity ${Math.exp(val).toFixed(1)})`;
    app.trainDone = { steps: app.trainLog.length, val };
  } catch (e) {
    showError("train-error", message(e));
  } finally {
    setTrainPhase("idle");
    $("train-stop").disabled = true;
    setBusy(false);
  }
}

async function useTrained() {
  clearError("train-error");
  $("output").dataset.state = "loading";
  setBusy(true);
  try {
    await useGenerator(await app.trainer.generator(), { kind: "trained" });
    $("rule").value = "";
    $("max-experts").value = "";
    $("prompt").value = "Shall I compare thee";
    // A model this small repeats itself under greedy decoding: sample the
    // preview (temperature 0.8, top-k 40; the seed makes it repeatable).
    $("temperature").value = "0.8";
    $("top-k").value = "40";
    app.sampledPreview = true;
    document.getElementById("generate-panel").scrollIntoView();
  } catch (e) {
    $("output").dataset.state = "error";
    showError("train-error", message(e));
    return null;
  } finally {
    setBusy(false);
  }
  return generate();
}

// ---------------------------------------------------------------- conformance

function fmtErr(x) {
  if (x == null || Number.isNaN(x)) return "-";
  return x.toExponential(2).replace("e+", "e");
}

async function conformance() {
  clearError("conf-error");
  const body = $("conf-table").querySelector("tbody");
  body.textContent = "";
  setBusy(true);
  let n = 0, failed = 0;
  $("conf-summary").textContent = "Running…";
  try {
    const fam = $("conf-family").value || undefined;
    const json = await app.gpu.conformance(fam, (rj) => {
      const r = JSON.parse(rj);
      n += 1;
      if (!r.pass) failed += 1;
      const tr = document.createElement("tr");
      if (!r.pass) tr.className = "fail";
      const cells = [r.kernel, r.case, fmtErr(r.max_abs_err), fmtErr(r.max_rel_err),
        r.gflops == null ? "" : r.gflops.toFixed(2), r.pass ? "pass" : "FAIL"];
      cells.forEach((c, i) => {
        const td = document.createElement("td");
        td.textContent = c;
        if (i >= 2 && i <= 4) td.className = "num";
        tr.append(td);
      });
      if (!r.pass && r.note) tr.title = r.note;
      body.append(tr);
      $("conf-summary").textContent = `${n} checked, ${failed} failed…`;
    });
    const rep = JSON.parse(json);
    app.lastConformance = rep;
    const na = rep.report.not_applicable.length;
    $("conf-summary").textContent =
      `${rep.adapter}: ${rep.report.kernels.length - failed} passed, ${failed} failed, ${na} not applicable on this adapter` +
      (na ? ` (${[...new Set(rep.report.not_applicable.map((w) => w.split("]: ").pop()))].join("; ")})` : "");
    return rep;
  } catch (e) {
    showError("conf-error", message(e));
    return null;
  } finally {
    setBusy(false);
  }
}

// ---------------------------------------------------------------- wiring

// Frees a wasm object's memory now; one still borrowed by a call in flight
// on the lost device refuses, and is then left to the garbage collector.
function release(obj) {
  try {
    obj?.free();
  } catch {
    /* busy: dropped with its last reference */
  }
}

async function restartGpu() {
  $("gpu-lost").hidden = true;
  release(app.generator);
  release(app.trainer);
  release(app.gpu);
  app.generator = null;
  app.trainer = null;
  app.gpu = null;
  if (!(await startGpu())) return;
  setStatus("Reloading the model…", "loading");
  const src = app.source;
  if (src && src.kind === "files" && (await loadFiles(src.files))) {
    setStatus("Ready.", "ready");
  } else {
    // A model trained in the tab lived on the lost device: the demo replaces it.
    await loadDemo();
  }
}

$("gen-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  generate();
});
$("load-demo").addEventListener("click", loadDemo);
$("ckpt-files").addEventListener("change", (ev) => {
  if (ev.target.files.length) loadFiles([...ev.target.files]);
  ev.target.value = "";
});
const dz = $("dropzone");
dz.addEventListener("dragover", (ev) => {
  ev.preventDefault();
  dz.classList.add("over");
});
dz.addEventListener("dragleave", () => dz.classList.remove("over"));
dz.addEventListener("drop", (ev) => {
  ev.preventDefault();
  dz.classList.remove("over");
  if (app.gpu) loadFiles([...ev.dataTransfer.files]);
});
$("gating").addEventListener("change", explainGating);
const out = $("output");
out.addEventListener("pointerover", (ev) => {
  if (ev.pointerType === "mouse") showTip(ev.target.closest(".tok"));
});
out.addEventListener("pointerleave", (ev) => {
  if (ev.pointerType === "mouse") showTip(null);
});
// A tap (touch, pen) or a click shows a token's routing until the next tap.
out.addEventListener("click", (ev) => showTip(ev.target.closest(".tok")));
$("train").addEventListener("click", train);
$("train-stop").addEventListener("click", () => (stopTraining = true));
$("use-trained").addEventListener("click", useTrained);
$("conformance").addEventListener("click", conformance);
$("retry-gpu").addEventListener("click", () => main().catch(() => {}));
$("restart-gpu").addEventListener("click", restartGpu);

Object.assign(app, { generate, train, useTrained, conformance, loadFiles, loadDemo, restartGpu });

app.ready = main().catch((e) => {
  setStatus(`The page failed to start: ${message(e)}`, "error");
  app.errors.push(message(e));
  return "error";
});
