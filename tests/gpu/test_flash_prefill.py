#!/usr/bin/env python3
"""GPU test of the tensor-core prefill attention kernels over a paged KV cache: flash_prefill.cu (mma.sync,
every card) and, on Hopper, flash_prefill_sm90.cu (wgmma). Every check runs on each kernel the card has.
Plain script: prints one PASS/FAIL line per check and exits non-zero on any failure.

    python3 tests/gpu/test_flash_prefill.py [--skip-timing] [--only TAG] [--stages3]

Kernel tags: mma, wgmma (one head per CTA), wgmma2 (two heads of a GQA group per CTA; odd-group cases are
skipped, as the runtime never sends them there), and with --stages3 also wgmma-s3 and wgmma2-s4 (other
pipeline depths), wgmma2-qsmem (Q in shared memory, as before 2026-11-28) and wgmma2-eager (O rescaled on
every new running max: WG_LAZY_RESCALE=0), for timing A/B.

Needs torch (CUDA), cupy and numpy. The kernels are compiled with NVRTC, with common.cuh prepended, exactly
as the runtime does: flash_prefill.cu through cupy, flash_prefill_sm90.cu for sm_90a through libnvrtc
directly (scripts/nvrtc_check.py's compile_cubin; cupy cannot ask for the "a" target).

Every check builds fresh random inputs: qkv rows [q heads | k heads | v heads], a paged K/V cache whose
blocks are handed out in shuffled order (unused cache slots, unused block-table entries and a spare
"poison" block are filled with NaN, so reading anything outside a sequence's keys shows up as NaN), and
an output buffer filled with the NaN bit pattern 0xFFFF. Rows that no work-list tile covers (rows of
sequences left out of the work list, as decode rows are, and padding rows after the last sequence) must
still hold 0xFFFF afterwards. The reference is exact causal attention in float64 on the CPU from the same
bf16/f16 inputs, with K/V gathered through the block table.

Tolerance: |out - ref| <= ATOL + RTOL * |ref| elementwise, with
    bf16: ATOL = 1e-2, RTOL = 1e-2   (bf16 has 8 significant bits: one output rounding is up to 2^-9
                                      relative, and P is rounded to bf16 before the PV product)
    f16 : ATOL = 2e-3, RTOL = 2e-3   (11 significant bits)
Values are O(1) (randn inputs), so these are a few ulps of the output type.
"""
import math
import os
import sys
import tempfile

import numpy as np
import torch

try:
    import cupy as cp
except ImportError:  # lets the CPU parts of this file be imported without cupy
    cp = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = os.path.join(ROOT, "crates", "ironllm-cuda", "kernels")

# Launch configuration (must match the headers of flash_prefill.cu and flash_prefill_sm90.cu).
BLOCK_M = 64
THREADS = 128


class Variant:
    """One prefill kernel file: its kernels' name prefix and dynamic shared memory by head size."""

    def __init__(self, tag, file, prefix, smem, arch=None, options=(), heads=1):
        self.tag, self.file, self.prefix, self.smem, self.arch = tag, file, prefix, smem, arch
        self.options, self.heads = options, heads  # heads: query heads per CTA (128 threads each)
        self._module = None

    def module(self):
        if self._module is None:
            common = open(os.path.join(KERNELS, "common.cuh")).read()
            src = common + f'\n#line 1 "{self.file}"\n' + open(os.path.join(KERNELS, self.file)).read()
            if self.arch is None:
                self._module = cp.RawModule(code=src, options=("--std=c++17",), backend="nvrtc")
            else:
                sys.path.insert(0, os.path.join(ROOT, "scripts"))
                import nvrtc_check
                try:
                    lib = nvrtc_check.load_nvrtc()
                except SystemExit as e:  # a missing libnvrtc fails the checks, not the whole run
                    raise RuntimeError(str(e)) from None
                cubin = nvrtc_check.compile_cubin(lib, self.file, src, self.arch, self.options)
                # kept until the run ends: cupy may read the file only at the first get_function
                path = os.path.join(tempfile.mkdtemp(), self.file + ".cubin")
                with open(path, "wb") as f:
                    f.write(cubin)
                self._module = cp.RawModule(path=path)
        return self._module

    def function(self, dtype, hd):
        fn = self.module().get_function(f"{self.prefix}{DTYPE_NAME[dtype]}_hd{hd}")
        smem = self.smem(hd)
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
        return fn, smem


def wg_smem(hd, heads, stages):
    """WG_SMEM_BYTES of flash_prefill_sm90.cu (ops::flash_prefill_wg_smem): alignment slack, a Q tile per
    head, K and V tiles per stage, stages + 1 row tables."""
    return 1024 + (heads + 2 * stages) * 64 * hd * 2 + (stages + 1) * 64 * 4


MMA = Variant("mma", "flash_prefill.cu", "flash_prefill_", lambda hd: 0)
WGMMA = Variant("wgmma", "flash_prefill_sm90.cu", "flash_prefill_wg_", lambda hd: wg_smem(hd, 1, 2), arch="sm_90a")
# two heads of one KV head per CTA (even group sizes only)
WGMMA2 = Variant("wgmma2", "flash_prefill_sm90.cu", "flash_prefill_wg2_", lambda hd: wg_smem(hd, 2, 3),
                 arch="sm_90a", heads=2)
# A/B of the two-head kernel's pipeline depth (--stages3 adds it too): four stages instead of three
WGMMA2S4 = Variant("wgmma2-s4", "flash_prefill_sm90.cu", "flash_prefill_wg2_", lambda hd: wg_smem(hd, 2, 4),
                   arch="sm_90a", heads=2, options=("-DWG2_STAGES=4",))
# A/B of the pipeline depth (--stages3): one head per CTA with three stages (at hd128 only one CTA then
# fits an SM, against two with two stages)
WGMMA3 = Variant("wgmma-s3", "flash_prefill_sm90.cu", "flash_prefill_wg_", lambda hd: wg_smem(hd, 1, 3),
                 arch="sm_90a", options=("-DWG_STAGES=3",))
# A/B (--stages3 adds it too): Q read from shared memory by every S wgmma instead of held in registers
WGMMA2QS = Variant("wgmma2-qsmem", "flash_prefill_sm90.cu", "flash_prefill_wg2_", lambda hd: wg_smem(hd, 2, 3),
                   arch="sm_90a", heads=2, options=("-DWG_Q_REGS=0",))
# A/B (--stages3 adds it too): O rescaled on every new running max (WG_LAZY_RESCALE=0, the form before lazy rescale)
WGMMA2EAGER = Variant("wgmma2-eager", "flash_prefill_sm90.cu", "flash_prefill_wg2_",
                      lambda hd: wg_smem(hd, 2, 3), arch="sm_90a", heads=2, options=("-DWG_LAZY_RESCALE=0",))
KERNEL = MMA  # the variant the checks below launch

TOL = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "f16"}
POISON = -1  # int16 view of 0xFFFF: a NaN in both bf16 and f16


def to_cupy(t):
    """A CUDA copy of a CPU torch tensor as a cupy array (16-bit floats travel as int16)."""
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return cp.from_dlpack(t.cuda())


class Case:
    """Random inputs for one launch.

    seqs: list of (query_len, cached_prefix, listed). Sequences with listed=False own rows of qkv/out but
    get no work-list entries (as decode rows of a mixed batch): their output rows must stay poisoned.
    """

    def __init__(self, dtype, hd, nh, nkv, block_size, seqs, scale_mult=1.0, pad_rows=7, seed=0,
                 spare_bt_entries=2, key_ramp=0.0):
        g = torch.Generator().manual_seed(seed)
        self.dtype, self.hd, self.nh, self.nkv, self.bs = dtype, hd, nh, nkv, block_size
        self.seqs = seqs
        self.scale = scale_mult / math.sqrt(hd)
        qlens = [q for q, _, _ in seqs]
        self.qsl = [0]
        for q in qlens:
            self.qsl.append(self.qsl[-1] + q)
        self.ctx = [q + p for q, p, _ in seqs]
        n_rows = self.qsl[-1] + pad_rows
        width = (nh + 2 * nkv) * hd
        self.qkv = torch.randn(n_rows, width, generator=g).to(dtype)

        # Block tables over a shuffled pool; block 0 of the pool is the poison block (all NaN) that the
        # unused table entries point at.
        nblk = [(c + block_size - 1) // block_size for c in self.ctx]
        self.mbps = max(nblk) + spare_bt_entries
        num_blocks = sum(nblk) + 3
        perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
        bt = torch.zeros(len(seqs), self.mbps, dtype=torch.int32)
        it = iter(perm)
        for s, n in enumerate(nblk):
            for i in range(n):
                bt[s, i] = next(it)
        self.bt = bt

        nan = torch.full((num_blocks, nkv, block_size, hd), POISON, dtype=torch.int16).view(dtype)
        self.k_cache = nan.clone()
        self.v_cache = nan.clone()
        for s, (q, past, _) in enumerate(seqs):
            ctx = self.ctx[s]
            rows = self.qkv[self.qsl[s]:self.qsl[s] + q]
            k_new = rows[:, nh * hd:(nh + nkv) * hd].reshape(q, nkv, hd)
            v_new = rows[:, (nh + nkv) * hd:].reshape(q, nkv, hd)
            k_all = torch.cat([torch.randn(past, nkv, hd, generator=g).to(dtype), k_new])
            if key_ramp:  # keys grow along the sequence, so each row's max keeps rising tile after tile
                k_all = (k_all.float() * (1 + key_ramp * torch.arange(ctx) / ctx)[:, None, None]).to(dtype)
                rows[:, nh * hd:(nh + nkv) * hd] = k_all[past:].reshape(q, nkv * hd)
            v_all = torch.cat([torch.randn(past, nkv, hd, generator=g).to(dtype), v_new])
            pos = torch.arange(ctx)
            blocks = bt[s, pos // block_size].long()
            self.k_cache[blocks, :, pos % block_size] = k_all
            self.v_cache[blocks, :, pos % block_size] = v_all

        tiles = []
        for s, (q, _, listed) in enumerate(seqs):
            if listed:
                for m0 in range(0, q, BLOCK_M):
                    tiles += [s, m0]
        self.tiles = torch.tensor(tiles, dtype=torch.int32)
        self.num_tiles = len(tiles) // 2
        self.n_rows = n_rows

    def gather(self, cache, s):
        """K or V of sequence s, [ctx, nkv, hd], read through the block table."""
        pos = torch.arange(self.ctx[s])
        blocks = self.bt[s, pos // self.bs].long()
        return cache[blocks, :, pos % self.bs]

    def reference(self, s, heads=None):
        """float64 attention output of listed sequence s: [q, nh, hd] (only `heads` filled if given)."""
        q, past, _ = self.seqs[s]
        ctx, hd, nh, nkv = self.ctx[s], self.hd, self.nh, self.nkv
        Q = self.qkv[self.qsl[s]:self.qsl[s] + q, :nh * hd].double().reshape(q, nh, hd)
        K = self.gather(self.k_cache, s).double()
        V = self.gather(self.v_cache, s).double()
        mask = torch.arange(ctx)[None, :] > (past + torch.arange(q))[:, None]
        out = torch.zeros(q, nh, hd, dtype=torch.float64)
        grp = nh // nkv
        for h in heads if heads is not None else range(nh):
            S = (Q[:, h] @ K[:, h // grp].T) * self.scale
            S.masked_fill_(mask, -math.inf)
            out[:, h] = torch.softmax(S, dim=-1) @ V[:, h // grp]
        return out

    def device_args(self):
        """(out_torch_cuda_int16, kernel args tuple, grid)."""
        out = torch.full((self.n_rows, self.nh * self.hd), POISON, dtype=torch.int16, device="cuda")
        self._keep = [to_cupy(self.qkv), to_cupy(self.k_cache), to_cupy(self.v_cache),
                      to_cupy(self.bt), to_cupy(torch.tensor(self.qsl, dtype=torch.int32)),
                      to_cupy(torch.tensor(self.ctx, dtype=torch.int32)),
                      to_cupy(self.tiles if self.num_tiles else torch.zeros(2, dtype=torch.int32))]
        qkv, kc, vc, bt, qsl, ctx, tiles = self._keep
        args = (cp.from_dlpack(out), qkv, kc, vc, bt, qsl, ctx, tiles, np.int32(self.num_tiles),
                np.int32(self.nh), np.int32(self.nkv), np.int32(self.bs), np.int32(self.mbps),
                np.float32(self.scale))
        grid = (self.num_tiles, self.nh // KERNEL.heads, 1)
        return out, args, grid

    def run(self):
        """Launches the kernel once; returns the output as a CPU tensor of the element type."""
        out, args, grid = self.device_args()
        if self.num_tiles:
            fn, smem = KERNEL.function(self.dtype, self.hd)
            fn(grid, (THREADS * KERNEL.heads, 1, 1), args, shared_mem=smem)
        torch.cuda.synchronize()
        return out.cpu()


def check_output(case, out_i16, heads=None):
    """(ok, max_abs_err, worst err/tol ratio, message)."""
    atol, rtol = TOL[case.dtype]
    out = out_i16.view(case.dtype).double().reshape(case.n_rows, case.nh, case.hd)
    written = torch.zeros(case.n_rows, dtype=torch.bool)
    max_err, worst, msgs = 0.0, 0.0, []
    for s, (q, past, listed) in enumerate(case.seqs):
        if not listed:
            continue
        r0 = case.qsl[s]
        written[r0:r0 + q] = True
        ref = case.reference(s, heads)
        got = out[r0:r0 + q]
        if heads is not None:
            ref, got = ref[:, heads], got[:, heads]
        if torch.isnan(got).any():
            bad = torch.isnan(got).nonzero()[0].tolist()
            msgs.append(f"seq {s}: NaN in output (row {bad[0]}, head {bad[1]})")
            max_err = worst = math.inf
            continue
        err = (got - ref).abs()
        ratio = err / (atol + rtol * ref.abs())
        max_err = max(max_err, err.max().item())
        if ratio.max().item() > worst:
            worst = ratio.max().item()
            if worst > 1.0:
                idx = (ratio == ratio.max()).nonzero()[0].tolist()
                msgs.append(f"seq {s} (q={q}, past={past}): worst at row {idx[0]} head {idx[1]} dim {idx[2]}: "
                            f"got {got[tuple(idx)].item():.5f} ref {ref[tuple(idx)].item():.5f}")
    untouched = out_i16[~written]
    n_clobbered = (untouched != POISON).any(dim=1).sum().item() if untouched.numel() else 0
    if n_clobbered:
        msgs.append(f"{n_clobbered} rows that must not be written were written")
    ok = worst <= 1.0 and n_clobbered == 0
    return ok, max_err, worst, "; ".join(msgs)


class Results:
    def __init__(self):
        self.n_pass = self.n_fail = 0

    def record(self, name, ok, max_err, worst, msg=""):
        tag = "PASS" if ok else "FAIL"
        print(f"{tag} {KERNEL.tag} {name}: max_abs_err={max_err:.3e} err/tol={worst:.3f}" + (f"  [{msg}]" if msg else ""),
              flush=True)
        if ok:
            self.n_pass += 1
        else:
            self.n_fail += 1


def run_check(res, name, heads=None, **kw):
    if (kw["nh"] // kw["nkv"]) % KERNEL.heads:
        return True  # a kernel with two heads per CTA takes even groups only (the runtime's rule too)
    try:
        case = Case(**kw)
        out = case.run()
        ok, max_err, worst, msg = check_output(case, out, heads)
    except Exception as e:  # a launch failure fails the check (and usually every later one)
        ok, max_err, worst, msg = False, math.inf, math.inf, f"{type(e).__name__}: {e}"
    res.record(name, ok, max_err, worst, msg)
    return ok


def timing(res, name, dtype, hd, nh, nkv, block_size, n_seqs, qlen, check_heads):
    """Median of 20 timed launches after warm-up, with a spot check of a few heads."""
    case = Case(dtype=dtype, hd=hd, nh=nh, nkv=nkv, block_size=block_size, seqs=[(qlen, 0, True)] * n_seqs,
                seed=1234, pad_rows=0)
    out, args, grid = case.device_args()
    if (nh // nkv) % KERNEL.heads:
        return  # as run_check: the two-head kernel takes even groups only
    fn, smem = KERNEL.function(dtype, hd)
    launch = lambda: fn(grid, (THREADS * KERNEL.heads, 1, 1), args, shared_mem=smem)
    for _ in range(5):
        launch()
    torch.cuda.synchronize()
    ok, max_err, worst, msg = check_output(case, out.cpu(), heads=check_heads)
    res.record(f"{name} correctness (heads {check_heads}, seqs checked: all)", ok, max_err, worst, msg)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        launch()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    ms = float(np.median(times))
    flops = 4.0 * qlen * qlen * hd * nh / 2 * n_seqs
    line = f"TIME {KERNEL.tag} {name}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s (causal, 4*q*ctx*hd*heads/2)"
    # informational: torch's own SDPA on the same (contiguous, unpaged) shapes
    try:
        q = torch.randn(n_seqs, nh, qlen, hd, device="cuda", dtype=dtype)
        k = torch.randn(n_seqs, nkv, qlen, hd, device="cuda", dtype=dtype)
        v = torch.randn(n_seqs, nkv, qlen, hd, device="cuda", dtype=dtype)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        for _ in range(5):
            sdpa()
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            sdpa()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        ms2 = float(np.median(ts))
        line += f" | torch sdpa: {ms2:.3f} ms, {flops / ms2 / 1e9:.1f} TFLOP/s"
    except Exception as e:
        line += f" | torch sdpa unavailable ({type(e).__name__})"
    print(line, flush=True)


def main():
    global KERNEL
    skip_timing = "--skip-timing" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    variants = [MMA]
    if torch.cuda.get_device_capability() == (9, 0):
        variants += [WGMMA, WGMMA2]
        if "--stages3" in sys.argv:
            variants += [WGMMA3, WGMMA2S4, WGMMA2QS, WGMMA2EAGER]
    res = Results()
    for v in variants:
        if only is None or v.tag == only:
            KERNEL = v
            run_all(res, skip_timing)
    print(f"{res.n_pass} passed, {res.n_fail} failed")
    sys.exit(1 if res.n_fail else 0)


def run_all(res, skip_timing):
    bf, fp = torch.bfloat16, torch.float16
    combos = [(bf, 64), (bf, 128), (fp, 64), (fp, 128)]
    seed = 100

    # 1. query lengths around BLOCK_M, no cached prefix, GQA 4, block_size 16
    for dt, hd in combos:
        for q in (1, 17, 63, 64, 65, 300):
            seed += 1
            run_check(res, f"{DTYPE_NAME[dt]} hd{hd} qlen={q} past=0 gqa=4 bs=16", dtype=dt, hd=hd, nh=8, nkv=2,
                      block_size=16, seqs=[(q, 0, True)], seed=seed)

    # 2. chunked prefill: cached prefixes
    for dt, hd in combos:
        for past in (0, 5, 16, 100):
            for q in (1, 17, 65, 300):
                seed += 1
                run_check(res, f"{DTYPE_NAME[dt]} hd{hd} qlen={q} past={past} gqa=4 bs=16", dtype=dt, hd=hd,
                          nh=8, nkv=2, block_size=16, seqs=[(q, past, True)], seed=seed)

    # 3. GQA group sizes
    for dt, hd in combos:
        for nh, nkv in ((4, 4), (8, 2), (16, 2)):
            seed += 1
            run_check(res, f"{DTYPE_NAME[dt]} hd{hd} gqa={nh // nkv} (heads {nh}/{nkv}) qlen=100 past=16 bs=16",
                      dtype=dt, hd=hd, nh=nh, nkv=nkv, block_size=16, seqs=[(100, 16, True)], seed=seed)

    # 4. block sizes (tiles spanning many blocks, and blocks larger than a tile)
    for dt, hd in ((bf, 128), (fp, 64)):
        for bs in (1, 16, 32, 64, 7, 256):
            seed += 1
            run_check(res, f"{DTYPE_NAME[dt]} hd{hd} bs={bs} qlen=130 past=37 gqa=4", dtype=dt, hd=hd, nh=8,
                      nkv=2, block_size=bs, seqs=[(130, 37, True)], seed=seed)

    # 5. several sequences per launch (shuffled block tables), interleaved with rows that are not in the
    #    work list (decode rows): those must stay poisoned
    mixed = [(300, 0, True), (1, 40, False), (65, 100, True), (1, 0, True), (3, 7, False), (17, 5, True),
             (64, 16, True), (128, 64, True), (63, 0, True), (1, 200, False), (200, 333, True)]
    for dt, hd in combos:
        for bs in (16, 32):
            seed += 1
            run_check(res, f"{DTYPE_NAME[dt]} hd{hd} multi-seq x{len(mixed)} (3 unlisted) gqa=4 bs={bs}",
                      dtype=dt, hd=hd, nh=8, nkv=2, block_size=bs, seqs=mixed, seed=seed)

    # 6. peaked softmax (large logits): exercises the running-max rescaling
    for dt, hd in combos:
        seed += 1
        run_check(res, f"{DTYPE_NAME[dt]} hd{hd} scale x8 qlen=300 past=100 gqa=4 bs=16", dtype=dt, hd=hd, nh=8,
                  nkv=2, block_size=16, seqs=[(300, 100, True), (129, 0, True)], scale_mult=8.0, seed=seed)

    # 6b. rising logits: the running max grows by more than 2^8 over some tiles and less over others, so
    #     both branches of the lazy rescale (WG_LAZY_RESCALE) run within one row
    for dt, hd in combos:
        seed += 1
        run_check(res, f"{DTYPE_NAME[dt]} hd{hd} rising keys x2 qlen=300 past=200 gqa=4 bs=16", dtype=dt, hd=hd,
                  nh=8, nkv=2, block_size=16, seqs=[(300, 200, True), (129, 0, True)], scale_mult=2.0,
                  key_ramp=6.0, seed=seed)

    # 7. long sequences
    seed += 1
    run_check(res, "bf16 hd128 long qlen=4096 past=0 gqa=4 bs=16", dtype=bf, hd=128, nh=8, nkv=2, block_size=16,
              seqs=[(4096, 0, True)], seed=seed)
    seed += 1
    run_check(res, "f16 hd64 long qlen=4096 past=100 gqa=8 bs=32", dtype=fp, hd=64, nh=8, nkv=1, block_size=32,
              seqs=[(4096, 100, True)], seed=seed)

    # 8. timing (informational), Llama-3-8B attention shape
    if not skip_timing:
        try:
            timing(res, "bf16 hd128 1x4096 heads 32/8 bs=16", bf, 128, 32, 8, 16, 1, 4096, [0, 13, 31])
            timing(res, "bf16 hd128 8x1024 heads 32/8 bs=16", bf, 128, 32, 8, 16, 8, 1024, [0, 31])
        except Exception as e:
            res.record("timing run", False, math.inf, math.inf, f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
