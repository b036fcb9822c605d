#!/usr/bin/env bash
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache RUST_LOG=info
for f in .gpu/ironllm.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
replay() { # label model ctx seqs [env...]
  local label=$1 model=$2 ctx=$3 seqs=$4
  shift 4
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency \
    $model --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $seqs 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | grep -v "batch [1-9]:\|batch 1[0-9]:" | sed "s/.*INFO /$label: /" | tee -a "$R/replays.txt"
}
L8=bench/configs/llama-3.1-8b
for round in 1 2; do
  replay "r$round base" $L8 1024 32
  replay "r$round no residual epilogue" $L8 1024 32 IRONLLM_DISABLE_RESIDUAL_EPILOGUE=1
  replay "r$round no GEMM tuning" $L8 1024 32 IRONLLM_GEMM_TUNING=0
  replay "r$round max 2 splits" $L8 1024 32 IRONLLM_MAX_DECODE_SPLITS=2
  replay "r$round no split-KV" $L8 1024 32 IRONLLM_DISABLE_SPLIT_KV=1
done
echo "elapsed $SECONDS"
tar czf $OUT/r.tgz -C $OUT r
IRONLLM_BENCH_AB=0 timeout $((570 - SECONDS)) bash bench/gpu_bench.sh $R/table > $R/table.txt 2>&1
grep "^|\|card" $R/table.txt
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
