"""transform's codec-level helpers: pyvips images and bytes in and out, no `Work` (the
DCT shrink choice, the exact resize, the fast encoders' hand-off, the sRGB profile test)."""

from __future__ import annotations

import math
import struct

import pyvips

from .. import fastcodecs
from ..config import EncodeOptions
from ..errors import RenderFailed

JPEG_SHRINKS = (8, 4, 2)
SRGB_DESCRIPTIONS = frozenset({"sRGB", "sRGB built-in", "sRGB IEC61966-2.1"})


def jpeg_shrink(width: int, height: int, w: int, h: int) -> int:
    """The largest DCT shrink (1/8, 1/4, 1/2) that still covers the output size: the decoder
    skips most of the work, and Lanczos3 does the rest."""
    fits = (s for s in JPEG_SHRINKS if math.ceil(width / s) >= w and math.ceil(height / s) >= h)
    return next(fits, 1)


def fast_encode(image: pyvips.Image, fmt: str, o: EncodeOptions, q: int | None) -> bytes | None:
    """JPEG, or lossy WebP, of an 8-bit image through fastcodecs (None: libvips' turn)."""
    if fmt not in ("jpeg", "webp") or (fmt == "webp" and o.webp_lossless):
        return None
    if image.format != "uchar" or image.bands not in ((1, 3) if fmt == "jpeg" else (3, 4)):
        return None
    pixels = fastcodecs.Pixels(image.write_to_memory(), image.width, image.height, image.bands)
    if fmt == "jpeg":
        return fastcodecs.encode_jpeg(pixels, max(1, o.jpeg_quality if q is None else q))
    return fastcodecs.encode_webp(pixels, o.webp_quality if q is None else q, o.webp_effort)


def encode_jxl(image: pyvips.Image, quality: int, effort: int) -> bytes:
    """JPEG XL through fastcodecs (pyvips-binary has no jxlsave); its refusal is ours."""
    if image.format != "uchar":
        image = image.cast("uchar")
    pixels = fastcodecs.Pixels(image.write_to_memory(), image.width, image.height, image.bands)
    out = fastcodecs.encode_jxl(pixels, quality, effort)
    if out is None:
        raise RenderFailed() from RuntimeError(f"libjxl refused a {image.bands}-band image")
    return out


def resize_exact(image: pyvips.Image, width: int, height: int, kernel: str) -> pyvips.Image:
    if (image.width, image.height) == (width, height):
        return image
    alpha = image.hasalpha()
    band_format = image.format
    if alpha:
        image = image.premultiply()
    image = image.resize(width / image.width, vscale=height / image.height, kernel=kernel)
    if alpha:
        image = image.unpremultiply().cast(band_format)
    if (image.width, image.height) != (width, height):  # guard against a rounding surprise
        image = image.thumbnail_image(width, height=height, size="force")
    return image


def icc_description(profile: bytes) -> str:
    """The 'desc' text of an RGB ICC profile (v2 'desc' or v4 'mluc' type); '' if unreadable."""
    try:
        if profile[36:40] != b"acsp" or profile[16:20] != b"RGB ":
            return ""
        (count,) = struct.unpack_from(">I", profile, 128)
        for i in range(min(count, 64)):
            sig, off, size = struct.unpack_from(">4sII", profile, 132 + 12 * i)
            if sig != b"desc":
                continue
            tag = profile[off : off + size]
            if tag[:4] == b"desc":  # v2: uint32 length, then ASCII with a trailing NUL
                (n,) = struct.unpack_from(">I", tag, 8)
                return tag[12 : 12 + n].split(b"\0", 1)[0].decode("ascii", "replace").strip()
            if tag[:4] == b"mluc":  # v4: first record's UTF-16BE string
                n, at = struct.unpack_from(">II", tag, 20)
                return tag[at : at + n].decode("utf-16-be", "replace").strip()
            return ""
    except (struct.error, ValueError):
        pass
    return ""


def is_srgb_profile(profile: bytes) -> bool:
    """An embedded sRGB profile: converting it to sRGB is an identity that still costs an
    lcms transform (+2.5 ms at 400 px, +6-11 % of a W2/W5 render), so it is skipped."""
    desc = icc_description(profile)
    return desc in SRGB_DESCRIPTIONS or desc.startswith("sRGB IEC61966-2")
