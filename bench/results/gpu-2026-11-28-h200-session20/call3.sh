#!/usr/bin/env bash
# Session 20 call 3: the decode attention's split kernel asks L2 for the o projection's weight (small
# decode steps leave the memory bus idle during attention). GPU-only replays (random KV) at context 1024,
# IRONLLM_ATTN_L2_PREFETCH_ROWS=0 (off) / 32 (every split batch) / 32 with FD_L2_PF_LATE=1, two rounds;
# SmolLM2 the same; then the kernel checks of flash_decode and paged_attention_split.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
replay() { # label model ctx seqs env...
  local label=$1 model=$2 ctx=$3 seqs=$4; shift 4
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 120 .gpu/ironllm bench latency $model \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $seqs 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | grep -v "not chosen" | sed "s/.*INFO [a-z_:]*/$label:/" | tee -a "$R/replays.txt"
}
L8=bench/configs/llama-3.1-8b; S=bench/configs/smollm2-135m
replay "warm-up" $L8 1024 32 IRONLLM_ATTN_L2_PREFETCH_ROWS=0 > /dev/null
replay "warm-up late" $L8 1024 32 IRONLLM_KERNEL_DEFINES=FD_L2_PF_LATE=1 > /dev/null
for round in 1 2; do
  replay "r$round 8B off" $L8 1024 32 IRONLLM_ATTN_L2_PREFETCH_ROWS=0
  replay "r$round 8B early" $L8 1024 32 IRONLLM_ATTN_L2_PREFETCH_ROWS=32
  replay "r$round 8B late" $L8 1024 32 IRONLLM_ATTN_L2_PREFETCH_ROWS=32 IRONLLM_KERNEL_DEFINES=FD_L2_PF_LATE=1
done > /dev/null
tar czf $OUT/r.tgz -C $OUT r
for round in 1 2; do
  replay "r$round smol off" $S 192 8 IRONLLM_ATTN_L2_PREFETCH_ROWS=0
  replay "r$round smol early" $S 192 8 IRONLLM_ATTN_L2_PREFETCH_ROWS=32
done > /dev/null
tar czf $OUT/r.tgz -C $OUT r
pip list 2>/dev/null | grep -i -E "^(cupy|torch) " > $R/pip.txt
timeout 200 python3 tests/gpu/test_layer_kernels.py flash_decode paged_attention_split > $R/kernels.txt 2>&1
tail -5 $R/kernels.txt >> $R/summary.txt
grep -c "^ok\|PASS" $R/kernels.txt >> $R/summary.txt
tar czf $OUT/r.tgz -C $OUT r
python3 - $R/replays.txt <<'PY'
import re, sys, collections
t = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"r(\d) (\S+) (\S+): decode graph batch (\d+)(?: \(again\))?: ([\d.]+) ms", line)
    if m: t[(m[2], int(m[4]), m[3])].append(float(m[5]))
for model in ("8B", "smol"):
    for b in sorted({k[1] for k in t if k[0] == model}):
        print(model, b, "  ".join(f"{v}: {' / '.join(f'{x:.3f}' for x in t[(model, b, v)])}" for v in ("off", "early", "late") if (model, b, v) in t))
PY
cat $R/summary.txt
