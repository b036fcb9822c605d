#!/usr/bin/env python3
"""Turns bench/gpu_bench.sh's JSON files into the table for BENCHMARKS.md: each figure beside its floor
(bytes that must move over the measured copy bandwidth; FLOPs over the measured bf16 GEMM rate)."""
import json
import os
import sys

L8 = dict(layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False)
SM = dict(layers=30, hidden=576, inter=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True)


def params(c):
    h, hd = c["hidden"], c["head_dim"]
    attn = h * (c["heads"] * hd) * 2 + h * (c["kv_heads"] * hd) * 2
    mlp = 3 * h * c["inter"]
    emb = c["vocab"] * h * (1 if c["tied"] else 2)
    return c["layers"] * (attn + mlp) + emb


def kv_bytes_per_token(c, dsize=2):
    return 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * dsize


def load(d, name):
    try:
        return json.load(open(os.path.join(d, name + ".json")))["avg_latency"]
    except Exception:
        return None


def main():
    d = sys.argv[1]
    ceil = json.load(open(os.path.join(d, "ceilings.json")))
    bw, fl = ceil.get("copy_bytes_per_s"), ceil.get("bf16_gemm_flops")
    dev = ceil.get("device", "?")
    print(f"card: {dev}; measured copy bandwidth {bw/1e12:.2f} TB/s (read+write), bf16 GEMM {fl/1e12:.0f} TFLOP/s")
    rows = []
    # A decode step is the difference of two runs of the same batch that differ only in output length (lo and
    # hi tokens: hi - lo more decode steps at contexts inp + lo .. inp + hi - 1). The 8B runs start at 65
    # tokens: with 1024-token prompts, batches of 64 and more spend their first steps in mixed prefill/decode
    # chunks (8192 tokens a step) and ramp down at the end; a pair of runs past that phase (65 and 129
    # tokens) shares both, where a 1-token run would not (BENCHMARKS.md, 2026-11-28, H200 session 16).
    for name, c, inp, lo, hi, bss in (("Llama-3.1-8B shape", L8, 1024, 65, 129, (1, 32, 64, 128)),
                                      ("SmolLM2-135M shape", SM, 128, 1, 129, (1, 64))):
        p = params(c)
        # A decode step reads every weight once except an untied embedding table (only its rows are gathered).
        w_bytes = 2 * (p - (0 if c["tied"] else c["vocab"] * c["hidden"]))
        for b in bss:
            pre = "l8" if c is L8 else "s"
            t1 = load(d, f"{pre}_b{b}_o{lo}")
            tn = load(d, f"{pre}_b{b}_o{hi}")
            if t1 is None or tn is None:
                rows.append((name, f"decode batch {b}", "failed", "", ""))
                continue
            step = (tn - t1) / (hi - lo)
            ctx = inp + (lo + hi - 1) / 2
            # HBM traffic: the copy figure counts bytes read plus written, so it is the rate for reads too.
            floor = (w_bytes + b * ctx * kv_bytes_per_token(c)) / bw if bw else float("nan")
            rows.append((name, f"decode step, batch {b}, ~{ctx:.0f}-token context", f"{step*1e3:.2f} ms ({b/step:.0f} tok/s)",
                         f"{floor*1e3:.2f} ms", f"{step/floor:.2f}x"))
    for label, key, ntok in (("prefill 1 x 4096", "l8_prefill_1x4096", 4096), ("prefill 8 x 1024", "l8_prefill_8x1024", 8192)):
        t = load(d, key)
        if t is None:
            rows.append(("Llama-3.1-8B shape", label, "failed", "", ""))
            continue
        p = params(L8)
        seq = 4096 if ntok == 4096 else 1024
        nseq = ntok // seq
        # The model's FLOPs for this step: every token through the layers, the LM head only for the one row
        # per sequence that samples (the embedding is a gather), plus causal attention (QK^T and PV).
        emb = L8["vocab"] * L8["hidden"]
        body = p - 2 * emb
        flops = (2 * body * ntok + 2 * emb * nseq
                 + nseq * 2 * 2 * L8["layers"] * L8["heads"] * L8["head_dim"] * seq * seq / 2)
        floor = flops / fl if fl else float("nan")
        rows.append(("Llama-3.1-8B shape", label, f"{t*1e3:.1f} ms ({ntok/t:.0f} tok/s, {flops/t/1e12:.0f} TFLOP/s)",
                     f"{floor*1e3:.1f} ms", f"{t/floor:.2f}x"))
    print("| model | measure | ironllm | floor | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
