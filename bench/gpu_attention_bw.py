#!/usr/bin/env python3
"""Achieved memory bandwidth of the decode attention kernels (issue 8: "report each kernel's achieved
bandwidth next to its ceiling"), on the GPU host:

    python3 bench/gpu_attention_bw.py [--out FILE.json] [--block-size N] [--in-order] [--variant NAME:DEF[,DEF] ...]

One layer of the Llama-3.1-8B shape (32 query heads, 8 KV heads, head_dim 128, block size 16, bf16), decode
rows only, every sequence at the same context, blocks handed out in shuffled order. --block-size changes
the size of the pieces the kernel gathers (block_size rows of 256 bytes per KV head: 4 KB at 16), --in-order
hands the blocks out in address order, to see whether either costs bandwidth. For each batch size and
context it times, with CUDA events (median of 50 launches after 5 warm-ups, the cache rotated over enough
layers' worth of KV that nothing stays in L2):
  - the general paged kernel (attention.cu, scalar lanes), split as the runtime splits it,
  - the tensor-core grouped-query kernel (flash_decode.cu), split the same way,
  - each --variant: the tensor-core kernel compiled with those definitions (flash_decode.cu's knobs),
    or split into a fixed number of shares (SPLITS=N: how the card's waves of CTAs fill matters),
and prints the bytes that must be read (K and V of every live position, once per KV head; q and the output
are negligible) over the time, next to the device-to-device copy rate and the rate of a kernel that only
streams reads (decode attention's own ceiling), both measured in the same run. The shapes include 320 x
1088, the pure-decode steps of the 1024/128 throughput run. Kernels are
compiled with NVRTC through cupy exactly as the runtime does (common.cuh prepended). The split count
follows ops::decode_splits (copied here; keep in sync).
"""
import argparse
import json
import math
import os
import sys

import cupy as cp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "crates", "ironllm-cuda", "kernels")
H, KV, HD, BS = 32, 8, 128, 16


def module(name, defines=()):
    common = open(os.path.join(KERNELS, "common.cuh")).read()
    src = common + "\n#line 1 \"" + name + "\"\n" + open(os.path.join(KERNELS, name)).read()
    return cp.RawModule(code=src, options=("--std=c++17",) + tuple(f"-D{d}" for d in defines), backend="nvrtc")


READ_SRC = r"""
extern "C" __global__ void read_xor(const uint4* __restrict__ a, long long n, unsigned int* out) {
    uint4 acc = make_uint4(0, 0, 0, 0);
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 v0 = a[i], v1 = a[i + stride], v2 = a[i + 2 * stride], v3 = a[i + 3 * stride];
        acc.x ^= v0.x ^ v1.x ^ v2.x ^ v3.x; acc.y ^= v0.y ^ v1.y ^ v2.y ^ v3.y;
        acc.z ^= v0.z ^ v1.z ^ v2.z ^ v3.z; acc.w ^= v0.w ^ v1.w ^ v2.w ^ v3.w;
    }
    for (; i < n; i += stride) { const uint4 v = a[i]; acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w; }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) out[0] = 1u;  // keeps the loads alive
}
"""


def read_bandwidth(sms):
    """A read-only streaming kernel over 2 GiB: the ceiling a kernel that only reads (decode attention) can reach."""
    n = 1 << 31
    a = cp.zeros(n // 16 * 4, dtype=cp.uint32)
    flag = cp.zeros(1, dtype=cp.uint32)
    k = cp.RawKernel(READ_SRC, "read_xor")
    ms = time_ms(lambda _: k((sms * 8,), (256,), (a, np.int64(n // 16), flag)), iters=20)
    return n / (ms * 1e-3)


MAX_SPLITS = int(os.environ.get("IRONLLM_MAX_DECODE_SPLITS", "16"))  # ops::DEFAULT_MAX_DECODE_SPLITS
MIN_KEYS = int(os.environ.get("IRONLLM_DECODE_SPLIT_MIN_KEYS", "128"))  # ops::DECODE_SPLIT_MIN_KEYS


def decode_splits(tokens, kv_heads, sms, max_context):
    """ops::decode_splits: about four blocks per SM, at most MAX_SPLITS shares of at least 128 keys."""
    pairs, target = tokens * kv_heads, 4 * sms
    if pairs == 0 or pairs >= target:
        return 1
    return max(1, min(-(-target // pairs), MAX_SPLITS, -(-max_context // 128)))


def flash_decode_smem(hd, stages_hd128=2):
    return (3 if hd == 64 else stages_hd128) * 2 * 64 * hd * 2 + 16 * hd * 2


def parse_variant(text):
    """NAME:DEF[,DEF...] (flash_decode.cu's knobs, e.g. s3:FD_STAGES_HD128=3; SPLITS=N is not a define but
    the split count to use at every shape instead of ops::decode_splits') -> (name, defines, hd128 stages,
    splits or None)."""
    name, _, defs = text.partition(":")
    defines = tuple(d for d in defs.split(",") if d and not d.startswith("SPLITS="))
    splits = next((int(d.split("=", 1)[1]) for d in defs.split(",") if d.startswith("SPLITS=")), None)
    stages = 2
    for d in defines:
        if d.startswith("FD_STAGES_HD128="):
            stages = int(d.split("=", 1)[1])
    return name, defines, stages, splits


def time_ms(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn(0)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for i in range(iters):
        start.record()
        fn(i + 1)
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def copy_bandwidth():
    n = 1 << 30
    a = cp.empty(n, dtype=cp.uint8)
    b = cp.empty(n, dtype=cp.uint8)
    ms = time_ms(lambda _: b.__setitem__(slice(None), a), iters=20)
    return 2 * n / (ms * 1e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--block-size", type=int, default=BS, help="tokens per KV cache block (the engine's --block-size)")
    ap.add_argument("--in-order", action="store_true",
                    help="hand the blocks out in address order instead of shuffled (does the gather's access "
                         "granularity, one block's rows per KV head, cost bandwidth?)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:DEF[,DEF]",
                    help="also time flash_decode.cu compiled with these definitions (A/B of its knobs)")
    args = ap.parse_args()
    attn, fd = module("attention.cu"), module("flash_decode.cu")
    variants = [parse_variant(v) for v in args.variant]
    names = [v[0] for v in variants]
    if len(set(names)) != len(names) or not all(names):
        sys.exit(f"--variant names must be distinct and non-empty: {names}")
    variant_mods = [(vname, module("flash_decode.cu", defs), stages, vsplits) for vname, defs, stages, vsplits in variants]
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    copy_bw = copy_bandwidth()
    read_bw = read_bandwidth(sms)
    rows = []
    bs = args.block_size
    scale = np.float32(1.0 / math.sqrt(HD))
    # (320, 1088): the pure-decode steps of the 1024/128 throughput run (~324 rows at ~1.1k context).
    for batch, ctx in ((1, 1024), (1, 8192), (32, 1024), (64, 1024), (128, 1024), (256, 1024), (320, 1088)):
        blocks_per_seq = -(-ctx // bs)
        kv_bytes = 2 * batch * ctx * KV * HD * 2
        # Rotate over enough copies (layers) that the working set exceeds the L2 several times.
        copies = max(2, min(32, int(math.ceil(4 * 64e6 / kv_bytes)) + 1))
        num_blocks = batch * blocks_per_seq
        caches = [(cp.random.standard_normal((num_blocks, KV, bs, HD), dtype=cp.float32).astype(cp.float16).view(cp.int16),
                   cp.random.standard_normal((num_blocks, KV, bs, HD), dtype=cp.float32).astype(cp.float16).view(cp.int16))
                  for _ in range(copies)]
        # bf16 bit patterns from f16 randoms are still finite, moderate numbers; values do not matter here.
        order = np.arange(num_blocks) if args.in_order else np.random.permutation(num_blocks)
        tables = cp.asarray(order.astype(np.int32).reshape(batch, blocks_per_seq))
        qkv = cp.random.standard_normal((batch, (H + 2 * KV) * HD), dtype=cp.float32).astype(cp.float16).view(cp.int16)
        qsl = cp.arange(batch + 1, dtype=cp.int32)
        ctx_lens = cp.full(batch, ctx, dtype=cp.int32)
        t2s = cp.arange(batch, dtype=cp.int32)
        out = cp.empty((batch, H * HD), dtype=cp.int16)
        splits = decode_splits(batch, KV, sms, ctx)
        most = max([splits] + [v[3] for v in variant_mods if v[3]])
        part_o = cp.empty(batch * H * most * HD, dtype=cp.float32)
        part_lse = cp.empty(batch * H * most, dtype=cp.float32)
        ints = (np.int32(batch), np.int32(H), np.int32(KV), np.int32(HD), np.int32(bs), np.int32(blocks_per_seq), scale)
        reduce = attn.get_function("paged_attention_reduce_bf16")

        def runner(kernel_mod, plain, split, smem, splits=splits):
            fp, fs = kernel_mod.get_function(plain), kernel_mod.get_function(split)
            if smem > 48 * 1024:
                fp.max_dynamic_shared_size_bytes = smem
                fs.max_dynamic_shared_size_bytes = smem

            def run(i):
                k, v = caches[i % copies]
                inputs = (qkv, k, v, tables, qsl, ctx_lens, t2s) + ints
                if splits == 1:
                    fp((batch, KV, 1), (128, 1, 1), (out,) + inputs, shared_mem=smem)
                else:
                    fs((batch, KV, splits), (128, 1, 1), inputs + (part_o, part_lse, np.int32(splits), np.int32(MIN_KEYS)),
                       shared_mem=smem)
                    reduce((batch, H, 1), (128, 1, 1), (out, part_o, part_lse, np.int32(batch), np.int32(H),
                                                        np.int32(HD), np.int32(splits)))
            return run

        general = time_ms(runner(attn, "paged_attention_bf16", "paged_attention_split_bf16", 0))
        tensor = time_ms(runner(fd, "flash_decode_bf16_hd128", "flash_decode_split_bf16_hd128", flash_decode_smem(HD)))
        row = {"batch": batch, "context": ctx, "splits": splits, "kv_bytes": kv_bytes,
               "general_ms": general, "general_tb_s": kv_bytes / general / 1e9,
               "tensor_core_ms": tensor, "tensor_core_tb_s": kv_bytes / tensor / 1e9, "variants": {}}
        for vname, vmod, stages, vsplits in variant_mods:
            ms = time_ms(runner(vmod, "flash_decode_bf16_hd128", "flash_decode_split_bf16_hd128",
                                flash_decode_smem(HD, stages), vsplits or splits))
            row["variants"][vname] = {"ms": ms, "tb_s": kv_bytes / ms / 1e9}
        rows.append(row)
        del caches
        cp.get_default_memory_pool().free_all_blocks()
    print(f"decode attention, one layer of the Llama-3.1-8B shape (32/8 heads, hd 128, bf16), {name}; "
          f"block size {bs}, blocks {'in address order' if args.in_order else 'shuffled'}")
    print(f"device-to-device copy (read + write): {copy_bw / 1e12:.2f} TB/s; read-only kernel: {read_bw / 1e12:.2f} TB/s")
    vhead = "".join(f" {v[0]} | TB/s |" for v in variants)
    print("| batch | context | splits | KV MB | general kernel | TB/s | tensor-core kernel | TB/s | of copy rate | of read rate |"
          + vhead)
    print("|---:" * (10 + 2 * len(variants)) + "|")
    for r in rows:
        vcells = "".join(f" {r['variants'][v[0]]['ms'] * 1e3:.1f} us | {r['variants'][v[0]]['tb_s']:.2f} |" for v in variants)
        print(f"| {r['batch']} | {r['context']} | {r['splits']} | {r['kv_bytes'] / 1e6:.1f} | {r['general_ms'] * 1e3:.1f} us | "
              f"{r['general_tb_s']:.2f} | {r['tensor_core_ms'] * 1e3:.1f} us | {r['tensor_core_tb_s']:.2f} | "
              f"{r['tensor_core_tb_s'] * 1e12 / copy_bw:.0%} | {r['tensor_core_tb_s'] * 1e12 / read_bw:.0%} |" + vcells)
    if args.out:
        json.dump({"device": name, "copy_bytes_per_s": copy_bw, "read_bytes_per_s": read_bw, "block_size": bs,
                   "in_order": args.in_order, "rows": rows},
                  open(args.out, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
