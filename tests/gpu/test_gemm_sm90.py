#!/usr/bin/env python3
"""GPU test and timing of the Hopper GEMM with SiLU-and-mul in its epilogue (kernels/gemm_sm90.cu).

    python3 tests/gpu/test_gemm_sm90.py [--skip-timing] [--variants default,s4,g8] [--json OUT]
    python3 tests/gpu/test_gemm_sm90.py --profile VARIANT   (no checks; launches for Nsight Compute)

Checks (each variant, bf16 and f16, shapes from 1 row to several tiles, odd row counts, and the
SmolLM2 and Llama-8B widths):
  - plain form against float64 x W^T: |out - ref| <= ATOL + RTOL |ref| (bf16 1e-2 / 1e-2, f16 2e-3 / 2e-3:
    an f32 sum over k rounded once to the output type);
  - swiglu form bit-equal to layers.cu's silu_and_mul applied to the plain form's output (same main loop,
    so the same f32 sums; the epilogue must round exactly as the unfused path does);
  - rows >= m of the output buffer untouched (they hold a NaN pattern before and after).
Timing (unless --skip-timing): the 8B shape's gate/up (k 4096, inter 14336) at several row counts, each
kernel launched back to back for a sustained period (the card at its power limit, as in a serving run):
torch.matmul (cuBLAS) + layers.cu's silu_and_mul, against the plain and the fused kernel, in rounds that
alternate the contenders (so none is favoured by the card's temperature), median of the rounds.
Variants (compile-time knobs of gemm_sm90.cu): default (3 stages, groups of 16 row tiles), s4 (4 stages),
g8 (groups of 8).

Needs torch (CUDA) and libnvrtc (scripts/nvrtc_check.py finds it); talks to the driver through ctypes
(tensor maps, launches), on torch's context and stream. Exits non-zero on any failed check.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = os.path.join(ROOT, "crates", "ironllm-cuda", "kernels")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import nvrtc_check  # noqa: E402

BM, BK, THREADS = 128, 64, 384
TOL = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
SUFFIX = {torch.bfloat16: "bf16", torch.float16: "f16"}
TMAP_DTYPE = {torch.bfloat16: 9, torch.float16: 6}  # CU_TENSOR_MAP_DATA_TYPE_{BFLOAT16,FLOAT16}


def smem_bytes(stages):
    """GS_SMEM_BYTES of gemm_sm90.cu."""
    return 1024 + stages * (BM + 256) * BK * 2 + BM * 128 * 2 + 2 * stages * 8


class Driver:
    def __init__(self):
        self.cu = ctypes.CDLL("libcuda.so.1")
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # makes torch's primary context current on this thread

    def check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what}: CUDA driver error {rc}")

    def load(self, cubin, name, smem):
        mod = ctypes.c_void_p()
        self.check(self.cu.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(cubin)), "cuModuleLoadData")
        fn = ctypes.c_void_p()
        self.check(self.cu.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), f"get {name}")
        if smem > 48 * 1024:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.check(self.cu.cuFuncSetAttribute(fn, 8, ctypes.c_int(smem)), "cuFuncSetAttribute")
        return fn

    def tmap(self, t, box_rows=128, box_cols=64):
        """2-D tensor map of a row-major 16-bit tensor, box {64 cols, 128 rows}, 128-byte swizzle."""
        rows, cols = t.shape
        m = (ctypes.c_uint64 * 16)()
        dims = (ctypes.c_uint64 * 2)(cols, rows)
        strides = (ctypes.c_uint64 * 1)(t.stride(0) * t.element_size())
        box = (ctypes.c_uint32 * 2)(box_cols, box_rows)
        estr = (ctypes.c_uint32 * 2)(1, 1)
        self.check(self.cu.cuTensorMapEncodeTiled(m, TMAP_DTYPE[t.dtype], 2, ctypes.c_void_p(t.data_ptr()), dims,
                                                  strides, box, estr, 0, 3, 3, 0), "cuTensorMapEncodeTiled")
        return m

    def launch(self, fn, grid, smem, maps, ints):
        args = list(maps) + [ctypes.c_int(v) for v in ints]
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.check(self.cu.cuLaunchKernel(fn, grid, 1, 1, THREADS, 1, 1, smem, stream, params, None),
                   "cuLaunchKernel")


class Variant:
    def __init__(self, tag, stages=3, group_m=16):
        self.tag, self.stages, self.group_m = tag, stages, group_m
        self.fns = {}

    def options(self):
        return (f"-DGS_STAGES={self.stages}", f"-DGS_GROUP_M={self.group_m}")

    def build(self, drv, lib, sms):
        common = open(os.path.join(KERNELS, "common.cuh")).read()
        src = common + '\n#line 1 "gemm_sm90.cu"\n' + open(os.path.join(KERNELS, "gemm_sm90.cu")).read()
        cubin = nvrtc_check.compile_cubin(lib, "gemm_sm90.cu", src, "sm_90a", self.options())
        self.smem = smem_bytes(self.stages)
        for dt in SUFFIX.values():
            for form in ("swiglu", "plain"):
                self.fns[(form, dt)] = drv.load(cubin, f"gemm_{form}_sm90_{dt}", self.smem)
        self.grid = sms
        return self

    def run(self, drv, form, x, w, out, up_row):
        m, k = x.shape
        fn = self.fns[(form, SUFFIX[x.dtype])]
        maps = (drv.tmap(x), drv.tmap(w), drv.tmap(out[:m]))
        tiles = -(-m // BM) * (out.shape[1] // (128 if form == "swiglu" else 256))
        drv.launch(fn, min(self.grid, tiles), self.smem, maps, (m, out.shape[1], k, up_row))


class Silu:
    """layers.cu's silu_and_mul, the unfused path's second kernel."""

    def __init__(self, drv, lib):
        common = open(os.path.join(KERNELS, "common.cuh")).read()
        src = common + '\n#line 1 "layers.cu"\n' + open(os.path.join(KERNELS, "layers.cu")).read()
        cubin = nvrtc_check.compile_cubin(lib, "layers.cu", src, "sm_90a")
        self.drv = drv
        self.fns = {dt: drv.load(cubin, f"silu_and_mul_{dt}", 0) for dt in SUFFIX.values()}

    def run(self, out, gate_up, rows, inter):
        p = [ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(gate_up.data_ptr()), ctypes.c_int(rows),
             ctypes.c_int(inter)]
        params = (ctypes.c_void_p * 4)(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in p])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        gy = (inter + 2047) // 2048
        self.drv.check(self.drv.cu.cuLaunchKernel(self.fns[SUFFIX[out.dtype]], rows, gy, 1, 256, 1, 1, 0, stream,
                                                  params, None), "silu launch")


def poison(rows, cols, dtype):
    return torch.full((rows, cols), -1, dtype=torch.int16, device="cuda").view(dtype)


def check_case(drv, v, silu, dtype, m, inter, k, seed, results):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    w = (torch.randn(2 * inter, k, generator=g, device="cuda") * k ** -0.5).to(dtype)
    extra = 37  # rows past m that must stay untouched
    plain = poison(m + extra, 2 * inter, dtype)
    v.run(drv, "plain", x, w, plain, 0)
    fused = poison(m + extra, inter, dtype)
    v.run(drv, "swiglu", x, w, fused, inter)
    unfused = poison(m, inter, dtype)
    silu.run(unfused, plain, m, inter)
    torch.cuda.synchronize()
    ref = x.double() @ w.double().T
    atol, rtol = TOL[dtype]
    got = plain[:m].double()
    bad = ((got - ref).abs() > atol + rtol * ref.abs()) | got.isnan()
    worst = ((got - ref).abs() / (atol + rtol * ref.abs())).nan_to_num(1e9).max().item()
    tag = f"{v.tag} {SUFFIX[dtype]} m={m} inter={inter} k={k}"
    ok_plain = not bad.any().item()
    mism = (fused[:m].view(torch.int16) != unfused.view(torch.int16)).sum().item()
    untouched = (plain[m:].view(torch.int16) == -1).all().item() and (fused[m:].view(torch.int16) == -1).all().item()
    ok = ok_plain and mism == 0 and untouched
    print(f"{'PASS' if ok else 'FAIL'} {tag}: plain worst err/tol {worst:.3f}, swiglu bit mismatches {mism} of "
          f"{m * inter}, rows past m untouched {untouched}", flush=True)
    results.append({"check": tag, "ok": ok, "worst": worst, "mismatch": mism, "untouched": untouched})
    return ok


def timed(fn, seconds=0.25, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    torch.cuda.synchronize()
    once = max(e0.elapsed_time(e1), 1e-3)
    n = max(10, int(seconds * 1000 / once))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ts = [a.elapsed_time(b) for a, b in evs]
    tail = ts[n // 2:]  # the sustained half
    return statistics.median(tail)


def timing(drv, variants, silu, rows_list, inter, k, out_rows):
    dtype = torch.bfloat16
    print(f"timing: k={k} inter={inter}, {torch.cuda.get_device_name()}", flush=True)
    mmax = max(rows_list)
    x_all = torch.randn(mmax, k, device="cuda").to(dtype)
    w = (torch.randn(2 * inter, k, device="cuda") * k ** -0.5).to(dtype)
    gu = torch.empty(mmax, 2 * inter, device="cuda", dtype=dtype)
    act = torch.empty(mmax, inter, device="cuda", dtype=dtype)
    for m in rows_list:
        x = x_all[:m]
        fl = 2.0 * m * k * 2 * inter
        contenders = {
            "cublas": lambda: torch.matmul(x, w.T, out=gu[:m]),
            "silu": lambda: silu.run(act, gu, m, inter),
            "cublas_silu": lambda: (torch.matmul(x, w.T, out=gu[:m]), silu.run(act, gu, m, inter)),
        }
        for v in variants:
            contenders[f"{v.tag}_plain"] = lambda v=v: v.run(drv, "plain", x, w, gu, 0)
            contenders[f"{v.tag}_fused"] = lambda v=v: v.run(drv, "swiglu", x, w, act, inter)
        rounds = {name: [] for name in contenders}
        for _ in range(3):
            for name, fn in contenders.items():
                rounds[name].append(timed(fn))
        t = {name: statistics.median(ts) for name, ts in rounds.items()}
        row = {"m": m, **{f"{name}_ms": v for name, v in t.items()}}
        line = (f"m={m:6d}: cuBLAS {t['cublas']:.3f} ms ({fl / t['cublas'] / 1e9:.0f} TFLOP/s) + silu "
                f"{t['silu']:.3f} = {t['cublas_silu']:.3f} ms")
        for v in variants:
            tp, tf = t[f"{v.tag}_plain"], t[f"{v.tag}_fused"]
            line += (f" | {v.tag}: plain {tp:.3f} ({fl / tp / 1e9:.0f}), fused {tf:.3f} "
                     f"({t['cublas_silu'] / tf:.3f}x)")
        print(line, flush=True)
        out_rows.append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--json")
    ap.add_argument("--profile", metavar="VARIANT",
                    help="no checks: launch VARIANT's fused and plain kernels three times each at the 8B gate/up "
                         "shape with 16384 rows (for Nsight Compute's -k / --launch-skip)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("SKIP: needs a Hopper (sm_90) GPU")
        return 0
    drv = Driver()
    lib = nvrtc_check.load_nvrtc()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    known = {"default": Variant("default", 3, 16), "s4": Variant("s4", 4, 16), "g8": Variant("g8", 3, 8)}
    variants = [known[t].build(drv, lib, sms) for t in args.variants.split(",")]
    for v in variants:
        print(f"{v.tag}: grid {v.grid}, smem {v.smem}", flush=True)
    if args.profile:
        v = known[args.profile].build(drv, lib, sms)
        m, inter, k = 16384, 14336, 4096
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        w = (torch.randn(2 * inter, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
        act = torch.empty(m, inter, device="cuda", dtype=torch.bfloat16)
        gu = torch.empty(m, 2 * inter, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            v.run(drv, "swiglu", x, w, act, inter)
            v.run(drv, "plain", x, w, gu, 0)
        torch.cuda.synchronize()
        print(f"profiled {v.tag}")
        return 0
    silu = Silu(drv, lib)
    results, ok = [], True
    shapes = [(1, 128, 64), (7, 256, 128), (129, 128, 192), (300, 1536, 576), (1000, 384, 4096), (4100, 1024, 512)]
    for v in variants:
        for dtype in (torch.bfloat16, torch.float16):
            for i, (m, inter, k) in enumerate(shapes):
                ok &= check_case(drv, v, silu, dtype, m, inter, k, 1000 + i, results)
    timings = []
    if not args.skip_timing:
        timing(drv, variants, silu, [16384, 8192, 4096, 2048, 1024, 512, 336], 14336, 4096, timings)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "checks": results, "timing": timings}, f, indent=1)
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
