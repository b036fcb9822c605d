#!/usr/bin/env bash
# Async scheduling on and off, same run (issue 8, item 2): the decode step of the Llama-3.1-8B shape at
# batch 1/32/128 (~1k context) and of the SmolLM2-135M shape at batch 1 (where host work weighs most),
# each as (latency(output 65) - latency(output 1)) / 64 like bench/gpu_bench.sh, plus offline throughput
# of the ~200-in / ~180-out workload. Dummy bf16 weights. Runs on the GPU host from the repository root.
# usage: bash bench/gpu_async.sh LOGDIR
set -uo pipefail
LOGS=${1:-/tmp/ironllm-async}
mkdir -p "$LOGS"
BIN=${IRONLLM_BIN:-.gpu/ironllm}
L8=bench/configs/llama-3.1-8b
S=bench/configs/smollm2-135m
lat() { # name model batch input output extra...
  local name=$1 model=$2 bs=$3 inp=$4 outl=$5; shift 5
  "$BIN" bench latency "$model" --load-format dummy --device cuda --batch-size "$bs" --input-len "$inp" \
    --output-len "$outl" --num-iters-warmup 2 --num-iters 5 --output-json "$LOGS/$name.json" "$@" \
    >"$LOGS/$name.log" 2>&1 || echo "FAILED $name (see $name.log)"
}
COMMON8=(--dtype bfloat16 --max-model-len 8192 --max-num-seqs 256)
for mode in sync async; do
  extra=(--no-async-scheduling)
  [ "$mode" = async ] && extra=(--async-scheduling)
  for b in 1 32 128; do
    lat "l8_b${b}_o1_$mode" $L8 "$b" 1024 1 "${COMMON8[@]}" "${extra[@]}"
    lat "l8_b${b}_o65_$mode" $L8 "$b" 1024 65 "${COMMON8[@]}" "${extra[@]}"
  done
  lat "s_b1_o1_$mode" $S 1 128 1 --dtype bfloat16 "${extra[@]}"
  lat "s_b1_o129_$mode" $S 1 128 129 --dtype bfloat16 "${extra[@]}"
  "$BIN" bench throughput $L8 --load-format dummy --device cuda --dtype bfloat16 --max-model-len 4096 \
    --num-prompts 1000 --input-len 200 --output-len 180 --random-range-ratio 0.5 --max-num-seqs 512 \
    --max-num-batched-tokens 16384 --output-json "$LOGS/tp_200_180_$mode.json" "${extra[@]}" \
    >"$LOGS/tp_200_180_$mode.log" 2>&1 || echo "FAILED tp_200_180_$mode"
done
grep -h "async scheduling" "$LOGS"/l8_b1_o1_async.log | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200
python3 - "$LOGS" <<'PY'
import json, sys
logs = sys.argv[1]
def load(name):
    try:
        return json.load(open(f"{logs}/{name}.json"))
    except Exception:
        return None
print("| measure | sync | async | async / sync |")
print("|---|---:|---:|---:|")
for label, model, b, steps, o1, on in [("8B decode step, batch 1", "l8", 1, 64, "o1", "o65"),
                                        ("8B decode step, batch 32", "l8", 32, 64, "o1", "o65"),
                                        ("8B decode step, batch 128", "l8", 128, 64, "o1", "o65"),
                                        ("SmolLM2 decode step, batch 1", "s", 1, 128, "o1", "o129")]:
    vals = []
    for mode in ("sync", "async"):
        a, c = load(f"{model}_b{b}_{o1}_{mode}"), load(f"{model}_b{b}_{on}_{mode}")
        vals.append((c["avg_latency"] - a["avg_latency"]) / steps * 1e3 if a and c else None)
    fmt = lambda v: f"{v:.3f} ms" if v is not None else "n/a"
    ratio = f"{vals[1] / vals[0]:.3f}" if None not in vals else "n/a"
    print(f"| {label} | {fmt(vals[0])} | {fmt(vals[1])} | {ratio} |")
t = [load(f"tp_200_180_{m}") for m in ("sync", "async")]
if None not in t:
    s, a = (x.get("tokens_per_second", 0) for x in t)
    rs, ra = (x.get("requests_per_second", 0) for x in t)
    print(f"| offline ~200/~180, 1000 requests, 512 seqs: req/s | {rs:.2f} | {ra:.2f} | {ra / rs:.3f} |")
PY
