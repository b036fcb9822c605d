#!/usr/bin/env python3
"""How fast the skinny GEMM (gemv.cu) streams the weights of a batch-1 decode step, next to what the card
can read (issue 8: the batch-1 step is a pass over the weights, so this is most of its floor), on the GPU
host:

    python3 bench/gpu_gemv_bw.py [--out FILE.json] [--variants "8,1,2,8,0 8,1,2,8,8 ..."]

For each projection of the Llama-3.1-8B shape (bf16; QKV 6144 x 4096, O 4096 x 4096, gate/up 28672 x 4096,
down 4096 x 14336, LM head 128256 x 4096 with f32 logits) at m = 1 and 2 it times runs of 20 back-to-back
launches between two CUDA events (median of 15 runs after warm-up; each launch reads another copy of the
weight, enough copies that nothing stays in L2) and prints the weight bytes over the time per launch. Two
ceilings are measured in the same run: the device-to-device copy rate (read + write, the floor's
denominator in BENCHMARKS.md) and a read-only stream (16-byte loads over 2 GiB, folded into one word per
block). Last, the GEMV time of one batch-1 step (32 layers of the four projections plus the LM head) is
set against the GPU-only graph replay, which says how much of the step the small kernels take. With
--variants, each tuple of gemv.cu's knobs (warps per block, rows per warp at m = 1 and above, unrolled
iterations, prefetched chunks) is compiled with -D and timed the same way, to choose the knobs. Kernels
are compiled with NVRTC through cupy as the runtime does (common.cuh prepended); launched the ordinary
way, so their programmatic-launch wait is a no-op.
"""
import argparse
import json
import os

import cupy as cp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "crates", "ironllm-cuda", "kernels")
SHAPES = [("qkv", 6144, 4096, "bf16"), ("o", 4096, 4096, "bf16"), ("gate_up", 28672, 4096, "bf16"),
          ("down", 4096, 14336, "bf16"), ("lm_head", 128256, 4096, "bf16_f32")]
LAYERS = 32
KNOBS = ("GEMV_WARPS", "GEMV_ROWS_M1", "GEMV_ROWS", "GEMV_UNROLL", "GEMV_PREFETCH")

READ_KERNEL = r"""
extern "C" __global__ void read_stream(const uint4* __restrict__ p, long long n, unsigned* out) {
    unsigned acc = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // practically never: keeps the loads alive
}
"""


def module(name, defines=()):
    common = open(os.path.join(KERNELS, "common.cuh")).read()
    src = common + "\n#line 1 \"" + name + "\"\n" + open(os.path.join(KERNELS, name)).read()
    return cp.RawModule(code=src, options=("--std=c++17",) + tuple(defines), backend="nvrtc")


def per_launch_ms(launch, reps=20, runs=15):
    """Median over `runs` of (time of `reps` back-to-back launches) / reps."""
    for i in range(reps):
        launch(i)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for r in range(runs):
        start.record()
        for i in range(reps):
            launch(r * reps + i)
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / reps)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--variants", default="8,1,2,8,0",
                    help="space-separated GEMV_WARPS,GEMV_ROWS_M1,GEMV_ROWS,GEMV_UNROLL,GEMV_PREFETCH tuples "
                         "(the default is gemv.cu's own)")
    args = ap.parse_args()
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]

    n = 1 << 31
    a, b = cp.empty(n, dtype=cp.uint8), cp.empty(n, dtype=cp.uint8)
    copy_ms = per_launch_ms(lambda _: b.__setitem__(slice(None), a), reps=5, runs=7)
    copy_bw = 2 * n / (copy_ms * 1e-3)
    read = cp.RawKernel(READ_KERNEL, "read_stream")
    sink = cp.zeros(sms * 8, dtype=cp.uint32)
    chunks = n // 16
    read_ms = per_launch_ms(lambda _: read((sms * 8,), (512,), (a, np.int64(chunks), sink)), reps=5, runs=7)
    read_bw = n / (read_ms * 1e-3)
    del a, b

    variants = [tuple(int(v) for v in t.split(",")) for t in args.variants.split()]
    mods = {v: module("gemv.cu", [f"-D{k}={x}" for k, x in zip(KNOBS, v)]) for v in variants}
    rows, step_ms = [], {v: {1: 0.0, 2: 0.0} for v in variants}
    for label, nrows, k, sfx in SHAPES:
        wbytes = nrows * k * 2
        copies = max(2, -(-(256 << 20) // wbytes))  # at least 256 MiB in rotation (L2 is 50 MiB)
        ws = [cp.random.standard_normal((nrows, k), dtype=cp.float32).astype(cp.float16).view(cp.uint16)
              for _ in range(copies)]
        for v in variants:
            fn = mods[v].get_function("gemv_" + sfx)
            for m in (1, 2):
                per_block = v[0] * (v[1] if m == 1 else v[2])
                x = cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16).view(cp.uint16)
                y = cp.empty((m, nrows), dtype=cp.float32 if sfx.endswith("f32") else cp.uint16)
                grid = ((nrows + per_block - 1) // per_block,)

                def launch(i, fn=fn, x=x, y=y, grid=grid, m=m, nrows=nrows, k=k, ws=ws, threads=v[0] * 32):
                    fn(grid, (threads,), (y, x, ws[i % len(ws)], np.int32(m), np.int32(nrows), np.int32(k)))

                ms = per_launch_ms(launch)
                bw = wbytes / (ms * 1e-3)
                step_ms[v][m] += ms * (1 if label == "lm_head" else LAYERS)
                rows.append(dict(variant=",".join(map(str, v)), shape=label, n=nrows, k=k, m=m, us=ms * 1e3,
                                 weight_mb=wbytes / 1e6, tb_s=bw / 1e12, of_read=bw / read_bw, of_copy=bw / copy_bw))
        del ws

    print(f"card: {name}; copy {copy_bw / 1e12:.2f} TB/s (read + write), read-only stream {read_bw / 1e12:.2f} TB/s")
    print("| warps,rows m=1,rows,unroll,prefetch | projection | n x k | m | time | weights | TB/s | of read-only | of copy |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['shape']} | {r['n']} x {r['k']} | {r['m']} | {r['us']:.1f} us | "
              f"{r['weight_mb']:.0f} MB | {r['tb_s']:.2f} | {100 * r['of_read']:.0f}% | {100 * r['of_copy']:.0f}% |")
    for v in variants:
        for m in (1, 2):
            print(f"variant {','.join(map(str, v))}: GEMVs of one batch-{m} decode step (32 layers + LM head): "
                  f"{step_ms[v][m]:.3f} ms")
    if args.out:
        json.dump(dict(card=name, copy_tb_s=copy_bw / 1e12, read_tb_s=read_bw / 1e12, rows=rows,
                       step_gemv_ms={",".join(map(str, v)): t for v, t in step_ms.items()}),
                  open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
