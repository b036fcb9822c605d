#!/usr/bin/env bash
# Prefix caching in TTFT (issue 4): the same `prefix_repetition` workload against `ironllm serve` with
# automatic prefix caching on (the default) and off (--no-enable-prefix-caching), one server at a time.
#
#   bash bench/prefix_caching.sh [MODEL.gguf]
#
# Env: OUT (results dir), PREFIX_LEN (256), SUFFIX_LEN (64), NUM_PREFIXES (4), OUTPUT_LEN (32),
# NUM_PROMPTS (48), CONCURRENCY (16), PORT (8183), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${IRONLLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ironllm}"
MODEL="${1:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="${OUT:-/tmp/ironllm_prefix_caching_$(date +%Y%m%d-%H%M%S)}"
PORT="${PORT:-8183}"
mkdir -p "$OUT"
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then cargo build --release -p ironllm-cli >"$OUT/cargo-build.log" 2>&1; fi
cp target/release/ironllm "$OUT/ironllm"
BIN="$OUT/ironllm"
PID=""
HZ=$(getconf CLK_TCK)
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
trap '[[ -n "$PID" ]] && kill "$PID" 2>/dev/null || true' EXIT

for mode in on off; do
  flag=(); [[ $mode == off ]] && flag=(--no-enable-prefix-caching)
  "$BIN" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --max-model-len 2048 --kv-cache-memory-bytes 1GiB \
    --log-level warn "${flag[@]}" >"$OUT/serve-$mode.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
  b0=$(busy_ticks); s0=$(proc_ticks "$PID"); t0=$(date +%s.%N)
  "$BIN" bench serve --base-url "http://127.0.0.1:$PORT" --dataset-name prefix_repetition \
    --prefix-repetition-prefix-len "${PREFIX_LEN:-256}" --prefix-repetition-suffix-len "${SUFFIX_LEN:-64}" \
    --prefix-repetition-num-prefixes "${NUM_PREFIXES:-4}" --prefix-repetition-output-len "${OUTPUT_LEN:-32}" \
    --num-prompts "${NUM_PROMPTS:-48}" --max-concurrency "${CONCURRENCY:-16}" --ignore-eos --temperature 0 \
    --num-warmups 0 --seed 1 --metric-percentiles 50,99 --disable-tqdm \
    --save-result --result-dir "$OUT" --result-filename "prefix-caching-$mode.json" >"$OUT/prefix-caching-$mode.txt" 2>&1
  b1=$(busy_ticks); s1=$(proc_ticks "$PID"); t1=$(date +%s.%N)
  # CPU used by anything but the server (the client included), as a share of the machine.
  awk -v b="$((b1 - b0))" -v s="$((s1 - s0))" -v hz="$HZ" -v n="$(nproc)" -v t0="$t0" -v t1="$t1" \
    'BEGIN {printf "%.3f\n", (b - s) / hz / (n * (t1 - t0))}' >"$OUT/other-share-$mode.txt"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
done

python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
r = {m: json.load(open(os.path.join(out, f"prefix-caching-{m}.json"))) for m in ("on", "off")}
print("\n| prefix caching | TTFT median (ms) | TTFT p99 (ms) | output tok/s | total tok/s | duration (s) | other CPU |")
print("|---|---:|---:|---:|---:|---:|---:|")
for m in ("on", "off"):
    x = r[m]
    print(f"| {m} | {x['median_ttft_ms']:.0f} | {x['p99_ttft_ms']:.0f} | {x['output_throughput']:.1f} | "
          f"{x['total_token_throughput']:.1f} | {x['duration']:.1f} | "
          f"{float(open(os.path.join(out, f'other-share-{m}.txt')).read()):.1%} |")
EOF
echo "raw results in $OUT" >&2
