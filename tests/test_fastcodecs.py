"""The fast codecs against libvips' own result: same pixels on decode, same settings and a
quality floor on encode, and a refusal (None) wherever they could differ."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import pyvips

from conftest import Server, photo
from imgproxy import fastcodecs, transform
from imgproxy.config import default_encode_options
from imgproxy.errors import UnprocessableImage
from imgproxy.fastcodecs import Pixels

KEEP_NONE = pyvips.enums.ForeignKeep.NONE


def psnr(a: pyvips.Image, b: pyvips.Image) -> float:
    assert (a.width, a.height, a.bands) == (b.width, b.height, b.bands)
    mse = ((a.cast("float") - b.cast("float")) ** 2).avg()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def to_vips(p: Pixels) -> pyvips.Image:
    return pyvips.Image.new_from_memory(p.data, p.width, p.height, p.bands, "uchar")


def pixels_of(image: pyvips.Image) -> Pixels:
    return Pixels(image.write_to_memory(), image.width, image.height, image.bands)


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


@pytest.fixture(scope="module")
def source() -> pyvips.Image:
    return photo(1000, 700).copy_memory()


@pytest.mark.parametrize("shrink", [1, 2, 4, 8])
@pytest.mark.parametrize("subsample", ["on", "off"])
@pytest.mark.parametrize("interlace", [False, True])
def test_jpeg_decode_is_pixel_identical_to_libvips(
    source: pyvips.Image, shrink: int, subsample: str, interlace: bool
) -> None:
    data = source.jpegsave_buffer(Q=85, subsample_mode=subsample, interlace=interlace)
    got = fastcodecs.decode_jpeg(data, shrink)
    assert got is not None
    ref = pyvips.Image.new_from_buffer(data, "", shrink=shrink)
    assert (got.width, got.height, got.bands) == (ref.width, ref.height, 3)
    assert bytes(got.data) == ref.write_to_memory()


def test_grey_jpeg_decodes_to_one_band(source: pyvips.Image) -> None:
    data = source.colourspace("b-w").jpegsave_buffer(Q=85)
    got = fastcodecs.decode_jpeg(data, 2)
    assert got is not None and got.bands == 1
    assert bytes(got.data) == pyvips.Image.new_from_buffer(data, "", shrink=2).write_to_memory()


def test_odd_sizes_round_up_like_libvips() -> None:
    data = photo(1001, 699).jpegsave_buffer(Q=85)
    got = fastcodecs.decode_jpeg(data, 8)
    assert got is not None and (got.width, got.height) == (125, 87)  # libvips rounds down
    ref = pyvips.Image.new_from_buffer(data, "", shrink=8)
    assert bytes(got.data) == ref.write_to_memory()


def test_refuses_what_libvips_must_handle(source: pyvips.Image) -> None:
    good = source.jpegsave_buffer(Q=85)
    cmyk = source.icc_transform("cmyk").jpegsave_buffer(Q=85)
    assert decode(cmyk).bands == 4
    assert fastcodecs.decode_jpeg(cmyk, 2) is None
    assert fastcodecs.decode_jpeg(good[: len(good) // 2], 2) is None  # truncated
    assert fastcodecs.decode_jpeg(b"not a jpeg at all", 1) is None
    assert fastcodecs.decode_jpeg(photo(100, 60).jpegsave_buffer(), 2) is None  # tiny


@pytest.mark.parametrize("bands", [3, 4])
@pytest.mark.parametrize(("q", "effort"), [(80, 4), (50, 0), (95, 6)])
def test_webp_encode_matches_libvips(bands: int, q: int, effort: int) -> None:
    image = photo(400, 270, bands=bands).copy_memory()
    ref = image.webpsave_buffer(Q=q, effort=effort, keep=KEEP_NONE)
    got = fastcodecs.encode_webp(pixels_of(image), q, effort)
    assert got is not None and got[:4] == b"RIFF" and got[8:12] == b"WEBP"
    assert abs(len(got) - len(ref)) <= 0.03 * len(ref)
    out = decode(got)
    assert (out.width, out.height, out.bands) == (400, 270, bands)
    assert psnr(out, decode(ref)) >= 45


@pytest.mark.parametrize("q", [75, 92])
def test_jpeg_encode_matches_libvips(q: int) -> None:
    image = photo(400, 270).copy_memory()
    ref = image.jpegsave_buffer(Q=q, optimize_coding=True, keep=KEEP_NONE)
    got = fastcodecs.encode_jpeg(pixels_of(image), q)
    assert got is not None and got[:3] == b"\xff\xd8\xff"
    assert abs(len(got) - len(ref)) <= 0.03 * len(ref)
    out, ref_out = decode(got), decode(ref)
    assert (out.width, out.height, out.bands) == (400, 270, 3)
    assert out.get("jpeg-chroma-subsample") == ref_out.get("jpeg-chroma-subsample")
    assert psnr(out, ref_out) >= 45
    assert psnr(out, image) >= psnr(ref_out, image) - 0.5  # as close to the source


def test_grey_jpeg_encode() -> None:
    image = photo(400, 270).colourspace("b-w").copy_memory()
    got = fastcodecs.encode_jpeg(pixels_of(image), 75)
    assert got is not None
    out = decode(got)
    assert out.bands == 1 and psnr(out, image) >= 30


def test_encoders_refuse_other_band_counts() -> None:
    two = photo(64, 64).colourspace("b-w").bandjoin(255).copy_memory()
    assert fastcodecs.encode_webp(pixels_of(two), 80, 4) is None
    assert fastcodecs.encode_jpeg(pixels_of(two), 75) is None
    grey = photo(64, 64).colourspace("b-w").copy_memory()
    assert fastcodecs.encode_webp(pixels_of(grey), 80, 4) is None


# -- inside the pipeline: fast codecs on against off (libvips for every codec) ---------------


def render(data: bytes, fmt: str, fast: bool, **plan: Any) -> transform.Rendered:
    options = dataclasses.replace(default_encode_options(), fast_codecs=fast)
    plan.setdefault("target", 400)
    return transform.render(data, transform.Plan("jpeg", fmt, options, 1 << 40, **plan))


def assert_equivalent(data: bytes, fmt: str, floor: float = 45, **plan: Any) -> bytes:
    fast, slow = render(data, fmt, True, **plan), render(data, fmt, False, **plan)
    assert (fast.width, fast.height) == (slow.width, slow.height)
    assert abs(len(fast.data) - len(slow.data)) <= 0.03 * len(slow.data)
    a, b = decode(fast.data), decode(slow.data)
    assert (a.width, a.height, a.bands) == (b.width, b.height, b.bands)
    assert psnr(a, b) >= floor
    return fast.data


@pytest.fixture(scope="module")
def landscape() -> bytes:
    transform.configure(1)
    return bytes(photo(1200, 900).jpegsave_buffer(Q=85))


PLANS: dict[str, dict[str, Any]] = {
    "shrink2": {"algorithm": "auto"},
    "full-decode": {"algorithm": "lanczos3"},
    "shrink4": {"target": 250},
    "no-resize": {"target": None},
}
# every format with every plan, except AVIF at full size (a 1200x900 AVIF encode is slow and
# its decode path is the same as the resized AVIF cases')
RENDERS = [
    pytest.param(fmt, plan, id=f"{name}-{fmt}")
    for fmt in ("jpeg", "webp", "png", "avif")
    for name, plan in PLANS.items()
    if (fmt, name) != ("avif", "no-resize")
]


@pytest.mark.parametrize(("fmt", "plan"), RENDERS)
def test_render_equals_the_libvips_only_render(
    landscape: bytes, fmt: str, plan: dict[str, Any]
) -> None:
    out = assert_equivalent(landscape, fmt, **plan)
    if fmt == "jpeg":  # Pillow writes a JFIF APP0 marker, libvips does not: the fast path ran
        assert out[6:10] == b"JFIF"


def test_the_fast_decoder_is_used_for_jpeg(
    landscape: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = fastcodecs.decode_jpeg

    def spy(data: bytes, shrink: int) -> Pixels | None:
        got = real(data, shrink)
        calls.append(shrink if got is not None else -1)
        return got

    monkeypatch.setattr(fastcodecs, "decode_jpeg", spy)
    render(landscape, "webp", True)
    render(landscape, "webp", True, target=250)
    render(landscape, "webp", True, target=None)
    render(landscape, "webp", False)
    assert calls == [2, 4, 1]


def test_exif_orientation_is_applied(landscape: bytes) -> None:
    image = pyvips.Image.new_from_buffer(landscape, "").copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)
    data = bytes(image.jpegsave_buffer(Q=85))
    for fmt in ("jpeg", "webp"):
        out = decode(assert_equivalent(data, fmt))
        assert (out.width, out.height) == (300, 400)
        assert not out.get_typeof("orientation") or out.get("orientation") == 1
    upright = decode(render(landscape, "png", True).data).rot90()
    assert psnr(decode(render(data, "png", True).data), upright) >= 45


def test_embedded_icc_profile_is_honoured() -> None:
    p3 = photo(1200, 900).icc_transform("p3").copy_memory()
    assert p3.get_typeof("icc-profile-data")
    data = bytes(p3.jpegsave_buffer(Q=90))
    stripped = bytes(p3.jpegsave_buffer(Q=90, keep=KEEP_NONE))
    for fmt in ("jpeg", "webp"):
        converted = decode(assert_equivalent(data, fmt))
        assert not converted.get_typeof("icc-profile-data")
        ignored = decode(render(stripped, fmt, True).data)
        assert psnr(converted, ignored) < 40  # the P3 -> sRGB conversion did happen


def test_grey_cmyk_and_truncated_sources(landscape: bytes) -> None:
    grey = bytes(photo(1200, 900).colourspace("b-w").jpegsave_buffer(Q=85))
    assert_equivalent(grey, "jpeg")
    assert_equivalent(grey, "webp")
    cmyk = bytes(photo(1200, 900).icc_transform("cmyk").jpegsave_buffer(Q=85))
    assert decode(assert_equivalent(cmyk, "webp")).bands == 3  # libvips decodes, then sRGB
    with pytest.raises(UnprocessableImage):
        render(landscape[: len(landscape) // 2], "webp", True)


def test_server_output_with_and_without_fast_codecs(serve: Callable[..., Server]) -> None:
    fast, slow = serve(), serve(IMAGE_PROXY_FAST_CODECS="false")
    for query in ("size=400&format=webp", "size=400&format=jpeg", "size=200&format=png"):
        a, b = fast.get(f"/landscape.jpg?{query}"), slow.get(f"/landscape.jpg?{query}")
        assert a.status == b.status == 200
        assert a.headers["content-type"] == b.headers["content-type"]
        assert abs(len(a.body) - len(b.body)) <= 0.03 * len(b.body)
        assert psnr(decode(a.body), decode(b.body)) >= 45
