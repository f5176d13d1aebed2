"""The header readers behind `sniff.probe`: per format, dimensions, alpha and EXIF
orientation from the first bytes, never a decode. Each may raise struct.error, IndexError or
ValueError on a short or odd header; `sniff` turns that into "the head does not say"."""

from __future__ import annotations

import struct
from collections.abc import Iterator


def _png(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return w, h


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(offset, marker, length) of each JPEG marker segment after SOI, in order; ends at the
    end of `data` or at a byte that is no marker (both: the head does not say more)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        yield i, marker, length
        i += 2 + length


def _jpeg(data: bytes) -> tuple[int, int] | None:
    for i, marker, _ in _jpeg_segments(data):
        if marker in _SOF:
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any SOF
            return None
    return None


def _webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        b = int.from_bytes(data[21:25], "little")
        return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
    return None


def _gif(data: bytes) -> tuple[int, int] | None:
    w, h = struct.unpack("<HH", data[6:10])  # the logical screen: libvips' canvas
    return w, h


def _avif(data: bytes) -> tuple[int, int] | None:
    """The largest `ispe` (image spatial extents) property in the `meta` box: the primary
    image (a grid's tiles, the alpha plane and thumbnails are never larger)."""
    meta = _avif_meta(data)
    if meta is None:
        return None
    start, end, _ = meta
    best: tuple[int, int] | None = None
    at = data.find(b"ispe", start, end)
    while at >= 0 and at + 16 <= end:
        w, h = struct.unpack(">II", data[at + 8 : at + 16])  # after version/flags
        if best is None or w * h > best[0] * best[1]:
            best = (w, h)
        at = data.find(b"ispe", at + 4, end)
    return best


def _avif_meta(data: bytes) -> tuple[int, int, bool] | None:
    """(start, end, complete) of the top-level `meta` box, clipped to `data`; None if the
    head ends before it starts."""
    at = 0
    while at + 8 <= len(data):
        size, box = struct.unpack(">I4s", data[at : at + 8])
        if size == 1:
            (size,) = struct.unpack(">Q", data[at + 8 : at + 16])
        elif size == 0:
            size = len(data) - at
        if box == b"meta":
            return at + 8, min(at + size, len(data)), at + size <= len(data)
        if size < 8:
            return None
        at += size
    return None


# -- alpha: True, False, or None (the head cannot tell) ------------------------------------

_AVIF_ALPHA_URNS = (b"urn:mpeg:mpegB:cicp:systems:auxiliary:alpha", b"urn:mpeg:hevc:2015:auxid:1")


def _png_alpha(data: bytes) -> bool | None:
    if data[25] in (4, 6):  # IHDR colour type: grey + alpha, RGBA
        return True
    at = 33  # after the signature and IHDR: walk the chunks up to the first IDAT
    while at + 8 <= len(data):
        length, chunk = struct.unpack(">I4s", data[at : at + 8])
        if chunk == b"tRNS":
            return True
        if chunk in (b"IDAT", b"IEND"):
            return False
        at += 12 + length
    return None


def _webp_alpha(data: bytes) -> bool | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        return bool(data[20] & 0x10)  # the ALPHA flag of the extended header
    if chunk == b"VP8L":
        b = int.from_bytes(data[21:25], "little")
        return bool((b >> 28) & 1)  # alpha_is_used hint after the 14+14 bit size
    if chunk == b"VP8 ":
        return False  # simple lossy: no alpha possible
    return None


def _avif_alpha(data: bytes) -> bool | None:
    meta = _avif_meta(data)
    if meta is None:
        return None
    start, end, complete = meta
    if any(data.find(urn, start, end) >= 0 for urn in _AVIF_ALPHA_URNS):
        return True  # an auxiliary alpha image (`auxC` property)
    return False if complete else None


def _gif_alpha(data: bytes) -> bool | None:
    """Transparent if the first frame's Graphic Control Extension sets the transparency
    flag, or the first frame does not cover the whole logical screen (libvips leaves the
    rest transparent)."""
    screen = data[6:10]
    packed = data[10]
    at = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)  # skip the global colour table
    while at < len(data):
        block = data[at]
        if block == 0x3B:  # trailer: no image at all
            return False
        if block == 0x2C:  # the first image descriptor: left, top, width, height
            left_top, size = data[at + 1 : at + 5], data[at + 5 : at + 9]
            if len(size) < 4:
                return None
            return left_top != b"\0\0\0\0" or size != screen
        if block != 0x21:
            return None  # not a GIF we understand
        if data[at + 1] == 0xF9 and data[at + 3] & 1:  # GCE: label, size byte, packed flags
            return True
        at += 2  # extension introducer and label, then sub-blocks until a 0 length
        while True:
            n = data[at]
            at += 1 + n
            if n == 0:
                break
    return None


def _jpeg_alpha(data: bytes) -> bool | None:
    return False


ALPHA = {
    "avif": _avif_alpha,
    "gif": _gif_alpha,
    "jpeg": _jpeg_alpha,
    "png": _png_alpha,
    "webp": _webp_alpha,
}


# -- orientation: what libvips will apply (EXIF `Orientation`), or None (the head cannot tell)


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 of a TIFF-structured EXIF block; 1 when absent or out of range
    (libvips applies 2-8 only)."""
    order = {b"II": "<", b"MM": ">"}[tiff[:2]]  # KeyError: not EXIF (caught as unknown)
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag, kind = struct.unpack(order + "HH", tiff[at : at + 4])
        if tag == 0x0112:
            value = struct.unpack(order + "H", tiff[at + 8 : at + 10])[0] if kind == 3 else 1
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg_orientation(data: bytes) -> int | None:
    """The first APP1 `Exif` segment's orientation, walking the markers up to SOF."""
    for i, marker, length in _jpeg_segments(data):
        if marker in _SOF or marker in (0xD9, 0xDA):
            return 1  # no EXIF before the frame: libvips reads none either
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\0\0":
            end = i + 2 + length
            if end > len(data):
                return None
            try:
                return _exif_orientation(data[i + 10 : end])
            except KeyError:
                return 1
    return None


def _png_orientation(data: bytes) -> int | None:
    at = 8
    while at + 8 <= len(data):
        length, chunk = struct.unpack(">I4s", data[at : at + 8])
        if chunk == b"eXIf":
            if at + 8 + length > len(data):
                return None
            try:
                return _exif_orientation(data[at + 8 : at + 8 + length])
            except KeyError:
                return 1
        if chunk in (b"IDAT", b"IEND"):
            return 1
        at += 12 + length
    return None


def _webp_orientation(data: bytes) -> int | None:
    """VP8X's EXIF flag set: the `EXIF` chunk's orientation when the head holds it (it sits
    after the image data: small files only), else None; no flag: 1."""
    if data[12:16] != b"VP8X" or not data[20] & 0x08:
        return 1
    at = 12
    while at + 8 <= len(data):
        chunk, length = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        if chunk == b"EXIF":
            if at + 8 + length > len(data):
                return None
            exif = data[at + 8 : at + 8 + length]
            try:
                return _exif_orientation(exif[6:] if exif[:6] == b"Exif\0\0" else exif)
            except KeyError:
                return 1
        at += 8 + length + (length & 1)
    return None


def _avif_orientation(data: bytes) -> int | None:
    """libheif applies `irot` itself and libvips then reports the rotated size (and drops
    any EXIF orientation): a quarter turn is a transposing orientation (6), else 1."""
    meta = _avif_meta(data)
    if meta is None or not meta[2]:
        return None
    start, end, _ = meta
    at = data.find(b"irot", start, end)
    if at < 0:
        return 1
    return 6 if data[at + 4] & 1 else 1  # angle = (byte & 3) x 90 degrees anticlockwise


ORIENTATION = {
    "avif": _avif_orientation,
    "gif": lambda data: 1,
    "jpeg": _jpeg_orientation,
    "png": _png_orientation,
    "webp": _webp_orientation,
}


DIMENSIONS = {"png": _png, "jpeg": _jpeg, "webp": _webp, "gif": _gif, "avif": _avif}
