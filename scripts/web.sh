#!/usr/bin/env bash
# Build the browser package (web/pkg) from this crate and serve web/ on 127.0.0.1.
#
#   bash scripts/web.sh               build, then serve on http://127.0.0.1:8080/
#   bash scripts/web.sh --port 9000   another port
#   bash scripts/web.sh --build-only  build web/pkg and stop (the browser test uses this)
#
# Needs a Rust toolchain (rustup adds the wasm32 target if missing) and Node.js
# for the server. wasm-bindgen-cli must match the wasm-bindgen version in
# Cargo.lock exactly; the script installs that version with cargo (into
# cargo's bin directory, outside the checkout, so that a clean checkout on the
# same machine finds it) once (about 4 minutes) when no matching one is on
# PATH or there. wasm-pack is not used: it downloads binaries at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

port=8080
serve=1
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port="$2"; shift 2 ;;
        --build-only) serve=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

want="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
[ -n "$want" ] || { echo "no wasm-bindgen in Cargo.lock" >&2; exit 1; }

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    echo "== adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
fi

version_of() { "$1" --version 2>/dev/null | awk '{ print $2 }'; }
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
bindgen=""
for b in "$(command -v wasm-bindgen || true)" "$cargo_bin/wasm-bindgen"; do
    if [ -n "$b" ] && [ -x "$b" ] && [ "$(version_of "$b")" = "$want" ]; then
        bindgen="$b"
        break
    fi
done
if [ -z "$bindgen" ]; then
    echo "== installing wasm-bindgen-cli $want into $cargo_bin (once, a few minutes)"
    # The CLI's own lock file can name a dependency version that the registry has
    # yanked since; fall back to a fresh resolution then. --force replaces
    # another version of it.
    cargo install --quiet --force wasm-bindgen-cli --version "$want" --locked 2>/dev/null ||
        cargo install --quiet --force wasm-bindgen-cli --version "$want"
    bindgen="$cargo_bin/wasm-bindgen"
fi

echo "== building the wasm (release)"
cargo rustc --locked --quiet --lib --release --target wasm32-unknown-unknown --crate-type cdylib
echo "== wasm-bindgen $want -> web/pkg"
rm -rf web/pkg
"$bindgen" --target web --no-typescript --out-dir web/pkg target/wasm32-unknown-unknown/release/amoe.wasm
ls -l web/pkg

if [ "$serve" = 1 ]; then
    command -v node >/dev/null || { echo "node not found: install Node.js to serve the page" >&2; exit 1; }
    exec node web/serve.mjs --port "$port"
fi
