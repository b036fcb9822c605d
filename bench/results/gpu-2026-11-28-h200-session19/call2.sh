#!/usr/bin/env bash
# Session 19 call 2: the CUDA Rust suites (sampler default 8 blocks/SM), split cost model out of sample at
# context 2048, end-to-end decode at batch 32 with 4096-token prompts: cost model vs the wave rule.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
L8=bench/configs/llama-3.1-8b
e2e() { # name rule out
  local name=$1 rule=$2 o=$3
  IRONLLM_DECODE_SPLIT_RULE=$rule timeout 150 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --batch-size 32 \
    --input-len 4096 --output-len $o --num-iters-warmup 1 --num-iters 2 --dtype bfloat16 --max-model-len 8192 \
    --max-num-seqs 256 --output-json $R/e2e_${name}_o$o.json > $R/e2e_${name}_o$o.log 2>&1
}
for rule in cost wave; do e2e $rule $rule 65; e2e $rule $rule 129; done
python3 - $R <<'PY' | tee -a $R/summary.txt
import json, sys
r = sys.argv[1]
for rule in ("cost", "wave"):
    a = json.load(open(f"{r}/e2e_{rule}_o65.json"))["avg_latency"]; b = json.load(open(f"{r}/e2e_{rule}_o129.json"))["avg_latency"]
    print(f"e2e 8B batch 32, 4096-token prompts, {rule} rule: {(b - a) / 64 * 1e3:.3f} ms per decode step (contexts 4161-4224)")
PY
tar czf $OUT/r.tgz -C $OUT r
NO_WAVE=1 ROUNDS=1 CONTEXTS="2048" timeout 150 bash bench/gpu_split_ab.sh $R/split > /dev/null 2>&1
tar czf $OUT/r.tgz -C $OUT r
OUT=$R/check STEP_TIMEOUT=150 bash scripts/gpu_check.sh models rust > $R/check.log 2>&1
cat $R/check/summary.txt >> $R/summary.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
