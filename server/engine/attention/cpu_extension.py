"""Builds and loads the C++ paged-attention ops (csrc/paged_decode.cpp, csrc/paged_prefill.cpp:
one library) once per process.

torch.utils.cpp_extension.load compiles it with the system C++ compiler and ninja into torch's
extensions directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), once per source,
flags and CPU: -march=native code only runs on the CPU kind it was built for, so the library's
name carries fingerprints of the CPU and of the source. Later loads find it built
(scripts/setup.sh builds it at set-up). The ops register themselves as torch.ops.headwise.paged_decode,
.paged_prefill and .write_kv.

    python -c "from server.engine.attention.cpu_extension import main; main()"   # build now (set-up)

When it cannot be built (no compiler, no ninja, a compile error) load_paged_decode() returns the
reason instead, and logs it once: the "auto" attention backend then uses the torch reference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / "paged_decode.cpp", Path(__file__).parent / "csrc" / "paged_prefill.cpp"]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]


@dataclass(frozen=True)
class Extension:
    """The loaded op, or why there is none."""

    op: Callable | None     # torch.ops.headwise.paged_decode
    reason: str | None      # set when op is None
    write: Callable | None = None  # torch.ops.headwise.write_kv: a step's new K/V into the cache
    prefill: Callable | None = None  # torch.ops.headwise.paged_prefill: a prefill chunk's rows


HEADERS = [Path(__file__).parent.parent / "csrc" / "exp_nonpositive.h",
           Path(__file__).parent / "csrc" / "paged_cache.h"]  # included by the sources


def library_name(prefix: str, sources: list[Path], flags: list[str]) -> str:
    """<prefix>_<cpu>_<source>: 8 hex digits of the CPU's model and flags (a cache shared across
    machines never runs code built for another CPU) and 8 of the source, the shared headers and
    the flags (two checkouts with different sources each keep their own build instead of
    rebuilding in turn)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = "\n".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name", "vendor_id"))}))
    src = b"".join(s.read_bytes() for s in [*sources, *HEADERS]) + " ".join(flags).encode()
    return f"{prefix}_{hashlib.sha256(cpu.encode()).hexdigest()[:8]}_{hashlib.sha256(src).hexdigest()[:8]}"


def build_library(prefix: str, sources: list[Path], cflags: list[str], ldflags: list[str] | None = None) -> str | None:
    """Build (first time) and load C++ sources (one library) that register torch ops; never raises.
    None when its ops are registered, else why not (no compiler or ninja, a compile error)."""
    reason = _missing_tool()
    if reason is not None:
        return reason
    try:
        from torch.utils.cpp_extension import load

        load(name=library_name(prefix, sources, cflags), sources=[str(s) for s in sources], extra_cflags=cflags,
             extra_ldflags=ldflags or [], is_python_module=False)
        return None
    except Exception as exc:  # no source, a compiler or linker error, an unwritable cache dir
        lines = str(exc).strip().splitlines()
        names = ", ".join(s.name for s in sources)
        return f"building {names} failed: {type(exc).__name__}: {lines[0] if lines else ''}"


def _missing_tool() -> str | None:
    """Why a build cannot even start, or None. Finds ninja installed next to this Python
    (pip's ninja in a virtual environment that is not activated) by putting it on PATH."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found on PATH; install g++ or set CXX)"
    if shutil.which("ninja") is None:
        scripts = sysconfig.get_path("scripts")
        if scripts and (Path(scripts) / "ninja").exists():
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
        else:
            return "ninja not found (pip install ninja)"
    return None


@functools.cache
def load_paged_decode() -> Extension:
    """Build (first time) and load the op; never raises. Logs one warning when unavailable."""
    reason = build_library("headwise_paged_decode", SOURCES, CFLAGS, ["-fopenmp"])
    if reason is None:
        import torch

        ops = torch.ops.headwise
        return Extension(ops.paged_decode, None, ops.write_kv, ops.paged_prefill)
    logger.warning("headwise: the CPU paged-decode attention extension is unavailable (%s); "
                   "--attention-backend auto uses the torch reference, --attention-backend cpu cannot run",
                   reason)
    return Extension(None, reason)


def main() -> None:
    """Build now; exit status 1 when the extension is unavailable (set-up warns and goes on)."""
    t0 = time.monotonic()
    names = ", ".join(s.name for s in SOURCES)
    print(f"[cpu_extension] building {names} (or finding it built) ...", file=sys.stderr, flush=True)
    ext = load_paged_decode()
    if ext.op is None:
        print(f"[cpu_extension] not built: {ext.reason}", file=sys.stderr)
        sys.exit(1)
    print(f"[cpu_extension] ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
