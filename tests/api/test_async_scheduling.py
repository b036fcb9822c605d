"""Async scheduling (`--async-scheduling`) over HTTP: a server that plans step N+1 before applying step
N answers exactly as the shared synchronous server does — greedy and seeded sampled completions (with
logprobs, penalties, stop strings, `n` > 1), streaming and non-streaming, chat, JSON-schema output, and
many concurrent requests — and a client that disconnects mid-stream still frees its KV blocks at once.
With speculative decoding the flag is refused at start-up with a message naming both flags.

The synchronous server is the oracle: async scheduling changes when the host does its work, never
which tokens come out. Both serve the same default model. (The whole API suite also passes against an
async server: `IRONLLM_API_ARGS=--async-scheduling bash scripts/api_tests.sh --deselect
tests/api/test_spec_decode.py`.)"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from apiutil import BIN, MODEL_ARGS, MODEL_NAME, Server, free_port, metrics, wait_idle

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.\n",
    "def fibonacci(n):",
    "List three colors:",
]


@pytest.fixture(scope="module")
def async_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("async_server") / "server.log"
    s = Server(["--async-scheduling"], log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def async_client(async_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=async_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def completion(client, prompt, **kw):
    kw.setdefault("max_tokens", 40)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, **kw)
    return [(c.text, c.finish_reason, c.logprobs.token_logprobs if c.logprobs else None) for c in r.choices], r.usage


def streamed_text(client, prompt, **kw):
    chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, max_tokens=40, **kw)
    text, finish = "", None
    for c in chunks:
        if c.choices:
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
    return text, finish


def test_greedy_and_seeded_completions_equal_the_sync_server(client, async_client):
    variants = [
        {"temperature": 0},
        {"temperature": 0, "logprobs": 3},
        {"temperature": 0.9, "top_p": 0.9, "seed": 7, "logprobs": 2},
        {"temperature": 1.0, "seed": 11, "n": 3, "presence_penalty": 0.5, "frequency_penalty": 0.3},
        {"temperature": 0, "stop": ["\n\n", "."], "max_tokens": 60},
        {"temperature": 0.7, "seed": 3, "extra_body": {"repetition_penalty": 1.2, "min_tokens": 8}},
    ]
    for prompt in PROMPTS:
        for kw in variants:
            ref = completion(client, prompt, **kw)
            got = completion(async_client, prompt, **kw)
            assert got == ref, (prompt, kw)


def test_streaming_and_chat_equal_the_sync_server(client, async_client):
    for prompt in PROMPTS:
        assert streamed_text(async_client, prompt, temperature=0) == streamed_text(client, prompt, temperature=0)
    messages = [{"role": "user", "content": "Name two planets."}]
    ref = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=32)
    got = async_client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=32)
    assert got.choices[0].message.content == ref.choices[0].message.content
    assert got.usage == ref.usage


def test_json_schema_output_equals_the_sync_server(client, async_client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    kw = dict(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=48,
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    ref = client.chat.completions.create(**kw)
    got = async_client.chat.completions.create(**kw)
    assert got.choices[0].message.content == ref.choices[0].message.content


def test_concurrent_requests_equal_the_sync_server(client, async_client):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(24)]

    def run(c):
        with ThreadPoolExecutor(max_workers=24) as pool:
            return list(pool.map(lambda p: completion(c, p, temperature=0, max_tokens=24), prompts))

    assert run(async_client) == run(client)


def test_stream_disconnect_frees_blocks(async_server):
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=async_server.url, timeout=60) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert metrics(async_server.url)["vllm:kv_cache_usage_perc"] > 0
    t0 = time.time()
    after = wait_idle(async_server.url, timeout=5)
    assert time.time() - t0 < 5
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_async_scheduling_with_speculative_decoding_is_refused():
    cmd = [str(BIN), "serve", *MODEL_ARGS, "--port", str(free_port()), "--async-scheduling",
           "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "--async-scheduling" in p.stderr + p.stdout and "--speculative-config" in p.stderr + p.stdout
