#!/usr/bin/env bash
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache RUST_LOG=info
for f in .gpu/ironllm.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
(which nsys ncu; ls /usr/local/cuda/bin 2>/dev/null | head -40; ls /opt/nvidia 2>/dev/null) > $R/tools.txt 2>&1
replay() { # label model ctx seqs [env...]
  local label=$1 model=$2 ctx=$3 seqs=$4
  shift 4
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency \
    $model --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $seqs 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | sed "s/.*INFO /$label: /" | tee -a "$R/replays.txt"
}
L8=bench/configs/llama-3.1-8b S=bench/configs/smollm2-135m
for round in 1 2 3; do
  replay "r$round 8B large=1 (new)" $L8 1024 2
  replay "r$round 8B large=0 (old)" $L8 1024 2 IRONLLM_KERNEL_DEFINES="GEMV_PREFETCH_LARGE=0"
  replay "r$round smol large=1 (new)" $S 128 2
  replay "r$round smol large=0 (old)" $S 128 2 IRONLLM_KERNEL_DEFINES="GEMV_PREFETCH_LARGE=0"
done
echo "elapsed $SECONDS"
tar czf $OUT/r.tgz -C $OUT r
for b in 32 128; do
  IRONLLM_STEP_TIMING=1 timeout 100 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --dtype bfloat16 \
    --max-model-len 8192 --max-num-seqs 256 --batch-size $b --input-len 1024 --output-len 129 --num-iters-warmup 0 \
    --num-iters 1 > $R/step_b$b.log 2>&1
  sed 's/\x1b\[[0-9;]*m//g' $R/step_b$b.log | grep -i "step timing\|Avg latency" | cut -c1-400
done
for b in 1 32; do for o in 65 129; do
  timeout 100 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --dtype bfloat16 --max-model-len 8192 \
    --max-num-seqs 256 --batch-size $b --input-len 1024 --output-len $o --num-iters-warmup 2 --num-iters 5 \
    --output-json $R/l8_b${b}_o$o.json > $R/l8_b${b}_o$o.log 2>&1
done; done
python3 - $R <<'PY'
import json, sys
r = sys.argv[1]
for b in (1, 32):
    t = {o: json.load(open(f"{r}/l8_b{b}_o{o}.json"))["avg_latency"] for o in (65, 129)}
    print(f"8B batch {b}: ({t[129]:.4f} - {t[65]:.4f}) / 64 = {(t[129] - t[65]) / 64 * 1e3:.3f} ms a decode step")
PY
tar czf $OUT/r.tgz -C $OUT r
echo "elapsed $SECONDS"
cat $R/tools.txt
