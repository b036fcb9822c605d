"""Error answers: vLLM's JSON shape and status codes (400 invalid parameters and context overflow,
404 unknown model, 401 API key, 413 oversized body, 400 — never 422 — for malformed JSON), and the
messages clients parse."""

import httpx
import openai
import pytest

from apiutil import MODEL_NAME, assert_error_shape

CHAT = [{"role": "user", "content": "Hi"}]


def test_malformed_json_is_400(http):
    for body in [b"{", b'{"prompt": "x",}', b"", b"\xff\xfe", b'{"prompt": "x"} trailing']:
        err = assert_error_shape(http.post("/v1/completions", content=body), 400)
        assert err["type"] == "BadRequestError"
    assert_error_shape(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    assert_error_shape(http.post("/v1/chat/completions", content=b'"just a string"'), 400)


def test_wrong_types_name_the_field(http):
    err = assert_error_shape(http.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 400)
    assert err["param"] == "temperature" and "temperature" in err["message"]
    err = assert_error_shape(http.post("/v1/chat/completions", json={"messages": CHAT, "n": "two"}), 400)
    assert err["param"] == "n"
    err = assert_error_shape(http.post("/v1/completions", json={"prompt": {"a": 1}}), 400)
    assert err["param"] == "prompt"
    err = assert_error_shape(http.post("/v1/completions", json={"prompt": "x", "stop": 5}), 400)
    assert err["param"] == "stop"


def test_missing_required_fields(http):
    err = assert_error_shape(http.post("/v1/chat/completions", json={}), 400)
    assert err["param"] == "messages"
    assert_error_shape(http.post("/v1/chat/completions", json={"messages": "hi"}), 400)
    assert_error_shape(http.post("/v1/chat/completions", json={"messages": [{"content": "no role"}]}), 400)
    err = assert_error_shape(http.post("/v1/completions", json={}), 400)
    assert err["param"] == "prompt"


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n must be at least 1, got 0"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"logprobs": 21}, "greater than max allowed: 20"),
        ({"logprobs": -1}, "`logprobs` must be a positive value"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"best_of": 1, "n": 2}, "best_of must be greater than or equal to n"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"min_tokens": 20}, "max_tokens": 5}, "min_tokens"),
        ({"extra_body": {"stop_token_ids": [10**7]}}, "out-of-vocab"),
        ({"extra_body": {"allowed_token_ids": []}}, "allowed_token_ids"),
        ({"extra_body": {"prompt_logprobs": 50}}, "max allowed"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"suffix": "x"}, "suffix"),
        ({"extra_body": {"use_beam_search": True}}, "Beam search"),
        ({"extra_body": {"truncate_prompt_tokens": 5000}}, "truncate_prompt_tokens"),
    ],
)
def test_invalid_completion_parameters(client, kw, needle):
    kw.setdefault("max_tokens", 4)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="Hello", **kw)
    assert needle in e.value.body["message"], e.value.body
    assert e.value.status_code == 400


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"top_logprobs": 3}, "`logprobs` must be set to true"),
        ({"logprobs": True, "top_logprobs": -1}, "`top_logprobs` must be a positive value"),
        ({"logprobs": True, "top_logprobs": 21}, "greater than max allowed"),
        ({"temperature": -0.5}, "temperature"),
        ({"n": 0}, "n must be at least 1"),
        ({"stream_options": {"include_usage": True}}, "Stream options can only be defined when `stream=True`"),
    ],
)
def test_invalid_chat_parameters(client, kw, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, **kw)
    assert needle in e.value.body["message"], e.value.body


def test_prompt_logprobs_not_with_stream(http):
    err = assert_error_shape(
        http.post("/v1/completions", json={"prompt": "x", "stream": True, "prompt_logprobs": 1}), 400
    )
    assert "`prompt_logprobs` are not available when `stream=True`" in err["message"]


def test_context_length_errors(http):
    err = assert_error_shape(http.post("/v1/completions", json={"prompt": [100] * 3000, "max_tokens": 1}), 400)
    assert err["message"].startswith(
        "This model's maximum context length is 2048 tokens. However, your request has 3000 input tokens."
    )
    assert err["param"] == "input_tokens"
    err = assert_error_shape(http.post("/v1/completions", json={"prompt": [100] * 2048}), 400)
    assert "your request has 2048 input tokens" in err["message"]
    err = assert_error_shape(http.post("/v1/completions", json={"prompt": [100] * 10, "max_tokens": 5000}), 400)
    assert err["message"].startswith(
        "'max_tokens' or 'max_completion_tokens' is too large: 5000. This model's maximum context length is 2048 "
        "tokens and your request has 10 input tokens (5000 > 2048 - 10)."
    )
    assert err["param"] == "max_tokens"
    err = assert_error_shape(
        http.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": 4000}), 400
    )
    assert "is too large: 4000" in err["message"]
    long_text = "hello " * 3000
    err = assert_error_shape(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]}), 400)
    assert "maximum context length is 2048 tokens" in err["message"]


def test_empty_and_out_of_vocab_prompts(http):
    err = assert_error_shape(http.post("/v1/completions", json={"prompt": ""}), 400)
    assert "The decoder prompt cannot be empty" in err["message"]
    err = assert_error_shape(http.post("/v1/completions", json={"prompt": [1, 10**8]}), 400)
    assert "Token id 100000000 is out of vocabulary" in err["message"]
    assert_error_shape(http.post("/v1/completions", json={"prompt": []}), 400)
    assert_error_shape(http.post("/v1/completions", json={"prompt": [[1], []]}), 400)
    assert_error_shape(http.post("/v1/completions", json={"prompt": [-5]}), 400)


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["message"] == "The model `nope` does not exist."
    err = assert_error_shape(http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": CHAT}), 404)
    assert err["type"] == "NotFoundError" and err["param"] == "model"


def test_oversized_body_is_413(http):
    body = b'{"prompt": "' + b"a" * (17 << 20) + b'"}'
    assert_error_shape(http.post("/v1/completions", content=body), 413)
    assert http.get("/health").status_code == 200


def test_api_key(start_server):
    s = start_server(env={"VLLM_API_KEY": "sekret"})
    with httpx.Client(base_url=s.url, timeout=30) as h:
        err = assert_error_shape(h.get("/v1/models"), 401)
        assert err["message"] == "Unauthorized"
        assert_error_shape(h.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error_shape(h.post("/v1/completions", json={"prompt": "x"}), 401)
        assert h.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        # Only /v1 is protected, as in vLLM.
        assert h.get("/health").status_code == 200
        assert h.get("/metrics").status_code == 200
    good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    bad = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
