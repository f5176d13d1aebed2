"""params.parse: the query contract, dpr priority and rounding, path sanitising (unit level)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgproxy.config import Settings
from imgproxy.errors import BadRequest, NotFound, UnsupportedMediaType
from imgproxy.params import parse, parse_path
from imgproxy.signing import strip_prefix


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"IMAGE_PROXY_ROOT_PATH": str(tmp_path)})


def p(settings: Settings, query: str = "", path: str = "/a.jpg", **headers: str):  # type: ignore[no-untyped-def]
    return parse(path, query, {k.replace("_", "-"): v for k, v in headers.items()}, settings)


def test_no_params_is_passthrough(settings: Settings) -> None:
    assert p(settings).is_passthrough
    assert p(settings, "v=3&utm_source=x").is_passthrough
    assert p(settings, sec_ch_dpr="2").is_passthrough


@pytest.mark.parametrize(
    ("query", "target"),
    [
        ("size=101&dpr=2.5", 253),  # half away from zero, not banker's 252
        ("size=1", 1),
        ("size=4294967295", 4294967295),
        ("size=400&dpr=2", 800),
        ("size=400&dpr=1.0", 400),
        ("size=3&dpr=1.5", 5),  # 4.5 -> 5
        ("size=5&dpr=1.1", 6),  # 5.5 -> 6
        ("size=0400", 400),
        ("size=400&dpr=10", 4000),
    ],
)
def test_target_edge(settings: Settings, query: str, target: int) -> None:
    assert p(settings, query).target == target


@pytest.mark.parametrize(
    "query",
    [
        "size=0",
        "size=abc",
        "size=4294967296",
        "size=-5",
        "size=",
        "size=1.5",
        "size=%20400",
        "dpr=0.5",
        "dpr=11",
        "dpr=abc",
        "dpr=nan",
        "dpr=inf",
        "dpr=",
        "dpr=10.0001",
        "format=gif",
        "format=",
        "format=tiff",
        "resize_algorithm=cubic",
        "resize_algorithm=",
        "size=1&size=2",
    ],
)
def test_bad_query_values(settings: Settings, query: str) -> None:
    with pytest.raises(BadRequest):
        p(settings, query)


def test_format_case_insensitive_and_jpg(settings: Settings) -> None:
    assert p(settings, "format=JPG").format == "jpeg"
    assert p(settings, "format=WebP").format == "webp"
    assert p(settings, "resize_algorithm=LANCZOS3").algorithm == "lanczos3"


def test_bicubic_is_an_algorithm(tmp_path: Path, settings: Settings) -> None:
    assert p(settings, "size=10&resize_algorithm=BiCubic").algorithm == "bicubic"
    s = Settings.from_env(
        {"IMAGE_PROXY_ROOT_PATH": str(tmp_path), "IMAGE_PROXY_RESIZE_ALGORITHM": "bicubic"}
    )
    assert p(s, "size=10").algorithm == "bicubic"


@pytest.mark.parametrize(
    ("query", "transform", "bw"),
    [
        ("bw=1", True, True),
        ("bw=1&size=10", True, True),
        ("bw=1&bw=1", True, True),
        ("bw=0", False, False),  # any other value is ignored: not a transform parameter
        ("bw=true", False, False),
        ("bw=", False, False),
        ("bw=01", False, False),
        ("bw=2&v=3", False, False),
        ("bw=0&size=10", True, False),
        ("bw=0&bw=1", True, True),
    ],
)
def test_bw_only_the_value_1(settings: Settings, query: str, transform: bool, bw: bool) -> None:
    spec = p(settings, query)
    assert (spec.transform, spec.bw) == (transform, bw)


def test_bw_is_in_the_cache_key(settings: Settings) -> None:
    key = p(settings, "size=100").cache_key("id")
    assert p(settings, "size=100&bw=1").cache_key("id") != key
    assert p(settings, "size=100&bw=0").cache_key("id") == key
    assert p(settings, "bw=1").cache_key("id") != p(settings, "format=jpeg").cache_key("id")


def test_dpr_priority_query_over_header(settings: Settings) -> None:
    assert p(settings, "size=100&dpr=3", sec_ch_dpr="2").target == 300
    assert p(settings, "size=100", sec_ch_dpr="2").target == 200
    # an unparsable or out-of-range header is ignored, never an error
    for header in ("abc", "0.5", "11", "", "nan", "2,3"):
        assert p(settings, "size=100", sec_ch_dpr=header).target == 100


def test_dpr_without_size_keeps_dimensions(settings: Settings) -> None:
    spec = p(settings, "dpr=2")
    assert spec.transform and spec.target is None
    assert spec == p(settings, "dpr=1")  # nothing to scale: one spec, one cache entry


def test_algorithm_default_from_settings(tmp_path: Path) -> None:
    s = Settings.from_env(
        {"IMAGE_PROXY_ROOT_PATH": str(tmp_path), "IMAGE_PROXY_RESIZE_ALGORITHM": "lanczos3"}
    )
    assert p(s, "size=10").algorithm == "lanczos3"
    assert p(s, "size=10&resize_algorithm=thumbnail").algorithm == "thumbnail"


def test_cache_key_ignores_noise_and_tracks_resolution(settings: Settings) -> None:
    key = p(settings, "size=100&format=webp").cache_key("id1")
    assert p(settings, "format=webp&size=100&v=3&utm_x=1").cache_key("id1") == key
    assert p(settings, "size=50&dpr=2&format=webp").cache_key("id1") == key  # same target
    assert p(settings, "size=100&format=webp", sec_ch_dpr="2").cache_key("id1") != key
    assert p(settings, "size=100&format=webp").cache_key("id2") != key  # source changed
    assert p(settings, "size=100&format=avif").cache_key("id1") != key
    assert p(settings, "format=webp", sec_ch_dpr="2").cache_key("id1") == p(
        settings, "format=webp"
    ).cache_key("id1")  # dpr without size changes nothing


@pytest.mark.parametrize(
    "raw",
    [
        "/../etc/passwd.jpg",
        "/a/../../x.jpg",
        "/%2e%2e/x.jpg",
        "/%2E%2E/x.jpg",
        "/a%2F..%2F..%2Fx.jpg",
        "/a%2fb.jpg",
        "//etc/x.jpg",
        "/a%00.jpg",
        "/a\\..\\b.jpg",
        "/a%5c..%5cb.jpg",
        "/%252e%252e/x.jpg",
        "/%c0%ae%c0%ae/x.jpg",
        "/%ff.jpg",
        "/./a.jpg",
        "/a//b.jpg",
        "/.hidden.jpg",
        "/",
        "",
    ],
)
def test_traversal_paths_are_404(raw: str) -> None:
    with pytest.raises(NotFound):
        parse_path(raw)


@pytest.mark.parametrize("raw", ["/a.txt", "/a", "/a.gif", "/a.jpg.exe", "/dir.jpg/x"])
def test_unsupported_extensions_are_415(raw: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_path(raw)


def test_paths_that_are_fine() -> None:
    assert parse_path("/photos/sample.jpg") == "photos/sample.jpg"
    assert parse_path("/A.JPEG") == "A.JPEG"
    assert parse_path("/my%20photo.webp") == "my photo.webp"
    assert parse_path("/caf%C3%A9.png") == "café.png"


def test_strip_prefix_then_path() -> None:
    """What `params.urls` does once per URL: strip the prefix, then parse what is left."""
    assert parse_path(strip_prefix("/static/image/a.avif", "static/image")) == "a.avif"
    assert parse_path(strip_prefix("/st%61tic/image/a.avif", "static/image")) == "a.avif"
    assert parse_path(strip_prefix("/a.avif", "static/image")) == "a.avif"
    for raw in ("/static/image/../../x.jpg", "/static/image", "/static/image/"):
        with pytest.raises(NotFound):
            parse_path(strip_prefix(raw, "static/image"))
