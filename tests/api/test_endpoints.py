"""The small endpoints: /health, /ping, /version, /v1/models, /metrics, /tokenize, /detokenize, and
the OpenAI-shaped answers for unknown routes and methods."""

import apiutil
from apiutil import MAX_MODEL_LEN, MODEL_NAME, assert_error_shape, metrics

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}]


def test_health_and_ping(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.content == b""
    assert http.get("/ping").status_code == 200
    assert http.post("/ping").status_code == 200


def test_version(http):
    v = http.get("/version").json()
    assert isinstance(v["version"], str) and v["version"]


def test_models_with_openai_client(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    m = models[0]
    assert m.object == "model" and m.owned_by == "vllm"
    extra = m.model_extra
    assert extra["max_model_len"] == MAX_MODEL_LEN
    assert extra["root"] == apiutil.API_MODEL if apiutil.API_MODEL else extra["root"].endswith(".gguf")
    assert extra["permission"][0]["object"] == "model_permission"


def test_metrics_have_vllm_names(server, http):
    http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    r = http.get("/metrics")
    assert r.status_code == 200
    text = r.text
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:request_prompt_tokens_bucket",
        "vllm:request_generation_tokens_bucket",
    ]:
        assert f"{name}{{" in text, name
    assert f'model_name="{MODEL_NAME}"' in text
    assert 'finished_reason="length"' in text
    m = metrics(server.url)
    assert m["vllm:generation_tokens_total"] >= 2
    assert m["vllm:request_success_total"] >= 1


def test_unknown_route_and_method(http):
    err = assert_error_shape(http.get("/v1/nothing"), 404)
    assert err["message"] == "Not Found"
    assert_error_shape(http.get("/v1/completions"), 405)


def test_tokenize_and_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) > 0
    assert r["max_model_len"] == MAX_MODEL_LEN
    assert len(r["token_strs"]) == r["count"]
    back = http.post("/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    plain = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "Hello world"}).json()
    assert plain["token_strs"] is None and plain["tokens"] == r["tokens"]


def test_tokenize_chat_messages(http):
    with_prompt = http.post("/tokenize", json={"messages": CHAT}).json()
    without = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert with_prompt["count"] > without["count"]
    text = http.post("/detokenize", json={"tokens": with_prompt["tokens"]}).json()["prompt"]
    assert "Name a color." in text and text.rstrip().endswith("assistant")


def test_tokenize_errors(http):
    assert_error_shape(http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)
    assert_error_shape(http.post("/tokenize", json={}), 400)
    assert_error_shape(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert_error_shape(http.post("/detokenize", json={"tokens": [-1]}), 400)
