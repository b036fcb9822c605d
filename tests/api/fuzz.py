"""Fuzz harness for the JSON bodies of /v1/completions and /v1/chat/completions (and, lightly,
/tokenize and /detokenize): valid bodies mutated at random — values of the wrong type, out of range,
huge or deeply nested, fields dropped or added, broken JSON, non-object JSON. The server must answer
every one with 2xx or 4xx (never 5xx, never a hang) and stay healthy.

Run it alone against a server: python tests/api/fuzz.py --url http://127.0.0.1:8000 -n 2000 --seed 7
It only talks to the URL it is given and stops after -n bodies.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

COMPLETION = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "prompt": "Hello there",
    "max_tokens": 4,
    "temperature": 0.7,
    "top_p": 0.9,
    "n": 1,
    "stream": False,
    "logprobs": 2,
    "echo": False,
    "stop": ["\n\n"],
    "seed": 3,
    "presence_penalty": 0.1,
    "frequency_penalty": 0.1,
    "logit_bias": {"100": 1.5},
    "user": "fuzzer",
    "best_of": 1,
    "top_k": 10,
    "min_p": 0.05,
    "repetition_penalty": 1.05,
    "ignore_eos": False,
    "min_tokens": 0,
    "stop_token_ids": [2],
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
    "prompt_logprobs": 1,
    "allowed_token_ids": [100, 200, 300],
    "bad_words": ["zebra"],
    "truncate_prompt_tokens": 50,
    "add_special_tokens": True,
    "response_format": {"type": "text"},
    "priority": 0,
    "return_token_ids": True,
}

CHAT = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ],
    "max_completion_tokens": 4,
    "max_tokens": 4,
    "temperature": 0.5,
    "top_p": 0.95,
    "n": 1,
    "stream": False,
    "logprobs": True,
    "top_logprobs": 2,
    "stop": "\n",
    "seed": 1,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "none",
    "chat_template_kwargs": {"x": 1},
    "add_generation_prompt": True,
    "continue_final_message": False,
    "echo": False,
    "documents": [{"title": "t", "text": "d"}],
    "top_k": 5,
    "min_tokens": 1,
    "ignore_eos": False,
    "response_format": {"type": "text"},
}

TOKENIZE = {"prompt": "Hello", "add_special_tokens": True, "return_token_strs": True}
TOKENIZE_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True}
DETOKENIZE = {"tokens": [100, 200, 300]}

ENDPOINTS = [
    ("/v1/completions", COMPLETION, 45),
    ("/v1/chat/completions", CHAT, 45),
    ("/tokenize", TOKENIZE, 3),
    ("/tokenize", TOKENIZE_CHAT, 3),
    ("/detokenize", DETOKENIZE, 4),
]


def rand_string(rng: random.Random) -> str:
    return rng.choice(
        [
            "",
            "x",
            "\u0000\u0001\u001f",
            "ünïcødé ✓ 漢字 🙂",
            "\ud7ff\ue000",
            "a" * rng.choice([100, 5000, 100_000]),
            "<|im_start|>assistant\n",
            "{{ raise_exception('boom') }}",
            "null",
            "-1",
            "1e309",
            " " * 50,
        ]
    )


def rand_number(rng: random.Random):
    return rng.choice(
        [0, 1, -1, 2, 7, 21, 100, 2048, 4096, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**30,
         0.0, -0.0, 0.5, 1.5, -2.5, 1e-320, 1e308, -1e308, 3.14159]
    )


def rand_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rand_number(rng)
    if kind == 3:
        return rand_string(rng)
    if kind == 4:
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 5:
        return {rand_string(rng)[:20] or "k": rand_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return rng.choice([[1, 2, 3], [[1], [2]], ["a", 1], [{"role": "user"}], {"type": "json_schema"}, [[]], [-1]])


def rand_message(rng: random.Random):
    role = rng.choice(["user", "assistant", "system", "tool", "developer", "", None, 5])
    content = rng.choice(
        [
            rand_string(rng),
            None,
            [{"type": "text", "text": rand_string(rng)}],
            [{"type": "image_url", "image_url": {"url": "http://x"}}],
            [{"type": rand_string(rng)}],
            rand_value(rng, 2),
        ]
    )
    msg = {"role": role, "content": content}
    if rng.random() < 0.2:
        msg["tool_calls"] = rng.choice(
            [[{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{bad json"}}], rand_value(rng, 2)]
        )
    if rng.random() < 0.2:
        del msg["role"]
    return msg


def mutate(rng: random.Random, base: dict) -> dict:
    body = copy.deepcopy(base)
    # Start from a random subset of the valid fields.
    for k in list(body):
        if k not in ("prompt", "messages", "tokens") and rng.random() < 0.5:
            del body[k]
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        keys = list(body) or ["prompt"]
        if op == 0:
            body[rng.choice(keys)] = rand_value(rng)
        elif op == 1 and body:
            del body[rng.choice(keys)]
        elif op == 2:
            body[rand_string(rng)[:30] or "extra"] = rand_value(rng)
        elif op == 3 and "messages" in body:
            body["messages"] = [rand_message(rng) for _ in range(rng.randrange(4))]
        elif op == 4 and "prompt" in body:
            body["prompt"] = rng.choice(
                [[rng.randrange(-5, 60000) for _ in range(rng.randrange(6))], [rand_string(rng)], [[1, 2], [3]],
                 [[]], rand_value(rng)]
            )
        elif op == 5:
            k = rng.choice(keys)
            body[k] = rng.choice([[body.get(k)], {"v": body.get(k)}, str(body.get(k))])
    return body


def raw_body(rng: random.Random, body: dict) -> bytes:
    """Mostly the JSON of `body`; sometimes broken JSON or JSON that is not an object."""
    text = json.dumps(body)
    r = rng.random()
    if r < 0.80:
        return text.encode()
    if r < 0.84:
        return text[: rng.randrange(len(text) + 1)].encode()
    if r < 0.87:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if r < 0.90:
        depth = rng.choice([10, 200, 5000])
        return ('{"prompt": ' + "[" * depth + "1" + "]" * depth + "}").encode()
    if r < 0.93:
        return rng.choice([b"[]", b"null", b"42", b'"x"', b"true", b"{}"])
    if r < 0.96:
        return text.replace("0.", "NaN", 1).replace("4", "Infinity", 1).encode()
    return text.replace(":", ":1e999999,\"z\":", 1).encode()


def check_response(path: str, status: int, content: bytes, streamed: bool) -> None:
    assert status < 500, f"{path}: {status} {content[:500]!r}"
    if 400 <= status < 500:
        err = json.loads(content)["error"]
        assert isinstance(err["message"], str) and err["code"] == status, content[:500]
    elif status == 200 and not streamed:
        json.loads(content)


def one_body(url: str, rng: random.Random, timeout: float) -> str:
    path, base, _ = rng.choices(ENDPOINTS, weights=[w for _, _, w in ENDPOINTS])[0]
    body = mutate(rng, base)
    data = raw_body(rng, body)
    stream = isinstance(body, dict) and body.get("stream") is True
    try:
        with httpx.Client(base_url=url, timeout=timeout) as h:
            with h.stream("POST", path, content=data, headers={"content-type": "application/json"}) as r:
                content = r.read()
                streamed = r.headers.get("content-type", "").startswith("text/event-stream")
                check_response(path, r.status_code, content, streamed)
                if streamed:
                    assert content.rstrip().endswith(b"data: [DONE]"), content[-300:]
                return f"{r.status_code}"
    except httpx.TimeoutException:
        # A long generation: the client gives up, which also exercises aborts.
        return "timeout"


def run_fuzz(url: str, n: int, seed: int = 0, concurrency: int = 4, timeout: float = 5.0) -> Counter:
    master = random.Random(seed)
    seeds = [master.randrange(2**32) for _ in range(n)]
    counts: Counter = Counter()
    lock = threading.Lock()

    def task(i: int) -> None:
        outcome = one_body(url, random.Random(seeds[i]), timeout)
        with lock:
            counts[outcome] += 1

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(task, i) for i in range(n)]:
            f.result()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    counts = run_fuzz(args.url, args.n, args.seed, args.concurrency)
    print(f"{sum(counts.values())} bodies: {dict(sorted(counts.items()))}")
    assert httpx.get(args.url + "/health", timeout=10).status_code == 200


if __name__ == "__main__":
    main()
