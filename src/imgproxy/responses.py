"""Reply -> HTTPResponse: headers, Server-Timing, X-Request-ID, the access line, errors.

build(request, reply)       an image response (bytes, a streamed file, a 304, a HEAD)
quick(body, known, ...)     a 200 from memory whose header block was encoded once (`Prepared`)
error(exc)                  the one place an error becomes a response
finish(request, response)   every response: X-Request-ID, Server-Timing (image responses) and
                            the access line; called by each handler and the error handler
                            (no middleware: Sanic runs middleware on every request, and a
                            cache hit costs less than the middleware machinery)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

from sanic import HTTPResponse, Request
from sanic.response import BaseHTTPResponse

from . import logs
from .config import Settings
from .errors import ImgProxyError, Overloaded
from .httpdates import format_date
from .service import Known, Reply

log = logging.getLogger("imgproxy")

TEXT = "text/plain; charset=utf-8"


def headers_of(reply: Reply, settings: Settings) -> dict[str, str]:
    images = settings.images
    # negotiation on: the same URL answers differently per Accept, and caches must know
    vary = "Accept, Sec-CH-DPR" if images.preferred_formats else "Sec-CH-DPR"
    headers: dict[str, str] = {"Vary": vary, "ETag": reply.etag}
    if images.cache_control:
        headers["Cache-Control"] = images.cache_control
    if reply.last_modified is not None:
        headers["Last-Modified"] = format_date(int(reply.last_modified))
    if reply.x_cache and images.cache_status_header:
        headers[images.cache_status_header] = reply.x_cache
    return headers


_CLEAN = str.maketrans("", "", "\r\n\x00")  # what Sanic strips from every header value


class Prepared(HTTPResponse):
    """A 200 from memory: its fixed headers (`block`: content type, Vary, ETag,
    Cache-Control, Last-Modified, X-Cache) encoded once per answer, only the per-request
    ones (Content-Length, Connection, X-Request-ID, Server-Timing) encoded per request.
    Sanic encodes and sanitises every header of a plain HTTPResponse on every request."""

    __slots__ = ("block",)

    def __init__(self, body: bytes, block: tuple[bytes, bytes]) -> None:
        # BaseHTTPResponse's slots, set directly: HTTPResponse() builds two Header objects
        self.asgi = False
        self.body = body
        self.content_type = None
        self.stream = None
        self.status = 200
        self.headers = {}  # type: ignore[assignment]  # Sanic sets and reads a few names
        self._cookies = None
        self.block = block

    @property
    def processed_headers(self) -> Iterator[tuple[bytes, bytes]]:
        yield self.block
        for name, value in self.headers.items():  # ours, or Sanic's own: already clean
            yield name.encode("ascii"), f"{value}".encode(errors="surrogateescape")


def block_of(headers: dict[str, str], content_type: str) -> tuple[bytes, bytes]:
    """`headers` (and the content type) as Sanic would send them, encoded once, as one
    (name, value) pair: Sanic writes each pair as `name: value CRLF`, so the value carries
    the other lines whole (`image/webp CRLF vary: Accept CRLF etag: ...`), and one header
    line's formatting sends all of them."""
    lines = [
        b"%b: %b" % (name.translate(_CLEAN).encode("ascii"), value.translate(_CLEAN).encode())
        for name, value in [("content-type", content_type), *headers.items()]
    ]
    name, _, first = lines[0].partition(b": ")
    return name, b"\r\n".join([first, *lines[1:]])


def quick(request: Request, body: bytes, known: Known, content_type: str, rid: str,
          started: float, tier: str | None) -> Prepared:  # fmt: skip
    """The response of a 200 served from memory (`ImageService.quick`): a hit of this
    worker's hot tier (`tier` "memory") or a passthrough of a memoised file (None)."""
    block = known.block
    if block is None:
        block = known.block = block_of(known.headers, content_type)
    response = Prepared(body, block)
    cache = stamp(request, response.headers, rid, started, tier)
    if request.app.ctx.access:
        access_line(request, response, rid, _since(started), cache, content_type)
    return response


async def build(
    request: Request, reply: Reply, settings: Settings, rid: str, started: float
) -> HTTPResponse:
    """The response for `reply`. A 200 whose headers the service keeps (`reply.headers`, a
    HIT or a passthrough of the same source identity) builds them once and reuses them."""
    headers = reply.headers
    if not headers:
        built = headers_of(reply, settings)
        if headers is not None:
            headers.update(built)  # kept with the answer for the next request
        headers = built
    if reply.status == 304:
        return HTTPResponse(status=304, headers=headers)
    if reply.stream is None:
        if reply.body is None:  # HEAD of a file that was not read: the length is the stat's
            headers["Content-Length"] = str(reply.size)
        return HTTPResponse(reply.body, headers=headers, content_type=reply.content_type)
    stream = reply.stream
    try:
        headers["Content-Length"] = str(stream.size)
        # the headers leave now, before the body: finished here, not after the body (the
        # client may be gone by then, and the handler cancelled with its connection)
        response = await request.respond(headers=headers, content_type=reply.content_type)
        finish(request, response, rid, started, reply, image=True)
        if request.method != "HEAD":
            try:
                async for chunk in stream.chunks():
                    await response.send(chunk)
            except OSError as exc:  # shrank or failed mid-way: the client sees a short body
                log.warning("passthrough of %s cut short: %s", request.path, exc)
                request.transport.close()
                return response  # type: ignore[no-any-return]
        await response.eof()
    finally:
        stream.close()
    return response  # type: ignore[no-any-return]


def error(exc: ImgProxyError) -> HTTPResponse:
    """The one place an error becomes a response: text/plain, one line, no Cache-Control."""
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else {}
    return HTTPResponse(exc.reason, status=exc.status, headers=headers, content_type=TEXT)


def request_id(request: Request) -> str:
    return logs.request_id(request.headers.get("x-request-id"))


def finish(
    request: Request,
    response: BaseHTTPResponse,
    rid: str,
    started: float | None,
    reply: Reply | None = None,
    image: bool = False,
) -> None:
    """Every response: X-Request-ID and the access line; image responses (`image`):
    Server-Timing (`stamp`). Before the response's headers are sent: `build` calls it for a
    streamed body, the handlers for the rest. What is off costs one flag test
    (`app.ctx.timing`, `.access`)."""
    if not image:
        response.headers["X-Request-ID"] = rid
        cache = None
    else:
        tier, steps = (reply.cache_tier, reply.steps) if reply else (None, None)
        cache = stamp(request, response.headers, rid, started, tier, steps)
    if request.app.ctx.access:
        ctype = reply.content_type if reply else None
        access_line(request, response, rid, _since(started), cache, ctype)


def stamp(
    request: Request,
    headers: MutableMapping[str, Any],
    rid: str,
    started: float | None,
    tier: str | None,
    steps: dict[str, float] | None = None,
) -> str | None:
    """An image response's X-Request-ID and (when on) Server-Timing, set in `headers`;
    returns the cache tier they name: `tier`, else `miss` with the cache on, else None."""
    headers["X-Request-ID"] = rid
    cache = tier or _miss(request)
    if request.app.ctx.timing:
        headers["Server-Timing"] = server_timing(_since(started), steps, cache)
    return cache


def _miss(request: Request) -> str | None:
    return "miss" if request.app.ctx.settings.cache.enabled else None


def _since(started: float | None) -> float:
    return 0.0 if started is None else time.perf_counter() - started


def access_line(
    request: Request,
    response: BaseHTTPResponse,
    rid: str,
    seconds: float,
    cache: str | None,
    content_type: str | None,
) -> None:
    query = request.query_string
    logs.access(
        request.method,
        request.path + ("?" + query if query else ""),
        response.status,
        _body_bytes(request, response),
        seconds * 1000,
        cache,
        content_type.rpartition("/")[2] if content_type else None,
        rid,
    )


def server_timing(total: float, steps: dict[str, float] | None, cache: str | None) -> str:
    """`cache;desc=<tier>|miss, decode;dur=.., resize;dur=.., encode;dur=.., total;dur=..`
    (milliseconds): what devtools shows under Network -> Timing -> Server Timing."""
    if steps is None:  # an answer from a cache or a passthrough: the common, cheap case
        if cache:
            return f"cache;desc={cache}, total;dur={total * 1000:.2f}"
        return f"total;dur={total * 1000:.2f}"
    parts = [f"cache;desc={cache}"] if cache else []
    for step in ("decode", "resize", "encode"):
        if steps and step in steps:
            parts.append(f"{step};dur={steps[step] * 1000:.2f}")
    parts.append(f"total;dur={total * 1000:.2f}")
    return ", ".join(parts)


def _body_bytes(request: Request, response: BaseHTTPResponse) -> int:
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    length = response.headers.get("content-length")
    if length and length.isdigit():
        return int(length)  # a streamed body
    return len(response.body or b"")
