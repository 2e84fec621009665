"""Live servers for the API tests: `python -m server.cli serve` in a subprocess on loopback,
waited for until /ready answers 200, stopped at the end of the session (or of the test)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`headwise serve` in a subprocess; its output goes to a log file shown on failure."""

    def __init__(self, args: list[str], log_dir: Path, name: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(self.port),
                                      "--threads", "1", *args],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def url(self, path: str) -> str:
        return self.base_url + path

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def start_server(tiny_llama_dir, tmp_path_factory):
    """start_server(*flags, model=tiny) -> a ready ServerProcess, stopped at session end."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    started: list[ServerProcess] = []

    def start(*args: str, model: str | None = "tiny", name: str = "server", wait: bool = True) -> ServerProcess:
        model_args = ["--model", tiny_llama_dir] if model == "tiny" else ([] if model is None else ["--model", model])
        srv = ServerProcess([*model_args, *args], log_dir, name)
        started.append(srv)
        return srv.wait_ready() if wait else srv

    yield start
    for srv in started:  # signal all, then wait for each
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGINT)
    for srv in started:
        srv.stop()


@pytest.fixture
def one_torch_thread():
    """transformers references in this process use one thread (the server under test has the
    other core: no OpenMP oversubscription); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared tiny-model server (no key, defaults otherwise; context window 512)."""
    return start_server("--max-model-len", "512", "--kv-cache-memory", "0.05", name="main")


@pytest.fixture(scope="session")
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def model_id(server) -> str:
    return httpx.get(server.url("/v1/models")).json()["data"][0]["id"]


@contextlib.contextmanager
def held_streams(url: str, body: dict, n: int, timeout: float = 120.0):
    """n streamed requests of `body` to `url`, held open until the block ends (then each client
    closes its stream). The block is entered once all n have their response headers, i.e. once
    the server has admitted every one of them."""
    started, stop = threading.Barrier(n + 1), threading.Event()

    def hold() -> None:
        with httpx.stream("POST", url, json=body, timeout=timeout) as r:
            started.wait(timeout)
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    started.wait(timeout)
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout)


def metric(server: ServerProcess, name: str, headers: dict | None = None, **labels: str) -> float:
    """The value of the sample `name` of /metrics whose labels include `labels` (the `model`
    label every family has need not be given), read with prometheus_client's parser."""
    text = httpx.get(server.url("/metrics"), headers=headers or {}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise KeyError(name)
