#!/usr/bin/env bash
# Session 18 call 1 (binary of branch exp/skip-ops): marginal cost of small kernels in decode graphs
# (IRONLLM_SKIP_OPS=norm|rope|reduce|silu launch nothing: wrong outputs, timing only), then the split A/B
# (bench/gpu_split_ab.sh, staged as .gpu/split_ab.sh, one round).
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
gunzip -f -k .gpu/ironllm.gz && chmod +x .gpu/ironllm
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $R/gpu.txt
replay() { # label ctx maxseqs [env...]
  local label=$1 ctx=$2 ms=$3; shift 3
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency bench/configs/llama-3.1-8b \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $ms 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror\|split-KV" | sed "s/.*INFO [a-z_:]*/$label, context $ctx:/" | tee -a "$R/skip.txt"
}
for round in 1 2; do
  for s in none norm rope reduce silu norm,rope,reduce; do
    replay "round $round, skip $s" 1024 32 IRONLLM_SKIP_OPS=$s
  done
  tar czf $OUT/r.tgz -C $OUT r
done
ROUNDS=1 bash .gpu/split_ab.sh $R/split
tar czf $OUT/r.tgz -C $OUT r
