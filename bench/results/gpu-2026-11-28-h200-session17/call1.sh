#!/usr/bin/env bash
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv > $R/smi.txt 2>&1
timeout 280 bash bench/gpu_decode_gemm_ab.sh $R/ab > $R/ab.txt 2>&1
cat $R/ab.txt
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
left=$((560 - SECONDS))
IRONLLM_BENCH_AB=0 timeout $left bash bench/gpu_bench.sh $R/table > $R/table.txt 2>&1
tail -40 $R/table.txt
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
