#!/usr/bin/env bash
# A/B of the sampler's split path for plain rows: the 8B decode step at batches 1/32/128/256 with the
# split path aiming for N blocks per SM (IRONLLM_SAMPLER_BLOCKS_PER_SM=N for each N in $BLOCKS) and with one
# block per row (IRONLLM_SAMPLER_NO_SPLIT=1, "whole"), with IRONLLM_STEP_TIMING (its "sampler" column is the
# sampler's GPU time and the copy of its results). Runs on the GPU host from the repository root with the
# binary staged in .gpu/ (scripts/gpu_stage.sh); writes to $OUT.
# usage: OUT=DIR BLOCKS="2 4 8" bash bench/gpu_sampler_ab.sh
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} IRONLLM_CACHE_DIR=${IRONLLM_CACHE_DIR:-/tmp/ironllm-cache}
mkdir -p "$OUT"
[ -e .gpu/ironllm.gz ] && gunzip -f -k .gpu/ironllm.gz && chmod +x .gpu/ironllm
L8=bench/configs/llama-3.1-8b
for v in ${BLOCKS:-2 4 8} whole; do for b in ${BATCHES:-1 32 128 256}; do
  knob=IRONLLM_SAMPLER_BLOCKS_PER_SM=$v
  [ "$v" = whole ] && knob=IRONLLM_SAMPLER_NO_SPLIT=1
  env $knob IRONLLM_STEP_TIMING=1 timeout 200 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda \
    --batch-size $b --input-len 128 --output-len 129 --num-iters-warmup 0 --num-iters 1 --dtype bfloat16 \
    --max-model-len 1024 --max-num-seqs 256 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep "step timing" \
    | sed "s/.*INFO /blocks $v, batch $b: /" | tail -1 | tee -a "$OUT/sampler_ab.txt"
done; done
