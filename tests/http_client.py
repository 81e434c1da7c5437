"""A small asyncio HTTP/1.1 client for online tests and the server benchmark: whole responses, SSE
streams as they arrive, and hanging up mid-request."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Optional
from urllib.parse import urlsplit


class Connection:
    """One request on its own connection (Connection: close); `close()` hangs up at any point."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}

    @classmethod
    async def open(cls, base_url: str, method: str, path: str, body: Any = None,
                   headers: Optional[dict[str, str]] = None, raw: Optional[bytes] = None,
                   content_length: Optional[int] = None) -> "Connection":
        """content_length: announce this body length instead of the real one (to test size limits)."""
        conn = await cls.send(base_url, method, path, body, headers, raw, content_length)
        try:
            await conn.read_head()
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    async def send(cls, base_url: str, method: str, path: str, body: Any = None,
                   headers: Optional[dict[str, str]] = None, raw: Optional[bytes] = None,
                   content_length: Optional[int] = None) -> "Connection":
        """The request sent, its answer not read yet (read_head reads the status line and headers)."""
        url = urlsplit(base_url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        lines = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: close",
                 f"Content-Length: {len(data) if content_length is None else content_length}",
                 "Content-Type: application/json"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        await writer.drain()
        return cls(reader, writer)

    async def read_head(self) -> None:
        status_line = await self.reader.readline()
        if len(status_line.split()) < 2:
            raise ConnectionError("the server closed the connection without an answer")
        self.status = int(status_line.split()[1])
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoded)."""
        if self.headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    return
                data = await self.reader.readexactly(size)
                await self.reader.readline()
                yield data
        elif "content-length" in self.headers:
            yield await self.reader.readexactly(int(self.headers["content-length"]))
        else:  # the body lasts until the connection closes
            while data := await self.reader.read(65536):
                yield data

    async def body(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def events(self) -> AsyncIterator[Any]:
        """SSE `data:` payloads, parsed as JSON except the final "[DONE]"."""
        buffer = b""
        async for chunk in self.chunks():
            buffer = (buffer + chunk).replace(b"\r\n", b"\n")  # SSE allows either line end
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):  # the space after the colon is optional
                        payload = line[5:].strip().decode()
                        yield payload if payload == "[DONE]" else json.loads(payload)

    def close(self) -> None:
        self.writer.close()


async def call(base_url: str, method: str, path: str, body: Any = None, headers: Optional[dict[str, str]] = None,
               raw: Optional[bytes] = None) -> tuple[int, Any]:
    """(status, JSON body) of one request."""
    conn = await Connection.open(base_url, method, path, body, headers, raw)
    try:
        data = await conn.body()
    finally:
        conn.close()
    return conn.status, json.loads(data) if data else None


async def stream(base_url: str, path: str, body: dict, headers: Optional[dict[str, str]] = None) -> list[Any]:
    """Every SSE payload of a streamed request (the final "[DONE]" included)."""
    conn = await Connection.open(base_url, "POST", path, body, headers)
    try:
        assert conn.status == 200, (conn.status, await conn.body())
        assert conn.headers["content-type"].startswith("text/event-stream")
        return [e async for e in conn.events()]
    finally:
        conn.close()
