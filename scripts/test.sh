#!/usr/bin/env bash
# The test command (README): installs what the tests need on a fresh
# Debian/Ubuntu machine, then runs format, lint and every test.
#
# On a machine without a GPU, Mesa's lavapipe (Vulkan) and llvmpipe (OpenGL
# through EGL) are the adapters; they are installed only when wgpu finds no
# adapter of that backend. The GPU tests then must run on both: under CI a
# missing adapter is a failure, not a skip.
#
# The browser test (tests/browser) builds the wasm package (scripts/web.sh:
# the wasm32 target and a pinned wasm-bindgen-cli), installs Debian's chromium
# and Node.js if missing and playwright-core from tests/browser's lock file,
# and drives the page against the native binary. AMOE_SKIP_BROWSER=1 skips it
# on a developer's machine (it says so); under CI it cannot be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step is stamped with the minutes since the start: where CI's time goes.
start_s=$SECONDS
log() { printf '\n== [%d:%02d] %s\n' $(((SECONDS - start_s) / 60)) $(((SECONDS - start_s) % 60)) "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2
        return 1
    fi
}

apt_install() {
    command -v apt-get >/dev/null || { echo "no apt-get: install $* by hand" >&2; return 1; }
    if [ -z "${AMOE_APT_UPDATED:-}" ]; then
        as_root apt-get update -qq
        AMOE_APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true

# Mesa warns about this without a display session; harmless, keep logs clean.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

# Data-parallel training (`amoe train --distributed`, cargo feature `mpi`) is
# built and tested with Open MPI; building the `mpi` crate needs libclang.
features=()
if [[ "$(uname -s)" == Linux ]]; then
    if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null || ! ldconfig -p 2>/dev/null | grep -q libclang; then
        log "installing Open MPI and libclang (the mpi feature)"
        apt_install openmpi-bin libopenmpi-dev libclang-dev
    fi
    features=(--features mpi)
    # mpirun refuses root without these (a CI container runs as root).
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

log "build"
cargo build --locked --all-targets "${features[@]}"

# Which backends does wgpu see? Install Mesa's software drivers for the ones missing.
backends() { ./target/debug/amoe devices --json 2>/dev/null | grep -o '"backend": *"[a-z0-9]*"' | sed 's/.*"\([a-z0-9]*\)"$/\1/' | sort -u | tr '\n' ' '; }
have="$(backends || true)"
if [[ "$(uname -s)" == Linux ]]; then
    missing=()
    [[ " $have " == *" vulkan "* ]] || missing+=(mesa-vulkan-drivers libvulkan1)
    [[ " $have " == *" gl "* ]] || missing+=(libegl1 libegl-mesa0 libgl1-mesa-dri libgles2)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} (no adapter for: vulkan/gl missing from '${have}')"
        apt_install "${missing[@]}"
        have="$(backends || true)"
    fi
fi
log "adapters: ${have:-none}"
./target/debug/amoe devices || true

# Where Mesa provides the adapters, both backends must run every GPU test.
if [ -z "${AMOE_REQUIRE_BACKENDS+x}" ] && [[ "$(uname -s)" == Linux ]]; then
    export AMOE_REQUIRE_BACKENDS=vulkan,gl
fi
export AMOE_REQUIRE_ADAPTERS=1

log "fmt"
cargo fmt --all -- --check
log "clippy"
cargo clippy --locked --all-targets "${features[@]}" -- -D warnings
if [ ${#features[@]} -gt 0 ]; then
    # The binary without MPI (what `cargo build` gives a user).
    cargo clippy --locked --bin amoe -- -D warnings
fi
log "clippy (wasm32: the browser build)"
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
cargo clippy --locked --lib --target wasm32-unknown-unknown -- -D warnings
log "tests (adapters required: ${AMOE_REQUIRE_BACKENDS:-any})"
cargo test --locked "${features[@]}" -- --test-threads="${AMOE_TEST_THREADS:-2}"

log "browser test"
if [ -n "${AMOE_SKIP_BROWSER:-}" ]; then
    if [ "${CI:-}" = true ]; then
        echo "AMOE_SKIP_BROWSER is set under CI: the browser test is required" >&2
        exit 1
    fi
    echo "SKIPPED: AMOE_SKIP_BROWSER is set (this run did not test the browser build)"
    exit 0
fi
need=()
command -v node >/dev/null && command -v npm >/dev/null || need+=(nodejs npm)
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt_install "${need[@]}"
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
    echo "Node.js $(node --version) is too old for playwright-core (it needs 20 or later)" >&2
    exit 1
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
log "browser package (scripts/web.sh)"
bash scripts/web.sh --build-only
log "browser test (tests/browser/browser.mjs)"
node tests/browser/browser.mjs
log "done"

