// `amoe bench infer --shape` in the page: a model of a published family's
// layer shapes with random weights, in each storage the page offers, timed
// in headless Chromium (its WebGPU adapter: SwiftShader on a machine without
// a GPU). Prints one JSON line per storage (the fields of `amoe bench infer
// --json`). A tool for the README's numbers; CI does not run it.
//
//   node tests/browser/bench.mjs [shape] [layers] [prompt tokens] [decode tokens] [storage...]
//   node tests/browser/bench.mjs granite-1b-a400m 2 128 32 f32 f16 q8 q4 "q8 all" "q4 all"
//
// Needs what browser.mjs needs: web/pkg built (scripts/web.sh --build-only),
// `npm ci` in tests/browser, Debian's chromium (CHROMIUM overrides its path).
import { chromium } from "playwright-core";
import { startServer } from "../../web/serve.mjs";

const [shape = "granite-1b-a400m", layers = "2", prompt = "128", decode = "32", ...asked] = process.argv.slice(2);
const storages = asked.length ? asked : ["f32", "f16", "q8", "q4", "q8 all", "q4 all"];
const flags = ["--no-sandbox", "--disable-gpu-sandbox", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-quic", "--enable-unsafe-webgpu"];
const { server, url } = await startServer(0);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: flags,
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error("pageerror:", e.message.slice(0, 400)));
  await page.goto(url);
  await page.waitForFunction(() => window.amoeApp && window.amoeApp.gpu, null, { timeout: 300_000 });
  for (const storage of storages) {
    // A fresh page per storage: the previous model's buffers go with it.
    await page.reload();
    await page.waitForFunction(() => window.amoeApp && window.amoeApp.gpu, null, { timeout: 300_000 });
    const t0 = Date.now();
    const out = await page.evaluate(
      async ([s, l, st, p, d]) => {
        try {
          return await window.amoeApp.gpu.benchShape(s, l, null, st, p, d);
        } catch (e) {
          return JSON.stringify({ error: String(e && e.message ? e.message : e) });
        }
      },
      [shape, Number(layers), storage, Number(prompt), Number(decode)],
    );
    const r = JSON.parse(out);
    r.storage = storage;
    r.wall_s = (Date.now() - t0) / 1000;
    console.log(JSON.stringify(r));
  }
} finally {
  await browser.close();
  server.close();
}
