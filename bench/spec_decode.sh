#!/usr/bin/env bash
# Speculative decoding on the CPU (issue 6): `ironllm serve` (default model) with and without the n-gram
# proposer, driven by `ironllm bench serve --dataset-name custom` (chat template applied, greedy, up to
# OUTPUT_LEN tokens, stopping at EOS) on two prompt sets from bench/spec_datasets.py: `repetitive` (code
# edits and quoting: the answer copies the prompt) and `open` (open-ended questions).
#
#   bash bench/spec_decode.sh
#
# 1. Single stream (max-concurrency 1): speculation off, then each n-gram config of GRID (k = 2, 4 by
#    prompt_lookup_max = 3, 5; prompt_lookup_min 2), each on a fresh server, repetitive and open.
# 2. Concurrency 16: off; the grid config with the best single-stream repetitive output tokens/s (or
#    C16_SPEC) with the default disable_by_batch_size (8 on the CPU: speculation pauses while 8 or more
#    requests run); the same config with "disable_by_batch_size": 64 (speculation forced on).
# Every phase runs ROUNDS times, every second round in reverse order. Acceptance comes from the server's
# `vllm:spec_decode_*` counters read before and after each run; the greedy outputs of every speculative
# run are compared with the run without speculation (same prompts, same round).
#
# Env: OUT (results dir), ROUNDS (3), SS_REPETITIVE (16 prompts), SS_OPEN (8), C16_PROMPTS (32),
# OUTPUT_LEN (256), C16_SPEC (a GRID name), PORT (8185), WAIT_QUIET_MAX (s, 600), QUIET_SHARE (0.10),
# RETRIES (2), SKIP_BUILD=1, TABLE_ONLY=1 (re-print the table of an earlier OUT).
#
# The machine is shared: before every run the script waits until other processes use less than
# QUIET_SHARE of the CPUs and records the share they used during the run (reported in the table); a run
# during which they used more is done again on a fresh server (up to RETRIES times; the contended
# results are kept as NAME.contendedN.*).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-/tmp/ironllm_spec_decode_$(date +%Y%m%d-%H%M%S)}"
ROUNDS="${ROUNDS:-3}"
SS_REPETITIVE="${SS_REPETITIVE:-16}"
SS_OPEN="${SS_OPEN:-8}"
C16_PROMPTS="${C16_PROMPTS:-32}"
OUTPUT_LEN="${OUTPUT_LEN:-256}"
PORT="${PORT:-8185}"
WAIT_QUIET_MAX="${WAIT_QUIET_MAX:-600}"
QUIET_SHARE="${QUIET_SHARE:-0.10}"
RETRIES="${RETRIES:-2}"
mkdir -p "$OUT"
log() { echo "[spec-decode $(date +%H:%M:%S)] $*" >&2; }

# name=speculative-config JSON ("off": no flag).
ngram() { echo "{\"method\":\"ngram\",\"num_speculative_tokens\":$1,\"prompt_lookup_min\":2,\"prompt_lookup_max\":$2$3}"; }
declare -A SPEC=([off]="")
GRID=()
for k in 2 4; do
  for max in 3 5; do
    SPEC[ngram-k$k-max$max]=$(ngram "$k" "$max" "")
    GRID+=("ngram-k$k-max$max")
  done
done

if [[ "${TABLE_ONLY:-0}" == 1 ]]; then python3 bench/spec_table.py "$OUT" | tee "$OUT/table.md"; exit 0; fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  log "building (cargo build --release -p ironllm-cli)"
  cargo build --release -p ironllm-cli >"$OUT/cargo-build.log" 2>&1
fi
# A private copy, so that a rebuild by someone else during the run cannot swap the binary under us.
TMP=$(mktemp -d)
cp target/release/ironllm "$TMP/ironllm"
BIN="$TMP/ironllm"
"$BIN" serve --help | grep -q -- --speculative-config || { log "this ironllm has no --speculative-config"; exit 1; }
python3 bench/spec_datasets.py "$OUT/data"

{
  echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "dirty_files=$(git status --porcelain 2>/dev/null | awk '{print $2}' | xargs)"
  echo "cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "nproc=$(nproc)"
  echo "command=bash bench/spec_decode.sh"
  echo "binary=$(sha256sum "$BIN" | cut -c1-12), built $(date -u -r target/release/ironllm +%Y-%m-%dT%H:%M:%SZ)"
  echo "settings=ROUNDS=$ROUNDS SS_REPETITIVE=$SS_REPETITIVE SS_OPEN=$SS_OPEN C16_PROMPTS=$C16_PROMPTS OUTPUT_LEN=$OUTPUT_LEN"
} >"$OUT/machine.txt"

HZ=$(getconf CLK_TCK)
NCPU=$(nproc)
PID=""
CFG=""
cleanup() { if [[ -n "$PID" ]]; then kill "$PID" 2>/dev/null || true; fi; rm -rf "$TMP"; }
trap cleanup EXIT
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
proc_ticks() { if [[ -n "${1:-}" && -r /proc/$1/stat ]]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi; }
# Share of the machine used by anything but the server over the last $1 seconds.
other_share() {
  local b0 s0 b1 s1
  b0=$(busy_ticks); s0=$(proc_ticks "$PID"); sleep "$1"; b1=$(busy_ticks); s1=$(proc_ticks "$PID")
  awk -v b="$((b1 - b0))" -v s="$((s1 - s0))" -v hz="$HZ" -v n="$NCPU" -v t="$1" 'BEGIN {printf "%.3f", (b - s) / hz / (n * t)}'
}
wait_quiet() {
  local waited=0 quiet=0 share
  while :; do
    share=$(other_share 2); waited=$((waited + 2))
    if awk -v x="$share" -v q="$QUIET_SHARE" 'BEGIN {exit !(x < q)}'; then
      quiet=$((quiet + 1)); ((quiet >= 2)) && return 0
      continue
    fi
    quiet=0
    if ((waited >= WAIT_QUIET_MAX)); then
      log "machine still busy after ${waited}s (other CPU $share); going on, marked as contended"
      echo "$(date +%H:%M:%S) $1 started while busy: other CPU $share; $(ps -eo pcpu,comm --sort=-pcpu | sed -n 2,4p | xargs)" >>"$OUT/contention.txt"
      return 0
    fi
    ((waited % 30 == 0)) && log "waiting for a quiet machine (other CPU $share): $(ps -eo pcpu,comm --sort=-pcpu | sed -n 2,4p | xargs)"
  done
}

start_server() { # config name
  local flag=()
  CFG=$1
  [[ -n "${SPEC[$1]}" ]] && flag=(--speculative-config "${SPEC[$1]}")
  "$BIN" serve --host 127.0.0.1 --port "$PORT" --log-level warn "${flag[@]}" >>"$OUT/serve-$1.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { log "server $1 did not come up"; exit 1; }
  # Warm-up with a prompt that no measured run uses (so the prefix cache stays cold for them).
  curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "Warm-up: count from one to twenty in words.", "max_tokens": 32, "temperature": 0}' >/dev/null
}
stop_server() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""; }
spec_counters() { curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^vllm:(spec_decode_|generation_tokens_total)' || true; }

# bench NAME DATASET NUM_PROMPTS CONCURRENCY
bench() {
  local name=$1 attempt=0 b0 s0 t0 b1 s1 t1 share f
  while :; do
    wait_quiet "$name"
    spec_counters >"$OUT/$name.metrics-before.txt"
    b0=$(busy_ticks); s0=$(proc_ticks "$PID"); t0=$(date +%s.%N)
    "$BIN" bench serve --base-url "http://127.0.0.1:$PORT" --dataset-name custom \
      --dataset-path "$OUT/data/$2.jsonl" --disable-shuffle --num-prompts "$3" --custom-output-len "$OUTPUT_LEN" \
      --max-concurrency "$4" --temperature 0 --num-warmups 0 --metric-percentiles 50,99 --disable-tqdm \
      --save-result --save-detailed --result-dir "$OUT" --result-filename "$name.json" >"$OUT/$name.txt" 2>&1
    b1=$(busy_ticks); s1=$(proc_ticks "$PID"); t1=$(date +%s.%N)
    spec_counters >"$OUT/$name.metrics-after.txt"
    share=$(awk -v b="$((b1 - b0))" -v s="$((s1 - s0))" -v hz="$HZ" -v n="$NCPU" -v t0="$t0" -v t1="$t1" \
      'BEGIN {printf "%.3f", (b - s) / hz / (n * (t1 - t0))}')
    awk -v b="$((b1 - b0))" -v s="$((s1 - s0))" -v hz="$HZ" -v n="$NCPU" -v t0="$t0" -v t1="$t1" \
      'BEGIN {t = t1 - t0; printf "{\"server_share\": %.3f, \"other_share\": %.3f, \"seconds\": %.1f}\n",
              s / hz / (n * t), (b - s) / hz / (n * t), t}' >"$OUT/$name.cpu.json"
    log "$name: $(grep -E 'Output token throughput' "$OUT/$name.txt" | awk '{print $NF}') output tok/s (other CPU $share)"
    if awk -v x="$share" -v q="$QUIET_SHARE" 'BEGIN {exit !(x > q)}' && ((attempt < RETRIES)); then
      attempt=$((attempt + 1))
      log "$name: other processes used $share of the machine during the run; again on a fresh server"
      for f in json txt cpu.json metrics-before.txt metrics-after.txt; do
        mv "$OUT/$name.$f" "$OUT/$name.contended$attempt.$f"
      done
      stop_server
      start_server "$CFG"
      continue
    fi
    return 0
  done
}

reverse() { local a=("$@") i; for ((i = ${#a[@]} - 1; i >= 0; i--)); do echo "${a[i]}"; done; }

# 1. Single stream.
SS_CONFIGS=(off "${GRID[@]}")
for round in $(seq "$ROUNDS"); do
  order=("${SS_CONFIGS[@]}")
  ((round % 2 == 0)) && mapfile -t order < <(reverse "${SS_CONFIGS[@]}")
  for cfg in "${order[@]}"; do
    log "single stream, round $round: $cfg"
    start_server "$cfg"
    bench "ss-repetitive-$cfg-r$round" repetitive "$SS_REPETITIVE" 1
    bench "ss-open-$cfg-r$round" open "$SS_OPEN" 1
    stop_server
  done
done

# 2. Concurrency 16.
if [[ -n "${C16_SPEC:-}" ]]; then
  best=$C16_SPEC
else
  best=$(python3 - "$OUT" "$ROUNDS" "${GRID[@]}" <<'EOF'
import json, statistics, sys
out, rounds, grid = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
tps = lambda c: statistics.median(json.load(open(f"{out}/ss-repetitive-{c}-r{r}.json"))["output_throughput"]
                                  for r in range(1, rounds + 1))
print(max(grid, key=tps))
EOF
)
fi
[[ -n "${SPEC[$best]:-}" ]] || { log "unknown C16_SPEC $best"; exit 1; }
echo "$best" >"$OUT/c16-spec-config.txt"
k=${best#ngram-k}; k=${k%%-*}; max=${best##*-max}
SPEC[$best-default]=${SPEC[$best]}
SPEC[$best-forced]=$(ngram "$k" "$max" ',"disable_by_batch_size":64')
C16_CONFIGS=(off "$best-default" "$best-forced")
log "concurrency 16 with $best"
for round in $(seq "$ROUNDS"); do
  order=("${C16_CONFIGS[@]}")
  ((round % 2 == 0)) && mapfile -t order < <(reverse "${C16_CONFIGS[@]}")
  for cfg in "${order[@]}"; do
    log "concurrency 16, round $round: $cfg"
    start_server "$cfg"
    bench "c16-repetitive-$cfg-r$round" repetitive "$C16_PROMPTS" 16
    bench "c16-open-$cfg-r$round" open "$C16_PROMPTS" 16
    stop_server
  done
done
for cfg in "${!SPEC[@]}"; do echo "$cfg ${SPEC[$cfg]:-(off)}"; done | sort >"$OUT/configs.txt"

python3 bench/spec_table.py "$OUT" | tee "$OUT/table.md"
# The per-chunk gaps (`itls`) are two thirds of the detailed results' size and the table does not use them;
# the generated texts stay (the table compares them).
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
for f in glob.glob(os.path.join(sys.argv[1], "*.json")):
    d = json.load(open(f))
    if isinstance(d, dict) and "itls" in d:
        del d["itls"]
        json.dump(d, open(f, "w"))
EOF
log "results in $OUT"
