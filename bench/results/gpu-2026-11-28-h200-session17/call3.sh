#!/usr/bin/env bash
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache RUST_LOG=info
for f in .gpu/ironllm.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
L8=bench/configs/llama-3.1-8b
replay() { # label ctx seqs [env...]
  local label=$1 ctx=$2 seqs=$3
  shift 3
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency \
    $L8 --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $seqs 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror\|kernels" | sed "s/.*INFO /$label: /" | tee -a "$R/replays.txt"
}
for round in 1 2; do
  replay "r$round base" 1024 2
  replay "r$round max64 p8" 1024 2 IRONLLM_KERNEL_DEFINES="GEMV_PREFETCH_MAX_MB=64"
  replay "r$round max64 p2" 1024 2 IRONLLM_KERNEL_DEFINES="GEMV_PREFETCH_MAX_MB=64 GEMV_PREFETCH=2"
  replay "r$round all p1" 1024 2 IRONLLM_KERNEL_DEFINES="GEMV_PREFETCH_MAX_MB=300 GEMV_PREFETCH=1"
  replay "r$round all p2" 1024 2 IRONLLM_KERNEL_DEFINES="GEMV_PREFETCH_MAX_MB=300 GEMV_PREFETCH=2"
done
echo "elapsed $SECONDS"
tar czf $OUT/r.tgz -C $OUT r
for b in 1 32; do
  IRONLLM_OP_TIMING=1 timeout 120 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --dtype bfloat16 \
    --max-model-len 8192 --max-num-seqs 64 --batch-size $b --input-len 16 --output-len 129 --num-iters-warmup 1 \
    --num-iters 2 --enforce-eager > $R/op_b$b.log 2>&1
  python3 bench/op_timing_table.py $R/op_b$b.log > $R/op_b$b.txt 2>&1; cat $R/op_b$b.txt
done
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
