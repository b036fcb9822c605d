#!/usr/bin/env python3
"""Compiles every CUDA kernel file of ironllm with NVRTC, exactly as the runtime does (common.cuh text
prepended, no toolkit headers), for one GPU architecture, and prints each file's resource report
(registers, spills, shared memory). Needs only libnvrtc: no GPU, no CUDA toolkit.

    pip install 'nvidia-cuda-nvrtc==13.0.*'      # once, into any venv
    python3 scripts/nvrtc_check.py [--arch sm_90a] [--verbose] [-D NAME=VALUE ...] [files...]

libnvrtc is looked for in $IRONLLM_NVRTC, then in the pip wheel's folder of this interpreter, then in the
system library path.
"""
import argparse
import ctypes
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "crates", "ironllm-cuda", "kernels")


def load_nvrtc():
    candidates = []
    if os.environ.get("IRONLLM_NVRTC"):
        candidates.append(os.environ["IRONLLM_NVRTC"])
    for p in sys.path:
        candidates += glob.glob(os.path.join(p, "nvidia", "cu13", "lib", "libnvrtc.so.13"))
        candidates += glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.*"))
    candidates += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    for c in candidates:
        try:
            if os.path.sep in c:
                # libnvrtc dlopens its builtins library by name; preloading it from the same folder
                # makes that work without LD_LIBRARY_PATH.
                for b in glob.glob(os.path.join(os.path.dirname(c), "libnvrtc-builtins.so.*")):
                    if ".alt." not in b:
                        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(c)
        except OSError:
            continue
    sys.exit("libnvrtc not found: pip install 'nvidia-cuda-nvrtc==13.0.*' or set IRONLLM_NVRTC")


def compile_source(lib, name, src, arch, verbose, defines=()):
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})"
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"] + [f"-D{d}".encode() for d in defines]
    if verbose:
        opts.append(b"--ptxas-options=-v")
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, buf.value.decode(errors="replace")


def compile_cubin(lib, name, src, arch, options=()):
    """CUBIN bytes of `src` for `arch` (raises RuntimeError with the log on failure): how the GPU tests
    load kernels that need an architecture-specific target (sm_90a), which cupy's own NVRTC call lacks."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"] + [o.encode() for o in options]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        raise RuntimeError(f"{name}: NVRTC failed:\n{log.value.decode(errors='replace')}")
    ok = lib.nvrtcGetCUBINSize(prog, ctypes.byref(n)) == 0 and n.value > 0
    cubin = ctypes.create_string_buffer(n.value)
    ok = ok and lib.nvrtcGetCUBIN(prog, cubin) == 0
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if not ok:
        raise RuntimeError(f"{name}: NVRTC compiled but gave no CUBIN for {arch}")
    return cubin.raw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--verbose", action="store_true", help="print ptxas resource usage")
    ap.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                    help="a preprocessor definition (the kernels' A/B knobs), repeatable")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    lib = load_nvrtc()
    common = open(os.path.join(KERNELS, "common.cuh")).read()
    files = args.files or sorted(glob.glob(os.path.join(KERNELS, "*.cu")))
    failed = 0
    for f in files:
        src = common + "\n#line 1 \"" + os.path.basename(f) + "\"\n" + open(f).read()
        ok, log = compile_source(lib, os.path.basename(f), src, args.arch, args.verbose, args.defines)
        print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(f)}")
        if log.strip() and (not ok or args.verbose or "warning" in log):
            print(log)
        failed += not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
