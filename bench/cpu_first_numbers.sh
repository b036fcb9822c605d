#!/usr/bin/env bash
# First CPU figures for BENCHMARKS.md: prompt and output tokens/s of the default model (Q4_1 GGUF),
# one request and 16 concurrent, with `ironllm bench`. Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ironllm-cli >/dev/null
bin=target/release/ironllm
common=(--kv-cache-memory-bytes 1GiB --max-model-len 2048 --log-level warn)
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== single request: prefill 512 tokens (output 1)"
$bin bench latency "${common[@]}" --input-len 512 --output-len 1 --batch-size 1 --num-iters-warmup 1 --num-iters 5
echo "== single request: 32-token prompt, 128 output tokens"
$bin bench latency "${common[@]}" --input-len 32 --output-len 128 --batch-size 1 --num-iters-warmup 1 --num-iters 3
echo "== 16 concurrent: 128-token prompts, 1 output token (prefill throughput)"
$bin bench throughput "${common[@]}" --input-len 128 --output-len 1 --num-prompts 16
echo "== 16 concurrent: 128-token prompts, 128 output tokens"
$bin bench throughput "${common[@]}" --input-len 128 --output-len 128 --num-prompts 16
echo "== same, --dtype float32 (dequantized weights)"
$bin bench throughput "${common[@]}" --dtype float32 --input-len 128 --output-len 128 --num-prompts 16
