#!/usr/bin/env bash
# The GPU run: executes on the device machine (no Rust toolchain there) what scripts/gpu_stage.sh staged
# in .gpu/, in phases, and prints a summary table last. Usage, from the repository root:
#   bash scripts/gpu_check.sh [kernels] [smoke] [models] [rust] [e2e] [bench] [serve] [hf] [startup] [async] [throughput] [spec] [profile]
# hf: Hugging Face transformers on the throughput workload (bench/hf_throughput.py, 8-9 min with its
# defaults: run it alone; extra flags through HF_ARGS, e.g. HF_ARGS="--workloads 200:180:0.5 --total-budget-s 240");
# startup: start-up time of the 8B shape from a real checkpoint (bench/gpu_startup.sh, ~2 min).
# Logs go to $OUT (the device tool's folder of files to bring back) as one tarball plus summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/ironllm-gpu-out}
LOGS=/tmp/ironllm-gpu-logs
MODELS=${IRONLLM_GPU_MODELS:-/tmp/ironllm-models}
mkdir -p "$OUT" "$LOGS" "$MODELS"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export IRONLLM_CACHE_DIR=${IRONLLM_CACHE_DIR:-/tmp/ironllm-cache}
export RUST_LOG=${RUST_LOG:-info}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

for f in .gpu/*.gz; do
  [ -e "$f" ] || continue
  gunzip -f -k "$f" && chmod +x "${f%.gz}"
done

record() { # name status seconds detail
  printf '%-34s %-5s %6ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}

step() { # name command...
  local name=$1; shift
  local t0=$(date +%s)
  timeout "${STEP_TIMEOUT:-300}" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local detail
  detail=$(grep -E "test result:|PASS|FAIL|passed|failed|error" "$LOGS/$name.log" | tail -1 | cut -c1-110)
  if [ $rc -eq 0 ]; then record "$name" ok "$dt" "$detail"; else record "$name" FAIL "$dt" "rc=$rc $detail"; fi
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$LOGS/nvidia-smi.txt"

for phase in "$@"; do
  case $phase in
    kernels)
      for t in tests/gpu/test_layer_kernels.py tests/gpu/test_flash_prefill.py tests/gpu/test_gemm_sm90.py tests/gpu/test_sampler_kernels.py; do
        [ -e "$t" ] && step "py_$(basename "$t" .py)" python3 "$t"
      done
      ;;
    smoke)
      step cpu_cuda_f32_tiny python3 tests/gpu/cpu_cuda_agreement.py .gpu/ironllm "$LOGS/agreement_tiny.json" \
        tests/fixtures/reference/tiny_qwen2 tests/fixtures/reference/tiny_qwen3 tests/fixtures/reference/tiny_llama3
      ;;
    models)
      step make_models python3 tests/gpu/make_models.py "$MODELS"
      ;;
    rust)
      export IRONLLM_TEST_DEVICE=cuda IRONLLM_TEST_RANDOM_WEIGHTS=1 IRONLLM_TEST_DTYPE=float32
      export IRONLLM_TEST_GGUF=${IRONLLM_TEST_MODEL:-$MODELS/smollm2-135m-float32}
      for t in .gpu/test_ironllm_cuda_unit .gpu/test_gpu_sampler .gpu/test_gpu_gemm .gpu/test_batch_invariance .gpu/test_offline_api .gpu/test_spec_decode .gpu/test_async_scheduling; do
        [ -x "$t" ] && step "$(basename "$t")" "$t" --test-threads 1
      done
      unset IRONLLM_TEST_DEVICE IRONLLM_TEST_GGUF IRONLLM_TEST_RANDOM_WEIGHTS IRONLLM_TEST_DTYPE
      ;;
    structured)
      step structured_cuda python3 tests/gpu/structured_check.py .gpu/ironllm "$MODELS/smollm2-135m-float32" \
        "$LOGS/structured.json"
      ;;
    e2e)
      # The Hugging Face side runs its bf16 greedy references slowly (~5.5 min in all on an H100).
      STEP_TIMEOUT=${E2E_STEP_TIMEOUT:-480} step compare_transformers python3 tests/gpu/compare_transformers.py --models "$MODELS/models.json" \
        --ironllm .gpu/ironllm --out "$LOGS/compare_results.json"
      cp "$LOGS/compare_results.json" "$OUT/" 2>/dev/null
      ;;
    bench)
      # ~7 minutes with the A/B rows (IRONLLM_BENCH_AB=0 skips them)
      STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-540} step gpu_bench bash bench/gpu_bench.sh "$LOGS"
      ;;
    spec)
      step gpu_spec bash bench/gpu_spec.sh "$LOGS/spec"
      ;;
    throughput)
      step gpu_throughput bash bench/gpu_throughput.sh "$LOGS/throughput"
      ;;
    async)
      step gpu_async bash bench/gpu_async.sh "$LOGS/async"
      ;;
    profile)
      step gpu_profile bash bench/gpu_profile.sh "$LOGS/profile"
      ;;
    serve)
      step serve_api bash tests/gpu/serve_api.sh "$MODELS" "$LOGS"
      ;;
    hf)
      # shellcheck disable=SC2086 # HF_ARGS is a list of flags
      STEP_TIMEOUT=${HF_STEP_TIMEOUT:-570} step hf_throughput python3 bench/hf_throughput.py --out "$LOGS/hf" ${HF_ARGS:-}
      cp "$LOGS/hf/hf_throughput.json" "$OUT/" 2>/dev/null
      [ -f "$LOGS/hf/table.txt" ] && tee -a "$SUMMARY" <"$LOGS/hf/table.txt"
      ;;
    startup)
      STEP_TIMEOUT=${STARTUP_STEP_TIMEOUT:-420} step gpu_startup bash bench/gpu_startup.sh "$LOGS/startup"
      [ -f "$LOGS/startup/startup_table.txt" ] && tee -a "$SUMMARY" <"$LOGS/startup/startup_table.txt"
      ;;
    *) echo "unknown phase $phase" ;;
  esac
done

tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
echo "=== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)) ==="
cat "$SUMMARY"
