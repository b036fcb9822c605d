"""Fixtures for the API tests: a real `ironllm serve` on a free local port with the default model.

The binary is `target/release/ironllm` (override with IRONLLM_BIN); `scripts/api_tests.sh` builds it.
One server is shared by the whole session; tests that need their own flags (API key, signals) start
one with `start_server(...)`.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from apiutil import Server


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Starts extra servers with their own flags; all are stopped at the end of the session."""
    started: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        s = Server(list(args), log, env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    return start_server()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


