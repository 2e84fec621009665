"""Load generator for the API tests, run as a separate process (so the test's own probes do not
compete with it for the GIL): N concurrent streams, prints the data events each received.

    python -m tests.api.load_streams URL N MAX_TOKENS
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> int:
    events = 0
    body = {"prompt": "Hello", "ignore_eos": True, "stream": True, "max_tokens": max_tokens, "seed": i,
            "temperature": 0.8}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for chunk in r.aiter_raw():
            events += chunk.count(b"data: ")
    return events


async def main(url: str, n: int, max_tokens: int) -> None:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n + 8)) as client:
        counts = await asyncio.gather(*(one(client, url, i, max_tokens) for i in range(n)))
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
