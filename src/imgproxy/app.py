"""create_app(settings) -> Sanic: routes, listeners and the one error handler. Thin.

Every per-worker resource (executors, HTTP client, cache handles, metrics) is created in
`before_server_start`, inside the worker, and closed in `after_server_stop`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.config import Config
from sanic.exceptions import BadURL, SanicException
from sanic.response import BaseHTTPResponse

from . import __version__, cache, flight, logs, params, signing, transform, workers
from . import metrics as metrics_mod
from .config import Settings
from .errors import Forbidden, ImgProxyError, Overloaded, status_label
from .httpdates import Conditional, format_date
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, mark_process_dead
from .service import ImageService, Reply
from .sources import HttpSource

log = logging.getLogger("imgproxy")

# Sanic defaults that matter for a public image server; any can be overridden with SANIC_*.
SANIC_DEFAULTS: dict[str, Any] = {
    "REQUEST_MAX_SIZE": 64 * 1024,  # only GET/HEAD are served: no request has a body
    "REQUEST_TIMEOUT": 10,  # slowloris guard: headers must arrive within 10 s
    "RESPONSE_TIMEOUT": 60,  # the transform queue and pixel limit bound the real work
    "GRACEFUL_SHUTDOWN_TIMEOUT": 8,  # multi-worker Sanic cuts in-flight requests at ~10 s
    "ACCESS_LOG": False,
    "NOISY_EXCEPTIONS": False,
    "MOTD": False,
}
_REASONS = {
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    413: "request too large",
    503: "response timeout",
}


class ImgRequest(Request):
    """Sanic's Request, but a bad request line gets its 400 instead of a traceback.

    For a raw TAB/DEL/NUL in the request target, Sanic 25.12 builds its placeholder request
    (method "NONE") for the error response from the same invalid URL; BadURL escapes again,
    the connection drops without a response and ~40 lines of traceback are logged per
    40-byte request. The placeholder only needs *a* URL.
    """

    def __init__(self, url_bytes: bytes, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(url_bytes, *args, **kwargs)
        except BadURL:
            if kwargs.get("method") != "NONE":
                raise
            super().__init__(b"*", *args, **kwargs)


def create_app(settings: Settings | None = None) -> Sanic[Any, Any]:
    # `sanic imgproxy.app:create_app --factory` passes its argparse Namespace: ignore it.
    if not isinstance(settings, Settings):
        settings = Settings.from_env()
    obs = settings.observability
    app = Sanic(
        "imgproxy",
        config=Config(defaults=SANIC_DEFAULTS),
        request_class=ImgRequest,
        configure_logging=obs.log_format == "text",  # JSON: logs.configure sets Sanic's up
    )
    # after Sanic(), which applies its own logging defaults; in every worker too (the
    # factory runs again there); the whole process only outside tests
    logs.configure(settings.server.log_level, obs.log_format, whole_process=not Sanic.test_mode)
    app.ctx.settings = settings
    # (worker index, pid) -> None, run in the main process when a worker died (workers.py):
    # main_process_start listeners add theirs, e.g. to return what the dead worker held.
    app.ctx.on_worker_death = []
    debug = settings.server.log_level == "DEBUG"
    if debug and not obs.access_log and "SANIC_ACCESS_LOG" not in os.environ:
        app.config.ACCESS_LOG = True  # RUST_LOG=DEBUG: one line per request, as the original
    app.register_middleware(begin_request, "request")
    app.register_middleware(finish_response, "response")
    app.add_route(health, "/health", methods=["GET", "HEAD"])
    app.add_route(metrics, "/metrics", methods=["GET", "HEAD"])
    app.add_route(image, "/<path:path>", methods=["GET", "HEAD"])
    app.error_handler.add(Exception, on_error)
    # Main process listeners: every way to run (python -m imgproxy, the .pyz, the Sanic CLI)
    # gets the same instance: metrics directory, render queue, cache home, watchdog.
    app.register_listener(start_instance, "main_process_start")
    app.register_listener(workers.start_watchdog, "main_process_ready")
    app.register_listener(stop_instance, "main_process_stop")
    app.register_listener(start_worker, "before_server_start")
    app.register_listener(stop_worker, "after_server_stop")
    return app


async def start_instance(app: Sanic[Any, Any]) -> None:
    """Main process, before the workers are spawned: what all of them share (the metrics
    directory, the render permits and queue, the Redis breaker, the instance memory tier's
    tmpfs directory). The workers inherit the environment set here."""
    s: Settings = app.ctx.settings
    if app.state.auto_reload:
        log.warning(
            "auto-reload: workers restart on code changes, but the main process (worker "
            "watchdog, render queue, cache home, metrics directory) keeps the code and "
            "settings it started with; restart the server to change those"
        )
    app.ctx.metrics_dir = metrics_mod.prepare_directory()
    threads = s.limits.transform_threads
    # the workers Sanic really starts (the CLI's --workers), not only IMAGE_PROXY_WORKERS
    count = max(int(app.state.workers or 1), s.server.workers)
    shared = flight.shared_primitives(threads, count)
    shared["cache_breaker"] = cache.shared_breaker_state()
    for name, value in shared.items():
        setattr(app.shared_ctx, name, value)
    # a worker killed mid-render cannot return its render permits: the watchdog does
    app.ctx.on_worker_death.append(
        lambda index, pid: flight.reclaim(app.shared_ctx, index, threads)
    )
    app.ctx.instance_dir = cache.instance.prepare(s)


async def stop_instance(app: Sanic[Any, Any]) -> None:
    cache.instance.remove(getattr(app.ctx, "instance_dir", None))
    metrics_mod.remove_directory(getattr(app.ctx, "metrics_dir", None))


async def start_worker(app: Sanic[Any, Any]) -> None:
    s: Settings = app.ctx.settings
    transform.configure(s.limits.vips_concurrency)
    m = Metrics()
    chain = None
    if s.cache.enabled:
        chain = cache.open_chain(
            s,
            breaker_state=getattr(app.shared_ctx, "cache_breaker", None),
            on_error=lambda tier: m.cache_errors.labels(tier).inc(),
            on_drop=lambda tier: m.cache_dropped.labels(tier).inc(),
        )
        await chain.warm_up()
    elif s.cache.disk_enabled:
        log.warning("IMAGE_PROXY_ENABLE_DISK_CACHE needs IMAGE_PROXY_ENABLE_CACHE=true; no cache")
    http = HttpSource(s.fallback, f"imgproxy/{__version__}") if s.fallback.url else None
    app.ctx.service = ImageService(
        settings=s,
        metrics=m,
        executor=ThreadPoolExecutor(s.limits.transform_threads, thread_name_prefix="imgproxy-vips"),
        io_executor=ThreadPoolExecutor(2, thread_name_prefix="imgproxy-io"),
        cache=chain,
        http=http,
        admission=flight.Admission.from_shared(
            app.shared_ctx, s.limits.transform_threads, s.limits.transform_queue
        ),
    )


async def stop_worker(app: Sanic[Any, Any]) -> None:
    service: ImageService | None = getattr(app.ctx, "service", None)
    if service is not None:
        await service.drain()
        service.executor.shutdown(wait=False, cancel_futures=True)
        service.io_executor.shutdown(wait=True)
        if service.cache is not None:
            await service.cache.close()
        if service.http is not None:
            await service.http.aclose()
    mark_process_dead(os.getpid())


async def health(request: Request) -> HTTPResponse:
    return HTTPResponse("ok", content_type="text/plain; charset=utf-8")


async def metrics(request: Request) -> HTTPResponse:
    body = request.app.ctx.service.metrics.render()
    return HTTPResponse(body, content_type=METRICS_CONTENT_TYPE)


_LABEL = re.compile(r"[a-z0-9]{1,10}")  # what a format or file extension can look like


def _format_label(path: str, asked: str | None) -> str:
    """`format` of image_requests_total, exactly as the original: the `format` parameter
    lowercased (`jpg` stays `jpg`) or the negotiated format, else the file's extension
    lowercased (`photo.JPG` -> `jpg`, `notes.txt` -> `txt`), `unknown` without one. A value
    that cannot be a format name (over 10 characters, or not [a-z0-9]) becomes `other`: a
    client cannot mint arbitrarily long label values."""
    if asked:
        value = asked.lower()
    else:
        name = path.rpartition("/")[2]
        if "." not in name:
            return "unknown"
        value = name.rpartition(".")[2].lower()
    return value if _LABEL.fullmatch(value) else "other"


async def image(request: Request, path: str) -> HTTPResponse:
    service: ImageService = request.app.ctx.service
    settings: Settings = request.app.ctx.settings
    request.ctx.reply = None  # an image request: finish_response adds Server-Timing
    service.metrics.in_flight.inc()
    reply: Reply | None = None
    kind = "other"
    negotiated: str | None = None
    try:
        if settings.security.signature_keys:
            check_signature(request, settings)
        spec = params.parse(request.path, request.query_string, request.headers, settings)
        cond = Conditional.from_headers(request.headers)
        located = None
        if settings.images.preferred_formats and spec.format is None:
            accept = ",".join(request.headers.getall("accept", ()))  # RFC 9110: lines join
            spec, located, negotiated = await service.negotiate(spec, accept)
        if spec.is_passthrough:
            kind = "passthrough"
            reply = await service.passthrough(spec, cond, located)
        else:
            kind = "transform"
            reply = await service.transform(spec, cond, located)
        request.ctx.reply = reply
        response = await _respond(request, reply, settings)
        status = reply.status
    except ImgProxyError as exc:
        response = error_response(exc)
        status = exc.status
    finally:
        service.metrics.in_flight.dec()
    sent = (
        reply.size if reply is not None and reply.status == 200 and request.method == "GET" else 0
    )
    service.observe(
        _format_label(path, negotiated or request.args.get("format")),
        status_label(status),
        kind,
        time.perf_counter() - request.ctx.started,  # set by begin_request
        sent,
    )
    return response


def check_signature(request: Request, settings: Settings) -> None:
    """Signed URLs: checked first, on the raw path and query, before the path is parsed or any
    parameter validated, so an unsigned request learns nothing (not even 404 vs 400)."""
    reason = signing.refusal(
        settings.security.signature_keys,
        request.path,  # still percent-encoded in Sanic
        request.query_string,
        settings.images.strip_path,
    )
    if reason is not None:
        raise Forbidden(reason)


async def _respond(request: Request, reply: Reply, settings: Settings) -> HTTPResponse:
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
    if reply.status == 304:
        return HTTPResponse(status=304, headers=headers)
    if reply.stream is None:
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


def begin_request(request: Request) -> None:
    request.ctx.started = time.perf_counter()
    request.ctx.request_id = logs.request_id(request.headers.get("x-request-id"))


def finish_response(request: Request, response: BaseHTTPResponse) -> None:
    """Every response: X-Request-ID and the access line; image responses: Server-Timing."""
    ctx = request.ctx
    now = time.perf_counter()
    rid = getattr(ctx, "request_id", None) or logs.request_id(request.headers.get("x-request-id"))
    response.headers["X-Request-ID"] = rid
    settings: Settings = request.app.ctx.settings
    is_image = hasattr(ctx, "reply")
    reply: Reply | None = getattr(ctx, "reply", None)
    cache = None
    if is_image and settings.cache.enabled:
        cache = (reply.cache_tier if reply is not None else None) or "miss"
    seconds = now - getattr(ctx, "started", now)
    if is_image and settings.observability.server_timing:
        steps = reply.steps if reply is not None else None
        response.headers["Server-Timing"] = server_timing(seconds, steps, cache)
    if settings.observability.access_log:
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


def error_response(exc: ImgProxyError) -> HTTPResponse:
    """The one place an error becomes a response: text/plain, one line, no Cache-Control."""
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else {}
    return HTTPResponse(
        exc.reason, status=exc.status, headers=headers, content_type="text/plain; charset=utf-8"
    )


async def on_error(request: Request, exc: Exception) -> HTTPResponse:
    if isinstance(exc, ImgProxyError):
        return error_response(exc)
    if isinstance(exc, SanicException):
        status = exc.status_code
        err = ImgProxyError(_REASONS.get(status, "bad request" if status < 500 else "server error"))
        err.status = status
        response = error_response(err)
        if status == 405:
            response.headers["Allow"] = "GET, HEAD"
        elif status == 503:
            response.headers["Retry-After"] = "1"
        return response
    log.exception("unhandled error on %s", request.path)
    return error_response(ImgProxyError())
