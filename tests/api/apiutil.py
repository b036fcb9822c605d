"""Helpers for the API tests: starting `ironllm serve`, reading metrics and server-sent events."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("IRONLLM_BIN", ROOT / "target" / "release" / "ironllm"))
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
BASE_ARGS = ["--kv-cache-memory-bytes", "1GiB", "--max-model-len", str(MAX_MODEL_LEN)]
# The GPU run serves a model directory made on the GPU host (no network there for the default model):
# IRONLLM_API_MODEL names it and IRONLLM_API_ARGS adds flags such as `--device cuda`.
API_MODEL = os.environ.get("IRONLLM_API_MODEL")
MODEL_ARGS = ([API_MODEL] if API_MODEL else []) + os.environ.get("IRONLLM_API_ARGS", "").split()
# Random weights of the default model's shape (the GPU run): tests of what a trained model says skip.
RANDOM_WEIGHTS = bool(os.environ.get("IRONLLM_API_RANDOM_WEIGHTS"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An `ironllm serve` process."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        base = [a for i, a in enumerate(BASE_ARGS) if not (a in args or (i % 2 and BASE_ARGS[i - 1] in args))]
        name = ["--served-model-name", MODEL_NAME] if API_MODEL and "--served-model-name" not in args else []
        cmd = [str(BIN), "serve", *MODEL_ARGS, *name, "--host", "127.0.0.1", "--port", str(self.port), *base, *args]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def metrics(url: str) -> dict[str, float]:
    """Samples of `/metrics` by name (labels dropped; series with several label sets are summed)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Waits until no request runs or waits and the KV cache is empty; returns the metrics."""
    deadline = time.time() + timeout
    m = metrics(url)
    while time.time() < deadline:
        m = metrics(url)
        if (
            m.get("vllm:num_requests_running") == 0
            and m.get("vllm:num_requests_waiting") == 0
            and m.get("vllm:kv_cache_usage_perc") == 0
        ):
            return m
        time.sleep(0.05)
    raise AssertionError(f"server not idle after {timeout}s: { {k: v for k, v in m.items() if 'num_requests' in k or 'kv_cache' in k} }")


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of a server-sent event stream, with "[DONE]" kept as a string."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error_shape(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert "param" in err
    assert err["code"] == status
    return err
