"""/v1/completions through the official openai client (and raw HTTP where the client hides fields):
prompt shapes, echo, n/best_of, logprobs, stop strings and ids, usage, streaming equality, and
vLLM's extra sampling fields."""

import httpx
import openai
import pytest

from apiutil import MODEL_NAME, sse_events

PROMPT = "The capital of France is"


def greedy(client, prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 12)
    extra = kw.pop("extra_body", {})
    return client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, extra_body=extra, **kw)


def tokenize(http, text):
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_basic_shape_and_usage(client, http):
    r = greedy(client)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.model == MODEL_NAME
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and isinstance(c.text, str) and c.text
    assert c.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tokenize(http, PROMPT))
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_default_max_tokens_is_16(http):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "ignore_eos": True, "temperature": 0}).json()
    assert r["usage"]["completion_tokens"] == 16
    assert r["choices"][0]["finish_reason"] == "length"


def test_null_max_tokens_runs_to_the_context_length(http):
    prompt = [1000] * 2040
    r = http.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": None, "ignore_eos": True, "temperature": 0}
    ).json()
    assert r["usage"]["prompt_tokens"] == 2040
    assert r["usage"]["completion_tokens"] == 8
    assert r["choices"][0]["finish_reason"] == "length"


def test_token_id_prompt_equals_text_prompt(client, http):
    text = greedy(client).choices[0].text
    ids = tokenize(http, PROMPT)
    assert greedy(client, prompt=ids).choices[0].text == text


def test_list_prompts(client, http):
    prompts = [PROMPT, "One, two, three,"]
    solo = [greedy(client, prompt=p).choices[0].text for p in prompts]
    r = greedy(client, prompt=prompts)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == solo
    ids = [tokenize(http, p) for p in prompts]
    r2 = greedy(client, prompt=ids)
    assert [c.text for c in r2.choices] == solo
    assert r2.usage.prompt_tokens == sum(len(i) for i in ids)


def test_n_and_seed(client):
    kw = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=1234, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens <= 24


def test_multiple_prompts_with_n(client):
    r = client.completions.create(model=MODEL_NAME, prompt=["a", "b"], max_tokens=2, n=2, temperature=0.7, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_best_of(client):
    r = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=6, temperature=1.0, n=1, best_of=3, seed=7
    )
    assert len(r.choices) == 1 and r.choices[0].index == 0


def test_echo(client):
    r = greedy(client, echo=True, max_tokens=4)
    assert r.choices[0].text.startswith(PROMPT)
    assert len(r.choices[0].text) > len(PROMPT)


def test_logprobs_shape(client):
    r = greedy(client, logprobs=3, max_tokens=8, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 1 <= len(top) <= 4
        assert tok in top
        # Greedy: the chosen token is the most likely one.
        assert abs(max(top.values()) - logprob) < 1e-5


def test_echo_with_logprobs(client, http):
    r = greedy(client, echo=True, logprobs=1, max_tokens=3)
    lp = r.choices[0].logprobs
    n_prompt = len(tokenize(http, PROMPT))
    assert len(lp.tokens) == n_prompt + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == PROMPT


def test_prompt_logprobs(http):
    r = http.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0}
    ).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert len(plp) == r["usage"]["prompt_tokens"]
    assert plp[0] is None
    for entry in plp[1:]:
        assert 1 <= len(entry) <= 3
        for tid, v in entry.items():
            assert int(tid) >= 0 and v["logprob"] <= 0 and v["rank"] >= 1 and isinstance(v["decoded_token"], str)


def test_stop_strings(client):
    full = greedy(client, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = full[: full.index(stop)]
    r = greedy(client, max_tokens=16, stop=[stop, "zzzzzz"], extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == cut and c.finish_reason == "stop"
    assert c.model_extra["stop_reason"] == stop
    kept = greedy(client, max_tokens=16, stop=stop, extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop


def test_stop_token_ids(http):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    ids = http.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
    assert len(ids) == 8
    stop_id = ids[3]
    first = ids.index(stop_id)
    r = http.post("/v1/completions", json={**body, "stop_token_ids": [stop_id]}).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == stop_id
    assert c["token_ids"] == ids[: first + 1]


def test_stream_equals_non_stream(client, http):
    for prompt in [PROMPT, "def fibonacci(n):"]:
        ref = greedy(client, prompt=prompt, max_tokens=16)
        chunks = list(
            greedy(client, prompt=prompt, max_tokens=16, stream=True, stream_options={"include_usage": True})
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == ref.choices[0].text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [ref.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == ref.usage
        assert all(c.usage is None for c in chunks[:-1])


def test_stream_raw_framing(http):
    with http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "usage" not in events[0]


def test_continuous_usage_stats(client):
    chunks = list(
        greedy(
            client,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].usage.completion_tokens == 6


def test_stream_n_and_multiple_prompts(client):
    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt=["a", "b"], n=2, max_tokens=3, temperature=0.8, seed=3, stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2, 3]


def test_stream_logprobs(client):
    ref = greedy(client, logprobs=2, max_tokens=6)
    chunks = list(greedy(client, logprobs=2, max_tokens=6, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == ref.choices[0].logprobs.tokens


def test_allowed_token_ids_and_logit_bias(http):
    tid = tokenize(http, " yes")[-1]
    base = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = http.post("/v1/completions", json={**base, "allowed_token_ids": [tid]}).json()
    assert r["choices"][0]["token_ids"] == [tid] * 4
    r = http.post("/v1/completions", json={**base, "logit_bias": {str(tid): 100}}).json()
    assert r["choices"][0]["token_ids"] == [tid] * 4


def test_bad_words(http):
    base = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "return_token_ids": True}
    first = http.post("/v1/completions", json=base).json()["choices"][0]
    word = http.post("/detokenize", json={"tokens": first["token_ids"][:1]}).json()["prompt"].strip()
    assert word
    r = http.post("/v1/completions", json={**base, "bad_words": [word]}).json()["choices"][0]
    assert r["token_ids"][0] != first["token_ids"][0]


def test_extra_sampling_fields_accepted(client):
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=5,
        user="someone",
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "priority": 0,
            "some_unknown_field": {"x": 1},
        },
    )
    assert r.usage.completion_tokens >= 2


def test_min_tokens_and_ignore_eos(client):
    r = greedy(client, max_tokens=10, extra_body={"min_tokens": 10})
    assert r.usage.completion_tokens == 10


def test_truncate_prompt_tokens(http):
    r = http.post(
        "/v1/completions", json={"prompt": "one two three four five six seven", "max_tokens": 1, "truncate_prompt_tokens": 3}
    ).json()
    assert r["usage"]["prompt_tokens"] == 3


def test_priority_requires_priority_scheduling(client):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, extra_body={"priority": 1})
    assert "Priority scheduling is not enabled" in str(e.value)


def test_model_may_be_omitted(http):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL_NAME


def test_non_json_content_type_is_still_parsed(server):
    r = httpx.post(
        server.url + "/v1/completions",
        content=b'{"prompt": "Hi", "max_tokens": 1}',
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 200


def test_streamed_token_ids_survive_tokens_without_text(http):
    """A token that ends inside a UTF-8 sequence adds no text; with return_token_ids its id must still
    reach the client (the GPU run's random-weight model found chunks dropped there)."""
    import json as _json
    from pathlib import Path

    vocab = _json.loads((Path(__file__).resolve().parents[1] / "fixtures/reference/smollm2_hf/tokenizer.json").read_text())
    lone_byte = vocab["model"]["vocab"]["\u00e2"]  # the byte 0xE2 alone: the start of a 3-byte sequence
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "allowed_token_ids": [lone_byte], "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    ids = [t for e in events[:-1] for c in e["choices"] for t in (c.get("token_ids") or [])]
    assert ids == [lone_byte] * 6
    chat_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                 "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                 "allowed_token_ids": [lone_byte], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=chat_body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    ids = [t for e in events[:-1] for c in e["choices"] for t in (c.get("token_ids") or [])]
    assert ids == [lone_byte] * 6
