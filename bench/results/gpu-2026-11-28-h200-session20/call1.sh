#!/usr/bin/env bash
# Session 20 call 1: do the GPU-only replays at batch 128 read fast because the KV cache holds zeros?
# One process per case: IRONLLM_TIME_GRAPHS=1120 (replays at capture, over a cache of random values, or of
# zeros with IRONLLM_TIME_GRAPHS_ZERO_KV=1), then 1024-token prompts, 129 tokens out, IRONLLM_STEP_TIMING=1
# (its last report: steps 65-128, contexts 1089-1152); nvidia-smi every 100 ms. Then the GPU suites.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
run() { # name batch [env]
  local name=$1 b=$2; shift 2
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 100 > $R/smi_$name.csv &
  local smi=$!
  env "$@" IRONLLM_TIME_GRAPHS=1120 IRONLLM_STEP_TIMING=1 timeout 150 .gpu/ironllm bench latency bench/configs/llama-3.1-8b \
    --load-format dummy --device cuda --batch-size $b --input-len 1024 --output-len 129 --num-iters-warmup 0 --num-iters 1 \
    --dtype bfloat16 --max-model-len 8192 --max-num-seqs $b 2>&1 | sed 's/\x1b\[[0-9;]*m//g' > $R/$name.log
  kill $smi
  { echo "== $name"; grep -E "graph batch $b(:| \(again)" $R/$name.log; grep "step timing" $R/$name.log | tail -1; } | tee -a $R/summary.txt
}
run b128_zero 128 IRONLLM_TIME_GRAPHS_ZERO_KV=1
run b128_random 128 IRONLLM_X=1
run b32_random 32 IRONLLM_X=1
tar czf $OUT/r.tgz -C $OUT r
run b128_zero_long 128 IRONLLM_TIME_GRAPHS_ZERO_KV=1 IRONLLM_TIME_GRAPHS_REPLAYS=100
run b128_random_long 128 IRONLLM_TIME_GRAPHS_REPLAYS=100
tar czf $OUT/r.tgz -C $OUT r
OUT=$R/check STEP_TIMEOUT=150 bash scripts/gpu_check.sh models rust > $R/check.log 2>&1
cat $R/check/summary.txt >> $R/summary.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
