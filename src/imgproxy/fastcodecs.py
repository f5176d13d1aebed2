"""Faster builds of the same codecs, for the render steps where pyvips-binary's builds lose.

pyvips-binary compiles libwebp with -Os and drives libjpeg through libvips' pipeline (two
header parses, strip regions, a worker thread per evaluation); on one core that costs a W5
render ~35 % in the JPEG decode and ~25 % in the WebP encode (bench/README.md, "Codecs").
This module runs those steps with the same libraries built for speed:

    decode_jpeg   simplejpeg (libjpeg-turbo 3.1, -O3): DCT-scaled decode, islow IDCT and
                  fancy upsampling like libvips' jpegload, so the pixels are identical
    encode_webp   Pillow's libwebp 1.6 (-O3): same encoder, same settings, same bytes
    encode_jpeg   Pillow's libjpeg-turbo 3.2, Huffman tables optimised like our
                  jpegsave(optimize_coding=True)

and the one codec pyvips-binary lacks, JPEG XL, through pillow-jxl-plugin (libjxl; chosen
by measurement, bench/README.md "JPEG XL"):

    encode_jxl     lossy JPEG XL of an 8-bit image (L, LA, RGB, RGBA)
    recompress_jpeg  lossless JPEG -> JPEG XL: the JPEG's own DCT data, no decode; the
                     original rebuilds bit for bit from the result (djxl)

`VERSIONS`: every library here, for the cache key (an upgrade must never serve bytes made
by the old one).

Every function returns None when it cannot guarantee the libvips result (CMYK, a libjpeg
warning such as a truncated file, an odd band count, lossless WebP): the caller then takes
the libvips path, which stays the single source of truth for errors and edge cases.
Pixels cross the boundary as 8-bit interleaved buffers, so pyvips stays in transform.py.
Both libraries release the GIL while they work.
"""

from __future__ import annotations

import importlib.metadata
import io
from dataclasses import dataclass
from typing import Any

import simplejpeg
from PIL import Image, features

_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}

_MAX_EDGE = {"webp": 16383, "jpeg": 65500}  # larger: libvips raises the error
_MIN_EDGE = 64  # below this a DCT scale could be met by a smaller factor; leave it to libvips


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - broken install
        return "unknown"


# computed at import, never hand-bumped: the distributions and the codec libraries inside
VERSIONS = {
    "pillow": _version("pillow"),
    "pillow-libjpeg-turbo": str(features.version("libjpeg_turbo")),
    "pillow-libwebp": str(features.version("webp")),
    "simplejpeg": _version("simplejpeg"),
    "pillow-jxl-plugin": _version("pillow-jxl-plugin"),
}


@dataclass(frozen=True)
class Pixels:
    """An 8-bit interleaved image: `data` is any buffer of height * width * bands bytes."""

    data: Any
    width: int
    height: int
    bands: int

    @property
    def nbytes(self) -> int:
        return self.width * self.height * self.bands


def decode_jpeg(data: bytes, shrink: int) -> Pixels | None:
    """The JPEG decoded at exactly 1/`shrink` (1, 2, 4 or 8), or None for libvips to do it.
    The buffer is read-only: transform may keep it for later renders (transform/memo.py)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "RGB", "Gray") or min(width, height) < _MIN_EDGE * shrink:
            return None
        # libjpeg scales to ceil(size / shrink); libvips then drops the partial last
        # row and column (floor), so decode at the first size and crop to the second
        scaled_w, scaled_h = -(-width // shrink), -(-height // shrink)
        gray = colorspace == "Gray"
        pixels = simplejpeg.decode_jpeg(
            data,
            colorspace="GRAY" if gray else "RGB",
            min_width=scaled_w if shrink > 1 else 0,
            min_height=scaled_h if shrink > 1 else 0,
            strict=True,  # any libjpeg warning (corrupt, truncated): libvips decides
        )
    except ValueError:
        return None
    bands = 1 if gray else 3
    if pixels.shape != (scaled_h, scaled_w, bands):
        return None
    out_w, out_h = width // shrink, height // shrink
    if out_w != scaled_w:
        pixels = pixels[:out_h, :out_w].copy()  # a contiguous copy without the last column
    elif out_h != scaled_h:
        pixels = pixels[:out_h]  # rows are contiguous: a view
    pixels.flags.writeable = False
    return Pixels(pixels, out_w, out_h, bands)


def _save(pixels: Pixels, fmt: str, **options: Any) -> bytes | None:
    mode = _MODES.get(pixels.bands)
    if mode is None or max(pixels.width, pixels.height) > _MAX_EDGE[fmt]:
        return None
    size = (pixels.width, pixels.height)
    out = io.BytesIO()
    try:
        Image.frombuffer(mode, size, pixels.data, "raw", mode, 0, 1).save(out, fmt, **options)
    except (OSError, ValueError):  # an encoder's refusal: libvips' turn, and its error
        return None
    return out.getvalue()


def encode_webp(pixels: Pixels, quality: int, effort: int) -> bytes | None:
    """Lossy WebP of an RGB or RGBA image, as libvips' webpsave(Q, effort) writes it."""
    if pixels.bands not in (3, 4):
        return None
    # libvips: WebPConfigPreset(DEFAULT, Q), method = effort, alpha_q 100, exact off
    return _save(pixels, "webp", quality=quality, method=effort, alpha_quality=100, exact=False)


def encode_jpeg(pixels: Pixels, quality: int) -> bytes | None:
    """Baseline JPEG with optimised Huffman tables, chroma subsampled 4:2:0 below Q90 and
    4:4:4 from Q90 (libvips' subsample_mode=auto), no metadata."""
    if pixels.bands not in (1, 3):
        return None
    extra = {"subsampling": 2 if quality < 90 else 0} if pixels.bands == 3 else {}  # 4:2:0 / 4:4:4
    return _save(pixels, "jpeg", quality=quality, optimize=True, **extra)


def _jxl_encoder(**options: Any) -> Any:
    """pillow-jxl-plugin's Encoder, imported on first use (~0.1 s: a worker that never
    writes JPEG XL never pays it). Typed Any: the package's own stub predates its
    Encoder's signature (mode=, effort=, ...)."""
    import pillow_jxl

    return pillow_jxl.Encoder(**options)


def encode_jxl(pixels: Pixels, quality: int, effort: int) -> bytes | None:
    """Lossy JPEG XL (libjxl's quality -> butteraugli distance mapping), one thread: the
    render pool owns the cores. None when libjxl refuses."""
    mode = _MODES.get(pixels.bands)
    if mode is None:
        return None
    encoder = _jxl_encoder(
        mode=mode,
        lossless=False,
        quality=quality,
        decoding_speed=0,
        effort=effort,
        use_container=False,
        use_original_profile=False,
        num_threads=1,  # the default, -1, takes every core
    )
    try:
        return bytes(encoder(bytes(pixels.data), pixels.width, pixels.height, jpeg_encode=False))
    except (RuntimeError, ValueError):
        return None


def recompress_jpeg(data: bytes, width: int, height: int, effort: int) -> bytes | None:
    """The JPEG's own coefficients as JPEG XL (~20 % smaller, lossless: it rebuilds bit for
    bit); None when libjxl cannot transcode it (CMYK, arithmetic coding, corrupt data):
    the caller then decodes and encodes."""
    encoder = _jxl_encoder(
        mode="RGB",
        lossless=True,
        quality=100,
        decoding_speed=0,
        effort=effort,
        use_container=False,
        use_original_profile=False,
        num_threads=1,
    )
    try:
        return bytes(encoder(data, width, height, jpeg_encode=True))
    except (RuntimeError, ValueError):
        return None
