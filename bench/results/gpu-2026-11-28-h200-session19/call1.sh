#!/usr/bin/env bash
# Session 19 call 1: correctness of the norm helpers (bit for bit against the binary before them), the
# sampler split tests, graph vs eager with several share counts per batch; sampler blocks-per-SM A/B;
# split cost model out of sample (contexts 2048, 8192); GEMM candidates 8 vs 32 at the decode graphs.
set -uo pipefail
R=$OUT/r; mkdir -p $R
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 IRONLLM_CACHE_DIR=/tmp/ironllm-cache
for f in .gpu/*.gz; do gunzip -f -k "$f" && chmod +x "${f%.gz}"; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $R/gpu.txt
python3 bench/gpu_ceilings.py > $R/ceilings.txt 2>&1 &
CEIL=$!
S=bench/configs/smollm2-135m; L8=bench/configs/llama-3.1-8b
gen() { # bin model out maxseqs env...
  local bin=$1 model=$2 out=$3 ms=$4; shift 4
  env "$@" timeout 150 $bin generate $model --load-format dummy --tokenizer tests/fixtures/tokenizer/smollm2 \
    --device cuda --dtype bfloat16 --max-model-len 2048 --max-tokens 200 --ignore-eos --logprobs 2 \
    -p "The quick brown fox" -p "Paged attention splits the cache into blocks of" --max-num-seqs $ms -o $out > $out.log 2>&1
}
wait $CEIL
# NVRTC compiles for both binaries first (~30 s each), in these runs.
for v in fused unfused; do for ms in 1 2; do
  e=X=1; [ $v = unfused ] && e=IRONLLM_DISABLE_GEMV_NORM=1
  gen .gpu/ironllm_old $S $R/gen_${v}_old$ms.jsonl $ms $e
  gen .gpu/ironllm $S $R/gen_${v}_new$ms.jsonl $ms $e IRONLLM_DECODE_SPLIT_RULE=wave
  if cmp -s $R/gen_${v}_old$ms.jsonl $R/gen_${v}_new$ms.jsonl && [ -s $R/gen_${v}_old$ms.jsonl ]; then r=identical; else r=DIFFERENT; fi
  echo "generate SmolLM2 bf16 ($v) max-num-seqs $ms, before vs after the norm helpers: $r" | tee -a $R/summary.txt
done; done
tar czf $OUT/r.tgz -C $OUT r
timeout 100 python3 tests/gpu/test_layer_kernels.py rms_norm > $R/layer_kernels_rms_norm.log 2>&1; echo "test_layer_kernels rms_norm rc=$? $(tail -1 $R/layer_kernels_rms_norm.log)" | tee -a $R/summary.txt
timeout 200 .gpu/test_gpu_gemm --test-threads 1 gemv > $R/test_gpu_gemm.log 2>&1; echo "test_gpu_gemm (gemv) rc=$? $(grep 'test result' $R/test_gpu_gemm.log)" | tee -a $R/summary.txt
timeout 200 .gpu/test_gpu_sampler --test-threads 1 > $R/test_gpu_sampler.log 2>&1; echo "test_gpu_sampler rc=$? $(grep 'test result' $R/test_gpu_sampler.log)" | tee -a $R/summary.txt
# Graph vs eager with the graphs' own share counts; batch 32 crosses 3 shares -> 1 share at ~1150 keys... the other way: starts at 1100 (1 share), ends at 1230 (3 shares).
IRONLLM_GRAPH_CHECK=1 timeout 200 .gpu/ironllm bench latency $L8 --load-format dummy --device cuda --batch-size 32 \
  --input-len 1100 --output-len 130 --num-iters-warmup 0 --num-iters 1 --dtype bfloat16 --max-model-len 8192 \
  --max-num-seqs 32 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -E "graph check|captured|rror" > $R/graph_check.txt
echo "graph check: $(grep -c 'graph check' $R/graph_check.txt) replays; by shares and diff: $(grep -o 'shares): max .*' $R/graph_check.txt | sort | uniq -c | tr '\n' ';')" | tee -a $R/summary.txt
grep captured $R/graph_check.txt | tee -a $R/summary.txt
tar czf $OUT/r.tgz -C $OUT r
OUT=$R/sampler BLOCKS="2 4 8" BATCHES="32 128 256" bash bench/gpu_sampler_ab.sh > /dev/null 2>&1
cat $R/sampler/sampler_ab.txt | tee -a $R/summary.txt
tar czf $OUT/r.tgz -C $OUT r
NO_WAVE=1 ROUNDS=1 CONTEXTS="8192" timeout 200 bash bench/gpu_split_ab.sh $R/split > /dev/null 2>&1
tar czf $OUT/r.tgz -C $OUT r
