"""A real client: headless Chromium shows what format negotiation serves it.

An HTML page (served from a temp dir by a static server on loopback) holds `<img>` tags
for a JPEG, a PNG with alpha and a resized variant, all pointing at a running imgproxy
subprocess. Chromium sends its own `Accept`; every image must decode in the browser
(`complete && naturalWidth == expected`, STACK-NOTES §10.2: a broken image has
naturalWidth 0), and the server side must have answered in the negotiated format:
`image_requests_total{format}` is labelled with the chosen format, and the same URLs
fetched with the Accept header the browser really sent (recorded by the static server from
an `<img>` it serves itself) sniff as that format.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian `chromium`, `chromium-driver`;
`make test` installs them when missing). Without them the tests skip with the reason, and
fail under CI (`CI` set). Selenium Manager is never consulted: the driver path is given
explicitly and SE_OFFLINE=true (STACK-NOTES §10.2: without it, it may try the network).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import MAGIC, Server, free_port, photo, subprocess_server

CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BINARY", "/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in CI containers: Chromium refuses to start without it
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # no background traffic: this machine's closed network refuses it, many at a time
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
)
# id -> (file, query, expected naturalWidth, source format)
IMAGES = {
    "jpeg": ("photo.jpg", "", 320, "jpeg"),
    "alpha": ("alpha.png", "", 200, "png"),
    "resized": ("photo.jpg", "?size=120", 120, "jpeg"),
}
# JPEG XL (Chromium 156 asks for it first): id -> (file, query, naturalWidth, naturalHeight)
JXL_IMAGES = {
    "photo": ("photo.jpg", "?size=160", 160, 120),
    "alpha": ("alpha.png", "", 200, 150),
    "cover": ("photo.jpg", "?w=100&h=100&fit=cover", 100, 100),
    "recompressed": ("photo.jpg", "", 320, 240),  # lossless JPEG -> JPEG XL
}


def kind(body: bytes) -> str | None:
    return next((k for k, test in MAGIC.items() if test(body)), None)


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (Debian packages chromium, chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (a start costs ~0.5 s, a page load ~0.1 s)."""
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    saved = {k: os.environ.get(k) for k in ("SE_OFFLINE", "SE_AVOID_STATS", "SE_CHROMEDRIVER")}
    os.environ.update(SE_OFFLINE="true", SE_AVOID_STATS="true")
    os.environ.pop("SE_CHROMEDRIVER", None)  # it would override the explicit driver path
    profile = tempfile.mkdtemp(prefix="imgproxy-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser-images")
    photo(320, 240).jpegsave(str(root / "photo.jpg"), Q=85)
    photo(200, 150, bands=4).pngsave(str(root / "alpha.png"))
    return root


@contextlib.contextmanager
def static_site(html: str) -> Iterator[tuple[str, list[str]]]:
    """index.html and a tiny PNG from a temp dir on loopback; yields (page URL, the Accept
    headers of the image requests it received)."""
    accepts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imgproxy-page-") as tmp:
        Path(tmp, "index.html").write_text(html)
        photo(4, 4).pngsave(str(Path(tmp, "probe.png")))

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/probe.png"):
                    accepts.append(self.headers.get("Accept", ""))
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        port = free_port()
        httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", port), functools.partial(Handler, directory=tmp)
        )
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{port}/index.html", accepts
        finally:
            httpd.shutdown()
            httpd.server_close()


def page(proxy: str, images: dict[str, tuple[Any, ...]] = IMAGES) -> str:
    tags = "\n".join(
        f'<img id="{name}" src="{proxy}/{file}{query}" alt="{name}">'
        for name, (file, query, *_) in images.items()
    )
    return f"<!doctype html><title>negotiation</title>{tags}\n<img id=probe src=/probe.png>"


@contextlib.contextmanager
def loaded(
    browser: Any,
    images: Path,
    env: dict[str, str],
    tags: dict[str, tuple[Any, ...]] = IMAGES,
) -> Iterator[tuple[dict[str, Any], Server, str]]:
    full = {"IMAGE_PROXY_ROOT_PATH": str(images), "IMAGE_PROXY_WORKERS": "1", **env}
    with (
        subprocess_server(full) as (server, _),
        static_site(page(server.url, tags)) as (
            url,
            accepts,
        ),
    ):
        browser.get(url)  # returns after the load event: every <img> has settled
        state = browser.execute_script(
            "return Object.fromEntries(Array.from(document.images).map(i => [i.id, "
            "{complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}]))"
        )
        assert accepts, "the browser did not request the probe image"
        yield state, server, accepts[-1]


def check(state: dict[str, Any], server: Server, accept: str, want: dict[str, str]) -> None:
    """Every image decoded in the browser at its expected width, and was served as `want`."""
    for name, (file, query, width, _) in IMAGES.items():
        img = state[name]
        assert img["complete"] and img["w"] == width, (name, img)  # decoded, right size
        r = httpx.get(f"{server.url}/{file}{query}", headers={"Accept": accept}, timeout=60)
        assert r.status_code == 200 and kind(r.content) == want[name], (name, want[name])
    # the label is the chosen format when negotiated, else the extension (jpg, png)
    labels = [
        want[n] if want[n] != src else f.rpartition(".")[2] for n, (f, _, _, src) in IMAGES.items()
    ]
    for label in set(labels):
        # the browser's requests, then ours with its Accept: two per image
        got = server.metric("image_requests_total", format=label, status="ok")
        assert got == 2 * labels.count(label), (label, got)


def test_chromium_gets_avif_and_shows_it(browser: Any, images: Path) -> None:
    with loaded(browser, images, {"IMAGE_PROXY_PREFERRED_FORMATS": "avif,webp"}) as (
        state,
        server,
        accept,
    ):
        assert "image/avif" in accept, accept
        check(state, server, accept, dict.fromkeys(IMAGES, "avif"))


def test_chromium_gets_webp_when_avif_is_not_preferred(browser: Any, images: Path) -> None:
    with loaded(browser, images, {"IMAGE_PROXY_PREFERRED_FORMATS": "webp"}) as (
        state,
        server,
        accept,
    ):
        check(state, server, accept, dict.fromkeys(IMAGES, "webp"))


def test_chromium_gets_the_source_formats_with_negotiation_off(browser: Any, images: Path) -> None:
    with loaded(browser, images, {}) as (state, server, accept):
        assert "image/avif" in accept, accept
        check(state, server, accept, {n: fmt for n, (_, _, _, fmt) in IMAGES.items()})


def test_chromium_gets_jxl_and_shows_it(browser: Any, images: Path) -> None:
    """Issue 20: with jxl preferred, the browser's own Accept (image/jxl first) yields JPEG
    XL, and every image decodes in the browser at its size: a photo, an alpha PNG, a
    fit=cover crop, and a JPEG recompressed losslessly (rebuilt bit for bit by djxl)."""
    from conftest import djxl

    env = {"IMAGE_PROXY_PREFERRED_FORMATS": "jxl,avif,webp"}
    with loaded(browser, images, env, JXL_IMAGES) as (state, server, accept):
        assert accept.startswith("image/jxl"), accept
        for name, (file, query, width, height) in JXL_IMAGES.items():
            img = state[name]
            assert img["complete"] and (img["w"], img["h"]) == (width, height), (name, img)
            r = httpx.get(f"{server.url}/{file}{query}", headers={"Accept": accept}, timeout=60)
            assert r.status_code == 200 and kind(r.content) == "jxl", name
            assert r.headers["content-type"] == "image/jxl"
        original = (images / "photo.jpg").read_bytes()
        r = httpx.get(f"{server.url}/photo.jpg", headers={"Accept": accept}, timeout=60)
        assert djxl(r.content, ".jpg") == original
        # the browser's four requests, then ours with its Accept: each labelled jxl
        assert server.metric("image_requests_total", format="jxl", status="ok") == 9
