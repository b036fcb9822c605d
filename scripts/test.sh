#!/usr/bin/env bash
# Runs every test: formatting, clippy, Rust unit and integration tests (release build, since tests run
# real models), after fetching the default model and materializing the reference fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

echo "== fixtures"
source scripts/fixtures.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings

echo "== cargo test"
cargo test --release --workspace 2>&1 | tee target/test.log
grep -E "^test result:" target/test.log | awk '{p+=$4; f+=$6; i+=$8} END {printf "%d passed, %d failed, %d skipped\n", p, f, i}'
bash scripts/api_tests.sh
