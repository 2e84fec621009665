"""Load generator for the event-loop test, run as a separate process (so the test's own /health
probes do not compete with it for the GIL): one large legal non-streaming response (N choices,
logprobs 20, MAX_TOKENS tokens each; its tokens and choices are counted in its bytes) and, while
it runs, ~3.9 MiB prompts two at a time (token ids and text, alternately; both are refused as too
long for the context), at most MAX_POSTS. Prints "go" when it starts sending, then a JSON summary.

    python -m tests.api.load_storm URL N MAX_TOKENS MAX_POSTS
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx

BODY_BYTES = int(3.9 * 2**20)


def big_bodies() -> list[bytes]:
    """A token-id prompt and a text prompt, each a body of about BODY_BYTES."""
    ids = json.dumps({"prompt": [123] * (BODY_BYTES // 4), "max_tokens": 4}, separators=(",", ":")).encode()
    text = json.dumps({"prompt": "Hello " * (BODY_BYTES // 6), "max_tokens": 4}).encode()
    return [ids, text]


async def large_response(client: httpx.AsyncClient, url: str, n: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": "Hello"}], "n": n, "max_tokens": max_tokens,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 20, "temperature": 1.0, "seed": 1}
    r = await client.post(url + "/v1/chat/completions", json=body)
    # counted in the bytes, not parsed: parsing megabytes here would take the cores the probes need
    return {"status": r.status_code, "bytes": len(r.content), "tokens": r.content.count(b'"top_logprobs":'),
            "choices": r.content.count(b'"finish_reason":"length"')}


async def big_posts(client: httpx.AsyncClient, url: str, bodies: list[bytes], done: asyncio.Event,
                    turns, codes: list) -> None:
    """Post big bodies until the large response is done or the shared `turns` run out."""
    for i in turns:
        if done.is_set():
            return
        r = await client.post(url + "/v1/completions", content=bodies[i % len(bodies)],
                              headers={"content-type": "application/json"})
        codes.append([r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None])


async def main(url: str, n: int, max_tokens: int, max_posts: int) -> None:
    bodies = big_bodies()
    codes: list = []
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=300) as client:
        print("go", flush=True)
        large = asyncio.ensure_future(large_response(client, url, n, max_tokens))
        large.add_done_callback(lambda _: done.set())
        turns = iter(range(max_posts))
        await asyncio.gather(*(big_posts(client, url, bodies, done, turns, codes) for _ in range(2)))
        result = await large
    print(json.dumps({"large": result, "big": codes}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
