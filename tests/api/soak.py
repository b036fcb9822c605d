"""Soak harness: many mixed requests against a running server, with random client disconnects
(mid-stream, and while waiting for a JSON answer) and a few invalid requests. Every answer must be
the expected one — never a 5xx — and the harness returns counts for the caller to check.

Run it alone against a server: python tests/api/soak.py --url http://127.0.0.1:8000 -n 1000
It only talks to the URL it is given and stops after -n requests.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def quicksort(arr):",
    "List three fruits:",
    "Explain gravity in one sentence.",
    "1, 2, 3, 4,",
]


def one_request(url: str, rng: random.Random) -> str:
    """Sends one random request; returns its kind, raising AssertionError on a wrong answer."""
    kind = rng.choices(
        ["complete", "long", "chat_stream", "stream_disconnect", "timeout_disconnect", "chat_n", "invalid"],
        weights=[30, 5, 20, 20, 10, 10, 5],
    )[0]
    prompt = rng.choice(PROMPTS)
    max_tokens = rng.randint(1, 16)
    with httpx.Client(base_url=url, timeout=120) as h:
        if kind == "complete":
            stream = rng.random() < 0.5
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7]), "stream": stream}
            if stream:
                with h.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200, r.read()
                    lines = [line for line in r.iter_lines() if line]
                assert lines[-1] == "data: [DONE]", lines[-3:]
            else:
                r = h.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        elif kind == "long":
            # Long enough that a small KV cache runs out and requests get preempted.
            body = {"prompt": prompt, "max_tokens": 120, "ignore_eos": True, "temperature": 0}
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 120
        elif kind == "chat_stream":
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True}
            with h.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                lines = [line for line in r.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
        elif kind == "stream_disconnect":
            body = {"prompt": prompt, "max_tokens": 500, "ignore_eos": True, "stream": True}
            with h.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for _ in range(rng.randint(0, 6)):
                    next(lines)
            # Leaving the block closes the connection mid-stream.
        elif kind == "timeout_disconnect":
            body = {"prompt": prompt, "max_tokens": 500, "ignore_eos": True}
            try:
                h.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 0.5))
            except httpx.TimeoutException:
                pass
        elif kind == "chat_n":
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "n": 2,
                "temperature": 0.8,
            }
            r = h.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"]) == 2
        else:
            body = rng.choice([{"prompt": ""}, {"prompt": "x", "top_p": 7}, {"messages": 3}, {"prompt": [10**9]}])
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = h.post(path, json=body)
            assert 400 <= r.status_code < 500, r.text
    return kind


def run_soak(url: str, n: int, concurrency: int = 16, seed: int = 0) -> Counter:
    """Runs `n` requests with `concurrency` clients; returns how many of each kind ran."""
    lock = threading.Lock()
    master = random.Random(seed)
    seeds = [master.randrange(2**32) for _ in range(n)]
    counts: Counter = Counter()

    def task(i: int) -> None:
        kind = one_request(url, random.Random(seeds[i]))
        with lock:
            counts[kind] += 1

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(task, i) for i in range(n)]:
            f.result()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    counts = run_soak(args.url, args.n, args.concurrency, args.seed)
    print(f"{sum(counts.values())} requests in {time.time() - t0:.1f}s: {dict(counts)}")


if __name__ == "__main__":
    main()
