#!/usr/bin/env bash
# Session 20 call 7: the deep form of the decode kernel (3 stages) chosen by the plan cost model. Kernel
# checks; GPU-only replays at contexts 1024 and 4096 with and without it (IRONLLM_DISABLE_DEEP_DECODE=1);
# batch 32 and 64 end to end ((t(129) - t(65)) / 64 of 1024-token prompts), with and without; the CUDA suites.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
timeout 150 python3 tests/gpu/test_layer_kernels.py flash_decode paged_attention_split > $R/kernels.txt 2>&1
tail -3 $R/kernels.txt | tee -a $R/summary.txt; grep FAIL $R/kernels.txt | head -5 | tee -a $R/summary.txt
tar czf $OUT/r.tgz -C $OUT r
L8=bench/configs/llama-3.1-8b
replay() { # label ctx env...
  local label=$1 ctx=$2; shift 2
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 100 .gpu/ironllm bench latency $L8 \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 128 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror\|captured" | sed "s/.*INFO [a-z_:]*/$label, context $ctx:/" | tee -a "$R/replays.txt"
}
for ctx in 1024 4096; do replay deep $ctx X=1; replay plain $ctx IRONLLM_DISABLE_DEEP_DECODE=1; done > /dev/null
tar czf $OUT/r.tgz -C $OUT r
lat() { # name batch out env...
  local name=$1 b=$2 o=$3; shift 3
  env "$@" timeout 60 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --batch-size $b --input-len 1024 \
    --output-len $o --num-iters-warmup 1 --num-iters 3 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 256 \
    --output-json $R/${name}_b${b}_o$o.json > $R/${name}_b${b}_o$o.log 2>&1
}
for b in 32 64; do for o in 65 129; do lat deep $b $o X=1; lat plain $b $o IRONLLM_DISABLE_DEEP_DECODE=1; done; done
python3 - $R <<'PY' | tee -a $R/summary.txt
import json, sys
r = sys.argv[1]
for b in (32, 64):
    for n in ("deep", "plain"):
        try:
            a, c = (json.load(open(f"{r}/{n}_b{b}_o{o}.json"))["avg_latency"] for o in (65, 129))
            print(f"8B batch {b} end to end, ~1120-token context, {n}: {(c - a) / 64 * 1e3:.3f} ms a step")
        except Exception as e:
            print(b, n, "missing", e)
PY
tar czf $OUT/r.tgz -C $OUT r
OUT=$R/check STEP_TIMEOUT=150 timeout 250 bash scripts/gpu_check.sh models rust > $R/check.log 2>&1
cat $R/check/summary.txt >> $R/summary.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
python3 - $R/replays.txt <<'PY'
import re, sys, collections
t = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    m = re.match(r"(deep|plain), context (\d+): graph batch (\d+)(?: \((again|not chosen)\))?: ([\d.]+) ms.*?, ([^)]*)\)", line)
    if m and m[4] != "not chosen":
        k = (int(m[2]), int(m[3])); t[k][m[1]] = min(t[k].get(m[1], (9e9, ""))[0], float(m[5])), m[6]
for k in sorted(t):
    print(k, t[k])
PY
