#!/usr/bin/env python3
"""Measures the card's ceilings in the same run as our numbers (../shared/gpu.md): device-to-device copy
bandwidth (bytes read + written) and the bf16 GEMM rate, with CUDA events, median of many runs after
warm-up, on random data. Prints one JSON object."""
import json
import torch


def timed(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    n = 1 << 30  # 2 GiB of bf16 per buffer, far beyond L2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 2 / t
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    t = timed(lambda: a @ b)
    gemm = 2 * m ** 3 / t
    print(json.dumps({"device": torch.cuda.get_device_name(0), "copy_bytes_per_s": copy_bw, "bf16_gemm_flops": gemm}))


if __name__ == "__main__":
    main()
