"""The fast codecs against libvips' own result: same pixels on decode, same settings and a
quality floor on encode, and a refusal (None) wherever they could differ."""

from __future__ import annotations

import math

import pytest
import pyvips

from imgproxy import fastcodecs
from imgproxy.fastcodecs import Pixels

from conftest import photo

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
