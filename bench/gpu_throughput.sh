#!/usr/bin/env bash
# Offline throughput of the Llama-3.1-8B shape (issue 8): 1000 random prompts of about 200 tokens in and
# 180 out, and of 1024 in / 128 out, ignore_eos, dummy bf16 weights, through `ironllm bench throughput`
# (vLLM's `bench throughput` with its random dataset). Runs on the GPU host from the repository root.
# usage: bash bench/gpu_throughput.sh LOGDIR
set -uo pipefail
LOGS=${1:-/tmp/ironllm-throughput}
mkdir -p "$LOGS"
BIN=${IRONLLM_BIN:-.gpu/ironllm}
L8=bench/configs/llama-3.1-8b
run() { # name input output extra...
  local name=$1 inp=$2 outl=$3; shift 3
  "$BIN" bench throughput $L8 --load-format dummy --device cuda --dtype bfloat16 --max-model-len 4096 \
    --num-prompts 1000 --input-len "$inp" --output-len "$outl" --output-json "$LOGS/$name.json" "$@" \
    >"$LOGS/$name.log" 2>&1 || echo "FAILED $name (see $name.log)"
  grep -h "Throughput:\|Elapsed" "$LOGS/$name.log" | sed "s/^/$name: /"
}
run tp_200_180 200 180 --random-range-ratio 0.5 --max-num-seqs 256
run tp_1024_128 1024 128 --max-num-seqs 256
# A/B (IRONLLM_TP_AB=0 skips): the cuBLASLt algorithms timed per shape at start-up off (the heuristic's
# first choice), on the prefill-heavy workload.
if [ "${IRONLLM_TP_AB:-1}" = 1 ]; then
  IRONLLM_GEMM_TUNING=0 run tp_1024_128_notune 1024 128 --max-num-seqs 256
fi
# IRONLLM_TP_SWEEP=1: async scheduling off, and the scheduler's budgets (figures in BENCHMARKS.md).
if [ "${IRONLLM_TP_SWEEP:-0}" = 1 ]; then
  run tp_200_180_sync 200 180 --random-range-ratio 0.5 --max-num-seqs 256 --no-async-scheduling
  run tp_200_180_seqs512 200 180 --random-range-ratio 0.5 --max-num-seqs 512 --max-num-batched-tokens 16384
  run tp_1024_128_16k 1024 128 --max-num-seqs 256 --max-num-batched-tokens 16384
  run tp_1024_128_seqs512_16k 1024 128 --max-num-seqs 512 --max-num-batched-tokens 16384
  run tp_1024_128_32k 1024 128 --max-num-seqs 256 --max-num-batched-tokens 32768
fi
# IRONLLM_TP_BLOCKS=1: larger KV blocks on the prefill-heavy workload (each (block, KV head) of the cache is
# one contiguous run of block_size x head_dim elements: 4 KB at 16 for the 8B shape), for the decode
# attention's share of it (the next step named in BENCHMARKS.md; not measured yet).
if [ "${IRONLLM_TP_BLOCKS:-0}" = 1 ]; then
  run tp_1024_128_bs32 1024 128 --max-num-seqs 256 --block-size 32
  run tp_1024_128_bs64 1024 128 --max-num-seqs 256 --block-size 64
fi
