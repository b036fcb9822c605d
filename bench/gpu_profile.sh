#!/usr/bin/env bash
# Where a decode step of the Llama-3.1-8B shape spends its time (issue 8): Nsight Compute's kernel
# durations for a short eager run (batch 1, 128-token prompt, 3 decode steps) with a small KV cache so
# replay stays quick, summed per kernel name by bench/gpu_profile_table.py. Clocks are left alone
# (--clock-control none, as the device notes ask).
# usage: bash bench/gpu_profile.sh LOGDIR
set -uo pipefail
LOGS=${1:-/tmp/ironllm-profile}
mkdir -p "$LOGS"
BIN=${IRONLLM_BIN:-.gpu/ironllm}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for b in 1 32; do
  timeout 420 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    "$BIN" bench latency bench/configs/llama-3.1-8b --load-format dummy --device cuda --dtype bfloat16 \
    --batch-size $b --input-len 128 --output-len 4 --num-iters-warmup 0 --num-iters 1 --enforce-eager \
    --max-model-len 1024 --max-num-seqs 64 --kv-cache-memory-bytes 2GiB \
    >"$LOGS/ncu_l8_b$b.csv" 2>"$LOGS/ncu_l8_b$b.err" || echo "ncu batch $b exited $?"
  python3 bench/gpu_profile_table.py "$LOGS/ncu_l8_b$b.csv" "$b" | tee "$LOGS/profile_l8_b$b.txt"
done
