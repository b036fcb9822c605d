#!/usr/bin/env bash
# Session 19 call 3: the issue's table (final code); the 8B decode at batch 128 / 64 end to end with the
# wave rule (one graph a batch size) beside the table's cost-model runs; GPU-only replays at context 1024,
# cost model vs wave rule, now with 3 warm-up launches a graph.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
L8=bench/configs/llama-3.1-8b
replay() { # label ctx env...
  local label=$1 ctx=$2; shift 2
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency $L8 \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 128 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | sed "s/.*INFO [a-z_:]*/$label:/" | tee -a "$R/replays.txt"
}
replay "warm-up (kernels compile)" 1024 X=1 > /dev/null
for round in 1 2; do replay "round $round, cost" 1024 X=1; replay "round $round, wave" 1024 IRONLLM_DECODE_SPLIT_RULE=wave; done > /dev/null
tar czf $OUT/r.tgz -C $OUT r
IRONLLM_BENCH_AB=0 timeout 400 bash bench/gpu_bench.sh $R/bench > $R/bench.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r
lat() { # name batch out env...
  local name=$1 b=$2 o=$3; shift 3
  env "$@" timeout 100 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --batch-size $b --input-len 1024 \
    --output-len $o --num-iters-warmup 2 --num-iters 5 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 256 \
    --output-json $R/${name}_b${b}_o$o.json > $R/${name}_b${b}_o$o.log 2>&1
}
for b in 128; do for o in 65 129; do lat wave $b $o IRONLLM_DECODE_SPLIT_RULE=wave; done; done
python3 - $R <<'PY' | tee -a $R/summary.txt
import json, sys
r = sys.argv[1]
for b in (128,):
    w = [json.load(open(f"{r}/wave_b{b}_o{o}.json"))["avg_latency"] for o in (65, 129)]
    c = [json.load(open(f"{r}/bench/l8_b{b}_o{o}.json"))["avg_latency"] for o in (65, 129)]
    print(f"8B batch {b} end to end, ~1120-token context: cost model {(c[1]-c[0])/64*1e3:.3f} ms, wave rule {(w[1]-w[0])/64*1e3:.3f} ms")
PY
tar czf $OUT/r.tgz -C $OUT r
tail -25 $R/bench.txt
