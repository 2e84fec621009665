"""The server process seen from /proc (Linux): resident memory, open file descriptors, threads,
and which process listens on a loopback port."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    rss_bytes: int | None
    fds: int | None
    threads: int | None


def parse_status(text: str) -> tuple[int | None, int | None]:
    """(VmRSS in bytes, Threads) from the text of /proc/<pid>/status; None where absent."""
    rss = threads = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key == "VmRSS" and parts:
            rss = int(parts[0]) * (1024 if len(parts) < 2 or parts[1].lower() == "kb" else 1)
        elif key == "Threads" and parts:
            threads = int(parts[0])
    return rss, threads


def read(pid: int, proc: str = "/proc") -> ProcStat | None:
    """The process's numbers now; None when it is gone. A part we may not read is None."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            rss, threads = parse_status(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        rss = threads = None
    try:
        fds: int | None = len(os.listdir(f"{proc}/{pid}/fd"))
    except FileNotFoundError:
        return None
    except PermissionError:
        fds = None
    return ProcStat(rss_bytes=rss, fds=fds, threads=threads)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def listening_inodes(table: str, port: int) -> set[str]:
    """Socket inodes listening (state 0A) on `port` in the text of /proc/net/tcp or tcp6."""
    inodes = set()
    for line in table.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        local, state, inode = cols[1], cols[3], cols[9]
        if state == "0A" and int(local.rpartition(":")[2], 16) == port:
            inodes.add(inode)
    return inodes


def listener_pid(port: int, proc: str = "/proc", max_pids: int = 100_000) -> int | None:
    """The pid of the (readable) process listening on TCP `port`, or None. Walks /proc once."""
    inodes: set[str] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{name}") as f:
                inodes |= listening_inodes(f.read(), port)
        except OSError:
            continue
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    pids = [p for p in os.listdir(proc) if p.isdigit()][:max_pids]
    for pid in sorted(pids, key=int):
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{proc}/{pid}/fd/{fd}") in wanted:
                    return int(pid)
            except OSError:
                continue
    return None
