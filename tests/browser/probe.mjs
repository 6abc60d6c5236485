// Runs the page's kernel conformance (all families, or the one named on the
// command line) in headless Chromium and prints its progress every 5 s: the
// summary and the last row. Stops when the run ends or has not moved for a
// minute ("STUCK": the row printed is the last case that finished). A tool
// for finding a case that never completes in a browser; CI does not run it.
//
//   node tests/browser/probe.mjs [family]
//
// Needs what browser.mjs needs: web/pkg built (scripts/web.sh --build-only),
// `npm ci` in tests/browser, Debian's chromium.
import { chromium } from "playwright-core";
import { startServer } from "../../web/serve.mjs";
const flags = ["--no-sandbox","--disable-gpu-sandbox","--no-first-run","--disable-background-networking","--disable-component-update","--disable-sync","--disable-quic","--enable-unsafe-webgpu"];
const { server, url } = await startServer(0);
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: flags });
const page = await browser.newPage();
page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") console.log("console:", m.type(), m.text().slice(0, 400)); });
page.on("pageerror", (e) => console.log("pageerror:", e.message.slice(0, 400)));
await page.goto(url);
console.log("state", await page.evaluate(() => window.amoeApp.ready));
const fam = process.argv[2] || "";
if (fam) await page.selectOption("#conf-family", fam);
await page.click("#conformance");
let last = "", same = 0;
for (let i = 0; i < 120; i++) {
  await new Promise((r) => setTimeout(r, 5000));
  const s = await page.textContent("#conf-summary");
  const row = await page.$$eval("#conf-table tbody tr", (trs) => trs.length ? trs[trs.length - 1].textContent : "");
  const done = await page.evaluate(() => !!window.amoeApp.lastConformance);
  console.log(new Date().toISOString().slice(11, 19), s, "|", row.slice(0, 160));
  if (done) break;
  if (s === last) { same++; if (same >= 12) { console.log("STUCK"); break; } } else same = 0;
  last = s;
}
await browser.close();
server.close();
process.exit(0);
