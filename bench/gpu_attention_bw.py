#!/usr/bin/env python3
"""Achieved memory bandwidth of the decode attention kernels (issue 8: "report each kernel's achieved
bandwidth next to its ceiling"), on the GPU host:

    python3 bench/gpu_attention_bw.py [--out FILE.json]

One layer of the Llama-3.1-8B shape (32 query heads, 8 KV heads, head_dim 128, block size 16, bf16), decode
rows only, every sequence at the same context, blocks handed out in shuffled order. For each batch size and
context it times, with CUDA events (median of 50 launches after 5 warm-ups, the cache rotated over enough
layers' worth of KV that nothing stays in L2):
  - the general paged kernel (attention.cu, scalar lanes), split as the runtime splits it,
  - the tensor-core grouped-query kernel (flash_decode.cu), split the same way,
and prints the bytes that must be read (K and V of every live position, once per KV head; q and the output
are negligible) over the time, next to the device-to-device copy rate measured in the same run. Kernels are
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


def module(name):
    common = open(os.path.join(KERNELS, "common.cuh")).read()
    src = common + "\n#line 1 \"" + name + "\"\n" + open(os.path.join(KERNELS, name)).read()
    return cp.RawModule(code=src, options=("--std=c++17",), backend="nvrtc")


MAX_SPLITS = int(os.environ.get("IRONLLM_MAX_DECODE_SPLITS", "16"))  # ops::DEFAULT_MAX_DECODE_SPLITS
MIN_KEYS = int(os.environ.get("IRONLLM_DECODE_SPLIT_MIN_KEYS", "128"))  # ops::DECODE_SPLIT_MIN_KEYS


def decode_splits(tokens, kv_heads, sms, max_context):
    """ops::decode_splits: about four blocks per SM, at most MAX_SPLITS shares of at least 128 keys."""
    pairs, target = tokens * kv_heads, 4 * sms
    if pairs == 0 or pairs >= target:
        return 1
    return max(1, min(-(-target // pairs), MAX_SPLITS, -(-max_context // 128)))


def flash_decode_smem(hd):
    return (3 if hd == 64 else 2) * 2 * 64 * hd * 2 + 16 * hd * 2


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
    args = ap.parse_args()
    attn, fd = module("attention.cu"), module("flash_decode.cu")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    copy_bw = copy_bandwidth()
    rows = []
    scale = np.float32(1.0 / math.sqrt(HD))
    for batch, ctx in ((1, 1024), (1, 8192), (32, 1024), (64, 1024), (128, 1024), (256, 1024)):
        blocks_per_seq = -(-ctx // BS)
        kv_bytes = 2 * batch * ctx * KV * HD * 2
        # Rotate over enough copies (layers) that the working set exceeds the L2 several times.
        copies = max(2, min(32, int(math.ceil(4 * 64e6 / kv_bytes)) + 1))
        num_blocks = batch * blocks_per_seq
        caches = [(cp.random.standard_normal((num_blocks, KV, BS, HD), dtype=cp.float32).astype(cp.float16).view(cp.int16),
                   cp.random.standard_normal((num_blocks, KV, BS, HD), dtype=cp.float32).astype(cp.float16).view(cp.int16))
                  for _ in range(copies)]
        # bf16 bit patterns from f16 randoms are still finite, moderate numbers; values do not matter here.
        tables = cp.asarray(np.random.permutation(num_blocks).astype(np.int32).reshape(batch, blocks_per_seq))
        qkv = cp.random.standard_normal((batch, (H + 2 * KV) * HD), dtype=cp.float32).astype(cp.float16).view(cp.int16)
        qsl = cp.arange(batch + 1, dtype=cp.int32)
        ctx_lens = cp.full(batch, ctx, dtype=cp.int32)
        t2s = cp.arange(batch, dtype=cp.int32)
        out = cp.empty((batch, H * HD), dtype=cp.int16)
        splits = decode_splits(batch, KV, sms, ctx)
        part_o = cp.empty(batch * H * splits * HD, dtype=cp.float32)
        part_lse = cp.empty(batch * H * splits, dtype=cp.float32)
        ints = (np.int32(batch), np.int32(H), np.int32(KV), np.int32(HD), np.int32(BS), np.int32(blocks_per_seq), scale)
        reduce = attn.get_function("paged_attention_reduce_bf16")

        def runner(kernel_mod, plain, split, smem):
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
               "tensor_core_ms": tensor, "tensor_core_tb_s": kv_bytes / tensor / 1e9}
        rows.append(row)
        del caches
        cp.get_default_memory_pool().free_all_blocks()
    print(f"decode attention, one layer of the Llama-3.1-8B shape (32/8 heads, hd 128, bf16), {name}")
    print(f"device-to-device copy (read + write): {copy_bw / 1e12:.2f} TB/s")
    print("| batch | context | splits | KV MB | general kernel | TB/s | tensor-core kernel | TB/s | of copy rate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['splits']} | {r['kv_bytes'] / 1e6:.1f} | {r['general_ms'] * 1e3:.1f} us | "
              f"{r['general_tb_s']:.2f} | {r['tensor_core_ms'] * 1e3:.1f} us | {r['tensor_core_tb_s']:.2f} | "
              f"{r['tensor_core_tb_s'] * 1e12 / copy_bw:.0%} |")
    if args.out:
        json.dump({"device": name, "copy_bytes_per_s": copy_bw, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
