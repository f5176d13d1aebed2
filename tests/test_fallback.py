"""Fallback origin: a real misbehaving origin on 127.0.0.1, and hostile request paths.

The origin records every request line and Host header it receives. Whatever the client sends,
the origin must only ever see `GET /base/...` with its own Host, and every failure mode of
the origin (404, 5xx, redirects, slow drip, lying Content-Length, oversized chunked body,
gzip, a body that is not an image) maps to the status in SPEC "Errors".
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import posixpath
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest
import pyvips

from conftest import Server, app_server, free_port, make_settings, photo, png_bomb

BASE = "/base/"
MAX_SIZE = 200_000
TIMEOUT = "1"


def _jpeg(width: int = 300, height: int = 200) -> bytes:
    return bytes(photo(width, height).jpegsave_buffer(Q=80))


JPEG = _jpeg()
PNG = bytes(photo(64, 48).pngsave_buffer())


@dataclass
class Seen:
    path: str
    host: str


@dataclass
class Origin:
    """A tiny HTTP/1.1 origin; `routes` maps an exact request path to a behaviour."""

    port: int
    routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]] = field(
        default_factory=dict
    )
    seen: list[Seen] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)  # body bytes written per path
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()
            self.sent.clear()

    def paths(self) -> list[str]:
        with self.lock:
            return [s.path for s in self.seen]


def _send(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes, **hdrs: str) -> None:
    h.send_response(status)
    headers = {"Content-Type": "image/jpeg", "Content-Length": str(len(body))}
    headers.update({k.replace("_", "-"): v for k, v in hdrs.items()})
    for k, v in headers.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def serve_body(body: bytes, status: int = 200, **hdrs: str) -> Callable[..., None]:
    return lambda h: _send(h, status, body, **hdrs)


def redirect(location: str, status: int = 302) -> Callable[..., None]:
    return lambda h: _send(h, status, b"", Location=location, Content_Type="text/plain")


def drip(body: bytes, every: float = 0.2) -> Callable[..., None]:
    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.flush()
        for i in range(len(body)):
            h.wfile.write(body[i : i + 1])
            h.wfile.flush()
            time.sleep(every)

    return handler


def header_drip(h: http.server.BaseHTTPRequestHandler) -> None:
    """Headers that never end: one byte every 0.2 s for 10 s."""
    h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(50):
        h.wfile.write(b"a")
        h.wfile.flush()
        time.sleep(0.2)
    h.close_connection = True


def slow_headers(delay: float) -> Callable[..., None]:
    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        time.sleep(delay)
        _send(h, 200, JPEG)

    return handler


def chunked(total: int, chunk: int = 16 * 1024, head: bytes = JPEG[:64]) -> Callable[..., None]:
    """A valid-looking JPEG start, then zeros, chunked, `total` bytes, no Content-Length."""

    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        written = 0
        data = head + b"\x00" * (chunk - len(head))
        while written < total:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            written += len(data)
            h.server.origin.sent[h.path] = written  # type: ignore[attr-defined]
            data = b"\x00" * chunk
        h.wfile.write(b"0\r\n\r\n")

    return handler


def long_content_length(body: bytes, declared: int) -> Callable[..., None]:
    """Declares more bytes than it sends, then closes the connection."""

    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        h.close_connection = True

    return handler


def short_content_length(body: bytes, declared: int) -> Callable[..., None]:
    """Declares fewer bytes than it sends (the rest is garbage on the connection)."""

    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        h.wfile.write(body + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad")
        h.wfile.flush()

    return handler


def raw_response(data: bytes) -> Callable[..., None]:
    """Bytes written as they are: for responses http.server would refuse to produce."""

    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        h.wfile.write(data)
        h.wfile.flush()
        h.close_connection = True

    return handler


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        origin: Origin = self.server.origin  # type: ignore[attr-defined]
        with origin.lock:
            origin.seen.append(Seen(self.path, self.headers.get("Host", "")))
        route = origin.routes.get(self.path)
        try:
            if route is None:
                _send(self, 404, b"no such image", Content_Type="text/plain")
            else:
                route(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


@contextlib.contextmanager
def run_origin() -> Iterator[Origin]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    origin = Origin(httpd.server_address[1])
    httpd.origin = origin  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield origin
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def other() -> Iterator[Origin]:
    """A second origin (another authority): redirects there must never be followed."""
    with run_origin() as o:
        o.routes["/base/ok.jpg"] = serve_body(JPEG)
        o.routes["/ok.jpg"] = serve_body(JPEG)
        yield o


@pytest.fixture(scope="module")
def origin(other: Origin) -> Iterator[Origin]:
    with run_origin() as o:
        p = o.port
        o.routes.update(
            {
                "/base/ok.jpg": serve_body(JPEG, Last_Modified="Wed, 21 Oct 2015 07:28:00 GMT"),
                "/base/photos/ok.png": serve_body(PNG, Content_Type="image/png"),
                "/base/html.jpg": serve_body(JPEG, Content_Type="text/html"),
                # Last-Modified values that parse but cannot be formatted back (year 10000)
                "/base/lm-far.jpg": serve_body(
                    JPEG, Last_Modified="Fri, 31 Dec 9999 23:59:59 -2359"
                ),
                "/base/lm-junk.jpg": serve_body(
                    JPEG, Last_Modified="Mon, 99 Jan 2020 99:00:00 XYZ"
                ),
                "/base/lm-year1.jpg": serve_body(
                    JPEG, Last_Modified="Mon, 01 Jan 0001 00:00:00 GMT"
                ),
                "/base/no-type.jpg": serve_body(JPEG, Content_Type=""),
                "/base/not-image.jpg": serve_body(b"<html>hello</html>" * 10),
                "/base/gif.png": serve_body(
                    bytes(photo(20, 10).gifsave_buffer()), Content_Type="image/png"
                ),
                "/base/410.jpg": serve_body(b"gone", status=410, Content_Type="text/plain"),
                "/base/500.jpg": serve_body(b"boom", status=500, Content_Type="text/plain"),
                "/base/503.jpg": serve_body(b"busy", status=503, Content_Type="text/plain"),
                "/base/204.jpg": serve_body(b"", status=204),
                "/base/gzip.jpg": serve_body(gzip.compress(JPEG), Content_Encoding="gzip"),
                "/base/br.jpg": serve_body(JPEG, Content_Encoding="br"),
                "/base/slow.jpg": drip(JPEG[:100]),
                "/base/slow-headers.jpg": slow_headers(3),
                "/base/cl-long.jpg": long_content_length(JPEG[:1000], len(JPEG)),
                "/base/cl-short.jpg": short_content_length(JPEG, len(JPEG) - 500),
                "/base/cl-over-max.jpg": serve_body(JPEG, Content_Length=str(MAX_SIZE + 1)),
                "/base/exactly-max.jpg": serve_body(JPEG[:64] + b"\x00" * (MAX_SIZE - 64)),
                "/base/over-max.jpg": serve_body(JPEG[:64] + b"\x00" * (MAX_SIZE - 63)),
                "/base/chunked-huge.jpg": chunked(200 * 1024 * 1024),
                "/base/chunked-small.jpg": chunked(MAX_SIZE // 2),
                "/base/bomb.png": serve_body(png_bomb(30000, 30000), Content_Type="image/png"),
                "/base/huge-header.jpg": raw_response(
                    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n" + JPEG
                ),
                "/base/cl-garbage.jpg": raw_response(
                    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n" + JPEG
                ),
                "/base/cl-negative.jpg": raw_response(
                    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n" + JPEG
                ),
                "/base/cl-conflict.jpg": raw_response(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n" + JPEG
                ),
                "/base/te-gzip.jpg": raw_response(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                    + b"%x\r\n" % len(JPEG)
                    + JPEG
                    + b"\r\n0\r\n\r\n"
                ),
                "/base/http09.jpg": raw_response(JPEG),
                "/base/header-drip.jpg": header_drip,
                "/base/101.jpg": raw_response(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n" + JPEG
                ),
                "/base/status-999.jpg": raw_response(
                    b"HTTP/1.1 999 Weird\r\nContent-Length: %d\r\n\r\n" % len(JPEG) + JPEG
                ),
                # redirects
                "/base/r-same.jpg": redirect("/base/ok.jpg"),
                "/base/r-relative.jpg": redirect("ok.jpg", 301),
                "/base/r-absolute.jpg": redirect(f"http://127.0.0.1:{p}/base/ok.jpg", 307),
                "/base/r-chain.jpg": redirect("/base/r-same.jpg", 308),
                "/base/r-outside.jpg": redirect("/ok.jpg"),
                "/base/r-dotdot.jpg": redirect("/base/../ok.jpg"),
                "/base/r-dotdot-encoded.jpg": redirect("/base/%2e%2e/ok.jpg"),
                "/base/r-dotdot-encoded2.jpg": redirect("/base/..%2fok.jpg"),
                "/base/r-backslash.jpg": redirect("/base/..%5c..%5cok.jpg"),
                "/base/r-basement.jpg": redirect("/basement/ok.jpg"),
                "/base/r-other-port.jpg": redirect(f"http://127.0.0.1:{other.port}/base/ok.jpg"),
                "/base/r-other-host.jpg": redirect(f"http://localhost:{p}/base/ok.jpg"),
                "/base/r-scheme-relative.jpg": redirect(f"//127.0.0.1:{other.port}/base/ok.jpg"),
                "/base/r-https.jpg": redirect(f"https://127.0.0.1:{p}/base/ok.jpg"),
                "/base/r-file.jpg": redirect("file:///etc/passwd"),
                "/base/r-userinfo.jpg": redirect(f"http://evil.example@127.0.0.1:{other.port}/"),
                "/base/r-loop.jpg": redirect("/base/r-loop.jpg"),
                "/base/r-pingpong-a.jpg": redirect("/base/r-pingpong-b.jpg"),
                "/base/r-pingpong-b.jpg": redirect("/base/r-pingpong-a.jpg"),
                "/base/r-no-location.jpg": serve_body(b"", status=302),
                "/base/r-unparsable.jpg": redirect("http://[::1"),
                # a real file under the base whose name needs encoding
                "/base/a%20b%3Fc%23d.jpg": serve_body(JPEG),
                "/base/caf%C3%A9.jpg": serve_body(JPEG),
                "/base/%40evil.example/x.jpg": serve_body(JPEG),
            }
        )
        yield o


@pytest.fixture(scope="module")
def local_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fallback") / "root"
    root.mkdir()
    (root / "local.jpg").write_bytes(_jpeg(40, 30))
    return root


@pytest.fixture(scope="module")
def fb(origin: Origin, local_root: Path) -> Iterator[Server]:
    """One server for the module: empty-ish root, fallback to the origin's /base/."""
    settings = make_settings(
        local_root,
        IMAGE_PROXY_FALLBACK_IMAGE_URL=f"http://127.0.0.1:{origin.port}{BASE}",
        IMAGE_PROXY_FALLBACK_TIMEOUT=TIMEOUT,
        IMAGE_PROXY_FALLBACK_IMAGE_MAX_SIZE=str(MAX_SIZE),
        IMAGE_PROXY_FALLBACK_MAX_REDIRECTS="3",
        # every request reaches the origin here (the tests count them); reuse is tested below
        IMAGE_PROXY_FALLBACK_REVALIDATE_AFTER="0",
    )
    with app_server(settings) as s:
        yield s


@pytest.fixture(autouse=True)
def _clean(origin: Origin, other: Origin) -> None:
    origin.clear()
    other.clear()


def assert_confined(origin: Origin, other: Origin) -> None:
    """Every request the origin saw stays under /base/, even decoded once and normalised,
    and carries the origin's own Host; the other origin saw nothing."""
    with origin.lock:
        seen = list(origin.seen)
    for s in seen:
        assert s.host == origin.authority, s
        assert s.path.startswith(BASE), s
        assert "?" not in s.path and "#" not in s.path, s
        decoded = unquote(s.path).replace("\\", "/")
        assert posixpath.normpath(decoded).startswith(BASE), s
        assert ".." not in decoded.split("/"), s
    assert other.paths() == []


def metric(server: Server, outcome: str) -> float:
    return server.metric("image_fallback_fetches_total", outcome=outcome)


# -- the happy paths -----------------------------------------------------------------------


def test_passthrough_is_byte_identical(fb: Server, origin: Origin, other: Origin) -> None:
    r = fb.get("/ok.jpg")
    assert r.status == 200
    assert r.body == JPEG
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["content-length"] == str(len(JPEG))
    assert r.headers["vary"] == "Sec-CH-DPR"
    assert r.headers["cache-control"] == "public, max-age=31536000, no-transform"
    assert r.headers["last-modified"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert "etag" in r.headers
    assert origin.paths() == ["/base/ok.jpg"]
    assert_confined(origin, other)


def test_query_is_not_forwarded(fb: Server, origin: Origin, other: Origin) -> None:
    r = fb.get("/ok.jpg?v=3&utm_source=x")
    assert r.status == 200 and r.body == JPEG
    assert origin.paths() == ["/base/ok.jpg"]


def test_local_file_wins_over_origin(fb: Server, origin: Origin, other: Origin) -> None:
    r = fb.get("/local.jpg")
    assert r.status == 200
    assert origin.paths() == []


def test_subdirectory_and_png(fb: Server, origin: Origin, other: Origin) -> None:
    r = fb.get("/photos/ok.png")
    assert r.status == 200 and r.body == PNG
    assert r.headers["content-type"] == "image/png"
    assert origin.paths() == ["/base/photos/ok.png"]


def test_content_type_comes_from_sniffing(fb: Server, origin: Origin, other: Origin) -> None:
    for path in ("/html.jpg", "/no-type.jpg"):
        r = fb.get(path)
        assert r.status == 200, path
        assert r.body == JPEG
        assert r.headers["content-type"] == "image/jpeg"


def test_transform_of_fallback_image(fb: Server, origin: Origin, other: Origin) -> None:
    r = fb.get("/ok.jpg?size=100&format=png")
    assert r.status == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["vary"] == "Sec-CH-DPR"
    assert "cache-control" in r.headers
    img = r.image()
    assert (img.width, img.height) == (100, 67)
    assert img.get("vips-loader").startswith("png")
    r = fb.get("/html.jpg?format=webp")
    assert r.status == 200 and r.headers["content-type"] == "image/webp"
    assert (r.image().width, r.image().height) == (300, 200)
    assert_confined(origin, other)


@pytest.mark.parametrize("name", ["lm-far", "lm-junk", "lm-year1"])
@pytest.mark.parametrize("query", ["", "?size=50"])
def test_origin_last_modified_garbage(
    fb: Server, origin: Origin, other: Origin, name: str, query: str
) -> None:
    """Whatever date an origin claims, the image is served (Last-Modified dropped if absurd)."""
    r = fb.get(f"/{name}.jpg{query}")
    assert r.status == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    r = fb.get(
        f"/{name}.jpg{query}", headers={"If-Modified-Since": "Fri, 31 Dec 9999 23:59:59 GMT"}
    )
    assert r.status in (200, 304), r.text


def test_head_of_fallback_image(fb: Server, origin: Origin, other: Origin) -> None:
    r = fb.request("HEAD", "/ok.jpg")
    assert r.status == 200 and r.body == b""
    assert r.headers["content-type"] == "image/jpeg"


def test_encoded_names_reach_the_origin_encoded(fb: Server, origin: Origin, other: Origin) -> None:
    # `?` and `#` inside a name are part of the name, never a query or a fragment upstream
    r = fb.raw("/a%20b%3Fc%23d.jpg")
    assert r.status == 200 and r.body == JPEG
    r = fb.raw("/caf%C3%A9.jpg")
    assert r.status == 200 and r.body == JPEG
    assert origin.paths() == ["/base/a%20b%3Fc%23d.jpg", "/base/caf%C3%A9.jpg"]


# -- origin failures -----------------------------------------------------------------------

FAILURES = [
    # (request path, our status, what the origin did)
    ("/missing.jpg", 404, "404"),
    ("/410.jpg", 404, "410 gone"),
    ("/500.jpg", 502, "500"),
    ("/503.jpg", 502, "503"),
    ("/204.jpg", 502, "204 no content"),
    ("/not-image.jpg", 502, "html body labelled image/jpeg"),
    ("/gzip.jpg", 502, "Content-Encoding: gzip"),
    ("/br.jpg", 502, "Content-Encoding: br"),
    ("/cl-long.jpg", 502, "Content-Length larger than the body, then close"),
    ("/cl-over-max.jpg", 502, "Content-Length over the max size"),
    ("/over-max.jpg", 502, "body one byte over the max size"),
    ("/chunked-huge.jpg", 502, "200 MiB chunked, no Content-Length"),
    ("/slow.jpg", 504, "1 byte every 0.2 s"),
    ("/header-drip.jpg", 504, "headers dripping 1 byte every 0.2 s"),
    ("/huge-header.jpg", 502, "a 200 KB response header"),
    ("/cl-garbage.jpg", 502, "Content-Length: abc"),
    ("/cl-negative.jpg", 502, "Content-Length: -1"),
    ("/cl-conflict.jpg", 502, "two different Content-Length headers"),
    ("/te-gzip.jpg", 502, "Transfer-Encoding: gzip, chunked"),
    ("/http09.jpg", 502, "no status line (HTTP/0.9 style body)"),
    ("/101.jpg", 502, "101 Switching Protocols"),
    ("/status-999.jpg", 502, "status 999"),
    ("/slow-headers.jpg", 504, "headers after 3 s"),
]


@pytest.mark.parametrize(("path", "status", "what"), FAILURES, ids=[f[2] for f in FAILURES])
def test_origin_failures(
    fb: Server, origin: Origin, other: Origin, path: str, status: int, what: str
) -> None:
    started = time.monotonic()
    r = fb.get(path)
    elapsed = time.monotonic() - started
    assert r.status == status, (what, r.text)
    assert r.headers["content-type"].startswith("text/plain")
    assert "cache-control" not in r.headers
    assert len(r.body.splitlines()) == 1
    assert elapsed < 5  # the total timeout is 1 s; nothing waits for the whole drip
    assert_confined(origin, other)


def test_fallback_gif_is_decoded_by_its_bytes(fb: Server, origin: Origin, other: Origin) -> None:
    # a GIF under an allowed name is an image, as a local file is: sniffed type on passthrough
    r = fb.get("/gif.png")
    assert r.status == 200 and r.headers["content-type"] == "image/gif"
    r = fb.get("/gif.png?size=10")
    assert r.status == 200 and r.headers["content-type"] == "image/png"
    out = pyvips.Image.new_from_buffer(r.body, "")
    assert (out.width, out.height) == (10, 5)


def test_fallback_bomb_refused_on_transform(fb: Server, origin: Origin, other: Origin) -> None:
    assert fb.get("/bomb.png?size=10").status == 422
    r = fb.get("/bomb.png")  # passthrough never decodes
    assert r.status == 200 and r.headers["content-type"] == "image/png"


def test_transform_failures_match_passthrough(fb: Server, origin: Origin, other: Origin) -> None:
    for path, status in (("/missing.jpg", 404), ("/500.jpg", 502), ("/not-image.jpg", 502)):
        assert fb.get(path + "?size=10").status == status, path


def test_huge_chunked_body_is_not_read_to_the_end(
    fb: Server, origin: Origin, other: Origin
) -> None:
    assert fb.get("/chunked-huge.jpg").status == 502
    time.sleep(0.3)  # let the origin notice the closed connection
    # socket buffers (tcp_rmem/tcp_wmem, up to tens of MiB on loopback) absorb some of it;
    # the point is that the fetch stopped long before the end of the body
    assert origin.sent["/base/chunked-huge.jpg"] < 100 * 1024 * 1024


def test_exactly_max_size_is_accepted(fb: Server, origin: Origin, other: Origin) -> None:
    r = fb.get("/exactly-max.jpg")
    assert r.status == 200 and len(r.body) == MAX_SIZE
    r = fb.get("/chunked-small.jpg")
    assert r.status == 200 and r.headers["content-type"] == "image/jpeg"


def test_short_content_length_does_not_poison_the_pool(
    fb: Server, origin: Origin, other: Origin
) -> None:
    r = fb.get("/cl-short.jpg")
    # httpx frames by Content-Length: we get at most what was declared, and never more
    assert r.status == 200  # a truncated JPEG still sniffs as one; passthrough never decodes
    assert r.body == JPEG[: len(JPEG) - 500]
    assert fb.get("/cl-short.jpg?size=50").status == 422  # ...but it cannot be transformed
    for _ in range(3):  # the garbage left on that connection never answers a later request
        r = fb.get("/ok.jpg")
        assert r.status == 200 and r.body == JPEG


def test_strip_path_with_fallback(local_root: Path, origin: Origin, other: Origin) -> None:
    settings = make_settings(
        local_root,
        IMAGE_PROXY_FALLBACK_IMAGE_URL=f"http://127.0.0.1:{origin.port}{BASE}",
        IMAGE_PROXY_FALLBACK_TIMEOUT=TIMEOUT,
        IMAGE_PROXY_STRIP_PATH="static/image/",
    )
    with app_server(settings) as s:
        r = s.raw("/static/image/ok.jpg")
        assert r.status == 200 and r.body == JPEG
        assert origin.paths() == ["/base/ok.jpg"]
        origin.clear()
        for target in (
            "/static/image/../x.jpg",
            "/static/image/%2e%2e/x.jpg",
            "/static/image//evil.example/x.jpg",
            "/static/image/..%2fx.jpg",
        ):
            assert s.raw(target).status == 404, target
        assert origin.paths() == []
        assert s.raw("/static/image/photos/ok.png").status == 200
        assert_confined(origin, other)


def test_unreachable_origin(local_root: Path) -> None:
    port = free_port()  # nothing listens there
    settings = make_settings(
        local_root,
        IMAGE_PROXY_FALLBACK_IMAGE_URL=f"http://127.0.0.1:{port}/base/",
        IMAGE_PROXY_FALLBACK_TIMEOUT=TIMEOUT,
    )
    with app_server(settings) as s:
        r = s.get("/ok.jpg")
        assert r.status == 502
        assert "cache-control" not in r.headers
        assert s.get("/ok.jpg?size=10").status == 502
        assert s.get("/local.jpg").status == 200
        assert metric(s, "error") == 2


def test_unanswered_connect_times_out(local_root: Path) -> None:
    """A listener that accepts nothing (full backlog) or never answers: 504, not a hang."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        settings = make_settings(
            local_root,
            IMAGE_PROXY_FALLBACK_IMAGE_URL=f"http://127.0.0.1:{port}/base/",
            IMAGE_PROXY_FALLBACK_TIMEOUT=TIMEOUT,
        )
        with app_server(settings) as s:
            started = time.monotonic()
            r = s.get("/ok.jpg")
            assert r.status == 504
            assert time.monotonic() - started < 5
            assert metric(s, "timeout") == 1


# -- redirects -----------------------------------------------------------------------------

REDIRECTS = [
    ("/r-same.jpg", 200, "to the same base"),
    ("/r-relative.jpg", 200, "relative Location"),
    ("/r-absolute.jpg", 200, "absolute URL on the same base"),
    ("/r-chain.jpg", 200, "two hops within the base"),
    ("/r-outside.jpg", 502, "outside the base path"),
    ("/r-dotdot.jpg", 502, "/base/../ outside the base"),
    ("/r-dotdot-encoded.jpg", 502, "/base/%2e%2e/ outside the base"),
    ("/r-dotdot-encoded2.jpg", 502, "/base/..%2f outside the base"),
    ("/r-backslash.jpg", 502, "/base/..%5c..%5c outside the base"),
    ("/r-basement.jpg", 502, "/basement/ shares a prefix with /base"),
    ("/r-other-port.jpg", 502, "another port"),
    ("/r-other-host.jpg", 502, "another host name"),
    ("/r-scheme-relative.jpg", 502, "scheme-relative //host"),
    ("/r-https.jpg", 502, "another scheme"),
    ("/r-file.jpg", 502, "file://"),
    ("/r-userinfo.jpg", 502, "userinfo@other"),
    ("/r-loop.jpg", 502, "redirect to itself"),
    ("/r-pingpong-a.jpg", 502, "a -> b -> a"),
    ("/r-no-location.jpg", 502, "302 without Location"),
    ("/r-unparsable.jpg", 502, "Location http://[::1 cannot be parsed"),
]


@pytest.mark.parametrize(("path", "status", "what"), REDIRECTS, ids=[r[2] for r in REDIRECTS])
def test_redirects(
    fb: Server, origin: Origin, other: Origin, path: str, status: int, what: str
) -> None:
    r = fb.get(path)
    assert r.status == status, (what, r.text)
    if status == 200:
        assert r.body == JPEG and r.headers["content-type"] == "image/jpeg"
    assert_confined(origin, other)
    assert len(origin.seen) <= 4  # bounded: the first request + at most 3 redirects


# -- hostile request paths: nothing escapes the base ----------------------------------------

HOSTILE = [
    "//evil.example/x.jpg",
    "///evil.example/x.jpg",
    "/@evil.example/x.jpg",
    "/%40evil.example/x.jpg",
    "/%2F%2Fevil.example%2Fx.jpg",
    "/%2f%2fevil.example/x.jpg",
    "/..%2f..%2fadmin.jpg",
    "/..%2F..%2Fadmin.jpg",
    "/a/../../admin.jpg",
    "/../admin.jpg",
    "/./admin.jpg",
    "/a/./../admin.jpg",
    "/%2e%2e/admin.jpg",
    "/%2E%2E/%2e%2e/admin.jpg",
    "/.%2e/admin.jpg",
    "/%252e%252e/x.jpg",
    "/%252e%252e%252fadmin.jpg",
    "/%25252e%25252e/x.jpg",
    "/..\\..\\admin.jpg",
    "/a\\..\\..\\admin.jpg",
    "/..%5c..%5cadmin.jpg",
    "/..%255c..%255cadmin.jpg",
    "/\\\\evil.example\\x.jpg",
    "/http://evil.example/x.jpg",
    "/http:%2F%2Fevil/x.jpg",
    "/http:/evil.example/x.jpg",
    "/https:evil.example/x.jpg",
    "/x.jpg%3F@evil.example/y.jpg",
    "/x.jpg%23@evil.example/y.jpg",
    "/x%3Fy=1.jpg",
    "/x%23frag.jpg",
    "/x.jpg?url=http://evil.example/y.jpg",
    "/x.jpg#@evil.example/y.jpg",
    "/x%00.jpg",
    "/x.jpg%00.png",
    "/%0d%0aHost:%20evil.example/x.jpg",
    "/x%0aGET%20/admin.jpg",
    "/%c0%ae%c0%ae/admin.jpg",
    "/%e0%80%ae%e0%80%ae/admin.jpg",
    "/%ef%bc%8e%ef%bc%8e/admin.jpg",
    "/%u002e%u002e/admin.jpg",
    "/%ff.jpg",
    "/.hidden.jpg",
    "/a/.git/x.jpg",
    "/" + "a/" * 300 + "x.jpg",
    "/" + "a" * 300 + ".jpg",
    "http://evil.example/x.jpg",
    "http://evil.example//evil.example/x.jpg",
]


# `@` in a path segment is just a character: it reaches the origin percent-encoded, under /base/
UNDER_BASE = {
    "/@evil.example/x.jpg": "/base/%40evil.example/x.jpg",
    "/%40evil.example/x.jpg": "/base/%40evil.example/x.jpg",
}


@pytest.mark.parametrize("target", HOSTILE, ids=HOSTILE)
def test_hostile_paths_never_leave_the_base(
    fb: Server, origin: Origin, other: Origin, target: str
) -> None:
    r = fb.raw(target)
    if target in UNDER_BASE:  # a harmless name the origin really has under its base
        assert r.status == 200 and r.body == JPEG
        assert origin.paths() == [UNDER_BASE[target]]
    else:
        assert r.status in (400, 404), (r.status, r.text)
        assert r.body != JPEG
    assert_confined(origin, other)


def test_fallback_metrics_move(fb: Server, origin: Origin, other: Origin) -> None:
    before = {o: metric(fb, o) for o in ("ok", "not_found", "error", "timeout", "not_image")}
    assert fb.get("/ok.jpg").status == 200
    assert fb.get("/missing.jpg").status == 404
    assert fb.get("/500.jpg").status == 502
    assert fb.get("/slow.jpg").status == 504
    assert fb.get("/not-image.jpg").status == 502
    after = {o: metric(fb, o) for o in before}
    assert after["ok"] - before["ok"] >= 1
    assert after["not_found"] - before["not_found"] == 1
    assert after["error"] - before["error"] == 1
    assert after["timeout"] - before["timeout"] == 1
    assert after["not_image"] - before["not_image"] == 1
    text = fb.get("/metrics").text
    assert "evil" not in text and "127.0.0.1" not in text  # labels never carry a host


def test_server_is_healthy_after_everything(fb: Server, origin: Origin) -> None:
    assert fb.get("/health").status == 200
    assert fb.get("/ok.jpg").status == 200


def test_many_concurrent_slow_fetches_all_time_out(
    fb: Server, origin: Origin, other: Origin
) -> None:
    import concurrent.futures as cf

    def one(i: int) -> int:
        s = Server(fb.port)
        try:
            return s.get("/slow.jpg").status
        finally:
            s.client.close()

    with cf.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(8)))
    assert statuses == [504] * 8
    assert fb.get("/health").status == 200


# -- not downloading the same image again and again ---------------------------------------


def etagged(body: bytes, etag: str) -> Callable[..., None]:
    """An origin that honours If-None-Match: 304 without a body when the ETag matches."""

    def handler(h: http.server.BaseHTTPRequestHandler) -> None:
        if h.headers.get("If-None-Match") == etag:
            h.send_response(304)
            h.send_header("ETag", etag)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        _send(h, 200, body, ETag=etag)
        origin: Origin = h.server.origin  # type: ignore[attr-defined]
        with origin.lock:
            origin.sent[h.path] = origin.sent.get(h.path, 0) + len(body)

    return handler


@pytest.fixture
def reusing(origin: Origin, local_root: Path) -> Iterator[Server]:
    settings = make_settings(
        local_root,
        IMAGE_PROXY_FALLBACK_IMAGE_URL=f"http://127.0.0.1:{origin.port}{BASE}",
        IMAGE_PROXY_FALLBACK_REVALIDATE_AFTER="60",
        IMAGE_PROXY_ENABLE_CACHE="true",
    )
    with app_server(settings) as s:
        yield s


def test_origin_without_validators_is_asked_once(reusing: Server, origin: Origin) -> None:
    origin.routes["/base/plain.jpg"] = serve_body(JPEG)
    for _ in range(3):
        r = reusing.get("/plain.jpg?size=50&format=webp")
        assert r.status == 200 and pyvips.Image.new_from_buffer(r.body, "").width == 50
        assert reusing.get("/plain.jpg").body == JPEG
    assert origin.paths() == ["/base/plain.jpg"]


def test_origin_with_etag_is_revalidated_without_a_body(reusing: Server, origin: Origin) -> None:
    origin.routes["/base/tagged.jpg"] = etagged(JPEG, '"v1"')
    first = reusing.get("/tagged.jpg?size=60&format=png")
    assert first.status == 200 and first.headers["x-cache"] == "MISS"
    origin.clear()
    again = reusing.get("/tagged.jpg?size=60&format=png")
    assert again.status == 200 and again.body == first.body
    assert again.headers["x-cache"] == "HIT"  # a 304 from the origin: the render is reused
    assert reusing.get("/tagged.jpg").body == JPEG
    assert origin.paths() == ["/base/tagged.jpg"] * 2
    assert origin.sent.get("/base/tagged.jpg", 0) == 0  # no body sent since the first


def test_origin_changed_body_is_fetched_again(reusing: Server, origin: Origin) -> None:
    origin.routes["/base/changing.jpg"] = etagged(JPEG, '"a"')
    a = reusing.get("/changing.jpg?size=40&format=png")
    other_jpeg = _jpeg(200, 300)
    origin.routes["/base/changing.jpg"] = etagged(other_jpeg, '"b"')
    b = reusing.get("/changing.jpg?size=40&format=png")
    assert a.status == b.status == 200
    assert pyvips.Image.new_from_buffer(a.body, "").width == 40
    assert pyvips.Image.new_from_buffer(b.body, "").height == 40  # portrait now: new render
    assert a.headers["etag"] != b.headers["etag"]
