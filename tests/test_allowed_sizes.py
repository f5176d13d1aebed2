"""IMAGE_PROXY_ALLOWED_SIZES: the target edge (after dpr) snaps up to the next listed size, or
down to the largest; never-upscale applies afterwards; the cache key follows the snapped size,
so a client looping over sizes cannot make more than (sizes x formats) renders per source."""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Server, make_settings
from imgproxy.params import parse, snap
from imgproxy.signing import sign_url

SIZES = "800,100,400"  # unsorted on purpose: settings sort them


@pytest.mark.parametrize(
    ("query", "target"),
    [
        ("size=1", 100),  # below the list
        ("size=99", 100),
        ("size=100", 100),  # exact
        ("size=101", 400),  # between
        ("size=399", 400),
        ("size=400", 400),
        ("size=401", 800),
        ("size=800", 800),
        ("size=801", 800),  # above them all: the largest
        ("size=4294967295", 800),
        ("size=150&dpr=2", 400),  # 300 after dpr
        ("size=50&dpr=2", 100),
        ("size=101&dpr=2.5", 400),  # 253 (half away from zero) -> 400
        ("size=350&dpr=2", 800),  # 700 -> 800
        ("size=101&dpr=4", 800),  # 400 at dpr 1, 800 after dpr (404)
        ("size=100&dpr=1.01", 400),  # 101 after dpr
    ],
)
def test_snapping_table(corpus: Path, query: str, target: int) -> None:
    settings = make_settings(corpus, IMAGE_PROXY_ALLOWED_SIZES=SIZES)
    assert settings.security.allowed_sizes == (100, 400, 800)
    assert parse("/a.jpg", query, {}, settings).target == target


def test_snapping_uses_the_dpr_header_too(corpus: Path) -> None:
    settings = make_settings(corpus, IMAGE_PROXY_ALLOWED_SIZES=SIZES)
    assert parse("/a.jpg", "size=150", {"sec-ch-dpr": "2"}, settings).target == 400


def test_no_list_means_any_size(corpus: Path) -> None:
    assert parse("/a.jpg", "size=123", {}, make_settings(corpus)).target == 123
    assert snap(123, ()) == 123
    assert snap(5, (7,)) == snap(9, (7,)) == 7


def test_without_size_nothing_snaps(corpus: Path) -> None:
    settings = make_settings(corpus, IMAGE_PROXY_ALLOWED_SIZES=SIZES)
    assert parse("/a.jpg", "format=webp", {}, settings).target is None
    assert parse("/a.jpg", "dpr=2", {}, settings).target is None


def test_snapped_sizes_share_one_cache_key(corpus: Path) -> None:
    settings = make_settings(corpus, IMAGE_PROXY_ALLOWED_SIZES=SIZES)
    keys = {parse("/a.jpg", q, {}, settings).cache_key("id") for q in ("size=101", "size=399")}
    assert len(keys) == 1
    assert parse("/a.jpg", "size=401", {}, settings).cache_key("id") not in keys


@pytest.mark.parametrize(
    ("target", "longest"),
    [
        ("/landscape.jpg?size=50", 100),  # 1200x900: snapped up
        ("/landscape.jpg?size=101", 400),
        ("/landscape.jpg?size=5000", 800),  # snapped down to the largest
        ("/landscape.jpg?size=150&dpr=2", 400),
        ("/small.jpg?size=50", 100),  # 101x50: 100 fits
        ("/small.jpg?size=101", 101),  # snapped to 400, then never upscaled
        ("/small.jpg?size=800", 101),
    ],
)
def test_snapping_end_to_end(serve: Callable[..., Server], target: str, longest: int) -> None:
    s = serve(IMAGE_PROXY_ALLOWED_SIZES=SIZES)
    r = s.get(target)
    assert r.status == 200
    im = r.image()
    assert max(im.width, im.height) == longest


def test_cache_key_follows_the_snapped_size(serve: Callable[..., Server]) -> None:
    s = serve(IMAGE_PROXY_ALLOWED_SIZES=SIZES, IMAGE_PROXY_ENABLE_CACHE="true")
    assert s.get("/landscape.jpg?size=101&format=webp").headers["x-cache"] == "MISS"
    r = s.get("/landscape.jpg?size=399&format=webp")
    assert (r.headers["x-cache"], r.image().width) == ("HIT", 400)
    assert s.metric("image_transforms_total") == 1


# -- load: a client hammering distinct sizes ----------------------------------------------

SOURCES = ("landscape.jpg", "photo.webp")
FORMATS = ("webp", "jpeg")


def hammer(s: Server, sizes: list[int], workers: int = 8) -> list[tuple[int, int]]:
    """One request per size, `workers` at a time, in random order; the sources and formats
    take turns, so each (source, format) pair sees a quarter of the sizes, spread evenly."""
    pairs = [(src, fmt) for src in SOURCES for fmt in FORMATS]
    jobs = [(*pairs[i % len(pairs)], size) for i, size in enumerate(sizes)]
    random.Random(7).shuffle(jobs)

    def one(job: tuple[str, str, int]) -> tuple[int, int]:
        src, fmt, size = job
        r = s.get(f"/{src}?size={size}&format={fmt}")
        return r.status, max(r.image().width, r.image().height) if r.status == 200 else 0

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def test_thousand_sizes_cost_at_most_four_renders_per_source_and_format(
    serve: Callable[..., Server],
) -> None:
    allowed = (64, 128, 256, 512)
    s = serve(
        IMAGE_PROXY_ALLOWED_SIZES=",".join(map(str, allowed)),
        IMAGE_PROXY_ENABLE_CACHE="true",
        IMAGE_PROXY_TRANSFORM_QUEUE="1000",
    )
    results = hammer(s, list(range(1, 1001)))  # 1,000 distinct sizes
    assert len(results) == 1000
    assert {status for status, _ in results} == {200}
    assert {edge for _, edge in results} == set(allowed)
    for fmt in FORMATS:
        # image_transforms_total is labelled by output format: 2 sources x 4 sizes at most
        assert s.metric("image_transforms_total", format=fmt) <= len(SOURCES) * len(allowed)
    assert s.metric("image_transforms_total") <= len(SOURCES) * len(FORMATS) * len(allowed)


def test_without_the_list_every_size_is_a_render(serve: Callable[..., Server]) -> None:
    """The threat the setting stops: each new size is a new render and a new cache entry."""
    s = serve(IMAGE_PROXY_ENABLE_CACHE="true", IMAGE_PROXY_TRANSFORM_QUEUE="1000")
    results = hammer(s, list(range(100, 140)))
    assert {status for status, _ in results} == {200}
    assert s.metric("image_transforms_total") == len(results)


def test_signed_url_replayed_with_every_dpr_header_stays_bounded(
    serve: Callable[..., Server],
) -> None:
    """A header cannot be signed: a signed `size` moves with Sec-CH-DPR (1.0 ... 10.0, used
    rounded up to 0.5 and capped at IMAGE_PROXY_MAX_DPR 3). The size list bounds that too:
    91 distinct header values, at most the listed sizes in renders."""
    key = "k" * 40
    s = serve(
        IMAGE_PROXY_SIGNATURE_KEYS=key,
        IMAGE_PROXY_ALLOWED_SIZES=SIZES,
        IMAGE_PROXY_ENABLE_CACHE="true",
    )
    url = sign_url("/landscape.jpg?size=100&format=webp", key)
    edges = set()
    for tenths in range(10, 101):
        r = s.get(url, headers={"Sec-CH-DPR": f"{tenths / 10:.1f}"})
        assert r.status == 200
        edges.add(r.image().width)
    assert edges == {100, 400}  # 100 x 1.0, and 100 x 1.5 ... 3.0 snapped up to 400
    assert s.metric("image_transforms_total") == 2
