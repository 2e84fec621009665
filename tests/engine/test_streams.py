"""Request streams: events buffered for thread and asyncio consumers, and the step's asyncio
wake-ups sent once per event loop."""

from __future__ import annotations

import asyncio
import threading

from server.engine.output import TokenEvent
from server.engine.streams import RequestStream, Wakeups


def _event(rid: str, finished: bool = False) -> TokenEvent:
    return TokenEvent(rid, (1,), "a", finished=finished)


def test_one_wake_up_per_loop_for_a_step_that_feeds_many_streams():
    streams = [RequestStream(f"r{i}", [1]) for i in range(5)]
    loop = asyncio.new_event_loop()
    calls = []
    original = loop.call_soon_threadsafe

    def counted(*args):
        calls.append(args)
        return original(*args)

    loop.call_soon_threadsafe = counted
    waiting = threading.Event()
    woken = []

    async def consume():
        tasks = [asyncio.ensure_future(s.async_wait()) for s in streams]
        await asyncio.sleep(0)
        waiting.set()
        await asyncio.gather(*tasks)
        woken.extend(s.drain() for s in streams)

    thread = threading.Thread(target=loop.run_until_complete, args=(consume(),))
    thread.start()
    assert waiting.wait(5)
    wakeups = Wakeups()
    for s in streams:
        s.put(_event(s.request_id), wakeups)
    assert calls == []                      # nothing sent before the flush
    wakeups.flush()
    thread.join(5)
    loop.close()
    assert not thread.is_alive()
    assert len(calls) == 1                  # one self-pipe write for the five streams
    assert [len(events) for events in woken] == [1] * 5


def test_put_without_wakeups_wakes_at_once_and_buffers_for_late_consumers():
    stream = RequestStream("r", [1])
    stream.put(_event("r"))                 # no consumer yet: buffered
    assert stream.wait(0) and [e.request_id for e in stream.drain()] == ["r"]

    async def consume():
        task = asyncio.ensure_future(stream.async_wait())
        await asyncio.sleep(0)
        threading.Thread(target=stream.put, args=(_event("r", finished=True),)).start()
        await asyncio.wait_for(task, 5)
        return stream.drain()

    events = asyncio.run(consume())
    assert len(events) == 1 and events[0].finished and stream.finished


def test_a_closed_loop_is_skipped():
    stream = RequestStream("r", [1])
    loop = asyncio.new_event_loop()
    flag = loop.run_until_complete(_make_flag())
    loop.close()
    wakeups = Wakeups()
    wakeups.add(loop, flag)
    stream.put(_event("r"), wakeups)
    wakeups.flush()                         # no exception: nobody to wake
    assert stream.drain()


async def _make_flag() -> asyncio.Event:
    return asyncio.Event()
