"""Nsight Compute kernel durations (a `--csv --metrics gpu__time_duration.sum` log of one eager
`bench latency` run) split into forwards at each embedding launch: prints every forward's kernel time
(start-up profiling, prefill, then the decode steps) and, for the last forward (a decode step), the time
per kernel name, largest first.
usage: python3 bench/gpu_profile_table.py NCU_CSV BATCH"""
import csv
import io
import sys
from collections import OrderedDict


def main():
    path, batch = sys.argv[1], sys.argv[2]
    text = open(path, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        print(f"no ncu table in {path}")
        return
    launches = []
    for r in csv.DictReader(io.StringIO(text[start:])):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        try:
            ns = float(r["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        launches.append((r.get("Kernel Name", "?").split("(")[0][:60], ns))
    if not launches:
        print("no kernel durations")
        return
    forwards, cur = [], []
    for name, ns in launches:
        if "embed" in name and cur:
            forwards.append(cur)
            cur = []
        cur.append((name, ns))
    forwards.append(cur)
    print(f"batch {batch}: kernel time per forward (us): " + ", ".join(f"{sum(x for _, x in f) / 1e3:.0f}" for f in forwards))
    per = OrderedDict()
    for name, ns in forwards[-1]:
        c = per.setdefault(name, [0.0, 0])
        c[0] += ns
        c[1] += 1
    total = sum(v[0] for v in per.values())
    print(f"last forward (a decode step): {total / 1e3:.1f} us of kernel time")
    print(f"{'kernel':60s} {'us':>9s} {'launches':>9s} {'share':>6s}")
    for name, (ns, cnt) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print(f"{name:60s} {ns / 1e3:9.1f} {cnt:9d} {100 * ns / total:5.1f}%")


if __name__ == "__main__":
    main()
