#!/usr/bin/env bash
# Session 20 call 4: the skinny GEMM's knobs on the H200 since the prefetch rules of sessions 16-17:
# GPU-only replays (random KV) of the 8B shape at batch 1 and 2, context 1024, two rounds.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/ironllm.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
replay() { # label defines
  IRONLLM_KERNEL_DEFINES="$2" IRONLLM_TIME_GRAPHS=1024 timeout 120 .gpu/ironllm bench latency bench/configs/llama-3.1-8b \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 2 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | sed "s/.*INFO [a-z_:]*/$1:/" | tee -a "$R/replays.txt"
}
V=("default|" "unroll4|GEMV_UNROLL=4" "unroll12|GEMV_UNROLL=12" "unroll16|GEMV_UNROLL=16" "pfmax40|GEMV_PREFETCH_MAX_MB=40" "pflarge0|GEMV_PREFETCH_LARGE=0" "pf4|GEMV_PREFETCH=4")
for round in 1 2; do
  for v in "${V[@]}"; do replay "r$round ${v%%|*}" "${v#*|}"; done > /dev/null
  tar czf $OUT/r.tgz -C $OUT r
done
grep -v again $R/replays.txt | sort -t: -k1,1 -s | awk '{print}' | sed 's/ per replay.*//'
