"""Server-sent events, read line by line as the SSE standard defines lines.

A line ends at LF (an optional CR before it is dropped), and only there: U+2028, U+2029, U+0085
and the other separators that str.splitlines (and so httpx's aiter_lines) also breaks on are
ordinary characters inside a `data:` line. A JSON encoder that writes non-ASCII as is (headwise's)
puts U+2028, U+2029 and U+0085 there whenever a generated token contains one, and splitting on
them turns a valid chunk into two malformed ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


def split(buffer: bytes) -> tuple[list[str], bytes]:
    """(the complete lines in buffer, decoded, without their line ends; the unfinished rest)."""
    *complete, rest = buffer.split(b"\n")
    return [line[:-1].decode("utf-8", "replace") if line.endswith(b"\r") else line.decode("utf-8", "replace")
            for line in complete], rest


async def lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The lines of a byte stream (e.g. httpx's Response.aiter_bytes()); a last line without its
    LF is yielded too."""
    rest = b""
    async for chunk in chunks:
        found, rest = split(rest + chunk)
        for line in found:
            yield line
    if rest:
        yield rest.decode("utf-8", "replace")
