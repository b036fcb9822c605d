#!/usr/bin/env bash
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache RUST_LOG=info
for f in .gpu/ironllm.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
IRONLLM_TIME_GRAPHS=1024 timeout 100 .gpu/ironllm bench latency bench/configs/llama-3.1-8b --load-format dummy --device cuda \
  --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 --num-iters 1 --dtype bfloat16 --max-model-len 8192 \
  --max-num-seqs 128 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep "per replay\|rror" | sed "s/.*INFO //" | tee $R/replays.txt
for b in 32 64; do for o in 65 129; do
  [ $SECONDS -gt 200 ] && break
  timeout 50 .gpu/ironllm bench latency bench/configs/llama-3.1-8b --load-format dummy --device cuda \
    --dtype bfloat16 --max-model-len 8192 --max-num-seqs 256 --batch-size $b --input-len 1024 --output-len $o \
    --num-iters-warmup 2 --num-iters 5 --output-json $R/l8_b${b}_o$o.json > $R/l8_b${b}_o$o.log 2>&1
done; done
python3 - $R <<'PY'
import json, sys
r = sys.argv[1]
for b in (32, 64):
    try:
        t = {o: json.load(open(f"{r}/l8_b{b}_o{o}.json"))["avg_latency"] for o in (65, 129)}
        print(f"8B batch {b}: {(t[129] - t[65]) / 64 * 1e3:.3f} ms a decode step")
    except Exception as e:
        print(b, e)
PY
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
