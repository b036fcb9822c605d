"""Lifecycle: a client that disconnects (mid-stream or while waiting for a JSON answer) aborts its
request and frees its KV blocks at once; SIGTERM/SIGINT stop the server cleanly — in-flight
requests are aborted with finish_reason "abort" (default) or allowed to finish within
--shutdown-timeout — and the process exits 0."""

import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from apiutil import BIN, metrics, sse_events, wait_idle

LONG = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}


def test_stream_disconnect_aborts_and_frees_blocks(server):
    before = metrics(server.url)
    with httpx.Client(base_url=server.url, timeout=60) as h:
        with h.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            running = metrics(server.url)
            assert running["vllm:num_requests_running"] == 1
            assert running["vllm:kv_cache_usage_perc"] > 0
    t0 = time.time()
    after = wait_idle(server.url, timeout=5)
    assert time.time() - t0 < 5
    assert after["vllm:request_success_total"] >= before["vllm:request_success_total"] + 1


def test_non_streaming_disconnect_aborts(server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=LONG, timeout=1.0)
    wait_idle(server.url, timeout=5)


def test_chat_stream_disconnect_aborts(server):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as h:
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
    wait_idle(server.url, timeout=5)


def read_stream(url, body, out):
    try:
        with httpx.Client(base_url=url, timeout=60) as h:
            with h.stream("POST", "/v1/completions", json=body) as r:
                out["status"] = r.status_code
                out["events"] = sse_events(r)
    except httpx.HTTPError as e:
        out["error"] = repr(e)


def wait_for_running(url, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics(url).get("vllm:num_requests_running", 0) >= 1:
            return
        time.sleep(0.05)
    raise AssertionError("request never started")


def test_sigterm_aborts_in_flight_requests_and_exits_cleanly(start_server):
    s = start_server()
    out = {}
    t = threading.Thread(target=read_stream, args=(s.url, {**LONG, "stream": True}, out))
    t.start()
    wait_for_running(s.url)
    s.signal(signal.SIGTERM)
    t.join(timeout=20)
    assert not t.is_alive()
    assert out.get("status") == 200, out
    events = out["events"]
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "abort"
    assert s.proc.wait(timeout=20) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)
    assert "Server stopped" in s.log_tail()


def test_sigint_with_shutdown_timeout_lets_requests_finish(start_server):
    s = start_server("--shutdown-timeout", "30")
    out = {}
    # Long enough to be seen running before it ends: 40 tokens take ~0.3 s on the CPU but ~40 ms on a GPU.
    tokens = 1000 if "cuda" in os.environ.get("IRONLLM_API_ARGS", "") else 40
    body = {**LONG, "max_tokens": tokens, "stream": True}
    t = threading.Thread(target=read_stream, args=(s.url, body, out))
    t.start()
    wait_for_running(s.url)
    s.signal(signal.SIGINT)
    time.sleep(0.2)
    # Draining: new requests are refused while the old one finishes.
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
        assert r.status_code == 503, r.text
    except httpx.TransportError:
        pass  # or the listener is already closed
    t.join(timeout=60)
    events = out["events"]
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in events[:-1] if e["choices"]) >= 1
    assert s.proc.wait(timeout=20) == 0


def test_unknown_flags_fail_with_a_clear_message():
    r = subprocess.run([str(BIN), "serve", "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "unexpected argument '--no-such-flag'" in r.stderr
    r = subprocess.run([str(BIN), "serve", "--uvicorn-log-level", "loud"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--uvicorn-log-level" in r.stderr
    r = subprocess.run([str(BIN), "serve", "--log-level", "loud"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--log-level loud" in r.stderr
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "LOUD"}
    env.pop("IRONLLM_LOG_LEVEL", None)
    r = subprocess.run([str(BIN), "serve"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and "VLLM_LOGGING_LEVEL" in r.stderr
