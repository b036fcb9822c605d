#!/usr/bin/env python3
"""The tables of bench/spec_decode.sh, from the results in its OUT directory.

Throughputs are medians over the rounds (each round listed); acceptance is summed over the rounds from
the deltas of the server's counters around each run (vLLM's definitions: acceptance rate = accepted /
draft tokens, mean acceptance length = 1 + accepted / drafts, i.e. tokens emitted per verification).
"Same output as off" compares each request's greedy text with the run without speculation of the same
round. Of the outputs' word 4-grams (without speculation): "from the prompt" is the share found in the prompt,
"seen before" the share found in the prompt or earlier in the output (what prompt lookup can draft from).

    python3 bench/spec_table.py OUT
"""
import json
import os
import re
import statistics
import sys

out = sys.argv[1]
COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def kv_file(name):
    d = {}
    p = os.path.join(out, name)
    if os.path.exists(p):
        for line in open(p):
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                d[k] = v
    return d


def counters(path):
    c = dict.fromkeys(COUNTERS, 0.0)
    if not os.path.exists(path):
        return c
    for line in open(path):
        m = re.match(r"^vllm:spec_decode_(num_drafts|num_draft_tokens|num_accepted_tokens)_total(\{[^}]*\})?\s+(\S+)$",
                     line.strip())
        if m:
            c[m.group(1)] += float(m.group(3))
    return c


def rounds_of(prefix):
    rs = []
    r = 1
    while os.path.exists(os.path.join(out, f"{prefix}-r{r}.json")):
        rs.append(r)
        r += 1
    return rs


def load(prefix, r):
    return json.load(open(os.path.join(out, f"{prefix}-r{r}.json")))


def spec_delta(prefix, rounds):
    tot = dict.fromkeys(COUNTERS, 0.0)
    for r in rounds:
        b = counters(os.path.join(out, f"{prefix}-r{r}.metrics-before.txt"))
        a = counters(os.path.join(out, f"{prefix}-r{r}.metrics-after.txt"))
        for k in COUNTERS:
            tot[k] += a[k] - b[k]
    return tot


def other_shares(prefix, rounds):
    v = []
    for r in rounds:
        p = os.path.join(out, f"{prefix}-r{r}.cpu.json")
        if os.path.exists(p):
            v.append(json.load(open(p))["other_share"])
    return v


def repetition(workload, res):
    """Shares of the outputs' word 4-grams found in their prompts, and in their prompts or earlier in the
    output (the prompts in file order: --disable-shuffle)."""
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(out, "data", f"{workload}.jsonl"))]
    in_prompt = seen = total = 0
    for p, t in zip(prompts, res["generated_texts"]):
        pw, tw = p.split(), t.split()
        grams = {tuple(pw[i:i + 4]) for i in range(len(pw) - 3)}
        prompt_grams = set(grams)
        for i in range(len(tw) - 3):
            g = tuple(tw[i:i + 4])
            in_prompt += g in prompt_grams
            seen += g in grams
            grams.add(g)
            total += 1
    return in_prompt / max(total, 1), seen / max(total, 1)


ALL_OTHER = []
SAME = [0, 0]
SUMMARY = []


def section(phase, workload, configs, c16):
    base_prefix = f"{phase}-{workload}-off"
    rounds = rounds_of(base_prefix)
    if not rounds:
        return
    base = [load(base_prefix, r) for r in rounds]
    base_tps = statistics.median(x["output_throughput"] for x in base)
    base_tpot = statistics.median(x["mean_tpot_ms"] for x in base)
    n_req = base[0]["completed"]
    out_tok = statistics.mean(x["total_output_tokens"] for x in base) / n_req
    from_prompt, seen = repetition(workload, base[0])
    print(f"\n**{workload}** ({n_req} prompts, {out_tok:.0f} output tokens per request on average; output word "
          f"4-grams from the prompt {from_prompt:.0%}, seen before {seen:.0%})\n")
    if c16:
        print("| config | output tok/s | each round | vs off | TTFT p99 (ms) | TTFT median (ms) | TPOT mean (ms) "
              "| acceptance rate | mean acceptance length | drafts | same output as off |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    else:
        print("| config | output tok/s | each round | vs off | TPOT mean (ms) | TPOT vs off | acceptance rate "
              "| mean acceptance length | drafts per output token | same output as off |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for cfg in configs:
        prefix = f"{phase}-{workload}-{cfg}"
        rs = [r for r in rounds_of(prefix)]
        if not rs:
            continue
        res = [load(prefix, r) for r in rs]
        ALL_OTHER.extend(other_shares(prefix, rs))
        tps = statistics.median(x["output_throughput"] for x in res)
        each = ", ".join(f"{x['output_throughput']:.1f}" for x in res)
        tpot = statistics.median(x["mean_tpot_ms"] for x in res)
        d = spec_delta(prefix, rs)
        if d["num_draft_tokens"] > 0:
            rate = f"{d['num_accepted_tokens'] / d['num_draft_tokens']:.1%}"
            length = f"{1 + d['num_accepted_tokens'] / max(d['num_drafts'], 1):.2f}"
        else:
            rate = length = "–"
        total_out = sum(x["total_output_tokens"] for x in res)
        if cfg == "off":
            same = "–"
        else:
            eq = n = 0
            for r, x in zip(rs, res):
                if r in rounds:
                    b = load(base_prefix, r)["generated_texts"]
                    eq += sum(a == c for a, c in zip(x["generated_texts"], b))
                    n += len(b)
            SAME[0] += eq
            SAME[1] += n
            same = f"{eq}/{n}"
        SUMMARY.append({
            "phase": "single_stream" if phase == "ss" else "concurrency_16", "workload": workload, "config": cfg,
            "speculative_config": CONFIGS.get(cfg) or None, "rounds": rs,
            "output_throughput": tps, "output_throughput_each": [x["output_throughput"] for x in res],
            "output_throughput_vs_off": tps / base_tps, "mean_tpot_ms": tpot,
            "p99_ttft_ms": statistics.median(x["p99_ttft_ms"] for x in res),
            "median_ttft_ms": statistics.median(x["median_ttft_ms"] for x in res),
            "total_output_tokens": total_out,
            "spec_decode_num_drafts": d["num_drafts"], "spec_decode_draft_tokens": d["num_draft_tokens"],
            "spec_decode_accepted_tokens": d["num_accepted_tokens"],
            "spec_decode_acceptance_rate": 100 * d["num_accepted_tokens"] / d["num_draft_tokens"]
            if d["num_draft_tokens"] else None,
            "spec_decode_acceptance_length":
            1 + d["num_accepted_tokens"] / d["num_drafts"] if d["num_drafts"] else None,
            "same_output_as_off": same,
        })
        if c16:
            p99 = statistics.median(x["p99_ttft_ms"] for x in res)
            med = statistics.median(x["median_ttft_ms"] for x in res)
            print(f"| {cfg} | {tps:.1f} | {each} | {tps / base_tps:.2f}x | {p99:.0f} | {med:.0f} | {tpot:.1f} | "
                  f"{rate} | {length} | {d['num_drafts']:.0f} | {same} |")
        else:
            per_tok = f"{d['num_drafts'] / total_out:.2f}" if d["num_drafts"] else "–"
            print(f"| {cfg} | {tps:.1f} | {each} | {tps / base_tps:.2f}x | {tpot:.2f} | {tpot / base_tpot:.2f}x | "
                  f"{rate} | {length} | {per_tok} | {same} |")


m = kv_file("machine.txt")
configs = CONFIGS = {}
if os.path.exists(os.path.join(out, "configs.txt")):
    for line in open(os.path.join(out, "configs.txt")):
        name, _, spec = line.strip().partition(" ")
        configs[name] = spec
print(f"Measured {m.get('date_utc', '?')} on {m.get('cpu', '?')} ({m.get('nproc', '?')} CPUs), commit "
      f"`{m.get('commit', '?')}` (uncommitted: {m.get('dirty_files') or 'none'}); default model "
      f"(SmolLM2-135M-Instruct, Q4_1 GGUF); binary {m.get('binary', '?')}; "
      f"`{m.get('settings', '')} {m.get('command', 'bash bench/spec_decode.sh')}`.")
print("\nEach config runs on a fresh `ironllm serve` (no flags but --speculative-config; k = "
      "num_speculative_tokens, max = prompt_lookup_max, prompt_lookup_min 2); "
      "`ironllm bench serve --dataset-name custom --disable-shuffle --custom-output-len OUTPUT_LEN "
      "--temperature 0` (chat template applied, stops at EOS).")
if configs:
    print("\nConfigs: " + "; ".join(f"`{k}` = `{v}`" for k, v in sorted(configs.items()) if k != "off")
          + "; `off` = no speculation.")

SS = ["off"] + sorted(k for k in configs if re.fullmatch(r"ngram-k\d+-max\d+", k))
if len(SS) == 1:  # configs.txt missing: take the names from the files
    SS = ["off"] + sorted({re.sub(r"^ss-\w+?-(.*)-r\d+\.json$", r"\1", f) for f in os.listdir(out)
                           if f.startswith("ss-") and f.endswith(".json") and "-off-" not in f})
print("\n### Single stream (max-concurrency 1)")
for w in ("repetitive", "open"):
    section("ss", w, SS, c16=False)

best = open(os.path.join(out, "c16-spec-config.txt")).read().strip() if os.path.exists(
    os.path.join(out, "c16-spec-config.txt")) else None
if best:
    print(f"\n### Concurrency 16 (`{best}`: default disable_by_batch_size, and forced on with 64)")
    for w in ("repetitive", "open"):
        section("c16", w, ["off", f"{best}-default", f"{best}-forced"], c16=True)

if ALL_OTHER:
    print(f"\nCPU used outside the server during the runs (client included): median "
          f"{statistics.median(ALL_OTHER):.1%}, largest {max(ALL_OTHER):.1%} of the machine.")
retried = sorted(f[:-len(".cpu.json")] for f in os.listdir(out) if ".contended" in f and f.endswith(".cpu.json"))
if retried:
    print(f"Repeated on a fresh server because other processes used more than the quiet share during them: "
          + ", ".join(f"`{r}` ({json.load(open(os.path.join(out, r + '.cpu.json')))['other_share']:.0%})"
                      for r in retried) + ".")
if os.path.exists(os.path.join(out, "contention.txt")):
    print("Runs started on a busy machine: " + "; ".join(open(os.path.join(out, "contention.txt")).read().split("\n")))
print(f"\nGreedy outputs identical with and without speculation: {SAME[0]} of {SAME[1]} requests.")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"machine": m, "rows": SUMMARY, "same_output_as_off": SAME,
               "other_cpu_share":
               {"median": statistics.median(ALL_OTHER), "max": max(ALL_OTHER)} if ALL_OTHER else None},
              f, indent=1)
