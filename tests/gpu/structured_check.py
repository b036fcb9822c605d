#!/usr/bin/env python3
"""Structured output on the CUDA backend: the same constrained requests (regex, choice, a bounded JSON
schema, a Lark grammar; through `structured_outputs` and `guided_*`) on the CPU and the GPU in float32,
greedy. Every finished output must satisfy its constraint, and the GPU's tokens must equal the CPU's
(the same grammar masks over the same float32 logits).

usage: structured_check.py BINARY MODEL_DIR OUT_JSON
"""
import json
import re
import subprocess
import sys
import tempfile

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog", "fish"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "kind", "n"], "additionalProperties": False}
CASES = [
    ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ({"guided_regex": "(yes|no), [A-Z][a-z]{1,6}\\."}, lambda t: re.fullmatch(r"(yes|no), [A-Z][a-z]{1,6}\.", t)),
    ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda t: t in ("alpha", "beta")),
    ({"structured_outputs": {"json": SCHEMA}}, lambda t: valid(t)),
    ({"guided_json": SCHEMA}, lambda t: valid(t)),
    ({"structured_outputs": {"grammar": 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]/'}},
     lambda t: re.fullmatch(r"\([0-9](\+[0-9])*\)", t)),
]


def valid(text):
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (isinstance(v, dict) and set(v) == {"ok", "kind", "n"} and isinstance(v["ok"], bool)
            and v["kind"] in ("cat", "dog", "fish") and isinstance(v["n"], int) and 0 <= v["n"] <= 9)


def run(binary, model, device, path, out):
    cmd = [binary, "generate", model, "--device", device, "--dtype", "float32", "--input", path, "--output", out,
           "--max-tokens", "40", "--kv-cache-memory-bytes", "512MiB", "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{device}: {r.stderr[-2000:]}")
    return [json.loads(line)["outputs"][0] for line in open(out)]


def main():
    binary, model, out_json = sys.argv[1:4]
    prompts = ["The answer is", "Once upon a time", "Q: what now?\nA:", "Hello"]
    lines, checks = [], []
    for p in prompts:
        for fields, check in CASES:
            lines.append({"prompt": p, "temperature": 0, **fields})
            checks.append(check)
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/in.jsonl"
        with open(path, "w") as f:
            for x in lines:
                f.write(json.dumps(x) + "\n")
        cpu = run(binary, model, "cpu", path, f"{d}/cpu.jsonl")
        gpu = run(binary, model, "cuda", path, f"{d}/gpu.jsonl")
    finished = satisfied = same = 0
    bad = []
    for i, (c, g, check) in enumerate(zip(cpu, gpu, checks)):
        same += c["token_ids"] == g["token_ids"]
        if g["finish_reason"] == "stop":
            finished += 1
            if check(g["text"]):
                satisfied += 1
            else:
                bad.append((i, g["text"]))
    res = {"requests": len(lines), "gpu_finished": finished, "gpu_satisfied": satisfied, "gpu_equals_cpu": same,
           "violations": bad}
    json.dump(res, open(out_json, "w"), indent=1)
    ok = not bad and same == len(lines)
    print(f"{'PASS' if ok else 'FAIL'} structured output on CUDA: {len(lines)} requests, {finished} finished, "
          f"{satisfied} satisfy their constraint, {len(bad)} violations, GPU tokens == CPU tokens for {same}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
