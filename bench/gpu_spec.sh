#!/usr/bin/env bash
# Speculative decoding on the GPU (issue 6): n-gram drafts against no drafts, in the same run, with
# dummy-weight models (the real default model cannot travel to the GPU host). Random weights make the
# acceptance rate whatever greedy decoding of a random model gives (they tend to fall into loops, which
# prompt lookup catches), so read the figures as "step cost of verifying k+1 tokens and the speed-up at
# the measured acceptance", not as an acceptance rate users will see.
# usage: bash bench/gpu_spec.sh LOGDIR   (from the repository root, binary staged in .gpu/)
set -uo pipefail
LOGS=${1:-/tmp/ironllm-spec}
mkdir -p "$LOGS"
BIN=${IRONLLM_BIN:-.gpu/ironllm}
NGRAM='{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_min":2,"prompt_lookup_max":4,"disable_by_batch_size":64}'

lat() { # name model batch input output extra...
  local name=$1 model=$2 bs=$3 inp=$4 outl=$5; shift 5
  "$BIN" bench latency "$model" --load-format dummy --device cuda --batch-size "$bs" --input-len "$inp" \
    --output-len "$outl" --num-iters-warmup 1 --num-iters 3 --output-json "$LOGS/$name.json" "$@" \
    >"$LOGS/$name.log" 2>&1 || echo "FAILED $name (see $name.log)"
  grep -h "Avg latency\|Output tokens/s\|Speculative" "$LOGS/$name.log" | sed "s/^/$name: /"
}

L8=bench/configs/llama-3.1-8b
S=bench/configs/smollm2-135m
COMMON8=(--dtype bfloat16 --max-model-len 4096 --max-num-seqs 64 --gpu-memory-utilization 0.5)
for b in 1 16; do
  lat "l8_b${b}_plain" $L8 "$b" 1024 256 "${COMMON8[@]}"
  lat "l8_b${b}_ngram4" $L8 "$b" 1024 256 "${COMMON8[@]}" --speculative-config "$NGRAM"
done
lat s_b1_plain $S 1 256 256 --dtype bfloat16
lat s_b1_ngram4 $S 1 256 256 --dtype bfloat16 --speculative-config "$NGRAM"
