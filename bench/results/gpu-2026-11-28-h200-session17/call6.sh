#!/usr/bin/env bash
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache RUST_LOG=info,ironllm_cuda::model=debug
for f in .gpu/ironllm.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
replay() { # label ctx seqs [env...]
  local label=$1 ctx=$2 seqs=$3
  shift 3
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency \
    bench/configs/llama-3.1-8b --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $seqs 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror\|split-KV" | sed "s/.*\(INFO\|DEBUG\) [a-z_:]*/$label: /" | tee -a "$R/replays.txt"
}
for round in 1 2; do
  replay "r$round wave rule" 1024 128
  replay "r$round old rule" 1024 128 IRONLLM_DECODE_SPLIT_FILL=4
done
echo "elapsed $SECONDS"
tar czf $OUT/r.tgz -C $OUT r
export RUST_LOG=info
IRONLLM_BENCH_AB=0 timeout $((480 - SECONDS)) bash bench/gpu_bench.sh $R/table > $R/table.txt 2>&1
grep "^|\|card" $R/table.txt
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
for b in 32 64; do for o in 65 129; do
  [ $SECONDS -gt 540 ] && break
  IRONLLM_DECODE_SPLIT_FILL=4 timeout 60 .gpu/ironllm bench latency bench/configs/llama-3.1-8b --load-format dummy --device cuda \
    --dtype bfloat16 --max-model-len 8192 --max-num-seqs 256 --batch-size $b --input-len 1024 --output-len $o \
    --num-iters-warmup 2 --num-iters 5 --output-json $R/old_b${b}_o$o.json > $R/old_b${b}_o$o.log 2>&1
done; done
python3 - $R <<'PY'
import json, sys
r = sys.argv[1]
for b in (32, 64):
    try:
        t = {o: json.load(open(f"{r}/old_b{b}_o{o}.json"))["avg_latency"] for o in (65, 129)}
        print(f"old rule, 8B batch {b}: {(t[129] - t[65]) / 64 * 1e3:.3f} ms a decode step")
    except Exception as e:
        print("old rule", b, e)
PY
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
