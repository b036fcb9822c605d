#!/usr/bin/env bash
# Session 18 call 7 (final code): the GEMV's norm prologue with its chunks in registers and the norm weight
# loaded before the wait (RMS_NORM_REGS, as the norm kernel). 1. test_gpu_gemm, test_layer_kernels (all),
# generation fused == unfused. 2. SmolLM2 replays RMS_NORM_REGS=1 vs 0, 8B batch 1-2. 3. the Rust GPU tests (f32).
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $R/gpu.txt
timeout 100 .gpu/test_gpu_gemm --test-threads 1 > $R/test_gpu_gemm.log 2>&1; echo "test_gpu_gemm rc=$? $(grep 'test result' $R/test_gpu_gemm.log)" | tee -a $R/summary.txt
timeout 100 python3 tests/gpu/test_layer_kernels.py > $R/layer_kernels.log 2>&1; echo "test_layer_kernels rc=$? $(tail -1 $R/layer_kernels.log)" | tee -a $R/summary.txt
S=bench/configs/smollm2-135m
gen() { # out maxseqs env...
  local out=$1 ms=$2; shift 2
  env "$@" timeout 120 .gpu/ironllm generate $S --load-format dummy --tokenizer tests/fixtures/tokenizer/smollm2 \
    --device cuda --dtype bfloat16 --max-model-len 2048 --max-tokens 200 --ignore-eos --logprobs 2 \
    -p "The quick brown fox" -p "Paged attention splits the cache into blocks of" --max-num-seqs $ms -o $out > $out.log 2>&1
}
gen $R/gen_fused2.jsonl 2
gen $R/gen_unfused2.jsonl 2 IRONLLM_DISABLE_GEMV_NORM=1
if cmp -s $R/gen_fused2.jsonl $R/gen_unfused2.jsonl && [ -s $R/gen_fused2.jsonl ]; then echo "generate bf16 (2 at a time) fused == unfused: identical" | tee -a $R/summary.txt; else echo "generate bf16: fused != unfused" | tee -a $R/summary.txt; fi
tar czf $OUT/r.tgz -C $OUT r
replay() { # label model ctx maxseqs env...
  local label=$1 model=$2 ctx=$3 ms=$4; shift 4
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency $model \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $ms 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | sed "s/.*INFO [a-z_:]*/$label:/" | tee -a "$R/replays.txt"
}
replay "warm-up, SmolLM2, re-read" $S 128 1 IRONLLM_KERNEL_DEFINES=RMS_NORM_REGS=0
for round in 1 2 3; do
  replay "round $round, SmolLM2, regs" $S 128 4
  replay "round $round, SmolLM2, re-read" $S 128 4 IRONLLM_KERNEL_DEFINES=RMS_NORM_REGS=0
done
replay "8B" bench/configs/llama-3.1-8b 1024 2
tar czf $OUT/r.tgz -C $OUT r
STEP_TIMEOUT=120 bash scripts/gpu_check.sh models rust > $R/gpu_check.log 2>&1
cp /tmp/ironllm-gpu-out/summary.txt $R/gpu_check_summary.txt 2>/dev/null
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt; tail -12 $R/gpu_check.log
