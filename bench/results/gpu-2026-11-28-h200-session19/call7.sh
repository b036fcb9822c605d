#!/usr/bin/env bash
# Session 19 call 7: the SM clock, power and temperature (nvidia-smi every 100 ms) through call 6's batch-128
# run: GPU-only replays at context 1120 at capture, then 1024-token prompts and 129 tokens out with step timing.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
gunzip -f -k .gpu/ironllm.gz && chmod +x .gpu/ironllm
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv,noheader -lms 100 > $R/smi.csv &
SMI=$!
IRONLLM_TIME_GRAPHS=1120 IRONLLM_STEP_TIMING=1 timeout 150 .gpu/ironllm bench latency bench/configs/llama-3.1-8b --load-format dummy \
  --device cuda --batch-size 128 --input-len 1024 --output-len 129 --num-iters-warmup 0 --num-iters 1 --dtype bfloat16 \
  --max-model-len 8192 --max-num-seqs 128 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -E "per replay|step timing|rror" > $R/b128.txt
kill $SMI
grep -E "graph batch 128" $R/b128.txt; grep "step timing" $R/b128.txt
gzip -k $R/smi.csv
