// A static file server for the page, on 127.0.0.1 only (a secure context, so
// the browser exposes WebGPU). `/` is web/, `/demo/` is the demo checkpoint in
// data/demo. No dependencies: Node's http module.
//
//   node web/serve.mjs [--port 8080]
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..");

const ROOTS = [
  ["/demo/", path.join(repo, "data", "demo")],
  ["/", here],
];

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".wasm": "application/wasm",
  ".txt": "text/plain; charset=utf-8",
  ".png": "image/png",
  ".svg": "image/svg+xml",
  ".safetensors": "application/octet-stream",
};

function resolve(urlPath) {
  let p;
  try {
    p = decodeURIComponent(urlPath.split("?")[0]);
  } catch {
    return null;
  }
  for (const [prefix, root] of ROOTS) {
    if (!p.startsWith(prefix)) continue;
    let file = path.resolve(root, "." + p.slice(prefix.length - 1));
    if (file !== root && !file.startsWith(root + path.sep)) return null;
    if (p.endsWith("/")) file = path.join(file, "index.html");
    return file;
  }
  return null;
}

/** Start the server; resolves to { server, url } once it listens. */
export function startServer(port = 8080, host = "127.0.0.1") {
  const server = http.createServer((req, res) => {
    const file = resolve(req.url || "/");
    if (!file || req.method !== "GET") {
      res.writeHead(file ? 405 : 403).end();
      return;
    }
    fs.stat(file, (err, st) => {
      if (err || !st.isFile()) {
        res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
        return;
      }
      res.writeHead(200, {
        "content-type": TYPES[path.extname(file)] || "application/octet-stream",
        "content-length": st.size,
        "cache-control": "no-store",
      });
      fs.createReadStream(file).pipe(res);
    });
  });
  return new Promise((ok, fail) => {
    server.once("error", fail);
    server.listen(port, host, () => {
      const { port: p } = server.address();
      ok({ server, url: `http://${host}:${p}/` });
    });
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const i = process.argv.indexOf("--port");
  const port = i > 0 ? Number(process.argv[i + 1]) : 8080;
  if (!fs.existsSync(path.join(here, "pkg", "amoe.js"))) {
    console.error("web/pkg/amoe.js is missing: build it first with scripts/web.sh --build-only");
    process.exit(1);
  }
  startServer(port).then(
    ({ url }) => console.log(`amoe page: ${url}  (Ctrl-C to stop)`),
    (e) => {
      console.error(`cannot listen on 127.0.0.1:${port}: ${e.message}`);
      process.exit(1);
    },
  );
}
