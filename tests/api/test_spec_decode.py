"""Speculative decoding (`--speculative-config`, n-gram prompt lookup) over HTTP: greedy output of a
speculating server equals, token for token, that of the shared plain server (non-streaming, streaming,
several prompts in one batch, concurrent requests); its `/metrics` carries vLLM's
`vllm:spec_decode_*` counters with consistent values; a config ironllm cannot serve stops `serve`
at once with a message naming the flag and the reason.

Speculation may change how many tokens a step computes, never which tokens greedy decoding picks, so
the plain server is the oracle. Both serve the same default model."""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import apiutil
from apiutil import BIN, MODEL_ARGS, MODEL_NAME, Server, free_port, wait_idle

NUM_SPECULATIVE_TOKENS = 3
SPEC_CONFIG = {
    "method": "ngram",
    "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
    "prompt_lookup_min": 2,
    "prompt_lookup_max": 4,
}

# Prompts whose continuation repeats earlier text, so prompt lookup finds n-grams to propose.
DAYS = "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday."
FRUITS = "apple, banana, cherry, date, elderberry, fig, grape, honeydew"
PROMPTS = [
    f"The days of the week: {DAYS}\nAgain: {DAYS}\nOnce more: Monday, Tuesday,",
    f"Fruits: {FRUITS}.\nThe same list again: {FRUITS}.\nAnd once more: apple, banana,",
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef",
]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    """A second `ironllm serve` with n-gram speculation, stopped when this module's tests end."""
    log = tmp_path_factory.mktemp("spec_server") / "server.log"
    s = Server(["--speculative-config", json.dumps(SPEC_CONFIG)], log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def spec_client(spec_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=spec_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(client, prompt, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    return client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, **kw)


def streamed(client, prompt, **kw):
    """The text, finish reason and usage of a streamed greedy completion."""
    chunks = list(greedy(client, prompt, stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finishes, chunks[-1].usage


def test_greedy_completions_equal_the_plain_server(client, spec_client):
    for prompt in PROMPTS:
        ref = greedy(client, prompt)
        got = greedy(spec_client, prompt)
        assert got.choices[0].text == ref.choices[0].text, prompt
        assert got.choices[0].finish_reason == ref.choices[0].finish_reason, prompt
        assert got.usage == ref.usage, prompt


def test_greedy_to_max_tokens_equals_the_plain_server(client, spec_client):
    # ignore_eos keeps both generating for all MAX_TOKENS tokens, so the comparison covers every
    # verification round up to the length limit (drafts must be cut at max_tokens).
    for prompt in PROMPTS[:2]:
        ref = greedy(client, prompt, extra_body={"ignore_eos": True})
        got = greedy(spec_client, prompt, extra_body={"ignore_eos": True})
        assert ref.usage.completion_tokens == MAX_TOKENS
        assert got.choices[0].text == ref.choices[0].text, prompt
        assert got.choices[0].finish_reason == "length"
        assert got.usage == ref.usage, prompt


def test_streaming_equals_the_plain_server(client, spec_client):
    for prompt in PROMPTS:
        ref = greedy(client, prompt)
        text, finishes, usage = streamed(spec_client, prompt)
        assert text == ref.choices[0].text, prompt
        assert finishes == [ref.choices[0].finish_reason], prompt
        assert usage == ref.usage, prompt


def test_batched_prompts_equal_the_plain_server(client, spec_client):
    # One request with several prompts: they share steps, with and without drafts side by side.
    prompts = [*PROMPTS, "The capital of France is"]
    ref = greedy(client, prompts)
    got = greedy(spec_client, prompts)
    ref_texts = [c.text for c in sorted(ref.choices, key=lambda c: c.index)]
    got_texts = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
    assert got_texts == ref_texts


def test_concurrent_requests_equal_the_plain_server(client, spec_client):
    prompts = PROMPTS * 2
    refs = [greedy(client, p).choices[0].text for p in PROMPTS]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        got = list(pool.map(lambda p: greedy(spec_client, p).choices[0].text, prompts))
    assert got == refs * 2


def spec_samples(url: str) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """The `vllm:spec_decode_*` samples: totals by name, per-position counts by position, and the raw
    per-position lines (to check their labels)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    totals: dict[str, float] = {}
    per_pos: dict[str, float] = {}
    per_pos_lines: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^(vllm:spec_decode_[a-z_]+)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
            pos = re.search(r'position="(\d+)"', labels)
            assert pos, line
            per_pos[pos.group(1)] = value
            per_pos_lines.append(line)
        else:
            totals[name] = totals.get(name, 0.0) + value
    return totals, per_pos, per_pos_lines


def test_metrics_count_drafts_and_acceptances(spec_client, spec_server):
    for prompt in PROMPTS:
        greedy(spec_client, prompt, extra_body={"ignore_eos": True})
    # The counters are published with the step that finishes the request; idle means published.
    wait_idle(spec_server.url)
    totals, per_pos, per_pos_lines = spec_samples(spec_server.url)
    drafts = totals["vllm:spec_decode_num_drafts_total"]
    draft_tokens = totals["vllm:spec_decode_num_draft_tokens_total"]
    accepted = totals["vllm:spec_decode_num_accepted_tokens_total"]
    if drafts == 0 and apiutil.RANDOM_WEIGHTS:
        pytest.skip("random weights generated nothing that prompt lookup could match")
    assert drafts > 0, totals
    # Each round verifies between 1 and k draft tokens and accepts at most all of them.
    assert drafts <= draft_tokens <= NUM_SPECULATIVE_TOKENS * drafts, totals
    assert 0 <= accepted <= draft_tokens, totals
    # Per position: present from 0, never past k - 1, labelled like every other series, and
    # non-increasing (a round accepts a prefix of its drafts), summing to the accepted tokens.
    assert per_pos_lines, "no vllm:spec_decode_num_accepted_tokens_per_pos_total series"
    positions = sorted(int(p) for p in per_pos)
    assert positions == list(range(len(positions))) and len(positions) <= NUM_SPECULATIVE_TOKENS, per_pos
    for line in per_pos_lines:
        assert f'model_name="{MODEL_NAME}"' in line and 'engine="0"' in line, line
    counts = [per_pos[str(p)] for p in positions]
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] <= drafts, (counts, drafts)
    assert sum(counts) == accepted, (counts, accepted)


def test_plain_server_reports_no_drafts(client, server):
    greedy(client, PROMPTS[0])
    wait_idle(server.url)
    totals, per_pos, _ = spec_samples(server.url)
    # Registered (dashboards find the series) but zero without --speculative-config.
    assert totals.get("vllm:spec_decode_num_drafts_total") == 0, totals
    assert totals.get("vllm:spec_decode_num_draft_tokens_total") == 0, totals
    assert per_pos == {}, per_pos


@pytest.mark.parametrize(
    "config, reason",
    [
        ('{"method":"eagle","num_speculative_tokens":2}', "eagle"),
        ('{"method":"ngram","num_speculative_tokens":0}', "num_speculative_tokens"),
        ('{"method": "ngram",', "not valid JSON"),
    ],
)
def test_bad_speculative_config_exits_at_once(config, reason):
    cmd = [str(BIN), "serve", *MODEL_ARGS, "--host", "127.0.0.1", "--port", str(free_port())]
    t0 = time.time()
    r = subprocess.run([*cmd, "--speculative-config", config], capture_output=True, text=True, timeout=60)
    elapsed = time.time() - t0
    assert r.returncode != 0, r.stderr
    assert "--speculative-config" in r.stderr and reason in r.stderr, r.stderr
    # The flag is checked before the model loads, so the command fails without loading it.
    assert elapsed < 10, elapsed
