"""LoadingGate: the ASGI application `headwise serve` runs, so that the port answers while the
model loads.

uvicorn binds its socket only once the application's lifespan start-up has returned, so the
model cannot load there. The gate's start-up starts `load` (which builds the engine and the API
application, create_app) on a thread of its own and returns at once. Until that application is
loaded and its own lifespan has started:

    GET /health   200 {"status": "loading"}: the process is alive
    GET /ready    503 not_ready, with Retry-After
    anything else 503 model_loading, with Retry-After (OpenAI's error object)

Then every request goes to the loaded application, whose lifespan runs inside the gate's. A load
that fails is kept in `error` and `on_failure` is called (the command stops the server and
reports it). This module imports no torch and no engine: loading them is the load's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from server.api.errors import APIError, send_error

log = logging.getLogger("headwise.api")

HEALTH_BODY = b'{"status":"loading"}'


async def _on_daemon_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a daemon thread (a start-up cut short by a signal never keeps the process alive)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while loading: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="headwise-load", daemon=True).start()
    return await done


class LoadingGate:
    """See the module docstring. `load()` returns the API application (FastAPI); it runs on a
    thread. `app` is that application once its lifespan has started, else None."""

    def __init__(self, load: Callable[[], Any], *, retry_after_s: int,
                 on_failure: Callable[[BaseException], None]) -> None:
        self._load = load
        self._retry_after = str(retry_after_s)
        self._on_failure = on_failure
        self._lifespans = contextlib.AsyncExitStack()
        self._starting: asyncio.Task | None = None
        self.app = None
        self.error: BaseException | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            return await self._answer_loading(scope["path"], send)
        # anything else (a websocket) is refused by the server when the app returns unanswered

    async def _answer_loading(self, path: str, send) -> None:
        if path == "/health":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(HEALTH_BODY)).encode())]})
            return await send({"type": "http.response.body", "body": HEALTH_BODY})
        code, message = (("not_ready", "not ready: the model is loading") if path == "/ready"
                         else ("model_loading", "the model is loading; retry later"))
        await send_error(send, APIError(503, message, type="service_unavailable_error", code=code,
                                        headers={"retry-after": self._retry_after}))

    async def _lifespan(self, receive: Callable[[], Awaitable[dict]], send) -> None:
        await receive()  # lifespan.startup
        self._starting = asyncio.create_task(self._start())
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self._stop()
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self) -> None:
        """Load, then start the loaded application's lifespan and hand it the traffic."""
        try:
            app = await _on_daemon_thread(self._load)
            await self._lifespans.enter_async_context(app.router.lifespan_context(app))
        except Exception as exc:  # noqa: BLE001 - a model that cannot load: stop the server, report it
            log.error("start-up failed: %s", exc)
            self.error = exc
            self._on_failure(exc)
            return
        self.app = app

    async def _stop(self) -> None:
        """Stop loading (the thread is left to finish on its own) or stop the loaded application."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        await self._lifespans.aclose()

    async def drain(self, timeout: float) -> None:
        """SIGTERM: the loaded application drains (OpenAIServing.drain); while loading there is
        nothing in flight to wait for."""
        if self.app is not None:
            await self.app.state.serving.drain(timeout)
