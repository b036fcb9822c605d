#!/usr/bin/env python3
"""Hugging Face transformers as a side-by-side peer for the offline throughput workload of
bench/gpu_throughput.sh (issue 8): a Llama-3.1-8B-shaped model (bench/configs/llama-3.1-8b) with random
bf16 weights built directly on the GPU, N random-token prompts (default 1000) of about 200 tokens
(uniform in [100, 300]) with exactly 180 new tokens each (EOS disabled), and of 1024 in / 128 out.

Methods, each in its own try/except (an error is printed and recorded, the next method runs):
  static_eager     model.generate, greedy, cache_implementation="static", attn "sdpa", left-padded
                   batches, torch.compile off (disable_compile=True)
  static_compiled  the same with transformers' automatic torch.compile of the decode step (its default for
                   a static cache on CUDA; mode "reduce-overhead"); one untimed warm-up batch compiles it
  cb               continuous batching, model.generate_batch with attn "paged|sdpa" (outside
                   torch.inference_mode, as transformers 5.17 requires)
The static batch size is the best of a short eager sweep (--batch-sizes, one batch of each size with
--sweep-new-tokens new tokens); all prompts are left-padded to the workload's longest prompt; for
static_compiled a short last batch is filled up with repeated prompts to keep the compiled shapes (filler
rows are not counted).

Time bounds: each method gets --time-budget-s (cb: --cb-time-budget-s) for its measured part. A static method times its first
batch and then runs only as many batches as fit; cb first runs --cb-probe-prompts requests and, if the
full set would not fit, runs a fixed smaller subset (the first M prompts). Subsets are reported as such
(requests measured / requests asked). Each workload gets an equal share of what is left of --total-budget-s;
once its share is spent, its remaining methods are skipped (and reported as skipped).
Throughput excludes the compile warm-up (static_compiled) and the continuous-batching manager's warm-up
(cb), as vLLM's and ironllm's `bench throughput` exclude engine start-up; the times incl. set-up are
reported next to them.

Note: ironllm's `bench throughput --random-range-ratio 0.5` (like vLLM's random dataset) also spreads the
output lengths over [90, 270]; here every request makes exactly OUTPUT tokens (same mean).

usage (GPU host, repository root):
  python3 bench/hf_throughput.py --out /tmp/hf [--num-prompts 1000] [--time-budget-s 30] [--total-budget-s 390]
  With the defaults it takes about --total-budget-s plus the overrun of the last method started (a compile
  or warm-up is not interruptible): plan 8-9 minutes. A method that starts after its workload's share is
  spent is skipped; rerun just what is missing, e.g. --workloads 1024:128:0 --methods cb.
local smoke test on the CPU with a tiny config:
  python3 bench/hf_throughput.py --config tiny.json --device cpu --dtype float32 --num-prompts 12 \
      --batch-sizes 4,8 --workloads 20:8:0.5 --out /tmp/hf
"""
import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback

import numpy as np
import torch

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="bench/configs/llama-3.1-8b", help="config.json or its directory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--workloads", default="200:180:0.5,1024:128:0",
                   help="comma-separated INPUT:OUTPUT:RANGE_RATIO (input lengths uniform in "
                        "[floor(in*(1-r)), ceil(in*(1+r))], output exactly OUTPUT)")
    p.add_argument("--methods", default="static_eager,static_compiled,cb", help="run in this order")
    p.add_argument("--batch-sizes", default="64,128,256", help="static batch sizes to sweep")
    p.add_argument("--batch-size", type=int, default=0, help="skip the sweep and use this static batch size")
    p.add_argument("--sweep-new-tokens", type=int, default=32)
    p.add_argument("--time-budget-s", type=float, default=30.0,
                   help="measured seconds per static method and workload before a subset is used")
    p.add_argument("--cb-time-budget-s", type=float, default=45.0,
                   help="measured seconds of cb per workload before a subset is used")
    p.add_argument("--total-budget-s", type=float, default=390.0,
                   help="seconds for the whole script, shared equally by the workloads; a method that would start "
                        "after its workload's share is skipped")
    p.add_argument("--cb-probe-prompts", type=int, default=128,
                   help="cb: requests of the probe run that sizes the measured set (0: no probe, run all)")
    p.add_argument("--cb-max-batch-tokens", type=int, default=0, help="cb: ContinuousBatchingConfig.max_batch_tokens (0: auto)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="/tmp/hf-throughput", help="folder for hf_throughput.json and table.txt")
    return p.parse_args()


T_START = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(model, device):
    if hasattr(model, "_cache"):
        try:
            del model._cache
        except Exception:
            pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def make_prompts(rng, n, input_len, ratio, vocab):
    lo = max(1, math.floor(input_len * (1 - ratio)))
    hi = max(lo, math.ceil(input_len * (1 + ratio)))
    lens = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(0, vocab, size=int(l)).tolist() for l in lens]


def left_pad(prompts, length, pad_id, device):
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p):] = 1
    return ids.to(device), mask.to(device)


def gen_config(new_tokens, compiled):
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        cache_implementation="static",
        disable_compile=not compiled,
    )


def run_static_batch(model, prompts, batch, pad_len, new_tokens, compiled, device):
    """One left-padded batch through model.generate with a static cache; filler rows (repeats of the
    batch's first prompts) keep the shape fixed. Returns (seconds, output tokens of the real rows)."""
    real = len(prompts)
    rows = list(prompts) + [prompts[i % real] for i in range(batch - real)]
    ids, mask = left_pad(rows, pad_len, 0, device)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config(new_tokens, compiled))
    sync(device)
    dt = time.perf_counter() - t0
    made = out.shape[1] - pad_len
    if made != new_tokens:
        raise RuntimeError(f"generate made {made} new tokens per row, expected {new_tokens}")
    return dt, real * made


def sweep(model, prompts, pad_len, sizes, new_tokens, device):
    rows = []
    for b in sizes:
        b_eff = min(b, len(prompts))
        try:
            free_memory(model, device)
            # one untimed short call per size first: static cache allocation and cuBLAS set-up
            run_static_batch(model, prompts[:b_eff], b_eff, pad_len, 2, False, device)
            dt, toks = run_static_batch(model, prompts[:b_eff], b_eff, pad_len, new_tokens, False, device)
            rows.append({"batch_size": b_eff, "seconds": dt, "output_tokens_per_s": toks / dt})
            log(f"  sweep batch {b_eff}: {new_tokens} new tokens in {dt:.2f}s = {toks / dt:.0f} output tok/s")
        except Exception as e:
            oom = is_oom(e)
            rows.append({"batch_size": b_eff, "error": ("OOM: " if oom else "") + str(e)[:300]})
            log(f"  sweep batch {b_eff}: {'out of memory' if oom else 'failed'}: {str(e)[:200]}")
            free_memory(model, device)
            if oom:
                break
        if b_eff == len(prompts):
            break
    ok = [r for r in rows if "error" not in r]
    best = max(ok, key=lambda r: r["output_tokens_per_s"])["batch_size"] if ok else None
    return rows, best


def method_static(model, prompts, pad_len, out_len, batch, compiled, budget, device):
    res = {"batch_size": batch, "padded_prompt_len": pad_len}
    free_memory(model, device)
    model.set_attn_implementation("sdpa")
    batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    if compiled:
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
        log(f"  warm-up batch of {batch} (torch.compile of the decode step)")
        t0 = time.perf_counter()
        run_static_batch(model, batches[0], batch, pad_len, out_len, True, device)
        res["warmup_s"] = time.perf_counter() - t0
        # transformers compiles only where it judges it can (a static cache on CUDA); say whether it did
        res["compiled"] = hasattr(model, "_compiled_call")
        log(f"  warm-up took {res['warmup_s']:.1f}s; decode step compiled: {res['compiled']}")
    times, toks, n_req = [], 0, 0
    k = len(batches)
    for i, b in enumerate(batches):
        if i >= k:
            break
        # compiled: a short last batch is filled up to keep the compiled shapes; eager: it runs as it is
        dt, t = run_static_batch(model, b, batch if compiled else len(b), pad_len, out_len, compiled, device)
        times.append(dt)
        toks += t
        n_req += len(b)
        log(f"  batch {i + 1}/{len(batches)}: {len(b)} requests in {dt:.2f}s")
        if i == 0:
            k = min(len(batches), max(1, int(budget // dt)))
            if k < len(batches):
                log(f"  budget {budget:.0f}s: measuring the first {k} of {len(batches)} batches only")
    res.update(elapsed_s=sum(times), num_requests_measured=n_req, output_tokens=toks,
               prompt_tokens=sum(len(p) for p in prompts[:n_req]), batch_seconds=times)
    return res


def reset_compiled(model, device):
    """Drops the compiled decode step and its CUDA graph pools before the next method."""
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    try:
        torch.compiler.reset()
    except Exception:
        pass
    free_memory(model, device)


def method_cb(model, prompts, out_len, budget, probe_n, max_batch_tokens, device):
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        ContinuousBatchingConfig = None
    if not hasattr(model, "generate_batch"):
        raise RuntimeError(f"transformers {transformers.__version__} has no generate_batch")
    free_memory(model, device)
    model.set_attn_implementation("paged|sdpa")
    # Time the manager's warm-up (CUDA graph capture) separately: it is part of generate_batch's wall time.
    warmups = []
    try:
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
        orig_warmup = ContinuousBatchingManager.warmup

        def timed_warmup(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return orig_warmup(self, *a, **kw)
            finally:
                sync(device)
                warmups.append(time.perf_counter() - t0)
        ContinuousBatchingManager.warmup = timed_warmup
    except Exception as e:
        orig_warmup = None
        log(f"  (cannot time the cb warm-up separately: {e})")

    def one(batch_prompts):
        gc_ = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0)
        kw = {}
        if ContinuousBatchingConfig is not None:
            cbc = ContinuousBatchingConfig()
            if max_batch_tokens:
                cbc.max_batch_tokens = max_batch_tokens
            kw["continuous_batching_config"] = cbc
        n_w = len(warmups)
        sync(device)
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=batch_prompts, generation_config=gc_, max_new_tokens=out_len, **kw)
        sync(device)
        wall = time.perf_counter() - t0
        warm = sum(warmups[n_w:])
        done = [o for o in outs.values() if getattr(o, "error", None) is None]
        toks = sum(len(o.generated_tokens) for o in done)
        short = sum(1 for o in done if len(o.generated_tokens) != out_len)
        if len(done) != len(batch_prompts) or short:
            raise RuntimeError(f"generate_batch returned {len(done)} of {len(batch_prompts)} requests, "
                               f"{short} with a length other than {out_len}")
        return wall, warm, toks

    res = {}
    try:
        n = len(prompts)
        if probe_n and probe_n < n:
            log(f"  probe: {probe_n} requests")
            wall, warm, toks = one(prompts[:probe_n])
            rate = probe_n / max(wall - warm, 1e-9)
            res["probe"] = {"num_requests": probe_n, "wall_s": wall, "warmup_s": warm,
                            "output_tokens_per_s": toks / max(wall - warm, 1e-9)}
            log(f"  probe: {wall:.1f}s wall, {warm:.1f}s of it warm-up, {toks / max(wall - warm, 1e-9):.0f} output tok/s")
            if n / rate > budget:
                n = max(probe_n, int(rate * budget) // 10 * 10)
                log(f"  budget {budget:.0f}s: measuring the first {n} of {len(prompts)} requests only")
        log(f"  run: {n} requests")
        wall, warm, toks = one(prompts[:n])
        log(f"  run: {wall:.1f}s wall, {warm:.1f}s of it warm-up")
        res.update(elapsed_s=wall - warm, elapsed_incl_setup_s=wall, warmup_s=warm, num_requests_measured=n,
                   output_tokens=toks, prompt_tokens=sum(len(p) for p in prompts[:n]))
    finally:
        if orig_warmup is not None:
            ContinuousBatchingManager.warmup = orig_warmup
        model.set_attn_implementation("sdpa")
    return res


def fmt_table(results):
    lines = []
    hdr = f"{'workload':<16} {'method':<18} {'batch':>5} {'requests':>11} {'req/s':>8} {'out tok/s':>10} {'setup s':>8}  note"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for w in results["workloads"]:
        for m in w["methods"]:
            name = m["method"] + (" *" if m["method"] == w.get("best") else "")
            if m.get("status") != "ok":
                lines.append(f"{w['name']:<16} {name:<18} {'':>5} {'':>11} {'':>8} {'':>10} {'':>8}  {m.get('status')}: {m.get('error', '')[:80]}")
                continue
            reqs = f"{m['num_requests_measured']}/{m['num_requests_asked']}"
            setup = f"{m['warmup_s']:.1f}" if m.get("warmup_s") is not None else "-"
            note = "SUBSET" if m["subset"] else ""
            if m.get("compiled") is False:
                note += " (transformers did not compile)"
            lines.append(f"{w['name']:<16} {name:<18} {str(m.get('batch_size', '-')):>5} {reqs:>11} "
                         f"{m['requests_per_s']:>8.2f} {m['output_tokens_per_s']:>10.0f} {setup:>8}  {note}")
    lines.append("* = best output tok/s of the workload; requests = measured/asked (SUBSET: time budget); "
                 "setup s = compile or continuous-batching warm-up, excluded from the rates")
    return "\n".join(lines)


def main():
    a = parse_args()
    os.makedirs(a.out, exist_ok=True)
    json_path = os.path.join(a.out, "hf_throughput.json")
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    cfg_path = a.config if a.config.endswith(".json") else os.path.join(a.config, "config.json")
    cfg = AutoConfig.from_pretrained(cfg_path)
    # No EOS anywhere: every request must make exactly its output length.
    cfg.eos_token_id = None
    cfg.pad_token_id = 0
    results = {
        "host": platform.node(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "config": cfg_path,
        "dtype": a.dtype, "num_prompts": a.num_prompts, "time_budget_s": a.time_budget_s,
        "cb_time_budget_s": a.cb_time_budget_s, "methods": a.methods,
        "total_budget_s": a.total_budget_s, "workloads": [],
    }

    def save():
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {results['device']}")
    t0 = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    sync(device)
    results["model_build_s"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    results["parameters"] = n_params
    log(f"model built on {device} in {results['model_build_s']:.1f}s: {n_params / 1e9:.2f}B parameters, {a.dtype}")
    save()

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    sizes = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
    specs = [x for x in a.workloads.split(",") if x.strip()]
    for wi, spec in enumerate(specs):
        # each workload gets an equal share of what is left of the total budget
        deadline = time.perf_counter() + (a.total_budget_s - (time.perf_counter() - T_START)) / (len(specs) - wi)
        inp, outl, ratio = spec.split(":")
        inp, outl, ratio = int(inp), int(outl), float(ratio)
        rng = np.random.default_rng(a.seed + wi)
        prompts = make_prompts(rng, a.num_prompts, inp, ratio, cfg.vocab_size)
        pad_len = max(len(p) for p in prompts)
        w = {"name": f"{inp}in_{outl}out" + (f"_r{ratio}" if ratio else ""), "input_len": inp, "output_len": outl,
             "range_ratio": ratio, "num_prompts": len(prompts), "prompt_tokens": sum(len(p) for p in prompts),
             "min_prompt_len": min(len(p) for p in prompts), "max_prompt_len": pad_len, "methods": []}
        results["workloads"].append(w)
        log(f"workload {w['name']}: {len(prompts)} prompts of {w['min_prompt_len']}-{pad_len} tokens, {outl} new tokens each")
        batch = a.batch_size or None
        if batch is None and any(m.startswith("static") for m in methods):
            if time.perf_counter() < deadline:
                try:
                    w["sweep"], batch = sweep(model, prompts, pad_len, sizes, a.sweep_new_tokens, device)
                    w["sweep_new_tokens"] = a.sweep_new_tokens
                except Exception as e:
                    traceback.print_exc()
                    w["sweep_error"] = str(e)[:300]
            log(f"  static batch size: {batch}")
            save()
        for m in methods:
            entry = {"method": m, "num_requests_asked": len(prompts)}
            w["methods"].append(entry)
            left = deadline - time.perf_counter()
            if left <= 0:
                entry.update(status="skipped", error=f"this workload's share of --total-budget-s {a.total_budget_s:.0f} spent")
                log(f"{w['name']} {m}: skipped (budget spent)")
                save()
                continue
            budget = min(a.cb_time_budget_s if m == "cb" else a.time_budget_s, left)
            log(f"{w['name']} {m}: budget {budget:.0f}s")
            try:
                if m in ("static_eager", "static_compiled"):
                    if batch is None:
                        raise RuntimeError("no static batch size (the sweep found none that runs)")
                    try:
                        r = method_static(model, prompts, pad_len, outl, batch, m == "static_compiled", budget, device)
                    finally:
                        if m == "static_compiled":
                            reset_compiled(model, device)
                elif m == "cb":
                    r = method_cb(model, prompts, outl, budget, a.cb_probe_prompts, a.cb_max_batch_tokens, device)
                else:
                    raise ValueError(f"unknown method {m}")
                n, dt = r["num_requests_measured"], r["elapsed_s"]
                entry.update(r)
                entry.update(status="ok", subset=n < len(prompts), requests_per_s=n / dt,
                             output_tokens_per_s=r["output_tokens"] / dt,
                             total_tokens_per_s=(r["output_tokens"] + r["prompt_tokens"]) / dt)
                log(f"{w['name']} {m}: {n}/{len(prompts)} requests in {dt:.2f}s: {n / dt:.2f} req/s, "
                    f"{r['output_tokens'] / dt:.0f} output tok/s" + (" (SUBSET)" if n < len(prompts) else ""))
            except Exception as e:
                traceback.print_exc()
                entry.update(status="error", error=("OOM: " if is_oom(e) else "") + f"{type(e).__name__}: {e}"[:500])
                log(f"{w['name']} {m}: FAILED: {entry['error'][:200]}")
                free_memory(model, device)
            ok = [x for x in w["methods"] if x.get("status") == "ok"]
            if ok:
                w["best"] = max(ok, key=lambda x: x["output_tokens_per_s"])["method"]
            save()
    table = fmt_table(results)
    with open(os.path.join(a.out, "table.txt"), "w") as f:
        f.write(f"Hugging Face transformers {transformers.__version__} on {results['device']}\n{table}\n")
    print(f"\n=== Hugging Face transformers {transformers.__version__}, torch {torch.__version__}, {results['device']} ===")
    print(table)
    print(f"JSON: {json_path}")


if __name__ == "__main__":
    main()
