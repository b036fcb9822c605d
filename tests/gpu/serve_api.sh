#!/usr/bin/env bash
# `ironllm serve` on the GPU answers the same Python API tests (tests/api, official openai client) as on
# the CPU. The GPU host has no network: the client's wheels travel in .gpu/wheels (scripts/gpu_stage.sh)
# and the served model is the SmolLM2-shaped random-weight directory that make_models.py wrote, with the
# real tokenizer and chat template, served under the default model's name. tests/api/test_structured.py is
# left out: its schemas need a trained model to finish their JSON; structured output on the GPU is checked
# by tests/gpu/structured_check.py with bounded constraints instead.
# usage: bash tests/gpu/serve_api.sh MODELS_DIR LOGDIR [pytest args...]
set -uo pipefail
MODELS=$1 LOGS=$2
shift 2
VENV=/tmp/ironllm-api-venv
if [ ! -x $VENV/bin/python ]; then
  python3 -m venv $VENV && $VENV/bin/pip install -q --no-index --find-links .gpu/wheels openai pytest httpx
fi
MODEL=${IRONLLM_API_MODEL:-$MODELS/smollm2-135m-bfloat16}
IRONLLM_BIN=$PWD/.gpu/ironllm IRONLLM_API_MODEL=$MODEL IRONLLM_API_RANDOM_WEIGHTS=1 IRONLLM_API_ARGS="--device cuda" \
  $VENV/bin/python -m pytest tests/api -q -p no:cacheprovider -rf --ignore tests/api/test_structured.py "$@" 2>&1 | tee "$LOGS/serve_api_pytest.log" | tail -40
exit "${PIPESTATUS[0]}"
