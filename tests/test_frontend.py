"""README "Use it from your front-end": every recipe, run as written in the README (the
JavaScript with node), makes URLs that a real server answers with images of the sizes the
framework asked for. A README edit that breaks a recipe breaks this test."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, photo

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = "https://img.example.com"
SOURCE = (1600, 1200)  # photos/hero.jpg


def recipe(name: str) -> str:
    """The code block that follows `<!-- recipe: name -->` in the README."""
    text = README.read_text()
    at = text.index(f"<!-- recipe: {name} -->")
    match = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL).search(text, at)
    assert match is not None, name
    return match.group(1)


@pytest.fixture
def hero(serve: Callable[..., Server], tmp_path: Path) -> Server:
    (tmp_path / "photos").mkdir()
    photo(*SOURCE).jpegsave(str(tmp_path / "photos" / "hero.jpg"), Q=85)
    return serve(tmp_path, IMAGE_PROXY_PREFERRED_FORMATS="jxl,avif,webp")


def node() -> str:
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("node not found (Debian package nodejs)")
        pytest.skip("node not found (Debian package nodejs)")
    return found


def run_js(module: str, server: Server, call: str, cases: list[Any], tmp_path: Path) -> list[str]:
    """Import the README's module (its placeholder origin pointed at `server`) and map
    `call` (a JS expression of `m` and `c`) over `cases`; the URLs it returns."""
    (tmp_path / "recipe.mjs").write_text(module.replace(PLACEHOLDER, server.url))
    (tmp_path / "driver.mjs").write_text(
        'import * as m from "./recipe.mjs";\n'
        f"const cases = {json.dumps(cases)};\n"
        f"console.log(JSON.stringify(cases.map((c) => {call})));\n"
    )
    out = subprocess.run(
        [node(), str(tmp_path / "driver.mjs")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    urls: list[str] = json.loads(out.stdout)
    return urls


def check(server: Server, urls: list[str], sizes: list[tuple[int, int]]) -> None:
    for url, size in zip(urls, sizes, strict=True):
        assert url.startswith(server.url + "/photos/hero.jpg"), url
        r = server.get(url.removeprefix(server.url), headers={"Accept": "image/webp,*/*"})
        assert r.status == 200, (url, r.text)
        image = r.image()
        assert (image.width, image.height) == size, url


def test_nextjs_loader(hero: Server, tmp_path: Path) -> None:
    widths = [16, 256, 640, 750, 828, 1080, 1200, 1920, 3840]  # Next's default sizes
    cases = [
        {"src": "/photos/hero.jpg", "width": w, "quality": q} for w in widths for q in (None, 50)
    ]
    urls = run_js(recipe("nextjs"), hero, "m.default(c)", cases, tmp_path)
    assert urls[0].endswith("?w=16&q=75") and urls[1].endswith("?w=16&q=50")
    expected = []
    for w in widths:
        width = min(w, SOURCE[0])  # never upscaled
        expected += [(width, (2 * SOURCE[1] * width + SOURCE[0]) // (2 * SOURCE[0]))] * 2
    check(hero, urls, expected)
    small, smaller = (hero.get(u.removeprefix(hero.url)) for u in urls[4:6])
    assert len(smaller.body) < len(small.body)  # the quality prop reaches the encoder


NUXT = [
    ({"width": 400, "height": 225, "fit": "cover", "quality": 70}, (400, 225)),
    ({"width": 300}, (300, 225)),
    ({"height": 150, "format": "webp"}, (200, 150)),
    ({"width": 400, "height": 400, "fit": "inside"}, (400, 300)),
    ({"width": 400, "height": 400, "fit": "contain", "background": "#ff0000"}, (400, 400)),
    ({"width": 500, "height": 200, "fit": "fill", "format": "png"}, (500, 200)),
    ({"width": 3200, "height": 1800, "fit": "cover"}, (1600, 900)),
    ({"width": 640, "format": "auto"}, (640, 480)),
]


def test_nuxt_image_provider(hero: Server, tmp_path: Path) -> None:
    cases = [m for m, _ in NUXT]
    call = f'm.getImage("/photos/hero.jpg", {{ modifiers: c, baseURL: "{hero.url}" }}).url'
    urls = run_js(recipe("nuxt"), hero, call, cases, tmp_path)
    assert urls[0].endswith("/photos/hero.jpg?w=400&h=225&fit=cover&q=70")
    check(hero, urls, [size for _, size in NUXT])


ASTRO = [
    ({"src": "/photos/hero.jpg", "width": 800, "height": 450, "format": "webp"}, (800, 450)),
    ({"src": {"src": "/photos/hero.jpg"}, "width": 400, "format": "avif"}, (400, 300)),
    ({"src": "/photos/hero.jpg", "width": 300, "height": 300, "fit": "contain"}, (300, 300)),
    ({"src": "/photos/hero.jpg", "width": 3200, "height": 1800, "quality": 60}, (1600, 900)),
]


def test_astro_image_service(hero: Server, tmp_path: Path) -> None:
    urls = run_js(recipe("astro"), hero, "m.default.getURL(c)", [o for o, _ in ASTRO], tmp_path)
    assert urls[0].endswith("/photos/hero.jpg?w=800&h=450&fit=cover&format=webp")
    check(hero, urls, [size for _, size in ASTRO])


def test_plain_html_srcset(hero: Server) -> None:
    html = recipe("html").replace(PLACEHOLDER, hero.url)
    urls = re.findall(r"(http://[^\s\"]+)", html)
    assert len(urls) == 6
    sizes = []
    for url in urls:
        q = dict(p.split("=") for p in url.partition("?")[2].split("&"))
        sizes.append((int(q["w"]), int(q["h"])))  # every box fits in the source: exact
    check(hero, urls, sizes)
