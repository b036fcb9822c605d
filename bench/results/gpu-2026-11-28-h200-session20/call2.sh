#!/usr/bin/env bash
# Session 20 call 2: the table with this session's final code; offline throughput (1024/128 and
# ~200/~180, 1000 requests) and transformers' best on 1024/128 in the same call.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
IRONLLM_BENCH_AB=0 timeout 290 bash bench/gpu_bench.sh $R/bench > $R/bench.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r
L8=bench/configs/llama-3.1-8b
B=".gpu/ironllm bench throughput $L8 --load-format dummy --device cuda --dtype bfloat16 --max-model-len 4096 --num-prompts 1000"
timeout 80 $B --input-len 1024 --output-len 128 > $R/tp1024.txt 2>&1
timeout 40 $B --input-len 200 --output-len 180 --random-range-ratio 0.5 > $R/tp200.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r
timeout 140 python3 bench/hf_throughput.py --out $R/hf --workloads 1024:128:0 --methods static_compiled --batch-size 128 --time-budget-s 25 --total-budget-s 105 > $R/hf.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r
tail -25 $R/bench.txt; grep -h "Throughput\|Elapsed\|Preempt" $R/tp1024.txt $R/tp200.txt; tail -8 $R/hf.txt
