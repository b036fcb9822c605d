#!/usr/bin/env bash
# Session 20 call 6: share counts against the decode attention's stage count, to fit the 3-stage kernel
# into the split cost model: bench/gpu_split_ab.sh (the rule, 1-4 shares forced) at contexts 1024 and 4096
# with FD_STAGES_HD128=2 (default) and 3, one round each.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
for s in 3 2; do
  IRONLLM_KERNEL_DEFINES="FD_STAGES_HD128=$s" NO_WAVE=1 ROUNDS=1 CONTEXTS="1024 4096" timeout 280 bash bench/gpu_split_ab.sh $R/s$s > /dev/null 2>&1
  tar czf $OUT/r.tgz -C $OUT r
done
wc -l $R/s*/replays.txt
