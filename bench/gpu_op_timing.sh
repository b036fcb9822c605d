#!/usr/bin/env bash
# Where the GPU time of whole workloads goes, op by op (issue 8): IRONLLM_OP_TIMING=N puts a CUDA event
# after every op of each eager forward (and after each decode-graph replay and sampler), and logs the
# sums with each op's achieved TFLOP/s or GB/s. Runs the offline 1024/128 and ~200/~180 workloads of
# bench/gpu_throughput.sh and the 8 x 1024 prefill of bench/gpu_bench.sh that way, then tabulates the
# last report of each with bench/op_timing_table.py. The events cost a little (wall time is not the
# figure here: the shares are). Runs on the GPU host from the repository root.
# The throughput runs use the engine's defaults (1024 sequences and 16k tokens on an H100 since
# 2026-11-28; earlier tables in BENCHMARKS.md ran with --max-num-seqs 256 and 8k tokens).
# IRONLLM_OP_ONLY_1024=1 stops after the 1024/128 run.
# usage: bash bench/gpu_op_timing.sh LOGDIR
set -uo pipefail
LOGS=${1:-/tmp/ironllm-op-timing}
mkdir -p "$LOGS"
BIN=${IRONLLM_BIN:-.gpu/ironllm}
L8=bench/configs/llama-3.1-8b
COMMON=(--load-format dummy --device cuda --dtype bfloat16)
IRONLLM_OP_TIMING=50 "$BIN" bench throughput $L8 "${COMMON[@]}" --max-model-len 4096 --num-prompts 1000 \
  --input-len 1024 --output-len 128 >"$LOGS/op_tp_1024_128.log" 2>&1 || echo "FAILED op_tp_1024_128"
[ "${IRONLLM_OP_ONLY_1024:-0}" = 1 ] && { python3 bench/op_timing_table.py "$LOGS"/op_tp_1024_128.log \
  | tee "$LOGS/op_timing_table.txt"; exit 0; }
IRONLLM_OP_TIMING=50 "$BIN" bench throughput $L8 "${COMMON[@]}" --max-model-len 4096 --num-prompts 1000 \
  --input-len 200 --output-len 180 --random-range-ratio 0.5 >"$LOGS/op_tp_200_180.log" 2>&1 \
  || echo "FAILED op_tp_200_180"
IRONLLM_OP_TIMING=1 "$BIN" bench latency $L8 "${COMMON[@]}" --max-model-len 8192 --max-num-seqs 256 --batch-size 8 \
  --input-len 1024 --output-len 1 --num-iters-warmup 1 --num-iters 3 >"$LOGS/op_prefill_8x1024.log" 2>&1 \
  || echo "FAILED op_prefill_8x1024"
python3 bench/op_timing_table.py "$LOGS"/op_tp_1024_128.log "$LOGS"/op_tp_200_180.log "$LOGS"/op_prefill_8x1024.log \
  | tee "$LOGS/op_timing_table.txt"
