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
  grep -h "Throughput:\|Elapsed\|Preemptions" "$LOGS/$name.log" | sed "s/^/$name: /"
}
# The engine's defaults (vLLM's for an H100-class card: 1024 sequences, 16k batched tokens offline; plus
# our admission headroom).
if [ "${IRONLLM_TP_DEFAULTS:-1}" = 1 ]; then
  run tp_1024_128 1024 128
  run tp_200_180 200 180 --random-range-ratio 0.5
fi
# A/B (IRONLLM_TP_AB=0 skips), on the KV-bound 1024/128: the defaults before 2026-11-28 (vLLM's for
# smaller cards: 256 sequences, 8k tokens; vLLM's admission), and the 8k budget alone.
if [ "${IRONLLM_TP_AB:-1}" = 1 ]; then
  IRONLLM_ADMISSION_HEADROOM=0 run tp_1024_128_seqs256_8k_h0 1024 128 --max-num-seqs 256 --max-num-batched-tokens 8192
  run tp_1024_128_8k 1024 128 --max-num-batched-tokens 8192
fi
# IRONLLM_TP_TUNE_AB=1: the cuBLASLt algorithms timed per shape at start-up off (the heuristic's first
# choice), on the prefill-heavy workload.
if [ "${IRONLLM_TP_TUNE_AB:-0}" = 1 ]; then
  IRONLLM_GEMM_TUNING=0 run tp_1024_128_notune 1024 128
fi
# IRONLLM_TP_SWEEP=1: async scheduling off, and the scheduler's budgets (figures in BENCHMARKS.md).
if [ "${IRONLLM_TP_SWEEP:-0}" = 1 ]; then
  run tp_200_180_sync 200 180 --random-range-ratio 0.5 --max-num-seqs 256 --no-async-scheduling --max-num-batched-tokens 8192
  run tp_200_180_seqs512 200 180 --random-range-ratio 0.5 --max-num-seqs 512 --max-num-batched-tokens 16384
  run tp_1024_128_16k 1024 128 --max-num-seqs 256 --max-num-batched-tokens 16384
  run tp_1024_128_seqs512_16k 1024 128 --max-num-seqs 512 --max-num-batched-tokens 16384
  run tp_1024_128_32k 1024 128 --max-num-seqs 256 --max-num-batched-tokens 32768
fi
# IRONLLM_TP_BLOCKS=1: larger KV blocks on the prefill-heavy workload (each (block, KV head) of the cache is
# one contiguous run of block_size x head_dim elements: 4 KB at 16 for the 8B shape), for the decode
# attention's share of it (the next step named in BENCHMARKS.md; not measured yet).
if [ "${IRONLLM_TP_BLOCKS:-0}" = 1 ]; then
  run tp_1024_128_bs32 1024 128 --max-num-seqs 256 --block-size 32 --max-num-batched-tokens 8192
  run tp_1024_128_bs64 1024 128 --max-num-seqs 256 --block-size 64 --max-num-batched-tokens 8192
fi
# IRONLLM_TP_ADMISSION=1: concurrency on the KV-bound 1024/128 (the cache holds ~359 of its requests at
# full length on an 80 GB card): more sequences at once, with vLLM's admission (preempts once decodes
# outgrow the cache) and with the admission headroom (IRONLLM_ADMISSION_HEADROOM tokens per running
# request kept free), and vLLM's H100 defaults for offline use (1024 sequences, 16k batched tokens).
if [ "${IRONLLM_TP_ADMISSION:-0}" = 1 ]; then
  IRONLLM_ADMISSION_HEADROOM=0 run tp_1024_128_seqs352_h0 1024 128 --max-num-seqs 352 --max-num-batched-tokens 8192
  IRONLLM_ADMISSION_HEADROOM=0 run tp_1024_128_seqs1024_h0 1024 128 --max-num-seqs 1024 --max-num-batched-tokens 8192
  IRONLLM_ADMISSION_HEADROOM=128 run tp_1024_128_seqs1024_h128 1024 128 --max-num-seqs 1024 --max-num-batched-tokens 8192
  IRONLLM_ADMISSION_HEADROOM=128 run tp_1024_128_seqs1024_h128_16k 1024 128 --max-num-seqs 1024 \
    --max-num-batched-tokens 16384
  IRONLLM_ADMISSION_HEADROOM=128 run tp_200_180_seqs1024_h128_16k 200 180 --random-range-ratio 0.5 \
    --max-num-seqs 1024 --max-num-batched-tokens 16384
fi
# IRONLLM_TP_ADMISSION2=1: with the headroom and 1024 sequences, smaller token budgets (a budget near
# 9 x the running requests admits about as fast as requests finish, so fewer steps are decode-only)
# and 32-token KV blocks.
if [ "${IRONLLM_TP_ADMISSION2:-0}" = 1 ]; then
  export IRONLLM_ADMISSION_HEADROOM=128
  run tp_1024_128_seqs1024_h128 1024 128 --max-num-seqs 1024 --max-num-batched-tokens 8192
  run tp_1024_128_seqs1024_h128_bs32 1024 128 --max-num-seqs 1024 --block-size 32 --max-num-batched-tokens 8192
  run tp_1024_128_seqs1024_h128_4k 1024 128 --max-num-seqs 1024 --max-num-batched-tokens 4096
  run tp_1024_128_seqs1024_h128_3k 1024 128 --max-num-seqs 1024 --max-num-batched-tokens 3072
  run tp_1024_128_seqs1024_h128_6k 1024 128 --max-num-seqs 1024 --max-num-batched-tokens 6144
  unset IRONLLM_ADMISSION_HEADROOM
fi
# IRONLLM_TP_ROPE_AB=1: the per-warp RoPE + KV write kernel instead of the packed one (2026-11-28: 30.54
# against 30.58-30.75 req/s on one H100).
if [ "${IRONLLM_TP_ROPE_AB:-0}" = 1 ]; then
  IRONLLM_DISABLE_ROPE_PACK=1 run tp_1024_128_warp_rope 1024 128
fi
# IRONLLM_TP_PREFILL_AB=1: the Hopper prefill attention with one head per CTA (two CTAs per SM) instead of
# two heads of a GQA group per CTA (one per SM; 266 vs 241 TFLOP/s alone, ~210 inside the engine).
if [ "${IRONLLM_TP_PREFILL_AB:-0}" = 1 ]; then
  IRONLLM_PREFILL_ONE_HEAD_PER_CTA=1 run tp_1024_128_prefill_wg1 1024 128
fi
# IRONLLM_TP_GEMM_CANDIDATES=1: the defaults with 32 cuBLASLt candidates timed per shape instead of 8 (the
# decode-only graph steps run their GEMMs at ~330 rows, where the op timing suggests ~550-600 TFLOP/s;
# 2026-11-28: no gain, 30.25-30.34 against 30.31-30.56 req/s).
if [ "${IRONLLM_TP_GEMM_CANDIDATES:-0}" = 1 ]; then
  IRONLLM_GEMM_CANDIDATES=32 run tp_1024_128_cand32 1024 128
fi
