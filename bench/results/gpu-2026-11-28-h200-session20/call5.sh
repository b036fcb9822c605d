#!/usr/bin/env bash
# Session 20 call 5: the decode attention's stage count (FD_STAGES_HD128 2 = default, 3, 4; the host sizes
# shared memory and the split cost model's wave from it). GPU-only replays (random KV) of the 8B shape at
# context 1024 and 1120, every captured batch up to 128, two rounds.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/ironllm.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
replay() { # label ctx defines
  IRONLLM_KERNEL_DEFINES="$3" IRONLLM_TIME_GRAPHS=$2 timeout 120 .gpu/ironllm bench latency bench/configs/llama-3.1-8b \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs 128 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror\|split-KV\|share" | sed "s/.*INFO [a-z_:]*/$1:/" | tee -a "$R/replays.txt"
}
for round in 1 2; do
  for s in 2 3 4; do replay "r$round s$s c1024" 1024 "FD_STAGES_HD128=$s"; done > /dev/null
  tar czf $OUT/r.tgz -C $OUT r
done
python3 - $R/replays.txt <<'PY'
import re, sys, collections
t = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"r(\d) s(\d) c(\d+): graph batch (\d+)(?: \((again|not chosen)\))?: ([\d.]+) ms.*?(\d+) shares", line)
    if m and m[5] != "not chosen": t[(int(m[4]), m[2])].append((float(m[6]), m[7]))
for b in sorted({k[0] for k in t}):
    print(b, "  ".join(f"s{s}: " + " / ".join(f"{x:.3f}({sh})" for x, sh in t[(b, s)]) for s in "234" if (b, s) in t))
PY
