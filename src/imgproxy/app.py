"""create_app(settings) -> Sanic: routes, listeners and the one error handler. Thin.

What the workers share is made in `main_process_start` (`start_instance`); every per-worker
resource (metrics, cache chain, render pool, HTTP client, the service over them) in
`before_server_start` (`start_worker`), inside the worker, and closed in `after_server_stop`.
Responses are built in `responses`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.config import Config
from sanic.exceptions import BadURL, SanicException

from . import __version__, cache, logs, pool, responses, transform, workers
from . import metrics as metrics_mod
from .config import Settings
from .errors import ImgProxyError
from .httpdates import Conditional
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, mark_process_dead
from .params import urls
from .produce import Producer
from .service import ImageService, Outcome, Reply
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
    app.ctx.timing, app.ctx.access = obs.server_timing, obs.access_log  # responses.finish
    # (worker index, pid) -> None, run in the main process when a worker died (workers.py):
    # main_process_start listeners add theirs, e.g. to return what the dead worker held.
    app.ctx.on_worker_death = []
    debug = settings.server.log_level == "DEBUG"
    if debug and not obs.access_log and "SANIC_ACCESS_LOG" not in os.environ:
        app.config.ACCESS_LOG = True  # RUST_LOG=DEBUG: one line per request, as the original
    app.add_route(health, "/health", methods=["GET", "HEAD"])
    app.add_route(metrics, "/metrics", methods=["GET", "HEAD"])
    app.add_route(image, "/<path:path>", methods=["GET", "HEAD"])
    app.error_handler.add(Exception, on_error)
    app.ctx.spread = None  # workers.Spread, in start_worker
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
    # the render queue: its dispatcher (a thread here) and render processes; a worker that
    # dies closes its connection to it, which gives back every place it held
    app.ctx.render_pool, shared = pool.start_instance(s)
    shared["cache_breaker"] = cache.shared_breaker_state()
    for name, value in shared.items():
        setattr(app.shared_ctx, name, value)
    app.ctx.instance_dir = cache.instance.prepare(s)
    counts = workers.shared_array(s.server.workers)  # open connections per worker
    if counts is not None:
        app.shared_ctx.connections = counts
        app.ctx.on_worker_death.append(lambda index, pid: counts.__setitem__(index, 0))


async def stop_instance(app: Sanic[Any, Any]) -> None:
    dispatcher = getattr(app.ctx, "render_pool", None)
    if dispatcher is not None:
        dispatcher.stop()
    cache.instance.remove(getattr(app.ctx, "instance_dir", None))
    metrics_mod.remove_directory(getattr(app.ctx, "metrics_dir", None))


# With asyncio's debug mode on (PYTHONASYNCIODEBUG=1), every event-loop callback slower than
# this is logged ("Executing <Task ...> took 0.031 seconds"): nothing on the loop may block
# on a disk, a database file or a lock (SPEC "Render queue"); the fault tests check it.
SLOW_CALLBACK = 0.02


async def start_worker(app: Sanic[Any, Any]) -> None:
    """Every per-worker resource, in one place: metrics, cache chain, render pool, the
    fallback origin's client, and the service over them."""
    s: Settings = app.ctx.settings
    loop = asyncio.get_running_loop()
    if loop.get_debug():
        loop.slow_callback_duration = SLOW_CALLBACK
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
    renders = pool.open_pool(app.shared_ctx, s.limits, s.encode, m)
    transform.configure_memo(pool.decoded_share(renders, s))
    http = None
    if s.fallback.url:  # the memo's budget is the instance's: each worker keeps its share
        memo = s.fallback.memo_size // s.server.workers
        http = HttpSource(s.fallback, f"imgproxy/{__version__}", memo)
    app.ctx.service = ImageService(s, m, Producer(s, m, renders, chain), http)
    app.ctx.urls = urls.Urls(s)
    app.ctx.negotiation = bool(s.images.preferred_formats)
    app.ctx.spread = workers.Spread.for_worker(getattr(app.shared_ctx, "connections", None))
    if app.ctx.spread is not None:
        app.ctx.spread.start(loop)


async def stop_worker(app: Sanic[Any, Any]) -> None:
    service: ImageService | None = getattr(app.ctx, "service", None)
    if service is not None:
        await service.close()
    mark_process_dead(os.getpid())


async def health(request: Request) -> HTTPResponse:
    response = HTTPResponse("ok", content_type=responses.TEXT)
    responses.finish(request, response, responses.request_id(request), time.perf_counter())
    return response


async def metrics(request: Request) -> HTTPResponse:
    started = time.perf_counter()
    body = request.app.ctx.service.metrics.render()
    response = HTTPResponse(body, content_type=METRICS_CONTENT_TYPE)
    responses.finish(request, response, responses.request_id(request), started)
    return response


async def image(request: Request, path: str) -> HTTPResponse:
    started = time.perf_counter()
    ctx = request.app.ctx
    if ctx.spread is not None and ctx.spread.over(request.stream):  # holds too many
        request.stream.keep_alive = False  # type: ignore[union-attr]
    service: ImageService = ctx.service
    headers = request.headers
    rid = responses.request_id(request)
    accept = None
    if ctx.negotiation:
        accept = ",".join(headers.getall("accept", ()))  # RFC 9110: lines join
    parsed = ctx.urls.parse(request.path, request.query_string, headers.get("sec-ch-dpr"), accept)
    head = request.method == "HEAD"
    if not head and "if-none-match" not in headers and "if-modified-since" not in headers:
        quick = service.quick(parsed)
        if quick is not None:  # from this worker's memory, not one await on the way
            (body, ctype), known, kind, tier = quick
            prepared = responses.quick(request, body, known, ctype, rid, started, tier)
            label = known.negotiated or parsed.label
            service.observe(label, 200, kind, time.perf_counter() - started, len(body))
            return prepared
    service.metrics.in_flight.inc()
    out = Outcome(parsed.label)
    reply: Reply | None = None
    try:
        cond = Conditional.from_headers(headers)
        reply = await service.serve(parsed, cond, accept, head, out)
        response = await responses.build(request, reply, service.settings, rid, started)
        status = reply.status
    except ImgProxyError as exc:
        response = responses.error(exc)
        status = exc.status
    except Exception:
        # the server's own failure: counted like any other answer, logged with its traceback
        log.exception("unhandled error on %s", request.path)
        response = responses.error(ImgProxyError())
        status = response.status
    finally:
        service.metrics.in_flight.dec()
    if response.stream is None:  # else sent already, and finished when its headers left
        responses.finish(request, response, rid, started, reply, image=True)
    sent = reply.size if reply is not None and status == 200 and not head else 0
    service.observe(out.label, status, out.kind, time.perf_counter() - started, sent)
    return response


async def on_error(request: Request, exc: Exception) -> HTTPResponse:
    """Errors raised outside the handlers (Sanic's: bad requests, timeouts, 405...)."""
    response = _error_response(request, exc)
    responses.finish(request, response, responses.request_id(request), None)
    return response


def _error_response(request: Request, exc: Exception) -> HTTPResponse:
    if isinstance(exc, ImgProxyError):
        return responses.error(exc)
    if isinstance(exc, SanicException):
        status = exc.status_code
        err = ImgProxyError(_REASONS.get(status, "bad request" if status < 500 else "server error"))
        err.status = status
        response = responses.error(err)
        if status == 405:
            response.headers["Allow"] = "GET, HEAD"
        elif status == 503:
            response.headers["Retry-After"] = "1"
        return response
    log.exception("unhandled error on %s", request.path)
    return responses.error(ImgProxyError())
