#!/usr/bin/env bash
# A/B of the split sampler for plain rows (branch wip/split-sampler): the GPU sampler tests, then the
# 8B decode step at batch 1/32/128 with plain rows split over blocks and with one block per row
# (IRONLLM_SAMPLER_NO_SPLIT=1), with IRONLLM_STEP_TIMING. Runs on the GPU host; writes to $OUT.
# usage: OUT=DIR bash bench/gpu_sampler_ab.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -kf $f; chmod +x ${f%.gz}; done
.gpu/test_gpu_sampler --test-threads 1 2>&1 | grep -E "test result|panicked|plain_rows" | head -5
python3 bench/gpu_ceilings.py 2>/dev/null | head -c 300; echo
L8=bench/configs/llama-3.1-8b
for v in split whole; do for b in 1 32 128; do
  for o in 1 65; do
    env $([ $v = whole ] && echo IRONLLM_SAMPLER_NO_SPLIT=1) IRONLLM_STEP_TIMING=1 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --batch-size $b --input-len 1024 --output-len $o --num-iters-warmup 2 --num-iters 5 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 256 --output-json $OUT/${v}_b${b}_o${o}.json 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep "step timing" | sed "s/.*INFO /$v b$b o$o: /" | tail -1
  done
done; done
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for v in ("split", "whole"):
    for b in (1, 32, 128):
        a = json.load(open(f"{o}/{v}_b{b}_o1.json"))["avg_latency"]; c = json.load(open(f"{o}/{v}_b{b}_o65.json"))["avg_latency"]
        print(f"{v} sampler, batch {b}: {(c - a) / 64 * 1e3:.3f} ms per step")
PY
