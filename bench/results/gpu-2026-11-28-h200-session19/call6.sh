#!/usr/bin/env bash
# Session 19 call 6: is the engine's decode graph at batch 128 slower than its GPU-only replay at the same
# context? One process: IRONLLM_TIME_GRAPHS=1120 (replays at capture) then 1024-token prompts, 129 tokens
# out, IRONLLM_STEP_TIMING=1 (its last report: steps 65-128, contexts 1089-1152).
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/ironllm.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
for b in 128 32; do
IRONLLM_TIME_GRAPHS=1120 IRONLLM_STEP_TIMING=1 timeout 150 .gpu/ironllm bench latency bench/configs/llama-3.1-8b --load-format dummy \
  --device cuda --batch-size $b --input-len 1024 --output-len 129 --num-iters-warmup 0 --num-iters 1 --dtype bfloat16 \
  --max-model-len 8192 --max-num-seqs $b 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -E "per replay|step timing|rror" > $R/b$b.txt
grep -E "graph batch $b(:| \(again)" $R/b$b.txt; grep "step timing" $R/b$b.txt | tail -1
done
