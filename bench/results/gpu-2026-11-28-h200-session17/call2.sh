#!/usr/bin/env bash
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
FORMS="ring:8:1 ring:4:1 ring:8:2 ring:4:2" timeout 560 bash bench/gpu_decode_gemm_ab.sh $R/ab > $R/ab.txt 2>&1
cat $R/ab.txt
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
