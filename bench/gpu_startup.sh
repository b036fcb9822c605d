#!/usr/bin/env bash
# Start-up time of the Llama-3.1-8B shape (issue 8; target: under 20 s with the weights in the page cache,
# kernels cached, graphs captured). Writes a real-layout checkpoint (bench/make_dummy_checkpoint.py: config
# from bench/configs/llama-3.1-8b, random bf16 weights made on the GPU, ~16 GB in 5 GB safetensors shards
# with model.safetensors.index.json, a synthetic tokenizer of the real vocabulary size), reads it once so
# it is in the page cache, then times `ironllm serve DIR --device cuda --dtype bfloat16 --max-model-len 8192`
# from launch to the first 200 from /health (bench/startup_timer.py), three times: a fresh kernel cache
# (NVRTC compiles), the same cache again (kernels cached), and `--load-format dummy` (no file reading).
# Prints a table of the phases ironllm logs; deletes the checkpoint at the end. Every server is killed
# after READY_TIMEOUT seconds if it is not ready. Runs on the GPU host from the repository root (~2 minutes).
# usage: bash bench/gpu_startup.sh LOGDIR
# env: IRONLLM_BIN (.gpu/ironllm), STARTUP_DIR (/tmp/ironllm-startup-l8), READY_TIMEOUT (90),
#      STARTUP_CONFIG (bench/configs/llama-3.1-8b), STARTUP_DEVICE (cuda; cpu for a local smoke test with a
#      tiny config), STARTUP_KEEP=1 keeps the checkpoint.
set -uo pipefail
LOGS=${1:-/tmp/ironllm-startup}
mkdir -p "$LOGS"
BIN=${IRONLLM_BIN:-.gpu/ironllm}
DIR=${STARTUP_DIR:-/tmp/ironllm-startup-l8}
CONFIG=${STARTUP_CONFIG:-bench/configs/llama-3.1-8b}
DEVICE=${STARTUP_DEVICE:-cuda}
READY_TIMEOUT=${READY_TIMEOUT:-90}
KCACHE=$(mktemp -d /tmp/ironllm-startup-kcache.XXXXXX)
cleanup() {
  rm -rf "$KCACHE"
  [ "${STARTUP_KEEP:-0}" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

rm -rf "$DIR"
df -h "$(dirname "$DIR")" | tail -1
t=$(now)
if ! timeout 300 python3 bench/make_dummy_checkpoint.py --config "$CONFIG" --out "$DIR" --device "$DEVICE" \
    --dtype bfloat16 --shard-gb 5 >"$LOGS/make_checkpoint.json" 2>"$LOGS/make_checkpoint.log"; then
  echo "FAILED: writing the checkpoint (see make_checkpoint.log)"; tail -5 "$LOGS/make_checkpoint.log"; exit 1
fi
echo "checkpoint written in $(since "$t")s: $(cat "$LOGS/make_checkpoint.json")"
du -sh "$DIR"; ls -la "$DIR" >"$LOGS/checkpoint_files.txt"
# flush the written shards so background write-back does not run during the timed starts (bounded)
t=$(now); timeout 30 sync; echo "sync (write-back, at most 30 s) took $(since "$t")s"
t=$(now); cat "$DIR"/*.safetensors >/dev/null; echo "read the shards once (page cache) in $(since "$t")s"

serve() { # name extra-flags...
  local name=$1; shift
  python3 bench/startup_timer.py --name "$name" --log "$LOGS/$name.log" --json "$LOGS/$name.json" \
    --timeout "$READY_TIMEOUT" -- env IRONLLM_CACHE_DIR="$KCACHE" "$BIN" serve "$DIR" --device "$DEVICE" \
    --dtype bfloat16 --max-model-len 8192 --port '{port}' --disable-log-stats "$@"
}
free -g | head -2
fails=0
serve startup_1_kernels_cold || fails=$((fails + 1))
serve startup_2_kernels_cached || fails=$((fails + 1))
serve startup_3_dummy_weights --load-format dummy || fails=$((fails + 1))
echo "=== start-up of $(basename "$CONFIG") on $( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "$DEVICE") | head -1) ==="
python3 bench/startup_timer.py --table "$LOGS"/startup_1_kernels_cold.json "$LOGS"/startup_2_kernels_cached.json \
  "$LOGS"/startup_3_dummy_weights.json | tee "$LOGS/startup_table.txt"
[ "$fails" = 0 ] || { echo "FAILED: $fails of 3 servers did not become ready"; exit 1; }
