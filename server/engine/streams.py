"""Per-request event channels between the engine thread and consumers (threads or asyncio)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from server.engine.output import TokenEvent


class Wakeups:
    """Event-loop wake-ups gathered over one engine step and sent once per loop by flush(): a
    step that feeds 16 streams read from one event loop writes to that loop's self-pipe once,
    not 16 times (each write is a system call on the engine thread and a context switch)."""

    def __init__(self) -> None:
        self._flags: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, flag: asyncio.Event) -> None:
        self._flags.setdefault(loop, []).append(flag)

    def flush(self) -> None:
        flags, self._flags = self._flags, {}
        for loop, pending in flags.items():
            _wake(loop, pending)


def _wake(loop: asyncio.AbstractEventLoop, flags: list[asyncio.Event]) -> None:
    try:
        loop.call_soon_threadsafe(_set_all, flags)
    except RuntimeError:  # the consumer's loop is closed: nobody to wake
        pass


def _set_all(flags: list[asyncio.Event]) -> None:
    for flag in flags:
        flag.set()


class RequestStream:
    """A buffer of TokenEvents for one request, readable from a thread or an event loop.

    The engine thread calls put(); a consumer calls get_nowait(), wait() (blocking) or
    await async_wait(). Events are never lost: put() before a consumer attaches is buffered.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._events: deque[TokenEvent] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.finished = False

    def put(self, event: TokenEvent, wakeups: Wakeups | None = None) -> None:
        """Buffer event and wake its consumers: now, or at wakeups.flush() when given."""
        with self._cond:
            self._events.append(event)
            if event.finished:
                self.finished = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, flag in waiters:
            if wakeups is None:
                _wake(loop, [flag])
            else:
                wakeups.add(loop, flag)

    def drain(self) -> list[TokenEvent]:
        """Every buffered event, oldest first (possibly none)."""
        with self._cond:
            events = list(self._events)
            self._events.clear()
            return events

    def wait(self, timeout: float | None = None) -> bool:
        """Block until an event is buffered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._events), timeout)

    async def async_wait(self) -> None:
        """Wait without blocking the event loop until an event is buffered."""
        flag = asyncio.Event()
        with self._cond:
            if self._events:
                return
            self._waiters.append((asyncio.get_running_loop(), flag))
        await flag.wait()
