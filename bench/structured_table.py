#!/usr/bin/env python3
"""The table of bench/structured_output.sh: output tokens/s by share of JSON-schema requests (median of
the runs, each run listed) and the new-vs-cached-schema TTFT."""
import glob
import json
import os
import statistics
import sys

d = sys.argv[1]
print("| JSON-schema requests | output tok/s (median) | each run | mean TTFT ms (median) | vs 0% |")
print("|---|---|---|---|---|")
base = None
for ratio in ("0", "0.5", "1"):
    rs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(d, "structured-%s-run*.json" % ratio)))]
    if not rs:
        continue
    tps = statistics.median(r["output_throughput"] for r in rs)
    ttft = statistics.median(r["mean_ttft_ms"] for r in rs)
    base = base or tps
    runs = ", ".join("%.1f" % r["output_throughput"] for r in rs)
    print("| %.0f%% | %.1f | %s | %.0f | %.3f |" % (float(ratio) * 100, tps, runs, ttft, tps / base))
t = json.load(open(os.path.join(d, "ttft.json")))
print("\nTTFT of a JSON-schema request, median of 10: new schema %.1f ms, cached schema %.1f ms"
      % (t["new_schema_ttft_ms_median"], t["cached_schema_ttft_ms_median"]))
