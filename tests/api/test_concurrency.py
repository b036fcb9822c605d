"""64 concurrent streaming requests: each must produce exactly the tokens it produces when run alone
(greedy), whatever else shares the batch."""

from concurrent.futures import ThreadPoolExecutor

import httpx

from apiutil import sse_events, wait_idle

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "import numpy as np\n",
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
    "In 1969, astronauts",
]
MAX_TOKENS = 24


def body(prompt, stream):
    return {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }


def test_64_concurrent_streams_match_solo_runs(server):
    with httpx.Client(base_url=server.url, timeout=300) as h:
        solo = {}
        for p in PROMPTS:
            c = h.post("/v1/completions", json=body(p, False)).json()["choices"][0]
            solo[p] = (c["token_ids"], c["text"])

    def run(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        with httpx.Client(base_url=server.url, timeout=300) as h:
            with h.stream("POST", "/v1/completions", json=body(prompt, True)) as r:
                assert r.status_code == 200
                events = sse_events(r)
        assert events[-1] == "[DONE]"
        ids, text, finish = [], "", None
        for e in events[:-1]:
            c = e["choices"][0]
            ids += c["token_ids"]
            text += c["text"]
            finish = c["finish_reason"] or finish
        return prompt, ids, text, finish

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(run, range(64)))
    assert len(results) == 64
    for prompt, ids, text, finish in results:
        assert finish == "length"
        assert len(ids) == MAX_TOKENS
        assert (ids, text) == solo[prompt], prompt
    wait_idle(server.url)
