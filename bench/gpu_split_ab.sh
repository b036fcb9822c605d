#!/usr/bin/env bash
# The decode attention's split-KV share count against the rule (ops::decode_splits) on the GPU host:
# GPU-only decode-graph replays of the 8B shape (IRONLLM_TIME_GRAPHS) for every captured batch up to 128,
# with the default rule (the cost model; its batch sizes with several graphs also print the share counts
# it did not choose, "not chosen"), the one-wave rule before 2026-11-28 14:00 (IRONLLM_DECODE_SPLIT_RULE=wave)
# and 1-4 shares forced (IRONLLM_DECODE_SPLITS=N, where the scratch holds them), at each context of
# $CONTEXTS (NO_WAVE=1 skips the wave rule), ROUNDS rounds interleaved. The forced counts run the decode
# kernel's plain form; IRONLLM_KERNEL_DEFINES=FD_STAGES_HD128=3 in the environment gives that form the deep
# form's three stages (how ops::DEEP_KEY_PERCENT was fitted, 2026-11-28). Runs from the repository root with the binary staged in .gpu/
# (scripts/gpu_stage.sh).
# usage: ROUNDS=1 CONTEXTS="1024 4096" bash bench/gpu_split_ab.sh OUTDIR    (~12 s a run, 6 runs a context)
set -uo pipefail
R=${1:-/tmp/ironllm-split-ab}
mkdir -p "$R"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} IRONLLM_CACHE_DIR=${IRONLLM_CACHE_DIR:-/tmp/ironllm-cache}
[ -e .gpu/ironllm.gz ] && gunzip -f -k .gpu/ironllm.gz && chmod +x .gpu/ironllm
replay() { # label ctx [env...]
  local label=$1 ctx=$2
  shift 2
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency bench/configs/llama-3.1-8b \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 128 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror\|split-KV" | sed "s/.*INFO [a-z_:]*/$label, context $ctx:/" | tee -a "$R/replays.txt"
}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for ctx in ${CONTEXTS:-1024 4096}; do
    replay "round $round, rule" $ctx
    [ -n "${NO_WAVE:-}" ] || replay "round $round, wave rule" $ctx IRONLLM_DECODE_SPLIT_RULE=wave
    for n in 1 2 3 4; do replay "round $round, $n shares" $ctx IRONLLM_DECODE_SPLITS=$n; done
  done
done
