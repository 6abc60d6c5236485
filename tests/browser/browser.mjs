// The browser test: the page in web/ (with the wasm build in web/pkg) in
// Debian's headless Chromium, driven by playwright-core, against the native
// `amoe` binary on the same machine.
//
//   node tests/browser/browser.mjs        (after scripts/web.sh --build-only
//                                          and cargo build; scripts/test.sh does both)
//
// Checks:
//  (a) greedy tokens of the page == native `amoe generate --json` (a token may
//      differ only where native's top two logits are a near-tie), and the page's
//      teacher-forced logits along native's tokens == native's within tolerance,
//      for the checkpoint's own gating and for adaptive gating;
//  (b) the in-browser kernel conformance passes;
//  (c) one training step's loss in the page == `amoe train`'s first step for the
//      same text, config and seed (and the next two steps within tolerance);
//      the page's training panel trains and generates from what it trained;
//  (d) without WebGPU the page says so and what to do;
//  (e) a Hugging Face folder picked in the page (a sharded f16 fixture) gives
//      the reference library's greedy tokens, as native does;
//  plus bad input (not a checkpoint, a truncated safetensors file), a lost
//  device (the page recovers), a screenshot after generation, and the decode
//  tokens/s of the page next to native's (printed, and written to
//  target/browser/numbers.json).
//
// Environment: AMOE_BIN (default target/debug/amoe), CHROMIUM (default
// /usr/bin/chromium), AMOE_BROWSER_OUT (default target/browser).
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { startServer } from "../../web/serve.mjs";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const amoe = process.env.AMOE_BIN || path.join(repo, "target", "debug", "amoe");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const outDir = process.env.AMOE_BROWSER_OUT || path.join(repo, "target", "browser");
fs.mkdirSync(outDir, { recursive: true });

// Chromium flags: headless as root in a container, no network chatter; WebGPU
// on Chromium's software adapter (SwiftShader) needs --enable-unsafe-webgpu.
const BASE_FLAGS = [
  "--no-sandbox",
  "--disable-gpu-sandbox",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-quic",
];
const WEBGPU_FLAGS = [...BASE_FLAGS, "--enable-unsafe-webgpu"];

// Float tolerance between the page (SwiftShader) and native (lavapipe): the
// same kernels, compiled by different drivers, differ in the last bits.
const LOGIT_ATOL = 1e-4;
const LOGIT_RTOL = 1e-4;
// A greedy token may differ from native's only where native's best two logits
// are closer than this.
const NEAR_TIE = 1e-2;
const LOSS_RTOL = 1e-3;

const PROMPT = "And God said unto Noah,";
const GEN_TOKENS = 24;
const BENCH_TOKENS = 64;

const results = [];
function check(name, ok, detail = "") {
  results.push({ name, ok: !!ok, detail });
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${detail ? ` -- ${detail}` : ""}`);
}

function native(args) {
  return execFileSync(amoe, args, {
    cwd: repo,
    encoding: "utf8",
    maxBuffer: 256 << 20,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, NO_COLOR: "1" },
  });
}

function nativeGenerate(gating, tokens, logits, stopAtEot = false) {
  const args = ["generate", "--prompt", PROMPT, "--max-tokens", String(tokens), "--json"];
  if (!stopAtEot) args.push("--no-stop");
  if (gating) args.push("--gating", gating);
  if (logits) args.push("--logits");
  return JSON.parse(native(args));
}

function argmaxGap(row) {
  let a = -Infinity, b = -Infinity, ia = -1;
  row.forEach((v, i) => {
    if (v > a) { b = a; a = v; ia = i; } else if (v > b) { b = v; }
  });
  return { id: ia, gap: a - b };
}

async function launch(flags) {
  return chromium.launch({ executablePath: chromiumPath, headless: true, args: flags });
}

async function openPage(browser, url) {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  page.on("console", (m) => {
    if (m.type() === "error" && /panicked|unreachable/.test(m.text())) pageErrors.push(m.text());
  });
  await page.goto(url);
  const state = await page.evaluate(() => window.amoeApp.ready);
  return { page, state, pageErrors };
}

/** Click `selector` and wait for the generation it starts to end. */
async function clickAndGenerate(page, selector, timeout = 300_000) {
  await page.evaluate(() => (window.amoeApp.lastGeneration = null));
  const errors = await page.evaluate(() => window.amoeApp.errors.length);
  await page.click(selector);
  await page.waitForFunction(
    (n) => window.amoeApp.lastGeneration || window.amoeApp.errors.length > n,
    errors,
    { timeout },
  );
  return page.evaluate(() => window.amoeApp.lastGeneration);
}

/** (a) for one gating: UI or API generation vs native, then teacher-forced logits. */
async function compareGeneration(page, gating, viaUi) {
  // The page's form stops at the end-of-text token, as native does by default.
  const nat = nativeGenerate(gating, GEN_TOKENS, true, viaUi);
  let web;
  if (viaUi) {
    await page.fill("#prompt", PROMPT);
    await page.fill("#max-tokens", String(GEN_TOKENS));
    await page.selectOption("#gating", gating || "");
    await page.fill("#threshold", "");
    web = await clickAndGenerate(page, "#generate");
    const err = await page.textContent("#gen-error");
    check(`generate via the page (${gating || "checkpoint's gating"}) finishes`, web && !err, err || "");
    if (!web) return null;
  } else {
    web = JSON.parse(
      await page.evaluate(
        ([p, n, g]) =>
          window.amoeApp.generator.generate(p, JSON.stringify({ max_tokens: n, gating: g, stop_at_eot: false }), null),
        [PROMPT, GEN_TOKENS, gating],
      ),
    );
  }
  const label = gating || nat.gating;
  check(`(a) ${label}: prompt tokens equal`, JSON.stringify(web.prompt_ids) === JSON.stringify(nat.prompt_ids));
  // Greedy tokens: equal, or the first difference sits on a near-tie of native's logits.
  let same = 0;
  while (same < nat.ids.length && web.ids[same] === nat.ids[same]) same++;
  if (same === nat.ids.length && web.ids.length === nat.ids.length) {
    check(`(a) ${label}: greedy tokens equal native's`, true, `${same} tokens: ${JSON.stringify(nat.text)}`);
  } else {
    const row = nat.tokens[same].logits;
    const { gap } = argmaxGap(row);
    const webPick = web.ids[same];
    const close = Math.abs(row[webPick] - row[nat.ids[same]]) <= NEAR_TIE;
    check(
      `(a) ${label}: greedy tokens equal native's up to a near-tie`,
      close,
      `first difference at token ${same}: native ${nat.ids[same]}, page ${webPick}, native's top-2 gap ${gap.toExponential(2)}`,
    );
  }
  // Teacher forcing along native's tokens.
  const flat = await page.evaluate(
    async ([p, ids, g]) => Array.from(await window.amoeApp.generator.score(p, ids, JSON.stringify(g ? { gating: g } : {}))),
    [PROMPT, nat.ids, gating],
  );
  const V = flat.length / nat.ids.length;
  let worstAbs = 0, worstExcess = -Infinity, where = "";
  nat.tokens.forEach((t, i) => {
    t.logits.forEach((want, j) => {
      const got = flat[i * V + j];
      const d = Math.abs(got - want);
      const excess = d - (LOGIT_ATOL + LOGIT_RTOL * Math.abs(want));
      if (d > worstAbs) worstAbs = d;
      if (excess > worstExcess) { worstExcess = excess; where = `token ${i}, logit ${j}: page ${got}, native ${want}`; }
    });
  });
  check(
    `(a) ${label}: teacher-forced logits within ${LOGIT_ATOL} + ${LOGIT_RTOL}|x| of native's`,
    V === nat.tokens[0].logits.length && worstExcess <= 0 && Number.isFinite(worstAbs),
    `${nat.ids.length} x ${V} logits, max |diff| ${worstAbs.toExponential(2)} (worst at ${where})`,
  );
  return { nat, web, maxAbs: worstAbs };
}

async function speed(page) {
  // Warm: the first call compiles the prefill pipelines.
  const opts = JSON.stringify({ max_tokens: BENCH_TOKENS, stop_at_eot: false });
  const runs = [];
  for (let i = 0; i < 3; i++) {
    runs.push(JSON.parse(await page.evaluate(([p, o]) => window.amoeApp.generator.generate(p, o, null), [PROMPT, opts])));
  }
  const webTps = runs.map((r) => r.decode_tps).sort((a, b) => a - b)[1];
  const nat = [0, 1, 2].map(() => nativeGenerate(null, BENCH_TOKENS, false));
  const natTps = nat.map((r) => r.decode_tps).sort((a, b) => a - b)[1];
  return { webTps, natTps, natAdapter: nat[0].adapter };
}

async function training(page) {
  const text = fs.readFileSync(path.join(repo, "web", "assets", "sonnets.txt"), "utf8");
  const cfg = { d: 32, layers: 2, heads: 2, context: 32, ffn: 64, experts: 4, vocab: 512, batch: 8, warmup: 20, seed: 1, gating: "adaptive" };
  const steps = 3;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "amoe-browser-"));
  const data = path.join(tmp, "sonnets.txt");
  fs.writeFileSync(data, text);
  native([
    "train", "--data", data, "--out", path.join(tmp, "run"),
    "--d", String(cfg.d), "--layers", String(cfg.layers), "--heads", String(cfg.heads),
    "--context", String(cfg.context), "--ffn", String(cfg.ffn), "--experts", String(cfg.experts),
    "--vocab", String(cfg.vocab), "--batch", String(cfg.batch), "--warmup", String(cfg.warmup),
    "--seed", String(cfg.seed), "--gating", cfg.gating, "--steps", String(steps),
    "--eval-every", "0", "--checkpoint-every", "0",
  ]);
  const natLoss = fs
    .readFileSync(path.join(tmp, "run", "metrics.jsonl"), "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l))
    .filter((m) => m.kind === "train")
    .map((m) => m.loss);
  fs.rmSync(tmp, { recursive: true, force: true });
  const webRun = await page.evaluate(
    async ([t, c, n]) => {
      const app = window.amoeApp;
      // Is the page still drawing while the first step compiles the
      // training kernels? Frame times and long tasks of the main thread.
      const frames = [];
      let on = true;
      const loop = () => {
        frames.push(performance.now());
        if (on) requestAnimationFrame(loop);
      };
      requestAnimationFrame(loop);
      const longTasks = [];
      const po = new PerformanceObserver((l) => l.getEntries().forEach((e) => longTasks.push(e.duration)));
      po.observe({ entryTypes: ["longtask"] });
      const t0 = performance.now();
      const tr = app.wasm.Trainer.create(app.gpu, "sonnets.txt", t, JSON.stringify({ ...c, steps: n }));
      const out = [];
      for (let i = 0; i < n; i++) out.push(JSON.parse(await tr.step()));
      const t1 = performance.now();
      on = false;
      await new Promise((r) => setTimeout(r, 100));
      po.disconnect();
      let gap = 0;
      for (let i = 1; i < frames.length; i++) gap = Math.max(gap, frames[i] - frames[i - 1]);
      const info = JSON.parse(tr.info());
      tr.free();
      return {
        losses: out.map((m) => m.loss),
        info,
        seconds: (t1 - t0) / 1000,
        frames: frames.length,
        maxFrameGap: gap / 1000,
        longTask: Math.max(0, ...longTasks) / 1000,
      };
    },
    [text, cfg, steps],
  );
  const rel = (a, b) => Math.abs(a - b) / Math.abs(b);
  check(
    "(c) first training step's loss equals native's",
    natLoss.length === steps && rel(webRun.losses[0], natLoss[0]) <= LOSS_RTOL,
    `page ${webRun.losses[0]}, native ${natLoss[0]} (vocabulary ${webRun.info.vocab}, ${webRun.info.params} parameters)`,
  );
  check(
    `(c) steps 2..${steps} follow native's`,
    webRun.losses.slice(1).every((l, i) => rel(l, natLoss[i + 1]) <= 2 * LOSS_RTOL),
    `page ${JSON.stringify(webRun.losses)}, native ${JSON.stringify(natLoss)}`,
  );
  // The kernels compile in the GPU process: the tab must go on drawing
  // (frames at most a second apart) while the first step waits for them.
  check(
    "(c) the page keeps drawing while its first training step compiles the kernels",
    webRun.frames > 10 && webRun.maxFrameGap < 1,
    `${steps} steps in ${webRun.seconds.toFixed(1)} s: ${webRun.frames} frames, longest gap ` +
      `${(webRun.maxFrameGap * 1000).toFixed(0)} ms, longest task ${(webRun.longTask * 1000).toFixed(0)} ms`,
  );
  return {
    web: webRun.losses,
    native: natLoss,
    first_steps_s: webRun.seconds,
    max_frame_gap_s: webRun.maxFrameGap,
    longest_task_s: webRun.longTask,
  };
}

async function trainingPanel(page) {
  await page.fill("#train-steps", "4");
  await page.click("#train");
  await page.waitForFunction(() => window.amoeApp.trainDone || !document.getElementById("train-error").hidden, null, {
    timeout: 600_000,
  });
  const err = await page.textContent("#train-error");
  const log = await page.evaluate(() => window.amoeApp.trainLog);
  check(
    "training panel: 4 steps with finite losses and a validation loss",
    !err && log.length === 4 && log.every((m) => Number.isFinite(m.loss)) &&
      Number.isFinite(await page.evaluate(() => window.amoeApp.trainDone.val)),
    err || `losses ${JSON.stringify(log.map((m) => m.loss))}`,
  );
  const g = await clickAndGenerate(page, "#use-trained");
  const src = await page.evaluate(() => window.amoeApp.source && window.amoeApp.source.kind);
  const prompt = await page.inputValue("#prompt");
  check("generate with the model trained in the page", src === "trained" && g && g.tokens.length > 0 &&
    g.prompt_text.join("") === prompt,
    g ? JSON.stringify(prompt + g.text.slice(0, 60)) : await page.textContent("#gen-error"));
}

async function conformance(page) {
  const started = Date.now();
  await page.click("#conformance");
  await page.waitForFunction(() => window.amoeApp.lastConformance || !document.getElementById("conf-error").hidden, null, {
    timeout: 900_000,
  });
  const rep = await page.evaluate(() => window.amoeApp.lastConformance);
  if (rep) rep.seconds = (Date.now() - started) / 1000;
  const rows = await page.$$eval("#conf-table tbody tr", (trs) => trs.length);
  const failed = rep ? rep.report.kernels.filter((k) => !k.pass) : [];
  const unnamed = rep ? rep.report.not_applicable.filter((w) => /browser\/ has/.test(w)) : [];
  check("(b) the conformance report names the adapter where a case does not apply", rep && unnamed.length === 0,
    unnamed.slice(0, 2).join("; "));
  check(
    "(b) in-browser conformance passes",
    rep && rep.pass && failed.length === 0 && rows === rep.report.kernels.length && rows > 100,
    rep ? `${rows} cases pass, ${rep.report.not_applicable.length} not applicable on ${rep.adapter}` +
      (failed.length ? `; failed: ${failed.map((k) => `${k.kernel} [${k.case}] ${k.note || ""}`).join("; ")}` : "")
      : await page.textContent("#conf-error"),
  );
  return rep;
}

async function badInput(page) {
  const demo = path.join(repo, "data", "demo");
  const stillWorks = async (what) => {
    const g = JSON.parse(
      await page.evaluate(() => window.amoeApp.generator.generate("And", JSON.stringify({ max_tokens: 2 }), null)),
    );
    check(`page still generates after ${what}`, g.tokens.length > 0 || g.stop === "end_of_text");
  };
  // Not a checkpoint at all.
  await page.setInputFiles("#ckpt-files", {
    name: "notes.txt",
    mimeType: "text/plain",
    buffer: Buffer.from("not a model"),
  });
  await page.waitForSelector("#model-error:not([hidden])");
  let msg = await page.textContent("#model-error");
  check("a file that is not a checkpoint: a message on the page", /not a checkpoint/i.test(msg), msg);
  await stillWorks("a file that is not a checkpoint");
  // A truncated safetensors file.
  const model = fs.readFileSync(path.join(demo, "model.safetensors"));
  await page.setInputFiles("#ckpt-files", [
    { name: "config.json", mimeType: "application/json", buffer: fs.readFileSync(path.join(demo, "config.json")) },
    { name: "tokenizer.json", mimeType: "application/json", buffer: fs.readFileSync(path.join(demo, "tokenizer.json")) },
    { name: "model.safetensors", mimeType: "application/octet-stream", buffer: model.subarray(0, model.length >> 1) },
  ]);
  await page.waitForFunction(() => /safetensors/.test(document.getElementById("model-error").textContent));
  msg = await page.textContent("#model-error");
  check("a truncated safetensors file: a message naming it", /truncated or corrupt/.test(msg), msg);
  await stillWorks("a truncated checkpoint");
  // The demo's own files through the file input load.
  await page.setInputFiles(
    "#ckpt-files",
    ["config.json", "tokenizer.json", "model.safetensors", "state.json"].map((n) => path.join(demo, n)),
  );
  await page.waitForFunction(() => window.amoeApp.source && window.amoeApp.source.kind === "files");
  check("a checkpoint picked with the file input loads", (await page.textContent("#model-error")) === "");
}

/** A Hugging Face folder (the f16 qwen2_moe fixture, three shards and an
 *  index) picked with the file input: it loads, its greedy tokens equal the
 *  reference library's (expected.json) and native's; a missing shard is a
 *  message naming it. The demo is loaded again at the end. */
async function hfFolder(page) {
  const dir = path.join(repo, "tests", "fixtures", "hf", "qwen2_moe");
  const exp = JSON.parse(fs.readFileSync(path.join(dir, "expected.json"), "utf8"));
  const files = fs.readdirSync(dir).filter((n) => n.endsWith(".json") || n.endsWith(".safetensors"))
    .filter((n) => n !== "expected.json");
  await page.setInputFiles("#ckpt-files", files.map((n) => path.join(dir, n)));
  await page.waitForFunction(
    () => document.getElementById("model-info").dataset.state !== "loading" &&
      (/qwen2_moe/.test(document.getElementById("model-info").textContent) ||
        !document.getElementById("model-error").hidden),
    null,
    { timeout: 300_000 },
  );
  const err = await page.textContent("#model-error");
  check("(e) a Hugging Face folder (qwen2_moe, 3 f16 shards) loads in the page", !err, err || (await page.textContent("#model-info")));
  if (err) return;
  const info = await page.textContent("#model-info");
  check("(e) ... with its matmul weights stored in f16 (--dtype auto)", /f16 weights/.test(info), info);
  const n = exp.greedy.new_tokens.length;
  const web = JSON.parse(
    await page.evaluate(
      ([p, n]) => window.amoeApp.generator.generate(p, JSON.stringify({ max_tokens: n, stop_at_eot: false }), null),
      [exp.prompt, n],
    ),
  );
  const nat = JSON.parse(native(["generate", "--checkpoint", dir, "--prompt", exp.prompt, "--max-tokens", String(n),
    "--json", "--no-stop"]));
  check("(e) the page's prompt ids equal the reference's", JSON.stringify(web.prompt_ids) === JSON.stringify(exp.input_ids));
  check("(e) the page's greedy tokens equal the reference library's", JSON.stringify(web.ids) === JSON.stringify(exp.greedy.new_tokens),
    `page ${JSON.stringify(web.ids)}, reference ${JSON.stringify(exp.greedy.new_tokens)}`);
  check("(e) ... and native's", JSON.stringify(web.ids) === JSON.stringify(nat.ids), `native ${JSON.stringify(nat.ids)}`);
  // The per-token expert rule from the page's controls: the tokens native
  // gives under the same rule, fewer experts than the model's 4 on average.
  await page.fill("#prompt", exp.prompt);
  await page.fill("#max-tokens", String(n));
  await page.fill("#threshold", "0.5");
  await page.selectOption("#rule", "ratio");
  const ruled = await clickAndGenerate(page, "#generate");
  const natRuled = JSON.parse(native(["generate", "--checkpoint", dir, "--prompt", exp.prompt, "--max-tokens", String(n),
    "--json", "--rule", "ratio", "--threshold", "0.5"]));
  check("(e) the page's expert rule controls (ratio 0.5) give native's tokens under that rule",
    ruled && JSON.stringify(ruled.ids) === JSON.stringify(natRuled.ids),
    `page ${ruled && JSON.stringify(ruled.ids)}, native ${JSON.stringify(natRuled.ids)}`);
  check("(e) ... with fewer experts per token than the model's top-4, shown live",
    ruled && ruled.gate.includes("ratio rule") && ruled.mean_experts >= 1 && ruled.mean_experts < 4 &&
      /experts per token/.test(await page.textContent("#gen-stats")),
    ruled && `${ruled.gate}: ${ruled.mean_experts}; ${await page.textContent("#gen-stats")}`);
  await page.selectOption("#rule", "");
  await page.fill("#threshold", "");
  // A shard left out: a message naming it; the model stays.
  const shard = files.find((n) => /-00002-of-/.test(n));
  await page.setInputFiles("#ckpt-files", files.filter((n) => n !== shard).map((n) => path.join(dir, n)));
  await page.waitForSelector("#model-error:not([hidden])");
  const msg = await page.textContent("#model-error");
  check("(e) a Hugging Face folder without one of its shards: a message naming the shard", msg.includes(shard), msg);
  // A GGUF file (olmoe, Q4_0): its experts and attention projections load
  // as q4 (the packed expert and dense kernels in the page), and its greedy
  // tokens equal native's on the same file; a truncated one is a message.
  const gguf = path.join(repo, "tests", "fixtures", "gguf", "olmoe-q4_0.gguf");
  const gexp = JSON.parse(fs.readFileSync(gguf.replace(/\.gguf$/, ".expected.json"), "utf8"));
  await page.setInputFiles("#ckpt-files", gguf);
  await page.waitForFunction(
    () => document.getElementById("model-info").dataset.state !== "loading" &&
      (/olmoe-q4_0/.test(document.getElementById("model-info").textContent) ||
        !document.getElementById("model-error").hidden),
    null,
    { timeout: 300_000 },
  );
  const gerr = await page.textContent("#model-error");
  const ginfo = await page.textContent("#model-info");
  check("(e) a GGUF file (olmoe, Q4_0) loads in the page, its experts and attention projections stored in q4",
    !gerr && /q4 experts, q4 projections/.test(ginfo),
    gerr || ginfo);
  if (!gerr) {
    const gweb = JSON.parse(
      await page.evaluate(
        ([p, n]) => window.amoeApp.generator.generate(p, JSON.stringify({ max_tokens: n, stop_at_eot: false }), null),
        [gexp.prompt, 12],
      ),
    );
    const gnat = JSON.parse(native(["generate", "--checkpoint", gguf, "--prompt", gexp.prompt, "--max-tokens", "12",
      "--json", "--no-stop"]));
    check("(e) ... its prompt ids are the reference's and its greedy tokens native's",
      JSON.stringify(gweb.prompt_ids) === JSON.stringify(gexp.input_ids) &&
        JSON.stringify(gweb.ids) === JSON.stringify(gnat.ids),
      `page ${JSON.stringify(gweb.ids)}, native ${JSON.stringify(gnat.ids)}`);
  }
  await page.setInputFiles("#ckpt-files", {
    name: "cut.gguf",
    mimeType: "application/octet-stream",
    buffer: fs.readFileSync(gguf).subarray(0, 5000),
  });
  await page.waitForSelector("#model-error:not([hidden])");
  const gmsg = await page.textContent("#model-error");
  check("(e) a truncated GGUF file: a message naming it", /cut\.gguf/.test(gmsg) && /GGUF/.test(gmsg), gmsg);
  const demo = path.join(repo, "data", "demo");
  await page.setInputFiles(
    "#ckpt-files",
    ["config.json", "tokenizer.json", "model.safetensors", "state.json"].map((n) => path.join(demo, n)),
  );
  await page.waitForFunction(() => document.getElementById("model-info").dataset.state !== "loading" &&
      !/olmoe-q4_0/.test(document.getElementById("model-info").textContent),
    null, { timeout: 300_000 });
  check("(e) the demo loads again after the Hugging Face model", (await page.textContent("#model-error")) === "");
}

/** Two calls at once on one model: the second is refused with a message. */
async function busy(page) {
  const r = await page.evaluate(async () => {
    const g = window.amoeApp.generator;
    const opts = JSON.stringify({ max_tokens: 4 });
    const first = g.generate("And", opts, null);
    let second;
    try {
      await g.generate("And", opts, null);
      second = "accepted";
    } catch (e) {
      second = e.message;
    }
    const a = JSON.parse(await first);
    return { first: a.tokens.length, second };
  });
  check("a second call while the model is busy is refused with a message", r.first > 0 && /busy/.test(r.second),
    JSON.stringify(r));
}

async function deviceLost(page) {
  // Lose the device in the middle of a generation: after its third token.
  await page.fill("#max-tokens", "400");
  await page.evaluate(() => (window.amoeApp.lastGeneration = null));
  const errors = await page.evaluate(() => window.amoeApp.errors.length);
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelectorAll("#output .tok:not(.prompt)").length >= 3, null, {
    timeout: 120_000,
    polling: 5,
  });
  const streamed = await page.evaluate(() => {
    window.amoeApp.gpu.destroyDevice();
    return document.querySelectorAll("#output .tok:not(.prompt)").length;
  });
  await page.waitForFunction(
    (n) => window.amoeApp.lastGeneration || window.amoeApp.errors.length > n,
    errors,
    { timeout: 120_000 },
  );
  const g = await page.evaluate(() => window.amoeApp.lastGeneration);
  const msg = await page.textContent("#gen-error");
  await page.waitForSelector("#gpu-lost", { state: "visible", timeout: 10_000 }).catch(() => {});
  const notice = (await page.isVisible("#gpu-lost")) ? await page.textContent("#gpu-lost") : "(no notice)";
  check(
    "a device lost mid-generation: a message and a restart button on the page",
    !g && /lost/i.test(notice),
    `destroyed after ${streamed} streamed tokens; ${msg} | ${notice.replace(/\s+/g, " ").trim()}`,
  );
  await page.click("#restart-gpu");
  await page.waitForFunction(() => window.amoeApp.generator && !window.amoeApp.gpu.lost &&
    document.getElementById("status").dataset.state === "ready", null, { timeout: 120_000 });
  await page.fill("#max-tokens", "8");
  const again = await clickAndGenerate(page, "#generate");
  check("after a restart the page generates again", again && again.tokens.length > 0, await page.textContent("#gen-error"));
}

async function main() {
  for (const [what, p] of [["amoe binary", amoe], ["chromium", chromiumPath], ["web/pkg", path.join(repo, "web", "pkg", "amoe.js")]]) {
    if (!fs.existsSync(p)) {
      console.error(`${what} not found at ${p}`);
      process.exit(1);
    }
  }
  const { server, url } = await startServer(0);
  const numbers = { native_adapter: null, browser_adapter: null };
  let browser;
  try {
    // (d) WebGPU unavailable: Chromium without --enable-unsafe-webgpu on Linux.
    browser = await launch(BASE_FLAGS);
    {
      const { page, state } = await openPage(browser, url);
      const shown = await page.isVisible("#nogpu");
      const why = await page.textContent("#nogpu");
      check("(d) without WebGPU the page explains what to do", state === "no-webgpu" && shown && /enable-unsafe-webgpu/.test(why),
        `state ${state}`);
    }
    await browser.close();

    browser = await launch(WEBGPU_FLAGS);
    const { page, state, pageErrors } = await openPage(browser, url);
    const adapter = await page.evaluate(() => window.amoeApp.gpu && window.amoeApp.gpu.adapter);
    numbers.browser_adapter = adapter;
    check("the page starts on a WebGPU adapter and loads the demo checkpoint", state === "ready", `${adapter}; state ${state}`);
    if (state !== "ready") throw new Error("the page did not start");
    const gsel = await page.inputValue("#gating");
    const hint = await page.textContent("#gating-hint");
    check("the demo generates with adaptive gating by default, and the page says what that does",
      gsel === "adaptive" && /only where the router\s+is unsure/.test(hint), `${gsel}: ${hint}`);

    const a1 = await compareGeneration(page, null, true);
    await page.hover("#output .tok:not(.prompt)");
    const tip = await page.evaluate(() => {
      const t = document.getElementById("tok-tip");
      return t.hidden ? null : t.textContent;
    });
    check("hovering a token shows its experts and weights at once", tip && /layer \d+: expert \d+ \(/.test(tip), String(tip));
    await page.screenshot({ path: path.join(outDir, "generate.png"), fullPage: true });
    const a2 = await compareGeneration(page, "adaptive", false);
    numbers.logits_max_abs_diff = Math.max(a1 ? a1.maxAbs : NaN, a2 ? a2.maxAbs : NaN);

    const sp = await speed(page);
    numbers.native_adapter = sp.natAdapter;
    numbers.native_binary = path.relative(repo, amoe);
    // The dev profile is optimized (Cargo.toml: opt-level 2 for amoe and its
    // dependencies): its decode speed matches the release build's.
    numbers.native_profile = /[\\/]release[\\/]/.test(amoe) ? "release" : "dev (opt-level 2)";
    numbers.browser_decode_tps = sp.webTps;
    numbers.native_decode_tps = sp.natTps;
    numbers.browser_over_native = sp.webTps / sp.natTps;
    console.log(
      `decode: page ${sp.webTps.toFixed(1)} tok/s on ${adapter}, native ${sp.natTps.toFixed(1)} tok/s on ${sp.natAdapter} ` +
        `(${path.relative(repo, amoe)}, ${numbers.native_profile}) ` +
        `(ratio ${(sp.webTps / sp.natTps).toFixed(2)}; demo checkpoint, ${BENCH_TOKENS} tokens, median of 3)`,
    );

    numbers.training = await training(page);
    await trainingPanel(page);
    const rep = await conformance(page);
    numbers.conformance = rep && { pass: rep.pass, cases: rep.report.kernels.length, not_applicable: rep.report.not_applicable.length, seconds: rep.seconds };
    await badInput(page);
    await hfFolder(page);
    await busy(page);
    await deviceLost(page);
    check("no panic, trap or uncaught error on the page", pageErrors.length === 0, pageErrors.join(" | "));
    await page.screenshot({ path: path.join(outDir, "final.png"), fullPage: true });
  } catch (e) {
    check("the browser test ran to the end", false, e.stack || String(e));
  } finally {
    if (browser) await browser.close();
    server.close();
  }
  numbers.checks = results;
  fs.writeFileSync(path.join(outDir, "numbers.json"), JSON.stringify(numbers, null, 2));
  const failed = results.filter((r) => !r.ok);
  console.log(`\nbrowser test: ${results.length - failed.length} passed, ${failed.length} failed ` +
    `(screenshots and numbers.json in ${path.relative(repo, outDir)})`);
  process.exit(failed.length ? 1 : 0);
}

main();
