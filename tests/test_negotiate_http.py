"""Format negotiation, the allow-list and the cache-status header, over real HTTP.

SPEC "Format negotiation" and "More of the original's later parameters": every case is a
real request to the real app; bodies are decoded with pyvips."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pyvips

from conftest import MAGIC, Server, free_port, photo

CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
CHROMIUM_156 = "image/jxl,image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX_OLD = "image/webp,*/*"
SAFARI = (
    "image/webp,image/avif,image/jxl,image/heic,image/heic-sequence,video/*;q=0.8,"
    "image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
)
ON = {"IMAGE_PROXY_PREFERRED_FORMATS": "avif,webp"}
CACHED = {**ON, "IMAGE_PROXY_ENABLE_CACHE": "true"}


def kind(body: bytes) -> str | None:
    return next((k for k, test in MAGIC.items() if test(body)), None)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("negotiation")
    photo(101, 50).jpegsave(str(r / "small.jpg"), Q=90)
    photo(60, 40, bands=4).pngsave(str(r / "alpha.png"))
    photo(60, 40).pngsave(str(r / "opaque.png"))
    photo(80, 60).webpsave(str(r / "photo.webp"), Q=80)
    photo(64, 48).heifsave(str(r / "photo.avif"), compression="av1", Q=60, effort=0)
    full = (r / "small.jpg").read_bytes()
    (r / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (r / "text.jpg").write_text("not an image")
    photo(40, 30).gifsave(str(r / "gif-named.png"))
    return r


@pytest.fixture
def on(serve: Callable[..., Server], root: Path) -> Server:
    return serve(root, **ON)


def get(
    server: Server, path: str, accept: str | None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    if accept is not None:
        headers["Accept"] = accept
    r = server.get(path, headers=headers)
    return r.status, r.headers, r.body


# -- which format ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "accept", "want"),
    [
        ("small.jpg", CHROME, "avif"),
        ("small.jpg", CHROMIUM_156, "avif"),
        ("small.jpg", SAFARI, "avif"),  # the operator's order, not the client's
        ("small.jpg", FIREFOX_OLD, "webp"),
        ("small.jpg", "image/avif;q=0, image/webp", "webp"),
        ("small.jpg", "image/avif;q=0.000,image/webp;q=0", "jpeg"),
        ("alpha.png", CHROME, "avif"),
        ("photo.webp", CHROME, "avif"),
    ],
    ids=[
        "chrome",
        "chromium-156",
        "safari",
        "firefox-old",
        "q0",
        "all-refused",
        "alpha",
        "webp-src",
    ],
)
def test_negotiated_transform(on: Server, root: Path, name: str, accept: str, want: str) -> None:
    status, headers, body = get(on, f"/{name}", accept)
    assert status == 200
    assert kind(body) == want
    assert headers["content-type"] == f"image/{want}"
    assert headers["vary"] == "Accept, Sec-CH-DPR"
    src = pyvips.Image.new_from_file(str(root / name))
    out = pyvips.Image.new_from_buffer(body, "")
    assert (out.width, out.height) == (src.width, src.height)  # `format=` alone: same size
    if want != "jpeg":
        assert out.hasalpha() == src.hasalpha()
    if want == "jpeg":  # nothing acceptable: the original bytes
        assert body == (root / name).read_bytes()


@pytest.mark.parametrize(
    ("name", "accept"),
    [
        ("small.jpg", "*/*"),
        ("small.jpg", "image/*"),
        ("small.jpg", None),
        ("small.jpg", ""),
        ("small.jpg", "garbage;;,,=/"),
        ("photo.avif", CHROME),  # chosen = the source's own format
        ("photo.webp", FIREFOX_OLD),
    ],
)
def test_passthrough_stays_a_passthrough(
    on: Server, root: Path, name: str, accept: str | None
) -> None:
    status, headers, body = get(on, f"/{name}", accept)
    assert status == 200
    assert body == (root / name).read_bytes()
    assert headers["vary"] == "Accept, Sec-CH-DPR"


def test_alpha_never_goes_to_jpeg(serve: Callable[..., Server], root: Path) -> None:
    s = serve(root, IMAGE_PROXY_PREFERRED_FORMATS="jpeg,png")
    # the header bytes decide; a passthrough is never decoded (a truncated JPEG passes)
    status, _, body = get(s, "/truncated.jpg", "image/jpeg")
    assert status == 200 and body == (root / "truncated.jpg").read_bytes()
    status, _, body = get(s, "/alpha.png", "image/jpeg,image/png")
    assert status == 200 and body == (root / "alpha.png").read_bytes()  # png = its own
    status, _, body = get(s, "/opaque.png", "image/jpeg,image/png")
    assert status == 200 and kind(body) == "jpeg"
    s2 = serve(root, IMAGE_PROXY_PREFERRED_FORMATS="jpeg,webp")
    _, _, body = get(s2, "/alpha.png", "image/jpeg,image/webp")
    assert kind(body) == "webp" and pyvips.Image.new_from_buffer(body, "").hasalpha()


def test_negotiation_with_size_and_explicit_format(on: Server) -> None:
    status, headers, body = get(on, "/small.jpg?size=50", CHROME)
    assert status == 200 and kind(body) == "avif"
    assert pyvips.Image.new_from_buffer(body, "").width == 50
    # chosen = own format, but `size` makes it a transform in the source's format
    status, headers, body = get(on, "/photo.avif?size=32", CHROME)
    assert status == 200 and kind(body) == "avif"
    assert pyvips.Image.new_from_buffer(body, "").width == 32
    # an explicit format wins over Accept, and the answer still varies by Accept
    status, headers, body = get(on, "/small.jpg?format=png", CHROME)
    assert status == 200 and kind(body) == "png"
    assert headers["vary"] == "Accept, Sec-CH-DPR"
    # ignored params do not make a passthrough a transform, nor change the choice
    status, _, body = get(on, "/small.jpg?v=3", CHROME)
    assert kind(body) == "avif"


def test_head_and_errors(on: Server) -> None:
    r = on.request("HEAD", "/small.jpg", headers={"Accept": CHROME})
    assert r.status == 200 and r.body == b"" and r.headers["content-type"] == "image/avif"
    assert get(on, "/missing.jpg", CHROME)[0] == 404
    assert get(on, "/text.jpg", CHROME)[0] == 415  # the probe says "not an image"
    assert get(on, "/truncated.jpg", CHROME)[0] == 422  # transcoding needs a decode


def test_refusal_in_a_second_accept_line_counts(on: Server) -> None:
    # RFC 9110 §5.3: repeated header lines are one comma-joined list (raw_request has no
    # way to repeat a header name, so the second line rides in the first's value)
    r = on.raw("/small.jpg", headers={"Accept": "image/avif, image/webp\r\nAccept: image/avif;q=0"})
    assert r.status == 200 and kind(r.body) == "webp"


def test_off_by_default(serve: Callable[..., Server], root: Path) -> None:
    s = serve(root)
    status, headers, body = get(s, "/small.jpg", CHROME)
    assert status == 200 and body == (root / "small.jpg").read_bytes()
    assert headers["vary"] == "Sec-CH-DPR"
    status, headers, body = get(s, "/small.jpg?size=40", CHROME)
    assert kind(body) == "jpeg" and headers["vary"] == "Sec-CH-DPR"


# -- cache, conditional requests, metrics ------------------------------------------------


def test_cache_key_holds_the_chosen_format_not_the_accept(
    serve: Callable[..., Server], root: Path
) -> None:
    s = serve(root, **CACHED)
    first = s.get("/small.jpg?size=60", headers={"Accept": CHROME})
    assert first.headers["x-cache"] == "MISS" and kind(first.body) == "avif"
    for accept in (CHROMIUM_156, SAFARI, "image/avif"):
        again = s.get("/small.jpg?size=60", headers={"Accept": accept})
        assert again.headers["x-cache"] == "HIT", accept
        assert again.body == first.body and again.headers["etag"] == first.headers["etag"]
    explicit = s.get("/small.jpg?size=60&format=avif", headers={"Accept": "*/*"})
    assert explicit.headers["x-cache"] == "HIT" and explicit.body == first.body
    webp = s.get("/small.jpg?size=60", headers={"Accept": FIREFOX_OLD})
    assert webp.headers["x-cache"] == "MISS" and kind(webp.body) == "webp"
    assert webp.headers["etag"] != first.headers["etag"]
    assert s.metric("image_transforms_total", format="avif") == 1
    assert s.metric("image_transforms_total", format="webp") == 1
    plain = s.get("/small.jpg?size=60", headers={"Accept": "*/*"})
    assert kind(plain.body) == "jpeg" and plain.headers["vary"] == "Accept, Sec-CH-DPR"


def test_conditional_requests_per_variant(serve: Callable[..., Server], root: Path) -> None:
    s = serve(root, **CACHED)
    avif = s.get("/small.jpg", headers={"Accept": CHROME})
    etag = avif.headers["etag"]
    r = s.get("/small.jpg", headers={"Accept": CHROMIUM_156, "If-None-Match": etag})
    assert r.status == 304 and r.headers["vary"] == "Accept, Sec-CH-DPR"
    # the same ETag does not match the WebP variant
    r = s.get("/small.jpg", headers={"Accept": FIREFOX_OLD, "If-None-Match": etag})
    assert r.status == 200 and kind(r.body) == "webp"
    # a passthrough variant has its own validator too
    orig = s.get("/small.jpg", headers={"Accept": "*/*"})
    r = s.get("/small.jpg", headers={"Accept": "*/*", "If-None-Match": orig.headers["etag"]})
    assert r.status == 304 and r.headers["vary"] == "Accept, Sec-CH-DPR"
    assert orig.headers["etag"] != etag


def test_metric_label_is_the_chosen_format(on: Server) -> None:
    get(on, "/small.jpg", CHROME)
    get(on, "/small.jpg", FIREFOX_OLD)
    get(on, "/small.jpg", "*/*")
    get(on, "/photo.avif", CHROME)
    assert on.metric("image_requests_total", format="avif", status="ok") == 2
    assert on.metric("image_requests_total", format="webp", status="ok") == 1
    assert on.metric("image_requests_total", format="jpg", status="ok") == 1


# -- allow-list --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "status"),
    [("webp", 200), ("WEBP", 200), ("jpg", 200), ("jpeg", 200), ("avif", 415), ("png", 415)],
)
def test_explicit_format_outside_the_allow_list(
    serve: Callable[..., Server], root: Path, fmt: str, status: int
) -> None:
    s = serve(root, IMAGE_PROXY_ALLOWED_OUTPUT_FORMATS="webp,jpg")
    r = s.get(f"/small.jpg?format={fmt}")
    assert r.status == status
    if status == 415:
        assert r.headers["content-type"].startswith("text/plain")
        assert "cache-control" not in r.headers
        assert len(r.text.splitlines()) == 1
    assert s.get("/small.jpg?format=bmp").status == 400  # not a format at all: still 400


def test_negotiation_never_picks_a_disallowed_format(
    serve: Callable[..., Server], root: Path
) -> None:
    s = serve(root, **ON, IMAGE_PROXY_ALLOWED_OUTPUT_FORMATS="webp,jpeg,png")
    assert kind(get(s, "/small.jpg", CHROME)[2]) == "webp"
    s2 = serve(root, **ON, IMAGE_PROXY_ALLOWED_OUTPUT_FORMATS="jpeg,png")
    status, _, body = get(s2, "/small.jpg", CHROME)
    assert status == 200 and body == (root / "small.jpg").read_bytes()


# -- cache-status header -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "want"), [(None, "x-cache"), ("X-Imgproxy-Cache", "x-imgproxy-cache"), ("", None)]
)
def test_cache_status_header_name(
    serve: Callable[..., Server], root: Path, name: str | None, want: str | None
) -> None:
    env = {"IMAGE_PROXY_ENABLE_CACHE": "true"}
    if name is not None:
        env["IMAGE_PROXY_CACHE_STATUS_HEADER"] = name
    s = serve(root, **env)
    first, second = (s.get("/small.jpg?size=30") for _ in range(2))
    for r, value in ((first, "MISS"), (second, "HIT")):
        assert r.status == 200
        cache_headers = {k for k in r.headers if "cache" in k and k != "cache-control"}
        assert cache_headers == ({want} if want else set())
        if want:
            assert r.headers[want] == value


# -- the fallback origin -----------------------------------------------------------------


@contextlib.contextmanager
def origin(directory: Path) -> Iterator[tuple[int, list[str]]]:
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(Handler, directory=str(directory))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield port, seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fallback_body_is_negotiated_and_fetched_once(
    serve: Callable[..., Server], root: Path, tmp_path: Path
) -> None:
    with origin(root) as (port, seen):
        s = serve(tmp_path, **ON, IMAGE_PROXY_FALLBACK_IMAGE_URL=f"http://127.0.0.1:{port}/")
        status, headers, body = get(s, "/small.jpg", CHROME)
        assert status == 200 and kind(body) == "avif"
        assert headers["vary"] == "Accept, Sec-CH-DPR"
        assert seen == ["/small.jpg"]
        status, headers, body = get(s, "/photo.webp", FIREFOX_OLD)
        assert status == 200 and body == (root / "photo.webp").read_bytes()
        assert headers["vary"] == "Accept, Sec-CH-DPR"
        assert seen == ["/small.jpg", "/photo.webp"]
        status, headers, body = get(s, "/small.jpg", "*/*")  # no probe needed
        assert body == (root / "small.jpg").read_bytes()
        assert len(seen) == 3


def test_gif_source_and_huge_accept(on: Server, root: Path) -> None:
    status, _, body = get(on, "/gif-named.png", CHROME)
    assert status == 200 and kind(body) == "avif"
    status, headers, body = get(on, "/gif-named.png", "*/*")
    assert body == (root / "gif-named.png").read_bytes()
    assert headers["content-type"] == "image/gif"
    # past the 4096 characters read, `image/avif` is not seen: no error, the original
    huge = ",".join(f"application/x-{i}" for i in range(300)) + ",image/avif"
    assert 4096 < len(huge) < 7000
    status, _, body = get(on, "/small.jpg", huge)
    assert status == 200 and body == (root / "small.jpg").read_bytes()
    status, _, body = get(on, "/small.jpg", "image/webp," + huge)
    assert status == 200 and kind(body) == "webp"
