"""SPEC.md's error table, one real request per row: status, text/plain one-liner, no Cache-Control."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from conftest import Resp, Server

ERRORS = [
    # bad query values
    ("size=0", "/landscape.jpg?size=0", 400),
    ("size=abc", "/landscape.jpg?size=abc", 400),
    ("size-overflow", "/landscape.jpg?size=4294967296", 400),
    ("size-negative", "/landscape.jpg?size=-1", 400),
    ("dpr=0.5", "/landscape.jpg?size=10&dpr=0.5", 400),
    ("dpr=11", "/landscape.jpg?size=10&dpr=11", 400),
    ("format=gif", "/landscape.jpg?format=gif", 400),
    ("algorithm", "/landscape.jpg?size=10&resize_algorithm=nearest", 400),
    # paths
    ("dotdot", "/../../etc/passwd", 404),
    ("dotdot-jpg", "/photos/../../x.jpg", 404),
    ("encoded-dotdot", "/%2e%2e/%2e%2e/etc/passwd.jpg", 404),
    ("encoded-slash", "/photos%2fsample.jpg", 404),
    ("nul", "/landscape.jpg%00.png", 404),
    ("absolute", "//etc/passwd", 404),
    ("backslash", "/photos\\..\\landscape.jpg", 404),
    ("missing", "/missing.jpg", 404),
    ("missing-transform", "/missing.jpg?size=10", 404),
    ("directory", "/dir.jpg", 404),
    # unsupported
    ("ext-txt", "/notes.txt", 415),
    ("ext-none", "/photos", 415),
    ("ext-gif", "/anim.gif", 415),
    ("text-named-jpg", "/text.jpg", 415),
    ("text-named-jpg-transform", "/text.jpg?size=10", 415),
    ("tiff-named-png", "/tiff-named.png", 415),
    ("tiff-named-png-transform", "/tiff-named.png?format=webp", 415),
    ("empty-file", "/empty.jpg", 415),
    # unprocessable
    ("truncated-jpeg", "/truncated.jpg?size=100", 422),
    ("truncated-jpeg-no-resize", "/truncated.jpg?format=png", 422),
    ("truncated-jpeg-shrink", "/truncated.jpg?size=100&resize_algorithm=thumbnail", 422),
    ("truncated-jpeg-bicubic", "/truncated.jpg?size=100&resize_algorithm=bicubic", 422),
    ("png-bomb", "/bomb.png?size=100", 422),
]


def check_error(r: Resp, status: int) -> None:
    assert r.status == status, (r.status, r.body[:200])
    assert r.headers["content-type"].startswith("text/plain")
    assert "cache-control" not in r.headers
    assert r.text and "\n" not in r.text.strip()
    assert r.headers["content-length"] == str(len(r.body))


@pytest.mark.parametrize(("target", "status"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_table(server: Server, target: str, status: int) -> None:
    check_error(server.raw(target), status)


def test_truncated_passthrough_is_served_untouched(server: Server) -> None:
    # passthrough never decodes: a damaged JPEG still sniffs as JPEG and is served as is
    assert server.get("/truncated.jpg").status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(server: Server, method: str) -> None:
    r = server.raw("/landscape.jpg", method=method)
    check_error(r, 405)
    assert "GET" in r.headers.get("allow", "")


def test_pixel_limit_setting(serve: Callable[..., Server]) -> None:
    s = serve(IMAGE_PROXY_MAX_SOURCE_PIXELS="10000")
    check_error(s.get("/landscape.jpg?size=10"), 422)
    assert s.get("/landscape.jpg").status == 200  # passthrough never decodes
    assert s.get("/small.jpg?size=10").status == 200  # 101x50 is under the limit


def test_source_bytes_limit(serve: Callable[..., Server]) -> None:
    s = serve(IMAGE_PROXY_MAX_SOURCE_BYTES="1000")
    check_error(s.get("/landscape.jpg?size=10"), 422)


def test_overload_gives_503_with_retry_after(serve: Callable[..., Server]) -> None:
    s = serve(IMAGE_PROXY_TRANSFORM_THREADS="1", IMAGE_PROXY_TRANSFORM_QUEUE="0")
    results: list[Resp] = []
    lock = threading.Lock()

    def hit(i: int) -> None:
        # distinct sizes, so single-flight does not merge the requests into one render
        r = s.raw(f"/huge.jpg?size={2000 + i}&format=webp&resize_algorithm=lanczos3")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status for r in results)
    assert set(statuses) <= {200, 503}
    assert 200 in statuses and 503 in statuses, statuses
    for r in results:
        if r.status == 503:
            check_error(r, 503)
            assert r.headers["retry-after"].isdigit()
    assert s.get("/health").status == 200


def test_the_servers_own_failure_is_counted_before_its_500(
    serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    """An exception that is not one of ours (here: the worker's render executor is shut
    down, as during a shutdown race) is a 500 with the generic reason, logged once with its
    traceback, and counted in image_requests_total{status="error"} like every answer (the
    5xx alert watches it)."""
    s = serve()
    assert s.app is not None
    s.app.ctx.service.producer.pool.executor.shutdown()  # a real collaborator, failing
    with caplog.at_level("ERROR", logger="imgproxy"):
        r = s.get("/landscape.jpg?size=10&format=png")
    check_error(r, 500)
    assert r.text == "internal error"
    assert s.metric("image_requests_total", status="error", format="png") == 1
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and "RuntimeError" in caplog.text
    assert s.get("/landscape.jpg").status == 200  # passthrough needs no render


def test_a_failing_source_renders_once_per_window(serve: Callable[..., Server]) -> None:
    """A poisoned source (a valid header, a corrupt body) is rendered once: the requests
    after it get the same 422 from the negative entry, not a render each."""
    s = serve()
    answers = [s.get("/truncated.jpg?size=100&format=png") for _ in range(5)]
    for r in answers:
        check_error(r, 422)
    assert len({r.body for r in answers}) == 1
    assert s.metric("image_render_failures_total", status="422") == 1
    assert s.get("/landscape.jpg?size=100&format=png").status == 200  # other keys render
