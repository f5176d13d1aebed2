"""Property tests: the request parser and the decoders, fed arbitrary and mutated input.

* parser: `params.parse_path`, `parse_query` and `parse` may only raise our typed errors, and a
  path they return is always safe to join onto the root;
* decoders: mutated real images (bit flips, truncation, splices, inserted bytes) through
  `transform.render` may only raise `UnprocessableImage` (and `RenderFailed` only for an
  encoder's own limit); `sniff.probe` never raises; a few through HTTP never give 500.

CI runs are short. Longer runs: `IMGPROXY_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_fuzz.py`
(see tests/README-fuzz.md).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest
import pyvips
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from conftest import Server, app_server, make_settings
from imgproxy import params, signing, sniff, transform
from imgproxy.config import (
    ConfigError,
    Settings,
    _strip_path,
    default_encode_options,
    format_named,
)
from imgproxy.errors import ImgProxyError, RenderFailed, UnprocessableImage
from imgproxy.httpdates import parse_date

EXAMPLES = int(os.environ.get("IMGPROXY_FUZZ_EXAMPLES", "200"))
DECODER_EXAMPLES = int(
    os.environ.get("IMGPROXY_FUZZ_DECODER_EXAMPLES", str(max(1, EXAMPLES * 3 // 10)))
)
PARSER = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
DECODER = settings(
    max_examples=DECODER_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- the parser -------------------------------------------------------------------------------

# Pieces that tend to matter for paths: separators, dots, encodings (single, double,
# overlong), NUL, controls, unicode look-alikes, the strip prefix, supported extensions.
TOKENS = [
    "/", "//", ".", "..", "...", "%", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%00", "%25",
    "%252e", "%252f", "%c0%ae", "%c0%af", "%e0%80%ae", "%ff", "%0a", "%0d", "%20", "%3f", "%23",
    "\\", "\x00", "\n", "\t", " ", "?", "#", ";", ":", "@", "~", "\u2024", "\uff0e", "\uff0f",
    "\u2215", "\ud800", "a", "b", "img", "static", "image", "static/image/", ".jpg", ".png",
    ".webp", ".avif", ".jpeg", ".JPG", ".gif", ".txt", "%2ejpg",
]  # fmt: skip
path_text = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=24).map("".join),
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec="latin-1"), max_size=200),
    st.binary(max_size=120).map(lambda b: b.decode("latin-1")),
)
strip_values = st.one_of(
    st.sampled_from(["", "static/image/", "static/image", "/static/image/", "a", "..", "%2e"]),
    st.lists(st.sampled_from(TOKENS), max_size=6).map("".join),
)


def _strip(raw: str) -> str | None:
    try:
        return _strip_path(raw)  # what the configuration would hand to the parser
    except ValueError:
        return None


def _assert_safe(path: str) -> None:
    assert path
    assert not path.startswith("/")
    assert "\x00" not in path and "\\" not in path
    segments = path.split("/")
    assert ".." not in segments and "." not in segments and "" not in segments
    assert not any(s.startswith(".") for s in segments)
    assert not any(ch < " " or ch == "\x7f" for ch in path)
    path.encode("utf-8")  # strict: no lone surrogates (they cannot be opened or hashed)
    name = segments[-1]
    assert format_named(name.rpartition(".")[2], served=True) is not None


@PARSER
@given(raw=path_text, strip=strip_values)
@example(raw="\ud800.jpg", strip="")  # found by this test: a lone surrogate was accepted
@example(raw="a\udcff.jpg", strip="")
@example(raw="static/image/../x.jpg", strip="static/image/")
@example(raw="static/image/", strip="static/image/")
def test_parse_path_only_typed_errors_and_safe_result(raw: str, strip: str) -> None:
    strip_path = _strip(strip)
    assume(strip_path is not None)
    assert strip_path is not None
    for candidate in (raw, "/" + raw):
        try:
            path = params.parse_path(signing.strip_prefix(candidate, strip_path))
        except ImgProxyError as exc:
            assert exc.status in (404, 415)
            continue
        _assert_safe(path)


@PARSER
@given(raw=st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12).map("".join))
def test_parse_path_result_stays_under_the_root(raw: str) -> None:
    """Joined onto a root and normalised, an accepted path never leaves the root."""
    try:
        path = params.parse_path("/" + raw)
    except ImgProxyError:
        return
    root = "/srv/images"
    joined = os.path.normpath(os.path.join(root, path))
    assert joined.startswith(root + "/")


query_text = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.tuples(
            st.sampled_from(["format", "size", "dpr", "resize_algorithm", "v", "", "size[]"]),
            st.one_of(
                st.text(max_size=20),
                st.sampled_from(["png", "AVIF", "0", "1", "-1", "1e3", "4294967296", "nan",
                                 "inf", "1.5", "10.0", "10.01", "+2", "٣", "²", "0x10"]),
            ),
        ),
        max_size=8,
    ).map(lambda kv: "&".join(f"{k}={v}" for k, v in kv)),
)  # fmt: skip


@PARSER
@given(query=query_text)
def test_parse_query_only_typed_errors(query: str) -> None:
    try:
        args = params.parse_query(query)
    except ImgProxyError as exc:
        assert exc.status == 400
        return
    assert set(args) <= set(params.TRANSFORM_PARAMS)


@pytest.fixture(scope="module")
def base_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("fuzz-settings")
    try:
        return make_settings(root)
    except ConfigError as exc:  # pragma: no cover - configuration is not under test here
        pytest.fail(str(exc))


@PARSER
@given(
    raw=path_text,
    query=query_text,
    dpr_header=st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["2", " 1.5 ", "11"])),
    strip=strip_values,
)
@example(raw="\ud800.jpg", query="size=1", dpr_header=None, strip="")
@example(raw="x.jpg", query="size=4294967295&dpr=10", dpr_header="1e-999", strip="")
def test_parse_only_typed_errors(
    base_settings: Settings, raw: str, query: str, dpr_header: str | None, strip: str
) -> None:
    strip_path = _strip(strip)
    assume(strip_path is not None)
    assert strip_path is not None
    s = base_settings  # the prefix is the caller's: stripped once, as `params.urls` does
    headers = {} if dpr_header is None else {"sec-ch-dpr": dpr_header}
    try:
        spec = params.parse(signing.strip_prefix("/" + raw, strip_path), query, headers, s)
    except ImgProxyError as exc:
        assert exc.status in (400, 404, 415)
        return
    _assert_safe(spec.path)
    assert spec.target is None or spec.target >= 1
    assert spec.format in (None, *sniff.CONTENT_TYPES)
    assert len(spec.cache_key("id")) == 64


@PARSER
@given(
    value=st.one_of(
        st.text(max_size=60),
        st.builds(
            "{}, {:02d} {} {} {:02d}:{:02d}:{:02d} {}".format,
            st.sampled_from(["Mon", "Fri", "Xyz"]),
            st.integers(0, 99),
            st.sampled_from(["Jan", "Dec", "Foo"]),
            st.integers(-1, 100000),
            st.integers(0, 99),
            st.integers(0, 99),
            st.integers(0, 99),
            st.sampled_from(["GMT", "UTC", "-2359", "+2359", "+9999", "EST", ""]),
        ),
    )
)
@example(value="Fri, 31 Dec 9999 23:59:59 -2359")  # found: parsed, then formatdate() raised
def test_origin_dates_are_total(value: str) -> None:
    """An origin's Last-Modified is a date we can send on (formatdate) or None: never a 500."""
    ts = parse_date(value)
    if ts is not None:
        formatdate(ts, usegmt=True)


# -- the decoders -----------------------------------------------------------------------------

KEEP_NONE = pyvips.enums.ForeignKeep.NONE


def _seed_images() -> dict[str, bytes]:
    x = pyvips.Image.xyz(48, 36)
    noise = pyvips.Image.gaussnoise(48, 36, sigma=20, seed=11)
    base = (x[0] * 5 + x[1] * 3 + noise).cast("uchar")
    rgb = base.bandjoin([(255 - base).cast("uchar"), (base // 2).cast("uchar")]).copy(
        interpretation="srgb"
    )
    rgba = rgb.bandjoin((x[0] * 5).cast("uchar"))
    return {
        "jpeg": bytes(rgb.jpegsave_buffer(Q=80, keep=KEEP_NONE)),
        "jpeg-progressive": bytes(rgb.jpegsave_buffer(Q=80, interlace=True, keep=KEEP_NONE)),
        "png": bytes(rgb.pngsave_buffer(keep=KEEP_NONE)),
        "png-alpha-interlaced": bytes(rgba.pngsave_buffer(interlace=True, keep=KEEP_NONE)),
        "webp": bytes(rgb.webpsave_buffer(Q=75, keep=KEEP_NONE)),
        "webp-lossless": bytes(rgba.webpsave_buffer(lossless=True, keep=KEEP_NONE)),
        "webp-alpha": bytes(rgba.webpsave_buffer(Q=75, keep=KEEP_NONE)),
        "avif": bytes(rgb.heifsave_buffer(compression="av1", effort=0, Q=40, keep=KEEP_NONE)),
        "avif-alpha": bytes(
            rgba.heifsave_buffer(compression="av1", effort=0, Q=40, keep=KEEP_NONE)
        ),
        "gif": bytes(rgb.gifsave_buffer(keep=KEEP_NONE)),
    }


SEEDS = _seed_images()
MAX_PIXELS = 2048 * 2048  # a mutated header may claim anything: keep a decode cheap here


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "splice", "insert", "delete"]))
        n = len(data)
        if n < 2:
            break
        at = draw(st.integers(0, n - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[max(1, at) :]
        elif op == "splice":
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            cut = draw(st.integers(0, len(other) - 1))
            data = data[:at] + bytearray(other[cut:])
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


@pytest.fixture(scope="module", autouse=True)
def _vips() -> None:
    transform.configure(1)


@DECODER
@given(
    data=mutated(),
    out=st.sampled_from(["jpeg", "png", "webp", "avif"]),
    target=st.one_of(st.none(), st.integers(1, 100)),
    algorithm=st.sampled_from(["thumbnail", "lanczos3", "bicubic", "auto"]),
    bw=st.booleans(),
)
def test_render_only_raises_unprocessable(
    data: bytes, out: str, target: int | None, algorithm: str, bw: bool
) -> None:
    kind = sniff.sniff(data[: sniff.SNIFF_BYTES])
    assume(kind is not None)  # the service answers 415 before any decoder sees these
    assert kind is not None
    try:
        plan = transform.Plan(
            kind, out, default_encode_options(), MAX_PIXELS, target, algorithm, bw
        )
        rendered = transform.render(data, plan)
    except UnprocessableImage:
        return
    except RenderFailed:
        # a decodable image may still be beyond an encoder's own limit (WebP: 16383 px)
        dims = sniff.dimensions(data, kind)
        assert out == "webp" and dims is not None and max(dims) > 16383
        return
    assert rendered.format == out
    assert rendered.width >= 1 and rendered.height >= 1
    assert sniff.sniff(rendered.data[: sniff.SNIFF_BYTES]) == out


@DECODER
@given(data=mutated())
def test_header_dimensions_never_raise(data: bytes) -> None:
    kind = sniff.sniff(data[: sniff.SNIFF_BYTES])
    if kind is None:
        return
    dims = sniff.dimensions(data, kind)
    assert dims is None or (dims[0] >= 0 and dims[1] >= 0)


@DECODER
@given(data=mutated(), cut=st.integers(0, sniff.PROBE_BYTES))
def test_probe_never_raises(data: bytes, cut: int) -> None:
    found = sniff.probe(data[:cut])
    if found is None:
        assert sniff.sniff(data[: min(cut, sniff.SNIFF_BYTES)]) is None
    else:
        assert found.kind == sniff.sniff(data[: sniff.SNIFF_BYTES])
        assert (found.width is None) == (found.height is None)


@PARSER
@given(head=st.binary(max_size=80))
def test_sniff_total_on_arbitrary_bytes(head: bytes) -> None:
    kind = sniff.sniff(head)
    assert kind in (None, *sniff.CONTENT_TYPES)
    if kind is not None:
        assert sniff.dimensions(head, kind) is None or len(sniff.dimensions(head, kind)) == 2  # type: ignore[arg-type]


# -- a few mutants through HTTP: never a 500 ---------------------------------------------------

EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "avif": "avif", "gif": "png"}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[str]]]:
    root = tmp_path_factory.mktemp("mutants") / "root"
    root.mkdir()
    rng = random.Random(20260101)
    names = []
    for i in range(40):
        seed_name = sorted(SEEDS)[i % len(SEEDS)]
        data = bytearray(SEEDS[seed_name])
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(8, len(data))  # keep most magic bytes: reach the decoders
            if rng.random() < 0.25:
                del data[at:]
                if len(data) < 16:
                    break
            else:
                data[at] ^= 1 << rng.randrange(8)
        ext = EXT[seed_name.split("-")[0]]
        name = f"m{i:02d}-{seed_name}.{ext}"
        (root / name).write_bytes(bytes(data))
        names.append(name)
    with app_server(make_settings(root)) as s:
        yield s, names


def test_mutants_over_http_never_500(mutants: tuple[Server, list[str]]) -> None:
    server, names = mutants
    seen: set[int] = set()
    for i, name in enumerate(names):
        query = ["", "?size=20", "?format=png", "?size=30&format=avif&resize_algorithm=lanczos3"][
            i % 4
        ]
        r = server.get(f"/{name}{query}")
        assert r.status in (200, 415, 422), (name, query, r.status, r.text)
        seen.add(r.status)
        if r.status == 200 and query:
            assert r.image().width >= 1
    assert server.get("/health").status == 200
    assert 422 in seen  # the mutants really did reach the decoders


# -- arbitrary request targets against the shared corpus: never a 500 --------------------------

TARGET_TOKENS = [
    "/", "//", ".", "..", "%", "%2e", "%2f", "%5c", "%00", "%25", "%c0%ae", "%ff", "\\", "?",
    "#", "&", "=", ";", "+", "size=", "format=", "dpr=", "resize_algorithm=", "1", "0", "-1",
    "99999999999", "2.5", "png", "avif", "lanczos3", "landscape.jpg", "photo.avif", "bomb.png",
    "truncated.jpg", "text.jpg", "gif-named.png", "empty.jpg", "dir.jpg", "photos",
    "sample.jpg", "metrics", "health", "\x80", "\xff",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus_server(corpus: Path) -> Iterator[Server]:
    with app_server(make_settings(corpus)) as s:
        yield s


@settings(
    max_examples=max(10, EXAMPLES // 4),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    target=st.lists(st.sampled_from(TARGET_TOKENS), max_size=14).map("".join),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_request_targets_never_500(corpus_server: Server, target: str, method: str) -> None:
    r = corpus_server.raw("/" + target, method=method)
    assert r.status in (200, 304, 400, 404, 415, 422), (target, r.status, r.text)
