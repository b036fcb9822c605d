"""Soak: a few hundred mixed requests with random disconnects on a server with a small KV cache
and a short context (so requests are preempted too). Afterwards nothing runs or waits, the KV cache is empty, the server
still answers, and its memory did not keep growing."""

import httpx

from apiutil import metrics, wait_idle
from soak import run_soak


def test_soak_with_random_disconnects(start_server):
    s = start_server("--kv-cache-memory-bytes", "32MiB", "--max-model-len", "512")
    run_soak(s.url, n=150, concurrency=16, seed=1)  # warm-up: caches, thread pools, KV pages
    wait_idle(s.url)
    rss_warm = s.rss_bytes()
    counts = run_soak(s.url, n=150, concurrency=16, seed=2)
    wait_idle(s.url)
    rss_mid = s.rss_bytes()
    counts += run_soak(s.url, n=150, concurrency=16, seed=3)
    assert sum(counts.values()) == 300
    assert counts["stream_disconnect"] > 20 and counts["timeout_disconnect"] > 10
    m = wait_idle(s.url, timeout=30)
    assert m["vllm:num_requests_running"] == 0
    assert m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:request_success_total"] > 300
    rss_end = s.rss_bytes()
    # Memory settles: the second half of the soak adds (almost) nothing.
    assert rss_end - rss_warm < 64 << 20, (rss_warm, rss_mid, rss_end)
    assert rss_end - rss_mid < 16 << 20, (rss_warm, rss_mid, rss_end)
    assert httpx.get(s.url + "/health").status_code == 200
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    print(f"soak: {dict(counts)}; RSS {rss_warm >> 20} -> {rss_mid >> 20} -> {rss_end >> 20} MiB; "
          f"preemptions {metrics(s.url).get('vllm:num_preemptions_total')}")
