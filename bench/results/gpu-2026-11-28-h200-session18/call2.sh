#!/usr/bin/env bash
# Session 18 call 2: the RMSNorm in the skinny GEMM's prologue and the residual add in its epilogue.
# 1. GPU tests of the GEMMs (test_gpu_gemm: the fused forms bit for bit against rms_norm + gemm).
# 2. End to end, bit for bit: greedy bf16 generation (SmolLM2 shape, dummy weights) fused vs IRONLLM_DISABLE_GEMV_NORM=1.
# 3. GPU-only decode graph replays, 8B at context 1024 and SmolLM2 at 128, fused vs not, interleaved rounds.
# 4. The table (IRONLLM_BENCH_AB=0 bash bench/gpu_bench.sh).
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $R/gpu.txt
timeout 200 .gpu/test_gpu_gemm --test-threads 1 > $R/test_gpu_gemm.log 2>&1; echo "test_gpu_gemm rc=$?" | tee -a $R/summary.txt
grep "test result\|FAILED\|panicked" $R/test_gpu_gemm.log | tee -a $R/summary.txt
S=bench/configs/smollm2-135m
gen() { # out maxseqs env...
  local out=$1 ms=$2; shift 2
  env "$@" timeout 120 .gpu/ironllm generate $S --load-format dummy --tokenizer tests/fixtures/tokenizer/smollm2 \
    --device cuda --dtype bfloat16 --max-model-len 2048 --max-tokens 200 --ignore-eos --logprobs 2 \
    -p "The quick brown fox" -p "Paged attention splits the cache into blocks of" --max-num-seqs $ms -o $out > $out.log 2>&1
}
gen $R/gen_fused.jsonl 2
gen $R/gen_unfused.jsonl 2 IRONLLM_DISABLE_GEMV_NORM=1
gen $R/gen_fused1.jsonl 1
gen $R/gen_unfused1.jsonl 1 IRONLLM_DISABLE_GEMV_NORM=1
if cmp -s $R/gen_fused.jsonl $R/gen_unfused.jsonl && [ -s $R/gen_fused.jsonl ]; then echo "generate bf16 fused == unfused: identical ($(wc -c < $R/gen_fused.jsonl) bytes)" | tee -a $R/summary.txt; else echo "generate bf16 fused != unfused" | tee -a $R/summary.txt; fi
if cmp -s $R/gen_fused1.jsonl $R/gen_unfused1.jsonl && [ -s $R/gen_fused1.jsonl ]; then echo "generate bf16 one at a time fused == unfused: identical" | tee -a $R/summary.txt; else echo "generate bf16 one at a time fused != unfused" | tee -a $R/summary.txt; fi
tar czf $OUT/r.tgz -C $OUT r
replay() { # label model ctx maxseqs env...
  local label=$1 model=$2 ctx=$3 ms=$4; shift 4
  env "$@" IRONLLM_TIME_GRAPHS=$ctx timeout 150 .gpu/ironllm bench latency $model \
    --load-format dummy --device cuda --batch-size 1 --input-len 16 --output-len 2 --num-iters-warmup 0 \
    --num-iters 1 --dtype bfloat16 --max-model-len 8192 --max-num-seqs $ms 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
    | grep "per replay\|rror" | sed "s/.*INFO [a-z_:]*/$label:/" | tee -a "$R/replays.txt"
}
for round in 1 2 3; do
  replay "round $round, 8B, fused" bench/configs/llama-3.1-8b 1024 8
  replay "round $round, 8B, unfused" bench/configs/llama-3.1-8b 1024 8 IRONLLM_DISABLE_GEMV_NORM=1
done
for round in 1 2; do
  replay "round $round, SmolLM2, fused" $S 128 4
  replay "round $round, SmolLM2, unfused" $S 128 4 IRONLLM_DISABLE_GEMV_NORM=1
done
tar czf $OUT/r.tgz -C $OUT r
IRONLLM_BENCH_AB=0 timeout 300 bash bench/gpu_bench.sh $R/bench > $R/bench.log 2>&1
tail -30 $R/bench.log
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
