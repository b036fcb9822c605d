#!/usr/bin/env bash
# Session 19 call 4: why a batch size's later-captured graph replays ~1-2% slower (GPU-only, context 1024):
# two timing passes, the capture order reversed (IRONLLM_GRAPH_CAPTURE_REVERSE, measurement only), the wave
# rule (one graph); then batch 128 end to end, cost model vs wave rule, interleaved.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
L8=bench/configs/llama-3.1-8b
replay() { # label ctx env...
  local label=$1 ctx=$2; shift 2
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency $L8 \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 128 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | grep -E "batch (32|64|96|112|128)" | sed "s/.*INFO [a-z_:]*/$label:/" | tee -a "$R/replays.txt"
}
replay "warm-up (kernels compile)" 1024 X=1 > /dev/null
for round in 1 2; do
  replay "round $round, cost" 1024 X=1
  replay "round $round, cost reversed" 1024 IRONLLM_GRAPH_CAPTURE_REVERSE=1
  replay "round $round, wave" 1024 IRONLLM_DECODE_SPLIT_RULE=wave
done > /dev/null
tar czf $OUT/r.tgz -C $OUT r
lat() { # name batch out env...
  local name=$1 b=$2 o=$3; shift 3
  env "$@" timeout 100 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --batch-size $b --input-len 1024 \
    --output-len $o --num-iters-warmup 1 --num-iters 2 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 256 \
    --output-json $R/${name}_b${b}_o$o.json > $R/${name}_b${b}_o$o.log 2>&1
}
for round in 1 2; do
  lat cost$round 128 65 X=1; lat cost$round 128 129 X=1
  lat wave$round 128 65 IRONLLM_DECODE_SPLIT_RULE=wave; lat wave$round 128 129 IRONLLM_DECODE_SPLIT_RULE=wave
done
python3 - $R <<'PY' | tee -a $R/summary.txt
import json, sys
r = sys.argv[1]
for rnd in (1, 2):
    for v in ("cost", "wave"):
        a, b = (json.load(open(f"{r}/{v}{rnd}_b128_o{o}.json"))["avg_latency"] for o in (65, 129))
        print(f"round {rnd}, {v}: 8B batch 128 end to end, ~1120-token context: {(b - a) / 64 * 1e3:.3f} ms a step")
PY
tar czf $OUT/r.tgz -C $OUT r
cat $R/replays.txt
