#!/usr/bin/env bash
# Builds what a GPU run needs and stages it, compressed, in the git-ignored .gpu/ folder that the device
# call carries (see ../shared/gpu.md): the release binary and the test binaries that run on the CUDA
# backend. The device has no Rust toolchain; scripts/gpu_check.sh unpacks and runs these there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
rm -f .gpu/*.gz
cargo build --release -p ironllm-cli
cp target/release/ironllm .gpu/ironllm
msgs=$(mktemp)
cargo test --release --no-run -p ironllm --test batch_invariance --test offline_api --test spec_decode --test async_scheduling --message-format=json >"$msgs" 2>/dev/null
cargo test --release --no-run -p ironllm-cuda --message-format=json >>"$msgs" 2>/dev/null
python3 - "$msgs" <<'PY'
import json, shutil, sys, os
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        name = m["target"]["name"]
        if m["target"]["kind"] == ["lib"]:
            name = m["target"]["name"] + "_unit"
        shutil.copy(m["executable"], os.path.join(".gpu", "test_" + name))
        print("staged test", name)
PY
for f in .gpu/ironllm .gpu/test_*; do
  strip "$f" 2>/dev/null || true
  gzip -9 -f "$f"
done
ls -la .gpu
du -sh .gpu
