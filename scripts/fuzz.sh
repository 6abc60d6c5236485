#!/usr/bin/env bash
# Fuzz every parser of user files longer than CI does (tests/fuzz.rs: a
# seeded mutation loop on stable Rust; a crash leaves its input under
# target/fuzz-crashes/ and fails with the target and case).
#
#   bash scripts/fuzz.sh            20000 cases per seed input
#   bash scripts/fuzz.sh 100000     more
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-20000}"
AMOE_FUZZ_CASES="$cases" cargo test --release --test fuzz -- --nocapture --test-threads 1
