"""A server the soak starts itself (--launch "headwise serve ..."): start it, wait until /ready,
stop it with SIGTERM at the end (SIGKILL if it does not exit in time).

The command is run directly (no shell), so its process is the one sampled. A bare `headwise` is
looked up on PATH, then beside the running Python (a virtual environment's bin/).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import httpx

# headwise serve's flags the soak sizes its requests by, and their defaults (server/cli.py)
SERVER_DEFAULTS = {"--max-num-seqs": 16, "--max-queue": 256, "--max-body-bytes": 4 * 2**20}


class LaunchError(Exception):
    """The server could not be started or did not become ready."""


@dataclass
class Launched:
    proc: subprocess.Popen
    log_path: str
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]


def command_flags(argv: Sequence[str]) -> dict[str, str]:
    """The `--flag value` and `--flag=value` pairs of a command line (last one wins)."""
    out: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if eq:
            out[name] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[name] = argv[i + 1]
    return out


def server_settings(argv: Sequence[str]) -> dict[str, int]:
    """max-num-seqs, max-queue and max-body-bytes of a `headwise serve` command line (its
    defaults where the command does not set them); ValueError for a non-integer value."""
    flags = command_flags(argv)
    out = {}
    for flag, default in SERVER_DEFAULTS.items():
        value = flags.get(flag)
        try:
            out[flag[2:].replace("-", "_")] = default if value is None else int(value)
        except ValueError:
            raise ValueError(f"--launch: {flag} {value!r} is not an integer") from None
    return out


def resolve(argv: list[str]) -> list[str]:
    if not argv:
        raise LaunchError("--launch: empty command")
    exe = argv[0]
    if os.sep not in exe and shutil.which(exe) is None:
        beside = os.path.join(os.path.dirname(sys.executable), exe)
        if os.access(beside, os.X_OK):
            return [beside, *argv[1:]]
        raise LaunchError(f"--launch: {exe!r} not found on PATH or beside {sys.executable}")
    return argv


def start(command: str, log_path: str) -> Launched:
    argv = resolve(shlex.split(command))
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except OSError as e:
        log.close()
        raise LaunchError(f"--launch: cannot run {argv[0]!r}: {e}") from None
    return Launched(proc=proc, log_path=log_path, log=log)


def answering(base_url: str, timeout: float = 1.0) -> bool:
    """Something answers HTTP at base_url (any status)."""
    try:
        httpx.get(base_url.rstrip("/") + "/health", timeout=timeout)
        return True
    except httpx.HTTPError:
        return False


def wait_ready(server: Launched, base_url: str, timeout: float) -> float:
    """Seconds until GET /ready answered 200; LaunchError if the process exits or time runs out."""
    t0 = time.monotonic()
    url = base_url.rstrip("/") + "/ready"
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            raise LaunchError(f"the server exited with {server.proc.returncode} before it was ready:\n{server.tail()}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise LaunchError(f"the server was not ready after {timeout:g} s:\n{server.tail()}")


def stop(server: Launched, timeout: float = 60.0) -> int:
    """SIGTERM (the server drains and exits), SIGKILL after `timeout`; the exit status."""
    try:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        return server.proc.returncode
    finally:
        server.log.close()
