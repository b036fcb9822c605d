#!/usr/bin/env python3
"""Times a server's start-up for bench/gpu_startup.sh (issue 8): launches the command given after `--`
(a `{port}` in it becomes a free port), polls http://127.0.0.1:PORT/health every 50 ms until it answers
200, then stops the server (SIGTERM, SIGKILL after a grace period). A server that dies or is not ready
within --timeout is killed and reported as such. Then it reads the phases ironllm logs (tracing
timestamps relative to the launch, and the durations the lines state) and writes one JSON file.
With --table it instead prints a table of such JSON files.

usage: python3 bench/startup_timer.py --name NAME --log LOG --json OUT.json [--timeout 120] -- CMD ... {port} ...
       python3 bench/startup_timer.py --table A.json B.json ...
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")
# (key, regex); the first match of each is taken. Groups become fields as named.
PATTERNS = [
    ("loading", re.compile(r"Loading model")),
    ("cuda", re.compile(r"CUDA device \d+: .*?; (?P<kernels>\d+) kernels (?P<kernel_source>compiled|loaded from the cache) in (?P<kernels_s>[\d.]+)s")),
    ("gpu_memory", re.compile(r"GPU memory: .*?weights (?P<weights_gib>[\d.]+) GiB.*?KV cache (?P<kv_gib>[\d.]+) GiB; profiled in (?P<profile_kv_s>[\d.]+)s")),
    ("gemm_timing", re.compile(r"timed cuBLASLt's algorithms for (?P<gemm_shapes>\d+) GEMM shapes"
                                r"(?: \((?P<gemm_cached>\d+) of them from the tuning cache\))? in (?P<gemm_s>[\d.]+)s")),
    ("graphs", re.compile(r"captured (?P<graphs>\d+) decode CUDA graphs .*? in (?P<graphs_s>[\d.]+)s")),
    ("eager", re.compile(r"CUDA graphs off")),
    ("loaded", re.compile(r"model .+ \(.+ layers, weights .+\) loaded in (?P<weights_s>[\d.]+)s")),
    ("kv_line", re.compile(r"KV cache (?P<kv_blocks>\d+) blocks x \d+ tokens = (?P<kv_tokens>\d+) tokens")),
    ("listening", re.compile(r"Starting ironllm API server on")),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ts_epoch(line):
    m = TS.match(line)
    if not m:
        return None
    frac = float(m.group(2) or 0.0)
    return datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp() + frac


def parse_log(path, t0):
    out = {"offsets": {}}
    first = None
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return out
    for raw in lines:
        line = ANSI.sub("", raw)
        t = ts_epoch(line)
        if t is not None and first is None:
            first = t - t0
        for key, rx in PATTERNS:
            if key in out["offsets"]:
                continue
            m = rx.search(line)
            if m:
                if t is not None:
                    out["offsets"][key] = round(t - t0, 3)
                for k, v in m.groupdict().items():
                    if v is not None:  # an optional group that did not take part
                        out[k] = v if k == "kernel_source" else float(v)
    out["first_log_s"] = None if first is None else round(first, 3)
    errors = [l for l in (ANSI.sub("", x) for x in lines) if " ERROR " in l or l.lower().startswith("error") or "panicked" in l]
    if errors:
        out["error_lines"] = errors[-3:]
    return out


def run(a, cmd):
    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in cmd]
    url = f"http://127.0.0.1:{port}/health"
    res = {"name": a.name, "command": " ".join(cmd), "timeout_s": a.timeout}
    log = open(a.log, "w")
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    status = "timeout"
    while True:
        if p.poll() is not None:
            status = f"died (exit code {p.returncode})"
            break
        if time.time() - t0 > a.timeout:
            break
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    status = "ready"
                    break
        except Exception:
            pass
        time.sleep(0.05)
    t_ready = time.time()
    res["status"] = status
    res["ready_s"] = round(t_ready - t0, 3) if status == "ready" else None
    res["waited_s"] = round(t_ready - t0, 3)
    if p.poll() is None:
        t_stop = time.time()
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=a.grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            res["killed"] = True
        except ProcessLookupError:
            pass
        res["shutdown_s"] = round(time.time() - t_stop, 3)
    log.close()
    res.update(parse_log(a.log, t0))
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"{a.name}: {status}" + (f" in {res['ready_s']:.2f}s" if res["ready_s"] is not None else f" after {res['waited_s']:.1f}s"))
    return 0 if status == "ready" else 1


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def table(paths):
    hdr = (f"{'run':<24} {'ready s':>8} {'1st log':>8} {'CUDA open':>9} {'kernels':>14} {'weights':>8} "
           f"{'prof+KV':>8} {'GEMM algos':>11} {'graphs':>11} {'->listen':>8} {'->ready':>8}  status")
    print(hdr)
    print("-" * len(hdr))
    for p in paths:
        try:
            r = json.load(open(p))
        except Exception as e:
            print(f"{os.path.basename(p):<24} unreadable: {e}")
            continue
        o = r.get("offsets", {})
        cuda_open = o["cuda"] - o["loading"] if "cuda" in o and "loading" in o else None
        kernels = "-" if "kernels_s" not in r else f"{r['kernels_s']:.2f} {'cache' if r.get('kernel_source', '').startswith('loaded') else 'nvrtc'}"
        gemm = "-" if "gemm_s" not in r else f"{r['gemm_s']:.2f} ({int(r['gemm_shapes'])})"
        if r.get("gemm_cached"):
            gemm += " cached" if r["gemm_cached"] == r["gemm_shapes"] else f" {int(r['gemm_cached'])} cached"
        graphs = "-" if "graphs_s" not in r else f"{r['graphs_s']:.2f} ({int(r['graphs'])})"
        # the engine's last start-up line (its KV capacity) follows weights, profile and graph capture
        engine_done = o.get("kv_line", o.get("graphs", o.get("eager")))
        to_listen = o["listening"] - engine_done if "listening" in o and engine_done is not None else None
        to_ready = r["ready_s"] - o["listening"] if r.get("ready_s") is not None and "listening" in o else None
        print(f"{r['name']:<24} {fmt(r.get('ready_s')):>8} {fmt(r.get('first_log_s')):>8} {fmt(cuda_open):>9} "
              f"{kernels:>14} {fmt(r.get('weights_s')):>8} {fmt(r.get('profile_kv_s')):>8} {gemm:>11} {graphs:>11} "
              f"{fmt(to_listen):>8} {fmt(to_ready):>8}  {r.get('status')}")
        if r.get("status") != "ready" and r.get("error_lines"):
            print(f"{'':<24} {r['error_lines'][-1][:160]}")
    print("ready s: launch to first 200 from /health; 1st log: launch to the first log line; CUDA open: context, "
          "cuBLASLt and kernels (compiled by NVRTC or loaded from the cache); weights: config, tokenizer and weights "
          "to the GPU (ironllm's 'loaded in'); prof+KV: workspace, profile forward and KV cache allocation "
          "('profiled in'); GEMM algos: cuBLASLt algorithm timing (shapes); graphs: decode CUDA graph capture (count); ->listen: engine built to the socket bound")


def main():
    argv = sys.argv[1:]
    cmd = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", nargs="+")
    ap.add_argument("--name")
    ap.add_argument("--log")
    ap.add_argument("--json")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL")
    a = ap.parse_args(argv)
    if a.table:
        table(a.table)
        return 0
    if not (cmd and a.name and a.log and a.json):
        ap.error("give --name, --log, --json and a command after --")
    return run(a, cmd)


if __name__ == "__main__":
    sys.exit(main())
