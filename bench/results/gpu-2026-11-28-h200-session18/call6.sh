#!/usr/bin/env bash
# Session 18 call 6: the RMSNorm kernel with its packs in registers and the weight loaded before the
# programmatic-launch wait (RMS_NORM_REGS=1, default) against the earlier form (IRONLLM_KERNEL_DEFINES="RMS_NORM_REGS=0").
# 1. tests/gpu/test_layer_kernels.py rms_norm (against float64 torch), test_gpu_gemm (norm kernel vs the GEMV's
# prologue bit for bit), greedy generation fused vs unfused bit for bit. 2. GPU-only replays, interleaved. 3. the table.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $R/gpu.txt
timeout 120 python3 tests/gpu/test_layer_kernels.py rms_norm > $R/layer_kernels_rms_norm.log 2>&1; echo "test_layer_kernels rms_norm rc=$? $(grep -c PASS $R/layer_kernels_rms_norm.log) PASS lines, $(tail -1 $R/layer_kernels_rms_norm.log)" | tee -a $R/summary.txt
timeout 200 .gpu/test_gpu_gemm --test-threads 1 gemv_with_the_norm > $R/test_gpu_gemm.log 2>&1; echo "test_gpu_gemm (norm) rc=$? $(grep 'test result' $R/test_gpu_gemm.log)" | tee -a $R/summary.txt
S=bench/configs/smollm2-135m
gen() { # out maxseqs env...
  local out=$1 ms=$2; shift 2
  env "$@" timeout 120 .gpu/ironllm generate $S --load-format dummy --tokenizer tests/fixtures/tokenizer/smollm2 \
    --device cuda --dtype bfloat16 --max-model-len 2048 --max-tokens 200 --ignore-eos --logprobs 2 \
    -p "The quick brown fox" -p "Paged attention splits the cache into blocks of" --max-num-seqs $ms -o $out > $out.log 2>&1
}
gen $R/gen_fused1.jsonl 1
gen $R/gen_unfused1.jsonl 1 IRONLLM_DISABLE_GEMV_NORM=1
if cmp -s $R/gen_fused1.jsonl $R/gen_unfused1.jsonl && [ -s $R/gen_fused1.jsonl ]; then echo "generate bf16 fused == unfused (norm kernel): identical" | tee -a $R/summary.txt; else echo "generate bf16: fused != unfused" | tee -a $R/summary.txt; fi
tar czf $OUT/r.tgz -C $OUT r
replay() { # label model ctx maxseqs env...
  local label=$1 model=$2 ctx=$3 ms=$4; shift 4
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency $model \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $ms 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | sed "s/.*INFO [a-z_:]*/$label:/" | tee -a "$R/replays.txt"
}
L8=bench/configs/llama-3.1-8b
replay "warm-up, 8B, regs" $L8 1024 2
replay "warm-up, 8B, re-read" $L8 1024 2 IRONLLM_KERNEL_DEFINES=RMS_NORM_REGS=0
for round in 1 2 3; do
  replay "round $round, 8B, regs" $L8 1024 32
  replay "round $round, 8B, re-read" $L8 1024 32 IRONLLM_KERNEL_DEFINES=RMS_NORM_REGS=0
done
for round in 1 2; do
  replay "round $round, SmolLM2, regs" $S 128 8
  replay "round $round, SmolLM2, re-read" $S 128 8 IRONLLM_KERNEL_DEFINES=RMS_NORM_REGS=0
done
tar czf $OUT/r.tgz -C $OUT r
IRONLLM_BENCH_AB=0 timeout 250 bash bench/gpu_bench.sh $R/bench > $R/bench.log 2>&1
tar czf $OUT/r.tgz -C $OUT r
grep -A12 "^card:" $R/bench.log
cat $R/summary.txt
