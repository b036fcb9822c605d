"""Tabulates the last `op timing` report (IRONLLM_OP_TIMING) of each log given: per op, its GPU time,
its share of the timed GPU time and its achieved rate; plus the run's wall time where the log has one
(`bench throughput`'s "Elapsed"), so the GPU's idle share shows.

usage: python3 bench/op_timing_table.py LOG...
"""

import re
import sys


def last_report(path):
    line = None
    with open(path, errors="replace") as f:
        for raw in f:
            if "op timing (GPU" in raw:
                line = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    return line


def parse(line):
    head, _, rest = line.partition(" in all;")
    m = re.search(r"(\d+) eager steps \((\d+) tokens\), (\d+) graph steps \((\d+) tokens\), ([\d.]+) ms", head)
    summary = {
        "eager_steps": int(m.group(1)),
        "eager_tokens": int(m.group(2)),
        "graph_steps": int(m.group(3)),
        "graph_tokens": int(m.group(4)),
        "total_ms": float(m.group(5)),
    } if m else {}
    ops = []
    for part in rest.split(";"):
        part = part.strip()
        pm = re.match(r"(.+?) ([\d.]+) ms \(([\d.]+)%(?:, ([\d.]+) (TFLOP/s|GB/s))?\)", part)
        if pm:
            rate = f"{pm.group(4)} {pm.group(5)}" if pm.group(4) else ""
            ops.append((pm.group(1), float(pm.group(2)), float(pm.group(3)), rate))
    return summary, ops


def elapsed_s(path):
    with open(path, errors="replace") as f:
        for raw in f:
            m = re.search(r"Elapsed[^\d]*([\d.]+)\s*s", raw)
            if m:
                return float(m.group(1))
    return None


def main(paths):
    for path in paths:
        try:
            line = last_report(path)
        except OSError as e:
            print(f"{path}: {e}\n")
            continue
        if not line:
            print(f"{path}: no op timing report\n")
            continue
        summary, ops = parse(line)
        print(f"### {path}")
        if summary:
            wall = elapsed_s(path)
            extra = f", wall {wall:.2f} s (GPU timed {summary['total_ms'] / 1e3 / wall:.0%} of it)" if wall else ""
            print(
                f"{summary['eager_steps']} eager steps ({summary['eager_tokens']} tokens), {summary['graph_steps']} "
                f"graph steps ({summary['graph_tokens']} tokens), GPU timed {summary['total_ms'] / 1e3:.2f} s{extra}"
            )
        print("| op | GPU ms | share | achieved |")
        print("|---|---:|---:|---:|")
        for name, ms, share, rate in ops:
            print(f"| {name} | {ms:.1f} | {share:.1f}% | {rate} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
