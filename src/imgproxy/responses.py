"""Reply -> HTTPResponse: headers, Server-Timing, X-Request-ID, the access line, errors.

build(request, reply)       an image response (bytes, a streamed file, a 304, a HEAD)
error(exc)                  the one place an error becomes a response
begin(request) / finish()   every request: its clock and id; every response: X-Request-ID,
                            Server-Timing (image responses) and the access line
"""

from __future__ import annotations

import logging
import time

from sanic import HTTPResponse, Request
from sanic.response import BaseHTTPResponse

from . import logs
from .config import Settings
from .errors import ImgProxyError, Overloaded
from .httpdates import format_date
from .service import Reply

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


async def build(request: Request, reply: Reply, settings: Settings) -> HTTPResponse:
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
        response = await request.respond(headers=headers, content_type=reply.content_type)
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


def begin(request: Request) -> None:
    request.ctx.started = time.perf_counter()
    request.ctx.request_id = logs.request_id(request.headers.get("x-request-id"))


def finish(request: Request, response: BaseHTTPResponse) -> None:
    """Every response: X-Request-ID and the access line; image responses: Server-Timing.
    What is off costs one flag test (`app.ctx.timing`, `.access`: set by create_app)."""
    ctx, app = request.ctx, request.app.ctx
    rid = getattr(ctx, "request_id", None) or logs.request_id(request.headers.get("x-request-id"))
    response.headers["X-Request-ID"] = rid
    is_image = hasattr(ctx, "reply")
    if not (app.access or (is_image and app.timing)):
        return
    seconds = time.perf_counter() - getattr(ctx, "started", time.perf_counter())
    reply: Reply | None = getattr(ctx, "reply", None)
    cache = None
    if is_image and app.settings.cache.enabled:
        cache = (reply.cache_tier if reply is not None else None) or "miss"
    if is_image and app.timing:
        steps = reply.steps if reply is not None else None
        response.headers["Server-Timing"] = server_timing(seconds, steps, cache)
    if app.access:
        fmt = None
        if reply is not None and reply.content_type:
            fmt = reply.content_type.rpartition("/")[2]
        query = request.query_string
        logs.access(
            request.method,
            request.path + ("?" + query if query else ""),
            response.status,
            _body_bytes(request, response),
            seconds * 1000,
            cache,
            fmt,
            rid,
        )


def server_timing(total: float, steps: dict[str, float] | None, cache: str | None) -> str:
    """`cache;desc=<tier>|miss, decode;dur=.., resize;dur=.., encode;dur=.., total;dur=..`
    (milliseconds): what devtools shows under Network -> Timing -> Server Timing."""
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
