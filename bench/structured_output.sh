#!/usr/bin/env bash
# Structured output (issue 5): output tokens/s at concurrency 16 with 0%, 50% and 100% JSON-schema
# requests (`ironllm bench serve --structured-output-ratio`, random 128-token prompts, 128 output tokens,
# ignore_eos, greedy), three runs each, then the time to first token of a request with a new schema next
# to one with a cached schema (bench/structured_ttft.py). One `ironllm serve` on the default model.
#
#   bash bench/structured_output.sh [MODEL]
# Env: OUT (results dir), NUM_PROMPTS (48), CONCURRENCY (16), RUNS (3), PORT (8184), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${IRONLLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ironllm}"
MODEL="${1:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="${OUT:-/tmp/ironllm_structured_$(date +%Y%m%d-%H%M%S)}"
PORT="${PORT:-8184}"
PY="${PY:-$CACHE/venv-api/bin/python}"
mkdir -p "$OUT"
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then cargo build --release -p ironllm-cli >"$OUT/cargo-build.log" 2>&1; fi
BIN=target/release/ironllm
"$BIN" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --max-model-len 2048 --kv-cache-memory-bytes 1GiB \
  --log-level warn >"$OUT/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
for run in $(seq "${RUNS:-3}"); do
  for ratio in 0 0.5 1; do
    # A fresh seed per run and ratio: the same prompts again would be served from the prefix cache.
    case $ratio in 0) k=1 ;; 0.5) k=2 ;; *) k=3 ;; esac
    seed=$((run * 10 + k))
    "$BIN" bench serve --base-url "http://127.0.0.1:$PORT" --dataset-name random --random-input-len 128 \
      --random-output-len 128 --num-prompts "${NUM_PROMPTS:-48}" --max-concurrency "${CONCURRENCY:-16}" \
      --ignore-eos --temperature 0 --structured-output-ratio "$ratio" --seed "$seed" --disable-tqdm \
      --save-result --result-dir "$OUT" --result-filename "structured-$ratio-run$run.json" \
      >"$OUT/structured-$ratio-run$run.txt" 2>&1
  done
done
"$PY" bench/structured_ttft.py "http://127.0.0.1:$PORT" 10 >"$OUT/ttft.json"
python3 bench/structured_table.py "$OUT"
echo "results in $OUT"
