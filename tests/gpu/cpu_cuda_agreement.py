#!/usr/bin/env python3
"""CPU and CUDA backends agree in float32: runs `ironllm generate` greedily on both devices over the same
token-id prompts (with logprobs) for each model directory given, and compares token for token. A
divergence is accepted only after a near-tie (the CPU's top-2 logprob gap at that position < 1e-3), as
for the transformers comparison; logprob differences of the compared tokens are reported.

usage: cpu_cuda_agreement.py BINARY OUT_JSON MODEL_DIR... [--dtype float32]
"""
import json
import os
import random
import subprocess
import sys
import tempfile


def run(binary, model, device, dtype, prompts_path, out_path, extra):
    cmd = [binary, "generate", model, "--device", device, "--dtype", dtype, "--input", prompts_path,
           "--output", out_path, "--max-tokens", "48", "--ignore-eos", "--logprobs", "2", "--seed", "0",
           "--max-num-batched-tokens", "256", "--kv-cache-memory-bytes", "256MiB"] + extra
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{device} failed ({r.returncode}): {r.stderr[-3000:]}")
    with open(out_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--dtype")]
    dtype = "float32"
    binary, out_json, models = args[0], args[1], args[2:]
    rng = random.Random(0)
    results = {}
    failed = False
    for model in models:
        cfg = json.load(open(os.path.join(model, "config.json")))
        vocab = cfg["vocab_size"]
        prompts = []
        for i in range(16):
            n = rng.choice([1, 3, 7, 16, 17, 33, 64, 100, 250])
            prompts.append({"prompt_token_ids": [rng.randrange(vocab) for _ in range(n)], "temperature": 0})
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "prompts.jsonl")
            with open(p, "w") as f:
                for x in prompts:
                    f.write(json.dumps(x) + "\n")
            cpu = run(binary, model, "cpu", dtype, p, os.path.join(d, "cpu.jsonl"), [])
            gpu = run(binary, model, "cuda", dtype, p, os.path.join(d, "gpu.jsonl"), [])
        identical = near_tie = bad = 0
        max_dlp = 0.0
        for c, g in zip(cpu, gpu):
            ct, gt = c["outputs"][0]["token_ids"], g["outputs"][0]["token_ids"]
            clp, glp = c["outputs"][0]["logprobs"], g["outputs"][0]["logprobs"]
            ok = True
            for i, (a, b) in enumerate(zip(ct, gt)):
                # logprobs per position: {"token_id", "logprob", "rank", "top": [[id, logprob], ...]}.
                ca, ga = clp[i], glp[i]
                if a == b:
                    max_dlp = max(max_dlp, abs(ca["logprob"] - ga["logprob"]))
                    continue
                vals = [t[1] for t in ca["top"]]
                gap = vals[0] - vals[1] if len(vals) >= 2 else 0.0
                if gap < 1e-3:
                    near_tie += 1
                else:
                    bad += 1
                    print(f"  {os.path.basename(model)}: diverged at {i}: cpu {a} gpu {b} (cpu top-2 gap {gap:.2e})")
                ok = False
                break
            identical += ok
        results[os.path.basename(model)] = {"prompts": len(cpu), "identical": identical, "near_tie": near_tie,
                                            "failed": bad, "max_abs_dlogprob": max_dlp}
        status = "PASS" if bad == 0 else "FAIL"
        failed |= bad > 0
        print(f"{status} {os.path.basename(model)}: {identical}/{len(cpu)} identical, {near_tie} near-tie, "
              f"{bad} failed, max |dlogprob| {max_dlp:.2e}")
    json.dump(results, open(out_json, "w"), indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
