"""Fuzz pass over the generation endpoints' JSON bodies: only 2xx/4xx answers, never 5xx, and the
server stays healthy and returns to idle. IRONLLM_FUZZ_N and IRONLLM_FUZZ_SEED change the run."""

import os

import httpx

from apiutil import wait_idle
from fuzz import run_fuzz


def test_fuzz_bodies(server):
    n = int(os.environ.get("IRONLLM_FUZZ_N", "400"))
    seed = int(os.environ.get("IRONLLM_FUZZ_SEED", "20261127"))
    counts = run_fuzz(server.url, n=n, seed=seed, concurrency=4, timeout=5.0)
    assert sum(counts.values()) == n
    assert counts["400"] > n // 4, counts
    assert counts["200"] > n // 10, counts
    assert not any(k.startswith("5") for k in counts), counts
    assert httpx.get(server.url + "/health").status_code == 200
    wait_idle(server.url, timeout=30)
    print(f"fuzz: {dict(sorted(counts.items()))}")
