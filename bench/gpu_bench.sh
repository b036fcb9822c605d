#!/usr/bin/env bash
# First GPU figures (issue 7): a Llama-3.1-8B-shaped model with dummy bf16 weights — decode step time at
# batch 1/32/64/128 with ~1k context and prefill tokens/s for 1x4096 and 8x1024 — and a SmolLM2-135M-shaped
# one at batch 1 and 64, each beside its floor computed from the card's ceilings measured in the same run
# (bench/gpu_ceilings.py). Runs on the GPU host from the repository root with the binary staged in .gpu/.
# usage: bash bench/gpu_bench.sh LOGDIR
set -uo pipefail
LOGS=${1:-/tmp/ironllm-bench}
mkdir -p "$LOGS"
BIN=${IRONLLM_BIN:-.gpu/ironllm}
python3 bench/gpu_ceilings.py >"$LOGS/ceilings.json" 2>"$LOGS/ceilings.err" || echo '{}' >"$LOGS/ceilings.json"

lat() { # name model batch input output extra...
  local name=$1 model=$2 bs=$3 inp=$4 outl=$5; shift 5
  "$BIN" bench latency "$model" --load-format dummy --device cuda --batch-size "$bs" --input-len "$inp" \
    --output-len "$outl" --num-iters-warmup 2 --num-iters 5 --output-json "$LOGS/$name.json" "$@" \
    >"$LOGS/$name.log" 2>&1 || echo "FAILED $name (see $name.log)"
}

L8=bench/configs/llama-3.1-8b
S=bench/configs/smollm2-135m
COMMON8=(--dtype bfloat16 --max-model-len 8192 --max-num-seqs 256)
# step8 SUFFIX "BATCHES" [VAR=value ...] [-- flags ...]: for each batch, the two 8B runs (65 and 129 output
# tokens after 1024 prompt tokens) whose difference is 64 decode steps, l8_b{batch}_o{65,129}SUFFIX, with
# the variables set and the flags added. Both runs are past the mixed prefill/decode phase that batches of
# 64 and more go through first (bench/gpu_table.py says more); 1 and 65 tokens, as before 2026-11-28, counted
# part of it as decode.
step8() {
  local v=$1 batches=$2 envs=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  for b in $batches; do
    for o in 65 129; do
      (for e in ${envs[@]+"${envs[@]}"}; do export "${e?}"; done
       lat "l8_b${b}_o${o}${v}" $L8 "$b" 1024 "$o" "${COMMON8[@]}" "$@")
    done
  done
}
lat l8_prefill_1x4096 $L8 1 4096 1 "${COMMON8[@]}"
lat l8_prefill_8x1024 $L8 8 1024 1 "${COMMON8[@]}"
step8 "" "1 32 64 128"
for b in 1 64; do
  lat "s_b${b}_o1" $S "$b" 128 1 --dtype bfloat16
  lat "s_b${b}_o129" $S "$b" 128 129 --dtype bfloat16
done
grep -h "KV cache\|GPU memory\|kernels" "$LOGS"/l8_b1_o65.log "$LOGS"/s_b1_o1.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220
python3 bench/gpu_table.py "$LOGS"
# Same run, each off in turn (issue 8): the split-KV share minimum and cap at batch 1, the cuBLASLt
# algorithms timed per shape at start-up (IRONLLM_GEMM_TUNING=0: the heuristic's first choice) at batch 32
# and 128 and for both prefills, then the rows below.
# IRONLLM_BENCH_AB_OLD=1 adds the older A/B rows (split sampler, async scheduling, programmatic launch, tensor-core decode
# attention, split-KV, skinny GEMM) whose figures are in BENCHMARKS.md.
if [ "${IRONLLM_BENCH_AB:-1}" = 1 ]; then
  # decode split-KV shares: sized by the split count alone (no 128-key minimum, the earlier default),
  # and the cap at 8 instead of 16
  step8 _minkeys1 1 IRONLLM_DECODE_SPLIT_MIN_KEYS=1
  step8 _splits8 1 IRONLLM_MAX_DECODE_SPLITS=8
  step8 _notune "32 128" IRONLLM_GEMM_TUNING=0
  IRONLLM_GEMM_TUNING=0 lat l8_prefill_1x4096_notune $L8 1 4096 1 "${COMMON8[@]}"
  IRONLLM_GEMM_TUNING=0 lat l8_prefill_8x1024_notune $L8 8 1024 1 "${COMMON8[@]}"
  # Hopper's wgmma prefill attention off (the mma.sync kernel), and the residual add of the o_proj and
  # down GEMMs' epilogue off (the next RMSNorm adds it) at batch 32 and 128.
  IRONLLM_DISABLE_WGMMA_PREFILL=1 lat l8_prefill_1x4096_nowgmma $L8 1 4096 1 "${COMMON8[@]}"
  IRONLLM_DISABLE_WGMMA_PREFILL=1 lat l8_prefill_8x1024_nowgmma $L8 8 1024 1 "${COMMON8[@]}"
  step8 _noresid "32 128" IRONLLM_DISABLE_RESIDUAL_EPILOGUE=1
  if [ "${IRONLLM_BENCH_AB_OLD:-0}" = 1 ]; then
    step8 _nosplitsampler "1 32" IRONLLM_SAMPLER_NO_SPLIT=1
    step8 _sync "1 32 128" -- --no-async-scheduling
    step8 _nopdl "1 32" IRONLLM_DISABLE_PDL=1
    step8 _nofd "1 32 128" IRONLLM_DISABLE_FLASH_DECODE=1
    step8 _nosplit "1 32" IRONLLM_DISABLE_SPLIT_KV=1
    step8 _nogemv 1 IRONLLM_DISABLE_GEMV=1
  fi
  grep -h "timed cuBLASLt" "$LOGS"/l8_b1_o65.log | sed 's/\x1b\[[0-9;]*m//g; s/.*INFO [^ ]* //'
  python3 - "$LOGS" <<'PY'
import json, os, sys
logs = sys.argv[1]
def step(b, v):
    try:
        a = json.load(open(f"{logs}/l8_b{b}_o65{v}.json"))["avg_latency"]
        c = json.load(open(f"{logs}/l8_b{b}_o129{v}.json"))["avg_latency"]
        return f"{(c - a) / 64 * 1e3:.3f} ms"
    except Exception as e:
        return f"n/a ({e})"
rows = [(1, "", "all on"), (1, "_nosplitsampler", "split sampler off"), (1, "_minkeys1", "split shares sized by count alone"),
        (1, "_splits8", "at most 8 KV splits"),
        (32, "", "all on"),
        (32, "_nosplitsampler", "split sampler off"), (32, "_notune", "GEMM algorithm timing off"),
        (128, "", "all on"), (128, "_notune", "GEMM algorithm timing off"),
        (32, "_noresid", "residual add in the GEMM epilogue off"),
        (128, "_noresid", "residual add in the GEMM epilogue off"),
        (1, "_sync", "async scheduling off"), (32, "_sync", "async scheduling off"),
        (128, "_sync", "async scheduling off"), (1, "_nopdl", "programmatic launch off"),
        (32, "_nopdl", "programmatic launch off"),
        (1, "_nofd", "tensor-core decode attention off"), (32, "_nofd", "tensor-core decode attention off"),
        (128, "_nofd", "tensor-core decode attention off"), (1, "_nosplit", "split-KV off"),
        (32, "_nosplit", "split-KV off"), (1, "_nogemv", "skinny GEMM off")]
for b, v, what in rows:
    if v and not os.path.exists(f"{logs}/l8_b{b}_o65{v}.json"):
        continue
    print(f"8B decode step, batch {b}, 1k context, {what}: {step(b, v)}")
for shape, tokens in (("1x4096", 4096), ("8x1024", 8192)):
    for v, what in (("", "all on"), ("_notune", "GEMM algorithm timing off"),
                    ("_nowgmma", "wgmma prefill attention off")):
        try:
            lat = json.load(open(f"{logs}/l8_prefill_{shape}{v}.json"))["avg_latency"]
            print(f"8B prefill {shape}, {what}: {tokens / lat:.0f} tokens/s ({lat * 1e3:.1f} ms)")
        except Exception as e:
            print(f"8B prefill {shape}, {what}: n/a ({e})")
PY
fi
# GPU-only time of a decode step (graph replays, no host work), to set against the end-to-end step: at
# context 1 (the weights alone) and 1024 (as the steps above); IRONLLM_BENCH_PDL_OFF=off adds programmatic
# launch off.
for ctx in 1 1024; do
  for pdl in on ${IRONLLM_BENCH_PDL_OFF:-}; do
    env $([ $pdl = off ] && echo IRONLLM_DISABLE_PDL=1) IRONLLM_TIME_GRAPHS=$ctx "$BIN" bench latency $L8 \
      --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
      --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 32 2>&1 \
      | sed 's/\x1b\[[0-9;]*m//g' | grep "per replay" | sed "s/.*INFO /programmatic launch $pdl: /" \
      | tee -a "$LOGS/graph_replay_times.txt"
  done
done
