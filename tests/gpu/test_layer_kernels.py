#!/usr/bin/env python3
"""GPU checks of ironllm's CUDA layer kernels (layers.cu, gemm_f32.cu, attention.cu) against float64
references computed on the CPU with torch.

Each kernel file is compiled with NVRTC through cupy exactly as the Rust runtime does (common.cuh text
prepended, no headers) and launched with the shapes documented at the top of the file. Inputs are fresh
random tensors (a new seed per check, printed on its line); outputs are poisoned with NaN before each
launch so unwritten elements show. torch is used on the CPU only: data moves to and from the device as
cupy arrays of the raw bits (bf16/f16 as uint16), so torch's and cupy's CUDA builds never have to meet.

Tolerances, per check kind:
  * copies and casts (embedding, gather_rows, cast_*): bit-exact.
  * rounding-mimicking layers (rms_norm, add_rms_norm, qk_norm_rope_kv, silu_and_mul, add_bias): the
    reference rounds to the dtype exactly where the kernel contract does, so in bf16/f16 nearly every
    element matches bit for bit; we require >= 99% exact matches and the rest within 1-2 ulp of the dtype
    (an f32 vs f64 intermediate may straddle a rounding boundary). In f32 a few ulp (rtol ~2e-6).
  * gemm_f32: the rigorous bound for a sequential f32 sum, |err| <= 1.01 * k * 2^-24 * (|x| @ |w|^T + |b|).
  * paged_attention: the kernel keeps everything in f32 and rounds only the output, so bf16/f16 get half
    an ulp of the output plus a small absolute term for the f32 softmax (rtol 2^-8 / 2^-10); f32 gets
    5e-5 (exp2f, f32 sums over up to 8192 keys).
  * batch invariance (gemm_f32, paged_attention): bit-identical rows across batches.
  * second forms of one kernel (rope_kv_pack vs qk_norm_rope_kv without q/k norm): bit-identical outputs.

Usage: python3 tests/gpu/test_layer_kernels.py [substring ...]   (run only checks whose name matches)
       IRONLLM_KERNEL_DEFINES="FD_WARP_PIPE=0" python3 tests/gpu/test_layer_kernels.py flash_decode
Exits non-zero if any check fails. Needs torch (CPU is enough), cupy and numpy.
"""
import math
import os
import sys
import traceback

import numpy as np
import torch

try:
    import cupy as cp
except Exception as e:  # pragma: no cover - depends on the host
    print(f"FAIL import cupy: {e}")
    sys.exit(1)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = os.path.join(ROOT, "crates", "ironllm-cuda", "kernels")

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
# Unit roundoff-ish spacing at 1.0 for each dtype (2^-mantissa_bits).
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}

RESULTS = []  # (ok, line)
_SEED = [1234]


def next_seed():
    _SEED[0] += 1
    torch.manual_seed(_SEED[0])
    return _SEED[0]


def report(ok, name, detail):
    line = f"{'PASS' if ok else 'FAIL'} {name}: {detail}"
    print(line, flush=True)
    RESULTS.append((ok, line))


# ---------------------------------------------------------------------------------------------------
# Compilation and launches

# IRONLLM_KERNEL_DEFINES="NAME=VALUE ...": the kernel files' compile-time knobs, as the runtime reads them
# (checks of an A/B variant before it is timed); FD_STAGES_HD128 is honoured in flash_decode_smem too.
EXTRA_DEFINES = tuple("-D" + d for d in os.environ.get("IRONLLM_KERNEL_DEFINES", "").split())


def compile_module(file_name):
    common = open(os.path.join(KERNELS, "common.cuh")).read()
    text = open(os.path.join(KERNELS, file_name)).read()
    src = common + "\n#line 1 \"" + file_name + "\"\n" + text
    try:
        mod = cp.RawModule(code=src, options=("--std=c++17",) + EXTRA_DEFINES, backend="nvrtc")
        mod.compile()
    except Exception as e:
        log = e.get_message() if hasattr(e, "get_message") else str(e)
        print(f"NVRTC log for {file_name}:\n{log}")
        report(False, f"compile {file_name}", "NVRTC compilation failed (log above)")
        return None
    report(True, f"compile {file_name}", "ok")
    return mod


def i32(v):
    return np.int32(v)


def i64(v):
    return np.int64(v)


def f32(v):
    return np.float32(v)


NULL = np.uint64(0)  # a null pointer argument


def launch(mod, name, grid, block, args, shared_mem=0):
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
    fn = mod.get_function(name)
    if shared_mem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = shared_mem  # as the runtime does at load (ops::dynamic_smem_of)
    fn(grid, block, tuple(args), shared_mem=shared_mem)
    cp.cuda.Device().synchronize()


def dev(t):
    """CPU torch tensor -> cupy array holding the same bits (halves as int16)."""
    t = t.contiguous()
    if t.dtype in HALF:
        return cp.asarray(t.view(torch.int16).numpy())
    return cp.asarray(t.numpy())


def host(a, dtype):
    """cupy array -> CPU torch tensor of `dtype` (reinterpreting halves' bits)."""
    t = torch.from_numpy(cp.asnumpy(a).copy())
    if dtype in HALF:
        return t.view(dtype)
    return t


def poisoned(shape, dtype):
    """Device buffer filled with NaN (0xFFFF for halves)."""
    if dtype in HALF:
        return cp.full(shape, -1, dtype=cp.int16)
    assert dtype == torch.float32
    return cp.full(shape, np.nan, dtype=cp.float32)


def rnd(x, dtype):
    """Round a float64 tensor to `dtype` and back (the kernel's round_to<T>)."""
    return x.to(dtype).to(torch.float64)


def bits(t):
    if t.dtype in HALF:
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


# ---------------------------------------------------------------------------------------------------
# Comparisons

def check_bits(name, got, ref):
    got, ref = got.contiguous(), ref.to(got.dtype).contiguous()
    same = bits(got) == bits(ref)
    # NaN == NaN in bits only if the same pattern; treat NaN vs NaN as equal when both are NaN.
    if got.is_floating_point():
        same |= torch.isnan(got) & torch.isnan(ref)
    bad = int((~same).sum())
    if bad:
        idx = int((~same).flatten().nonzero()[0])
        report(False, name, f"{bad}/{same.numel()} elements differ (first at flat index {idx}: got "
                            f"{got.flatten()[idx].item()} want {ref.flatten()[idx].item()})")
    else:
        report(True, name, f"bit-exact ({same.numel()} elements)")
    return bad == 0


def check_close(name, got, ref, atol, rtol, dtype=None, min_exact=None, why=""):
    """got: tensor in the kernel dtype; ref: float64. |got - ref| <= atol + rtol * |ref| everywhere,
    no NaN, and (min_exact) that fraction of elements equal ref rounded to the dtype."""
    g = got.double().flatten()
    r = ref.double().flatten()
    nan = int(torch.isnan(g).sum())
    err = (g - r).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    tol = atol + rtol * r.abs()
    bad = int((err > tol).sum())
    max_err = float(err.max()) if err.numel() else 0.0
    detail = f"max_abs_err={max_err:.3g} (atol={atol:.3g}, rtol={rtol:.3g}{'; ' + why if why else ''})"
    ok = nan == 0 and bad == 0
    if min_exact is not None and dtype is not None and g.numel():
        exact = float((g == rnd(r, dtype)).double().mean())
        detail += f", exact={exact:.4f}"
        ok = ok and exact >= min_exact
    if nan:
        detail += f", {nan} NaN (unwritten?)"
    if bad:
        i = int((err > tol).nonzero()[0])
        detail += f", {bad} over tolerance (first at {i}: got {g[i].item():.6g} want {r[i].item():.6g})"
    report(ok, name, detail)
    return ok


def layer_tol(dtype):
    """(atol, rtol, min_exact) for the rounding-mimicking layer checks."""
    if dtype == torch.float32:
        return 1e-6, 4e-6, None
    return 0.0, 2.0 * EPS[dtype], 0.99


# ---------------------------------------------------------------------------------------------------
# layers.cu

HIDDENS = (1, 7, 576, 4096, 4097, 10240)


def test_embedding(mods):
    m = mods["layers.cu"]
    for sfx, dt in DTYPES.items():
        for hidden in HIDDENS:
            seed = next_seed()
            vocab, n = 50, 9
            table = torch.randn(vocab, hidden).to(dt)
            ids = torch.randint(0, vocab, (n,), dtype=torch.int32)
            ids[0] = vocab - 1
            out = poisoned((n, hidden), dt)
            launch(m, f"embedding_{sfx}", (n,), (256,),
                   (out, dev(table), dev(ids.view(torch.int32)), i32(n), i32(hidden)))
            check_bits(f"embedding_{sfx} hidden={hidden} seed={seed}", host(out, dt).view(n, hidden),
                       table[ids.long()])


def test_gather_rows(mods):
    m = mods["layers.cu"]
    for sfx, dt in DTYPES.items():
        for hidden in HIDDENS:
            seed = next_seed()
            rows_in, n = 23, 11
            x = torch.randn(rows_in, hidden).to(dt)
            rows = torch.randint(0, rows_in, (n,), dtype=torch.int32)
            rows[1] = rows[0]  # repeats are allowed
            out = poisoned((n, hidden), dt)
            launch(m, f"gather_rows_{sfx}", (n,), (256,), (out, dev(x), dev(rows), i32(n), i32(hidden)))
            check_bits(f"gather_rows_{sfx} hidden={hidden} seed={seed}", host(out, dt).view(n, hidden),
                       x[rows.long()])


def ref_rms_norm(x, w, eps, dt):
    x = x.double()
    var = (x * x).mean(-1, keepdim=True)
    y = rnd(x * torch.rsqrt(var + eps), dt)
    return rnd(w.double() * y, dt)


def test_rms_norm(mods):
    m = mods["layers.cu"]
    eps = 1e-6
    for sfx, dt in DTYPES.items():
        atol, rtol, min_exact = layer_tol(dt)
        for hidden in HIDDENS:
            seed = next_seed()
            rows = 5
            x = (torch.randn(rows, hidden) * 3).to(dt)
            w = (1 + 0.5 * torch.randn(hidden)).to(dt)
            out = poisoned((rows, hidden), dt)
            launch(m, f"rms_norm_{sfx}", (rows,), (256,),
                   (out, dev(x), dev(w), i32(rows), i32(hidden), f32(eps)))
            check_close(f"rms_norm_{sfx} hidden={hidden} seed={seed}", host(out, dt), ref_rms_norm(x, w, eps, dt),
                        atol, rtol, dt, min_exact, "HF rounding points mimicked")


def test_add_rms_norm(mods):
    m = mods["layers.cu"]
    eps = 1e-5
    for sfx, dt in DTYPES.items():
        atol, rtol, min_exact = layer_tol(dt)
        for hidden in HIDDENS:
            seed = next_seed()
            rows = 6
            res = torch.randn(rows, hidden).to(dt)
            x = torch.randn(rows, hidden).to(dt)
            w = (1 + 0.5 * torch.randn(hidden)).to(dt)
            d_res = dev(res)
            out = poisoned((rows, hidden), dt)
            launch(m, f"add_rms_norm_{sfx}", (rows,), (256,),
                   (d_res, dev(x), dev(w), out, i32(rows), i32(hidden), f32(eps)))
            new_res = (res.double() + x.double()).to(dt)  # one rounding of an exact-in-f64 sum
            check_bits(f"add_rms_norm_{sfx} residual hidden={hidden} seed={seed}", host(d_res, dt).view(rows, hidden),
                       new_res)
            check_close(f"add_rms_norm_{sfx} out hidden={hidden} seed={seed}", host(out, dt),
                        ref_rms_norm(new_res, w, eps, dt), atol, rtol, dt, min_exact, "HF rounding points mimicked")


def test_silu_and_mul(mods):
    m = mods["layers.cu"]
    for sfx, dt in DTYPES.items():
        atol, rtol, min_exact = layer_tol(dt)
        for rows, inter in ((3, 1), (3, 7), (2, 576), (3, 4097), (1, 5000)):
            seed = next_seed()
            gu = (torch.randn(rows, 2 * inter) * 3).to(dt)
            out = poisoned((rows, inter), dt)
            launch(m, f"silu_and_mul_{sfx}", (rows, (inter + 2047) // 2048), (256,),
                   (out, dev(gu), i32(rows), i32(inter)))
            g = gu[:, :inter].double()
            u = gu[:, inter:].double()
            ref = rnd(rnd(g / (1 + torch.exp(-g)), dt) * u, dt)
            check_close(f"silu_and_mul_{sfx} rows={rows} inter={inter} seed={seed}", host(out, dt), ref,
                        atol, rtol, dt, min_exact, "silu rounded to dtype before the product")


def test_add_bias(mods):
    m = mods["layers.cu"]
    for sfx, dt in DTYPES.items():
        for rows, cols in ((4, 1), (4, 7), (3, 576), (2, 4097), (1, 5000)):
            seed = next_seed()
            x = torch.randn(rows, cols).to(dt)
            b = torch.randn(cols).to(dt)
            d_x = dev(x)
            launch(m, f"add_bias_{sfx}", (rows, (cols + 2047) // 2048), (256,), (d_x, dev(b), i32(rows), i32(cols)))
            # x + b of two dtype values is exact in f64 and almost always in f32: one rounding to dtype.
            check_close(f"add_bias_{sfx} rows={rows} cols={cols} seed={seed}", host(d_x, dt).view(rows, cols),
                        rnd(x.double() + b.double(), dt), 0.0, EPS[dt], dt, 0.999, "one rounding of x + b")


def test_casts(mods):
    m = mods["layers.cu"]
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65520.0, 1e-8, -3e-5, 1e30, float("inf"),
                             -float("inf"), 3.0e38, 1.00390625, 1.0039063], dtype=torch.float32)
    for sfx, dt in DTYPES.items():
        for n in (1, 7, 4097, 100003):
            seed = next_seed()
            x = (torch.randn(n) * 10).to(dt)
            out = poisoned((n,), torch.float32)
            launch(m, f"cast_to_f32_{sfx}", (min((n + 2047) // 2048, 65535),), (256,), (out, dev(x), i64(n)))
            check_bits(f"cast_to_f32_{sfx} n={n} seed={seed}", host(out, torch.float32), x.float())

            xf = torch.randn(n) * 100
            k = min(n, specials.numel())
            xf[:k] = specials[:k]
            out = poisoned((n,), dt)
            launch(m, f"cast_from_f32_{sfx}", (min((n + 2047) // 2048, 65535),), (256,), (out, dev(xf), i64(n)))
            check_bits(f"cast_from_f32_{sfx} n={n} seed={seed}", host(out, dt), xf.to(dt))


def rope_tables(max_pos, head_dim, theta=10000.0):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cos(freqs).float().contiguous(), torch.sin(freqs).float().contiguous()


def rope_inputs(H, KV, hd, bs, dt, T=13, max_pos=4096):
    """A RoPE + KV write case: T token rows of random q/k/v, rope tables, random positions and distinct,
    scattered cache slots. Returns (T, num_blocks, width, qkv, cos, sin, positions, slots)."""
    num_blocks = max(4, (T + bs - 1) // bs + 1)
    width = (H + 2 * KV) * hd
    qkv = (torch.randn(T, width) * 2).to(dt)
    cos, sin = rope_tables(max_pos, hd)
    positions = torch.randint(0, max_pos, (T,), dtype=torch.int32)
    slots = torch.randperm(num_blocks * bs)[:T].to(torch.int64)
    return T, num_blocks, width, qkv, cos, sin, positions, slots


def ref_qk_norm_rope(qkv, cos, sin, positions, qw, kw, H, KV, hd, eps, dt):
    T = qkv.shape[0]
    half = hd // 2
    x = qkv.double().view(T, H + 2 * KV, hd).clone()
    qk = x[:, : H + KV]
    if qw is not None:
        w = torch.cat([qw.double().expand(H, hd), kw.double().expand(KV, hd)], 0)
        var = (qk * qk).mean(-1, keepdim=True)
        qk = rnd(w * rnd(qk * torch.rsqrt(var + eps), dt), dt)
    c = rnd(cos[positions.long()].double(), dt)[:, None, :]
    s = rnd(sin[positions.long()].double(), dt)[:, None, :]
    x1, x2 = qk[..., :half], qk[..., half:]
    o1 = rnd(rnd(x1 * c, dt) - rnd(x2 * s, dt), dt)
    o2 = rnd(rnd(x2 * c, dt) + rnd(x1 * s, dt), dt)
    x[:, : H + KV] = torch.cat([o1, o2], -1)
    return x.view(T, -1)


def test_qk_norm_rope_kv(mods):
    m = mods["layers.cu"]
    eps = 1e-6
    configs = [  # (num_heads, num_kv_heads, head_dim, block_size)
        (8, 8, 64, 16), (12, 4, 128, 16), (16, 2, 80, 32), (4, 4, 256, 1), (6, 2, 34, 5), (32, 8, 128, 16),
    ]
    for sfx, dt in DTYPES.items():
        for H, KV, hd, bs in configs:
            for qk_norm in (False, True):
                seed = next_seed()
                T, num_blocks, width, qkv, cos, sin, positions, slots = rope_inputs(H, KV, hd, bs, dt)
                slots[[1, 5, 12]] = -1  # padding tokens: no cache write
                qw = kw = None
                if qk_norm:
                    qw = (1 + 0.2 * torch.randn(hd)).to(dt)
                    kw = (1 + 0.2 * torch.randn(hd)).to(dt)
                d_qkv = dev(qkv)
                kc = poisoned((num_blocks, KV, bs, hd), dt)
                vc = poisoned((num_blocks, KV, bs, hd), dt)
                args = (d_qkv, kc, vc, dev(cos), dev(sin), dev(positions), dev(slots),
                        dev(qw) if qk_norm else NULL, dev(kw) if qk_norm else NULL,
                        i32(T), i32(H), i32(KV), i32(hd), i32(bs), f32(eps))
                launch(m, f"qk_norm_rope_kv_{sfx}", (T, (H + KV + 3) // 4), (128,), args)
                tag = f"qk_norm_rope_kv_{sfx} H={H} KV={KV} hd={hd} bs={bs} qk_norm={int(qk_norm)} seed={seed}"
                got = host(d_qkv, dt).view(T, width)
                ref = ref_qk_norm_rope(qkv, cos, sin, positions, qw, kw, H, KV, hd, eps, dt)
                atol, rtol, min_exact = layer_tol(dt)
                if dt != torch.float32:
                    # Near-cancelling rotations: error relative to the operands, not the result.
                    atol = 2 * EPS[dt] * float(ref.abs().max())
                else:
                    atol = 4e-6 * float(ref.abs().max())
                qk_cols = (H + KV) * hd
                check_close(tag + " q,k", got[:, :qk_cols], ref[:, :qk_cols], atol, rtol, dt, min_exact,
                            "rounding points mimicked; atol relative to the largest operand")
                check_bits(tag + " v untouched", got[:, qk_cols:], qkv[:, qk_cols:])
                # Caches: written slots hold the roped k (bit-equal to what went back into qkv) and v;
                # every other slot is still poison.
                kcg = host(kc, dt).view(num_blocks, KV, bs, hd)
                vcg = host(vc, dt).view(num_blocks, KV, bs, hd)
                want_k = torch.full((num_blocks, KV, bs, hd), float("nan"), dtype=dt)
                want_v = want_k.clone()
                kv_rows = got.view(T, H + 2 * KV, hd)
                for t in range(T):
                    s = int(slots[t])
                    if s < 0:
                        continue
                    want_k[s // bs, :, s % bs, :] = kv_rows[t, H:H + KV]
                    want_v[s // bs, :, s % bs, :] = qkv.view(T, H + 2 * KV, hd)[t, H + KV:]
                check_bits(tag + " k_cache", kcg, want_k)
                check_bits(tag + " v_cache", vcg, want_v)


def rope_kv_pack_threads(H, KV, hd, dt):
    """ops::rope_kv_pack_threads: a thread per 16-byte pack, None where half a head is not whole packs."""
    pack = 16 // torch.tensor([], dtype=dt).element_size()
    half = hd // 2
    if hd % 2 or half % pack:
        return None
    items = (H + KV) * half // pack + KV * hd // pack
    return min(max((items + 31) // 32, 1), 32) * 32


def test_rope_kv_pack(mods):
    """rope_kv_pack (a block per token, 16-byte packs) writes exactly what qk_norm_rope_kv without q/k norm
    writes: q and k in place, the roped k and the v rows in the cache slots, nothing else."""
    m = mods["layers.cu"]
    configs = [  # (num_heads, num_kv_heads, head_dim, block_size); the last needs the block-strided loop
        (8, 8, 64, 16), (12, 4, 128, 16), (16, 2, 80, 32), (4, 4, 256, 1), (32, 8, 128, 16), (9, 3, 64, 5),
        (128, 16, 256, 16),
    ]
    for sfx, dt in DTYPES.items():
        for H, KV, hd, bs in configs:
            threads = rope_kv_pack_threads(H, KV, hd, dt)
            if threads is None:
                continue
            seed = next_seed()
            T, num_blocks, width, qkv, cos, sin, positions, slots = rope_inputs(H, KV, hd, bs, dt)
            slots[[0, 7]] = -1  # padding tokens: no cache write
            outs = []
            for name in ("qk_norm_rope_kv", "rope_kv_pack"):
                d_qkv = dev(qkv)
                kc = poisoned((num_blocks, KV, bs, hd), dt)
                vc = poisoned((num_blocks, KV, bs, hd), dt)
                common = (d_qkv, kc, vc, dev(cos), dev(sin), dev(positions), dev(slots))
                tail = (i32(T), i32(H), i32(KV), i32(hd), i32(bs))
                if name == "rope_kv_pack":
                    launch(m, f"{name}_{sfx}", (T,), (threads,), common + tail)
                else:
                    launch(m, f"{name}_{sfx}", (T, (H + KV + 3) // 4), (128,), common + (NULL, NULL) + tail + (f32(1e-6),))
                outs.append((host(d_qkv, dt).view(T, width), host(kc, dt), host(vc, dt)))
            tag = f"rope_kv_pack_{sfx} H={H} KV={KV} hd={hd} bs={bs} threads={threads} seed={seed}"
            (q0, k0, v0), (q1, k1, v1) = outs
            check_bits(tag + " qkv = per-warp kernel's", q1, q0)
            check_bits(tag + " k_cache = per-warp kernel's", k1, k0)
            check_bits(tag + " v_cache = per-warp kernel's", v1, v0)
            ref = ref_qk_norm_rope(qkv, cos, sin, positions, None, None, H, KV, hd, 1e-6, dt)
            qk_cols = (H + KV) * hd
            atol = (2 * EPS[dt] if dt != torch.float32 else 4e-6) * float(ref.abs().max())
            _, rtol, min_exact = layer_tol(dt)
            check_close(tag + " q,k", q1[:, :qk_cols], ref[:, :qk_cols], atol, rtol, dt, min_exact,
                        "rounding points mimicked; atol relative to the largest operand")


# ---------------------------------------------------------------------------------------------------
# gemm_f32.cu

def run_gemm(m, x, w, bias):
    M, K = x.shape
    N = w.shape[0]
    y = poisoned((M, N), torch.float32)
    launch(m, "gemm_f32_nt", ((N + 63) // 64, (M + 63) // 64), (256,),
           (y, dev(x), dev(w), dev(bias) if bias is not None else NULL, i32(M), i32(N), i32(K)))
    return host(y, torch.float32).view(M, N)


def test_gemm_f32(mods):
    m = mods["gemm_f32.cu"]
    i = 0
    for M in (1, 3, 65):
        for N in (1, 100, 257):
            for K in (1, 7, 64, 1000):
                seed = next_seed()
                x = torch.randn(M, K)
                w = torch.randn(N, K)
                bias = torch.randn(N) if i % 2 == 0 else None
                i += 1
                y = run_gemm(m, x, w, bias)
                ref = x.double() @ w.double().T
                mag = x.double().abs() @ w.double().abs().T
                if bias is not None:
                    ref = ref + bias.double()
                    mag = mag + bias.double().abs()
                # Rigorous bound for a sequential f32 fma chain of length k (+1 for the bias add).
                bound = 1.01 * (K + 1) * 2.0 ** -24 * mag
                err = (y.double() - ref).abs()
                bad = int((~(err <= bound)).sum())
                report(bad == 0, f"gemm_f32_nt m={M} n={N} k={K} bias={int(bias is not None)} seed={seed}",
                       f"max_abs_err={float(torch.nan_to_num(err, nan=float('inf')).max()):.3g} "
                       f"(bound (k+1)*2^-24*|x||w|, {bad} over)")
    # k = 0: y = bias.
    y = run_gemm(m, torch.zeros(3, 0), torch.zeros(5, 0), torch.arange(5, dtype=torch.float32))
    check_bits("gemm_f32_nt k=0 gives bias", y, torch.arange(5, dtype=torch.float32).expand(3, 5))


def test_gemv(mods):
    """The skinny GEMM (m <= 4) of bf16/f16 decode steps, T and f32 outputs, against float64: odd n, k from
    8 to 14336, the Llama-3.1-8B projection shapes."""
    m = mods["gemv.cu"]

    def per_block(rows):  # GEMV_WARPS x output columns per warp (GEMV_ROWS_M1 at m = 1, else GEMV_ROWS)
        return 8 * (1 if rows == 1 else 2)

    shapes = [(1, 8), (7, 64), (33, 4096), (6144, 4096), (4096, 4096), (1001, 14336), (3, 24)]
    for sfx in ("bf16", "f16"):
        dt = DTYPES[sfx]
        for M in (1, 2, 3, 4):
            for N, K in shapes:
                seed = next_seed()
                x = torch.randn(M, K).to(dt)
                w = (torch.randn(N, K) / math.sqrt(K)).to(dt)
                ref = x.double() @ w.double().T
                mag = x.double().abs() @ w.double().abs().T
                for out_sfx, out_dt in ((sfx, dt), (sfx + "_f32", torch.float32)):
                    y = poisoned((M, N), out_dt)
                    grid = ((N + per_block(M) - 1) // per_block(M),)
                    launch(m, f"gemv_{out_sfx}", grid, (256,), (y, dev(x), dev(w), i32(M), i32(N), i32(K)))
                    got = host(y, out_dt).view(M, N)
                    # f32 accumulation (k terms) plus one rounding of the output to its dtype.
                    eps_out = 0.0 if out_dt == torch.float32 else EPS[dt]
                    err = (got.double() - ref).abs()
                    bound = 1.01 * K * 2.0 ** -24 * mag + eps_out * ref.abs() + 1e-30
                    bad = int((~(err <= bound)).sum())
                    report(bad == 0, f"gemv_{out_sfx} m={M} n={N} k={K} seed={seed}",
                           f"max_abs_err={float(torch.nan_to_num(err, nan=float('inf')).max()):.3g} "
                           f"(bound k*2^-24*|x||w| + output rounding, {bad} over)")


def test_gemv_swiglu(mods):
    """The skinny GEMM with SiLU-and-mul in its epilogue (gemv_swiglu_T, decode steps of one or two rows):
    bit-identical to the plain form over the stacked [gate; up] weight followed by silu_and_mul_T."""
    g, lay = mods["gemv.cu"], mods["layers.cu"]
    for sfx in ("bf16", "f16"):
        dt = DTYPES[sfx]
        for M in (1, 2):
            for inter, K in ((1, 8), (7, 64), (136, 512), (1536, 576), (14336, 4096)):
                seed = next_seed()
                x = torch.randn(M, K).to(dt)
                w = (torch.randn(2 * inter, K) / math.sqrt(K)).to(dt)
                fused = poisoned((M, inter), dt)
                launch(g, f"gemv_swiglu_{sfx}", ((inter + 7) // 8,), (256,),
                       (fused, dev(x), dev(w), i32(M), i32(inter), i32(K)))
                gu = poisoned((M, 2 * inter), dt)
                per_block = 8 * (1 if M == 1 else 2)
                launch(g, f"gemv_{sfx}", ((2 * inter + per_block - 1) // per_block,), (256,),
                       (gu, dev(x), dev(w), i32(M), i32(2 * inter), i32(K)))
                act = poisoned((M, inter), dt)
                launch(lay, f"silu_and_mul_{sfx}", (M, (inter + 2047) // 2048), (256,), (act, gu, i32(M), i32(inter)))
                check_bits(f"gemv_swiglu_{sfx} m={M} inter={inter} k={K} seed={seed}", host(fused, dt),
                           host(act, dt))


def test_gemm_f32_batch_invariance(mods):
    m = mods["gemm_f32.cu"]
    for K in (1000, 333):
        seed = next_seed()
        x = torch.randn(130, K)
        w = torch.randn(257, K)
        bias = torch.randn(257)
        full = run_gemm(m, x, w, bias)
        for lo, hi in ((77, 78), (63, 66), (1, 66), (129, 130), (0, 1)):
            part = run_gemm(m, x[lo:hi].clone(), w, bias)
            check_bits(f"gemm_f32_nt batch invariance k={K} rows {lo}..{hi} of 130 seed={seed}", part, full[lo:hi])


# ---------------------------------------------------------------------------------------------------
# attention.cu

class AttnCase:
    """A paged KV cache holding `seqs` = [(context_len, query_len)], with metadata and a qkv tensor whose
    k/v columns are NaN (the attention kernel must only read q from it). Cache slots outside every
    context, spare blocks and unused block-table entries hold NaN, so any stray read shows."""

    def __init__(self, dt, H, KV, hd, bs, seqs):
        self.dt, self.H, self.KV, self.hd, self.bs, self.seqs = dt, H, KV, hd, bs, seqs
        nblk = [(c + bs - 1) // bs for c, _ in seqs]
        num_blocks = sum(nblk) + 2
        perm = torch.randperm(num_blocks)
        spare = int(perm[-1])
        self.max_blocks = max(nblk) + 1
        self.block_tables = torch.full((len(seqs), self.max_blocks), spare, dtype=torch.int32)
        valid = torch.zeros(num_blocks, bs, dtype=torch.bool)
        k = 0
        for s, (c, _) in enumerate(seqs):
            for b in range(nblk[s]):
                self.block_tables[s, b] = perm[k]
                k += 1
            pos = torch.arange(c)
            valid[self.block_tables[s, (pos // bs).long()].long(), pos % bs] = True
        self.k_cache = torch.randn(num_blocks, KV, bs, hd).to(dt)
        self.v_cache = torch.randn(num_blocks, KV, bs, hd).to(dt)
        self.k_cache.transpose(1, 2)[~valid] = float("nan")
        self.v_cache.transpose(1, 2)[~valid] = float("nan")
        T = sum(q for _, q in seqs)
        self.qkv = torch.randn(T, (H + 2 * KV) * hd).to(dt)
        self.qkv[:, H * hd:] = float("nan")
        self.set_metadata(list(range(len(seqs))), seqs)

    def set_metadata(self, table_rows, seqs):
        """Batch layout: sequence i uses block-table row table_rows[i] with (context_len, query_len)."""
        self.batch_tables = self.block_tables[table_rows].contiguous()
        self.batch_seqs = seqs
        qsl = [0]
        for _, q in seqs:
            qsl.append(qsl[-1] + q)
        self.query_start_loc = torch.tensor(qsl, dtype=torch.int32)
        self.context_lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
        self.token_to_seq = torch.cat([torch.full((q,), i, dtype=torch.int32) for i, (_, q) in enumerate(seqs)])

    def run(self, mod, sfx, qkv=None, scale=None):
        qkv = self.qkv if qkv is None else qkv
        T = qkv.shape[0]
        H, KV, hd, bs = self.H, self.KV, self.hd, self.bs
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        out = poisoned((T, H * hd), self.dt)
        launch(mod, f"paged_attention_{sfx}", (T, KV), (128,),
               (out, dev(qkv), dev(self.k_cache), dev(self.v_cache), dev(self.batch_tables),
                dev(self.query_start_loc), dev(self.context_lens), dev(self.token_to_seq), i32(T), i32(H), i32(KV),
                i32(hd), i32(bs), i32(self.batch_tables.shape[1]), f32(scale)))
        return host(out, self.dt).view(T, H * hd)

    def run_split(self, mod, sfx, num_splits, scale=None, min_keys=1):
        """Split-KV decode attention (every row a decode row): split kernel (shares of at least `min_keys`
        keys), then the reduce."""
        T = self.qkv.shape[0]
        H, KV, hd, bs = self.H, self.KV, self.hd, self.bs
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        part_o = poisoned((T * H * num_splits, hd), torch.float32)
        part_lse = poisoned((T * H * num_splits,), torch.float32)
        launch(mod, f"paged_attention_split_{sfx}", (T, KV, num_splits), (128,),
               (dev(self.qkv), dev(self.k_cache), dev(self.v_cache), dev(self.batch_tables),
                dev(self.query_start_loc), dev(self.context_lens), dev(self.token_to_seq), i32(T), i32(H), i32(KV),
                i32(hd), i32(bs), i32(self.batch_tables.shape[1]), f32(scale), part_o, part_lse, i32(num_splits),
                i32(min_keys)))
        out = poisoned((T, H * hd), self.dt)
        launch(mod, f"paged_attention_reduce_{sfx}", (T, H), (128,),
               (out, part_o, part_lse, i32(T), i32(H), i32(hd), i32(num_splits)))
        return host(out, self.dt).view(T, H * hd)

    def run_flash_decode(self, mod, sfx, num_splits, scale=None, min_keys=1, deep=False):
        """Tensor-core decode attention (flash_decode.cu; its deep form, 3 stages, when `deep`): the plain
        kernel when num_splits == 1, else the split kernel (shares of at least `min_keys` keys) followed by
        attention.cu's reduce."""
        form = "deep_" if deep else ""
        T = self.qkv.shape[0]
        H, KV, hd, bs = self.H, self.KV, self.hd, self.bs
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        smem = flash_decode_smem(hd, deep)
        inputs = (dev(self.qkv), dev(self.k_cache), dev(self.v_cache), dev(self.batch_tables),
                  dev(self.query_start_loc), dev(self.context_lens), dev(self.token_to_seq), i32(T), i32(H),
                  i32(KV), i32(hd), i32(bs), i32(self.batch_tables.shape[1]), f32(scale))
        out = poisoned((T, H * hd), self.dt)
        if num_splits == 1:
            launch(mod["flash_decode.cu"], f"flash_decode_{form}{sfx}_hd{hd}", (T, KV), (128,), (out,) + inputs,
                   shared_mem=smem)
        else:
            part_o = poisoned((T * H * num_splits, hd), torch.float32)
            part_lse = poisoned((T * H * num_splits,), torch.float32)
            launch(mod["flash_decode.cu"], f"flash_decode_split_{form}{sfx}_hd{hd}", (T, KV, num_splits), (128,),
                   inputs + (part_o, part_lse, i32(num_splits), i32(min_keys)), shared_mem=smem)
            launch(mod["attention.cu"], f"paged_attention_reduce_{sfx}", (T, H), (128,),
                   (out, part_o, part_lse, i32(T), i32(H), i32(hd), i32(num_splits)))
        return host(out, self.dt).view(T, H * hd)

    def reference(self, scale=None):
        H, KV, hd, bs = self.H, self.KV, self.hd, self.bs
        G = H // KV
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        outs = []
        t0 = 0
        for s, (c, ql) in enumerate(self.batch_seqs):
            pos = torch.arange(c)
            blk = self.batch_tables[s, (pos // bs).long()].long()
            K = self.k_cache[blk, :, pos % bs, :].double().repeat_interleave(G, dim=1)  # [c, H, hd]
            V = self.v_cache[blk, :, pos % bs, :].double().repeat_interleave(G, dim=1)
            q = self.qkv[t0:t0 + ql, : H * hd].double().view(ql, H, hd)
            scores = torch.einsum("qhd,khd->hqk", q, K) * scale
            qpos = c - ql + torch.arange(ql)
            mask = pos[None, :] > qpos[:, None]  # [ql, c]
            scores = scores.masked_fill(mask[None], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            outs.append(torch.einsum("hqk,khd->qhd", p, V).reshape(ql, H * hd))
            t0 += ql
        return torch.cat(outs, 0)


def attn_tol(dt):
    if dt == torch.float32:
        return 5e-5, 5e-5
    if dt == torch.bfloat16:
        return 2e-3, 2.0 ** -8
    return 2e-4, 2.0 ** -10


def test_paged_attention(mods):
    mod = mods["attention.cu"]
    configs = [  # (num_heads, num_kv_heads, head_dim, block_size): GQA 1, 3, 4, 8, 16, odd shapes
        (8, 8, 64, 16), (12, 4, 128, 16), (16, 4, 80, 32), (32, 4, 128, 1), (16, 1, 64, 16),
        (6, 2, 34, 16), (4, 2, 256, 16), (6, 3, 128, 7), (9, 3, 64, 32),
    ]
    # A mixed batch: a decode row with a long-ish context, a 37-token prefill over a 50-token cached prefix,
    # a fresh 20-token prefill and a fresh 1-token prompt.
    mixed = [(300, 1), (87, 37), (20, 20), (1, 1)]
    for sfx, dt in DTYPES.items():
        atol, rtol = attn_tol(dt)
        for H, KV, hd, bs in configs:
            seed = next_seed()
            case = AttnCase(dt, H, KV, hd, bs, mixed)
            got = case.run(mod, sfx)
            check_close(f"paged_attention_{sfx} mixed H={H} KV={KV} hd={hd} bs={bs} seed={seed}", got,
                        case.reference(), atol, rtol, why="f32 softmax, output rounded once")
        # Long context: an 8192-token decode row and a 16-token chunk at the end of a 4100-token context.
        seed = next_seed()
        case = AttnCase(dt, 32, 8, 128, 16, [(8192, 1), (4100, 16)])
        check_close(f"paged_attention_{sfx} long context 8192 H=32 KV=8 hd=128 bs=16 seed={seed}",
                    case.run(mod, sfx), case.reference(), atol, rtol, why="f32 softmax, output rounded once")
        # Sharper softmax (large scores) to exercise the running-max rescaling.
        seed = next_seed()
        case = AttnCase(dt, 8, 2, 128, 16, [(600, 1), (70, 33)])
        scale = 4.0 / math.sqrt(128)
        check_close(f"paged_attention_{sfx} sharp softmax scale*4 seed={seed}", case.run(mod, sfx, scale=scale),
                    case.reference(scale=scale), atol, rtol, why="f32 softmax, output rounded once")


def test_paged_attention_split(mods):
    """Split-KV decode attention against the float64 reference: decode-only batches, GQA 1-8, contexts
    shorter than the split count (empty shares), long contexts, odd head sizes, sharp softmax."""
    mod = mods["attention.cu"]
    configs = [(32, 8, 128, 16), (8, 8, 64, 16), (12, 4, 128, 1), (6, 2, 34, 7), (16, 2, 256, 32)]
    for sfx in ("bf16", "f16", "f32"):
        dt = DTYPES[sfx]
        atol, rtol = attn_tol(dt)
        for H, KV, hd, bs in configs:
            for splits in (2, 3, 16, 32):
                seed = next_seed()
                case = AttnCase(dt, H, KV, hd, bs, [(1000, 1), (5, 1), (1, 1), (129, 1)])
                check_close(f"paged_attention_split_{sfx} H={H} KV={KV} hd={hd} bs={bs} splits={splits} seed={seed}",
                            case.run_split(mod, sfx, splits), case.reference(), atol, rtol,
                            why="f32 softmax per share, shares merged in f32, output rounded once")
        seed = next_seed()
        case = AttnCase(dt, 32, 8, 128, 16, [(8192, 1)])
        check_close(f"paged_attention_split_{sfx} 8192-token context splits=16 seed={seed}",
                    case.run_split(mod, sfx, 16), case.reference(), atol, rtol, why="as above")
        # shares of at least 128 keys (ops::DECODE_SPLIT_MIN_KEYS): short rows fill fewer shares than the
        # grid has, long ones all of them
        for splits in (16, 32):
            seed = next_seed()
            case = AttnCase(dt, 32, 8, 128, 16, [(1000, 1), (5, 1), (128, 1), (129, 1), (4097, 1), (2048, 1)])
            check_close(f"paged_attention_split_{sfx} min 128 keys a share splits={splits} seed={seed}",
                        case.run_split(mod, sfx, splits, min_keys=128), case.reference(), atol, rtol,
                        why="as above")
        seed = next_seed()
        case = AttnCase(dt, 8, 2, 128, 16, [(600, 1), (70, 1)])
        scale = 4.0 / math.sqrt(128)
        check_close(f"paged_attention_split_{sfx} sharp softmax scale*4 seed={seed}",
                    case.run_split(mod, sfx, 5, scale=scale), case.reference(scale=scale), atol, rtol, why="as above")


def flash_decode_smem(hd, deep=False):
    """FD_SMEM_BYTES of flash_decode.cu (and ops::flash_decode_smem); the deep form has 3 stages."""
    stages = 3 if hd == 64 or deep else 2
    for d in EXTRA_DEFINES:
        if d.startswith("-DFD_STAGES_HD128=") and hd == 128 and not deep:
            stages = int(d.split("=", 1)[1])
    return stages * 2 * 64 * hd * 2 + 16 * hd * 2


def test_flash_decode(mods):
    """Tensor-core grouped-query decode attention against the float64 reference: GQA groups 1-16 (7 and 5
    too), head sizes 64 and 128, block sizes 1/7/16/32, contexts shorter than one warp's 16 keys, than a
    64-key tile and than the split count (empty shares), tile-boundary lengths, an 8192-token context, a
    sharp softmax; plain and split-KV (merged by attention.cu's reduce)."""
    configs = [(32, 8, 128, 16), (8, 8, 64, 16), (28, 4, 128, 16), (16, 1, 128, 32), (64, 4, 64, 7),
               (10, 2, 128, 1), (12, 12, 64, 16)]
    seqs = [(1000, 1), (5, 1), (1, 1), (129, 1), (64, 1), (65, 1), (16, 1), (17, 1)]
    for sfx in ("bf16", "f16"):
        dt = DTYPES[sfx]
        atol, rtol = FLASH_TOL[dt]
        for H, KV, hd, bs in configs:
            for splits in (1, 3, 16, 32):
                seed = next_seed()
                case = AttnCase(dt, H, KV, hd, bs, seqs)
                check_close(f"flash_decode_{sfx} H={H} KV={KV} hd={hd} bs={bs} splits={splits} seed={seed}",
                            case.run_flash_decode(mods, sfx, splits), case.reference(), atol, rtol,
                            why="P rounded to the input type for the PV tensor-core product, as flash_prefill")
        for splits in (1, 16, 32):
            seed = next_seed()
            case = AttnCase(dt, 32, 8, 128, 16, [(8192, 1), (4097, 1)])
            check_close(f"flash_decode_{sfx} 8192-token context splits={splits} seed={seed}",
                        case.run_flash_decode(mods, sfx, splits), case.reference(), atol, rtol, why="as above")
        # shares of at least 128 keys (ops::DECODE_SPLIT_MIN_KEYS), as the runtime launches them
        for H, KV, hd, bs in ((32, 8, 128, 16), (8, 8, 64, 16), (12, 4, 128, 1)):
            for splits in (8, 16, 32):
                seed = next_seed()
                case = AttnCase(dt, H, KV, hd, bs, seqs + [(1088, 1), (4097, 1), (127, 1), (128, 1), (256, 1)])
                check_close(f"flash_decode_{sfx} H={H} KV={KV} hd={hd} bs={bs} splits={splits} min 128 keys a share "
                            f"seed={seed}", case.run_flash_decode(mods, sfx, splits, min_keys=128), case.reference(),
                            atol, rtol, why="as above")
        # the deep form (3 stages, head size 128): the same arithmetic in the same order, so the plain
        # form's output bit for bit, plain and split, short and long rows, block sizes 1/16/32
        for H, KV, bs in ((32, 8, 16), (28, 4, 16), (16, 1, 32), (12, 4, 1)):
            for splits in (1, 3, 16):
                seed = next_seed()
                case = AttnCase(dt, H, KV, 128, bs, seqs + [(1088, 1), (4097, 1), (127, 1), (128, 1), (256, 1)])
                deep = case.run_flash_decode(mods, sfx, splits, min_keys=128, deep=True)
                check_bits(f"flash_decode_deep_{sfx} H={H} KV={KV} bs={bs} splits={splits} seed={seed} = plain form",
                           deep, case.run_flash_decode(mods, sfx, splits, min_keys=128))
                check_close(f"flash_decode_deep_{sfx} H={H} KV={KV} bs={bs} splits={splits} seed={seed}", deep,
                            case.reference(), atol, rtol, why="as above")
        seed = next_seed()
        case = AttnCase(dt, 8, 2, 128, 16, [(600, 1), (70, 1)])
        scale = 4.0 / math.sqrt(128)
        check_close(f"flash_decode_{sfx} sharp softmax scale*4 seed={seed}",
                    case.run_flash_decode(mods, sfx, 5, scale=scale), case.reference(scale=scale), atol, rtol,
                    why="as above")


# bf16 / f16 tolerances of the tensor-core attention kernels (tests/gpu/test_flash_prefill.py's): P is
# rounded to the input type before the PV product, so errors are a few ulps of the output type.
FLASH_TOL = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def test_paged_attention_batch_invariance(mods):
    mod = mods["attention.cu"]
    for sfx in ("f32", "bf16"):
        dt = DTYPES[sfx]
        for H, KV, hd, bs in ((12, 4, 128, 16), (8, 1, 80, 1), (6, 2, 34, 16)):
            seed = next_seed()
            tag = f"paged_attention_{sfx} batch invariance H={H} KV={KV} hd={hd} bs={bs} seed={seed}"
            case = AttnCase(dt, H, KV, hd, bs, [(300, 1), (87, 37), (20, 20)])
            full = case.run(mod, sfx)  # tokens: 0 = decode of seq 0; 1..37 = seq 1 (positions 50..86)
            # The same sequence alone (fewer tokens in the batch).
            case.set_metadata([1], [(87, 37)])
            alone = case.run(mod, sfx, qkv=case.qkv[1:38].clone())
            check_bits(tag + ": prefill alone vs in a mixed batch", alone, full[1:38])
            # Chunked prefill: positions 50..69 then 70..86.
            case.set_metadata([1], [(70, 20)])
            c1 = case.run(mod, sfx, qkv=case.qkv[1:21].clone())
            case.set_metadata([1, 0], [(87, 17), (300, 1)])
            c2 = case.run(mod, sfx, qkv=torch.cat([case.qkv[21:38], case.qkv[0:1]]).clone())
            check_bits(tag + ": chunked prefill vs one chunk", torch.cat([c1, c2[:17]]), full[1:38])
            check_bits(tag + ": decode row next to a chunk vs in the mixed batch", c2[17:18], full[0:1])
            # Prefill tokens recomputed as decode rows (context truncated to each token's position).
            picks = [1, 18, 37]  # positions 50, 67, 86
            case.set_metadata([1, 1, 1, 0], [(51, 1), (68, 1), (87, 1), (300, 1)])
            dec = case.run(mod, sfx, qkv=torch.cat([case.qkv[picks], case.qkv[0:1]]).clone())
            check_bits(tag + ": prefill rows recomputed as decodes", dec, full[picks + [0]])


def test_rope_then_attention(mods):
    """qk_norm_rope_kv writes the paged cache, paged_attention reads it: both kernels agree on the layout."""
    lay, att = mods["layers.cu"], mods["attention.cu"]
    for sfx in ("f32", "bf16"):
        dt = DTYPES[sfx]
        seed = next_seed()
        H, KV, hd, bs = 8, 2, 64, 16
        lens = [45, 30]  # tokens ever written per sequence
        tables = [[3, 0, 5], [1, 4]]
        num_blocks = 6
        width = (H + 2 * KV) * hd
        pos = torch.cat([torch.arange(n) for n in lens]).to(torch.int32)
        slots = torch.tensor([tables[s][p // bs] * bs + p % bs for s, n in enumerate(lens) for p in range(n)],
                             dtype=torch.int64)
        T = int(pos.numel())
        qkv = torch.randn(T, width).to(dt)
        cos, sin = rope_tables(256, hd)
        d_qkv = dev(qkv)
        kc = poisoned((num_blocks, KV, bs, hd), dt)
        vc = poisoned((num_blocks, KV, bs, hd), dt)
        launch(lay, f"qk_norm_rope_kv_{sfx}", (T, (H + KV + 3) // 4), (128,),
               (d_qkv, kc, vc, dev(cos), dev(sin), dev(pos), dev(slots), NULL, NULL, i32(T), i32(H), i32(KV), i32(hd),
                i32(bs), f32(1e-6)))
        roped = host(d_qkv, dt).view(T, width)
        # This step: all 45 tokens of seq 0 (fresh prefill) and the last 12 of seq 1 (18 cached before).
        rows = list(range(45)) + list(range(45 + 18, 45 + 30))
        q_batch = roped[rows].clone()
        bt = torch.tensor([[3, 0, 5], [1, 4, 0]], dtype=torch.int32)
        qsl = torch.tensor([0, 45, 57], dtype=torch.int32)
        ctx = torch.tensor([45, 30], dtype=torch.int32)
        t2s = torch.tensor([0] * 45 + [1] * 12, dtype=torch.int32)
        out = poisoned((57, H * hd), dt)
        scale = 1.0 / math.sqrt(hd)
        launch(att, f"paged_attention_{sfx}", (57, KV), (128,),
               (out, dev(q_batch), kc, vc, dev(bt), dev(qsl), dev(ctx), dev(t2s), i32(57), i32(H), i32(KV), i32(hd),
                i32(bs), i32(3), f32(scale)))
        refs = []
        r = roped.double().view(T, H + 2 * KV, hd)
        for s, (start, n, ql) in enumerate(((0, 45, 45), (45, 30, 12))):
            q = r[start + n - ql:start + n, :H]
            k = r[start:start + n, H:H + KV].repeat_interleave(H // KV, dim=1)
            v = r[start:start + n, H + KV:].repeat_interleave(H // KV, dim=1)
            sc = torch.einsum("qhd,khd->hqk", q, k) * scale
            mask = torch.arange(n)[None, :] > (n - ql + torch.arange(ql))[:, None]
            p = torch.softmax(sc.masked_fill(mask[None], float("-inf")), -1)
            refs.append(torch.einsum("hqk,khd->qhd", p, v).reshape(ql, H * hd))
        atol, rtol = attn_tol(dt)
        check_close(f"qk_norm_rope_kv_{sfx} -> paged_attention_{sfx} (cache written then read) seed={seed}",
                    host(out, dt).view(57, H * hd), torch.cat(refs), atol, rtol, why="f32 softmax, output rounded once")


# ---------------------------------------------------------------------------------------------------

CHECKS = [
    ("embedding", test_embedding, ("layers.cu",)),
    ("gather_rows", test_gather_rows, ("layers.cu",)),
    ("rms_norm", test_rms_norm, ("layers.cu",)),
    ("add_rms_norm", test_add_rms_norm, ("layers.cu",)),
    ("silu_and_mul", test_silu_and_mul, ("layers.cu",)),
    ("add_bias", test_add_bias, ("layers.cu",)),
    ("casts", test_casts, ("layers.cu",)),
    ("qk_norm_rope_kv", test_qk_norm_rope_kv, ("layers.cu",)),
    ("rope_kv_pack", test_rope_kv_pack, ("layers.cu",)),
    ("gemm_f32", test_gemm_f32, ("gemm_f32.cu",)),
    ("gemm_f32_batch_invariance", test_gemm_f32_batch_invariance, ("gemm_f32.cu",)),
    ("gemv", test_gemv, ("gemv.cu",)),
    ("gemv_swiglu", test_gemv_swiglu, ("gemv.cu", "layers.cu")),
    ("paged_attention", test_paged_attention, ("attention.cu",)),
    ("paged_attention_split", test_paged_attention_split, ("attention.cu",)),
    ("paged_attention_batch_invariance", test_paged_attention_batch_invariance, ("attention.cu",)),
    ("flash_decode", test_flash_decode, ("flash_decode.cu", "attention.cu")),
    ("rope_then_attention", test_rope_then_attention, ("layers.cu", "attention.cu")),
]


def main():
    filters = sys.argv[1:]
    checks = [c for c in CHECKS if not filters or any(f in c[0] for f in filters)]
    mods = {}
    for f in sorted({f for c in checks for f in c[2]}):
        mods[f] = compile_module(f)
    for name, fn, files in checks:
        missing = [f for f in files if mods.get(f) is None]
        if missing:
            report(False, name, f"skipped: {', '.join(missing)} did not compile")
            continue
        try:
            fn(mods)
        except Exception:
            traceback.print_exc()
            report(False, name, "raised (traceback above)")
    failed = [line for ok, line in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    for line in failed:
        print("  " + line)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
