#!/usr/bin/env bash
# A/B: off vs ngram k2 max3 (default disable_by_batch_size: no drafts at 16 running), c16 open, alternating.
set -euo pipefail
BIN=${BIN:-target/release/ironllm}; PORT=8187; OUT=${OUT:-/tmp/ironllm_spec_ab}; mkdir -p $OUT
SPEC='{"method":"ngram","num_speculative_tokens":2,"prompt_lookup_min":2,"prompt_lookup_max":3}'
for i in 1 2 3; do
  for cfg in off default; do
    flag=(); [[ $cfg == default ]] && flag=(--speculative-config "$SPEC")
    $BIN serve --host 127.0.0.1 --port $PORT --log-level warn "${flag[@]}" > $OUT/serve.log 2>&1 & PID=$!
    for _ in $(seq 100); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 0.2; done
    curl -sf localhost:$PORT/v1/completions -H 'Content-Type: application/json' -d '{"prompt":"Warm-up: count from one to twenty in words.","max_tokens":32,"temperature":0}' >/dev/null
    $BIN bench serve --base-url http://127.0.0.1:$PORT --dataset-name custom --dataset-path bench/results/spec-decode-2026-11-27-cpu/data/open.jsonl --disable-shuffle --num-prompts 32 --custom-output-len 256 --max-concurrency 16 --temperature 0 --disable-tqdm --save-result --result-dir $OUT --result-filename $cfg-$i.json > $OUT/$cfg-$i.txt 2>&1
    echo "$cfg $i $(python3 -c "import json; d=json.load(open('$OUT/$cfg-$i.json')); print(round(d['output_throughput'],1), round(d['mean_tpot_ms'],2))") drafts=$(curl -s localhost:$PORT/metrics | grep '^vllm:spec_decode_num_drafts_total' | awk '{print $NF}')"
    kill $PID; wait $PID 2>/dev/null || true
  done
done
