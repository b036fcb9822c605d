#!/usr/bin/env bash
# The OpenAI-API test suite: builds the release binary, makes a virtual environment with the official
# `openai` client, pytest and httpx (once, under the ironllm cache), and runs tests/api against a real
# `ironllm serve` on the default model. Extra arguments go to pytest (e.g. -k chat, -x).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${IRONLLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ironllm}"
VENV="$CACHE/venv-api"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, pytest, httpx" 2>/dev/null; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check openai pytest httpx
fi

echo "== cargo build --release -p ironllm-cli"
cargo build --release -p ironllm-cli

echo "== pytest tests/api"
exec "$VENV/bin/python" -m pytest tests/api -q -p no:cacheprovider "$@"
