"""The only module that imports pyvips: bytes in, encoded image out.

`render()` runs the pipeline as a visible list of small steps:

    header   read the header only; refuse bombs (pixel limit) before a pixel is decoded
    load     decode, shrinking on load where the format allows (JPEG DCT scaling)
    resize   Lanczos3 to the exact output size (never upscale), alpha premultiplied
    orient   apply EXIF orientation (after the resize: rotating the small image is cheaper)
    colour   convert to sRGB (embedded ICC profile honoured), 8 bits
    flatten  JPEG only: alpha onto white
    encode   metadata stripped (EXIF, XMP, ICC)

libvips evaluates lazily; `load` materialises the (shrunk) decode so that the three timed
steps (decode, resize, encode) mean what they say.  The non-JPEG `thumbnail` path lets libvips
stream decode+resize in one pass (bounded memory for big PNGs) and is timed as `resize`.
It runs in executor threads: pyvips releases the GIL inside libvips.
"""

from __future__ import annotations

import contextlib
import math
import struct
import time
from dataclasses import dataclass, field

import pyvips

from .config import EncodeOptions
from .errors import UnprocessableImage

_KEEP_NONE = pyvips.enums.ForeignKeep.NONE
_LOADERS = (
    "VipsForeignLoadJpeg",
    "VipsForeignLoadPng",
    "VipsForeignLoadWebp",
    "VipsForeignLoadHeif",
)
_JPEG_SHRINKS = (8, 4, 2)
_SRGB_DESCRIPTIONS = frozenset({"sRGB", "sRGB built-in", "sRGB IEC61966-2.1"})
_AUTO_THRESHOLD = 0.8  # auto: thumbnail when target / longest source edge < 0.8


def configure(concurrency: int) -> None:
    """Set libvips up once per worker process."""
    # A proxy rarely sees the same buffer twice; libvips' operation cache would only hold
    # memory, and it serves stale pixels when a file is rewritten under the same name.
    pyvips.cache_set_max(0)
    # Parallelism comes from the executor threads (one image each); libvips' own pipeline
    # threads on top would oversubscribe the cores.
    pyvips.concurrency_set(concurrency)
    # Only the four formats we serve may ever reach a decoder: no SVG, TIFF, PDF, GIF,
    # matrix/CSV/raw loaders, whatever a file claims to be.
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoad", True)
    for name in _LOADERS:
        pyvips.operation_block_set(name, False)


@dataclass
class Rendered:
    data: bytes
    format: str
    width: int
    height: int
    steps: dict[str, float] = field(default_factory=dict)


def output_size(width: int, height: int, target: int | None) -> tuple[int, int]:
    """Box fit of the longest edge to `target`, never upscaling; the short edge is rounded
    half away from zero and at least 1 px."""
    longest = max(width, height)
    if target is None or target >= longest:
        return width, height
    scale = target / longest
    if width >= height:
        return target, max(1, math.floor(height * scale + 0.5))
    return max(1, math.floor(width * scale + 0.5)), target


def choose_algorithm(algorithm: str, target: int, longest: int) -> str:
    if algorithm == "auto":
        return "thumbnail" if target / longest < _AUTO_THRESHOLD else "lanczos3"
    return algorithm


def render(
    data: bytes,
    source_type: str,
    out_format: str,
    target: int | None,
    algorithm: str,
    max_pixels: int,
    options: EncodeOptions,
) -> Rendered:
    """Transform one image; raises UnprocessableImage for corrupt or oversized input."""
    steps: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        header = pyvips.Image.new_from_buffer(data, "")
        width, height = header.width, header.height
        if width * height > max_pixels:
            raise UnprocessableImage(f"image too large: {width}x{height} is over the pixel limit")
        orientation = header.get("orientation") if header.get_typeof("orientation") else 1
        swap = orientation in (5, 6, 7, 8)
        ow, oh = (height, width) if swap else (width, height)
        tw, th = output_size(ow, oh, target)
        resize = (tw, th) != (ow, oh)
        pre_w, pre_h = (th, tw) if swap else (tw, th)  # the output size before rotation

        if resize and choose_algorithm(algorithm, target or 0, max(ow, oh)) == "thumbnail":
            if source_type == "jpeg":
                image = _load_jpeg_shrunk(data, width, height, pre_w, pre_h)
                steps["decode"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                image = _orient(_resize(image, pre_w, pre_h), orientation).copy_memory()
            else:
                steps["decode"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                image = pyvips.Image.thumbnail_buffer(
                    data, tw, height=th, size="force", option_string="fail_on=truncated"
                ).copy_memory()
            steps["resize"] = time.perf_counter() - t1
        else:
            image = pyvips.Image.new_from_buffer(data, "", fail_on="truncated", access="sequential")
            image = image.copy_memory()
            steps["decode"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            if resize:
                image = _resize(image, pre_w, pre_h)
            image = _orient(image, orientation).copy_memory()
            steps["resize"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        image = _to_srgb(image)
        if out_format == "jpeg" and image.hasalpha():
            image = image.flatten(background=[255] * (image.bands - 1))
        body = _encode(image, out_format, options)
        steps["encode"] = time.perf_counter() - t2
        return Rendered(body, out_format, image.width, image.height, steps)
    except pyvips.Error as exc:
        raise UnprocessableImage("corrupt or truncated image") from exc


def _load_jpeg_shrunk(data: bytes, width: int, height: int, w: int, h: int) -> pyvips.Image:
    """Decode at the largest DCT shrink (1/8, 1/4, 1/2) that still covers the output size:
    the decoder skips most of the work, and Lanczos3 does the rest."""
    shrink = 1
    for s in _JPEG_SHRINKS:
        if math.ceil(width / s) >= w and math.ceil(height / s) >= h:
            shrink = s
            break
    image = pyvips.Image.new_from_buffer(
        data, "", shrink=shrink, fail_on="truncated", access="sequential"
    )
    return image.copy_memory()


def _resize(image: pyvips.Image, width: int, height: int) -> pyvips.Image:
    if (image.width, image.height) == (width, height):
        return image
    alpha = image.hasalpha()
    band_format = image.format
    if alpha:
        image = image.premultiply()
    image = image.resize(width / image.width, vscale=height / image.height, kernel="lanczos3")
    if alpha:
        image = image.unpremultiply().cast(band_format)
    if (image.width, image.height) != (width, height):  # guard against a rounding surprise
        image = image.thumbnail_image(width, height=height, size="force")
    return image


def _orient(image: pyvips.Image, orientation: int) -> pyvips.Image:
    if orientation in (1, 0) or not 1 <= orientation <= 8:
        return image
    return image.autorot()


def _icc_description(profile: bytes) -> str:
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


def _is_srgb_profile(profile: bytes) -> bool:
    """An embedded sRGB profile: converting it to sRGB is an identity that still costs an
    lcms transform (+2.5 ms at 400 px, +6-11 % of a W2/W5 render), so it is skipped."""
    desc = _icc_description(profile)
    return desc in _SRGB_DESCRIPTIONS or desc.startswith("sRGB IEC61966-2")


def _to_srgb(image: pyvips.Image) -> pyvips.Image:
    if image.get_typeof("icc-profile-data") and not _is_srgb_profile(image.get("icc-profile-data")):
        # a broken profile: fall back to libvips' own conversion below
        with contextlib.suppress(pyvips.Error):
            image = image.icc_transform("srgb", embedded=True, intent="relative")
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def _encode(image: pyvips.Image, fmt: str, o: EncodeOptions) -> bytes:
    data: bytes
    if fmt == "jpeg":
        data = image.jpegsave_buffer(
            Q=max(1, o.jpeg_quality), optimize_coding=True, keep=_KEEP_NONE
        )
    elif fmt == "webp":
        data = image.webpsave_buffer(Q=o.webp_quality, effort=o.webp_effort, keep=_KEEP_NONE)
    elif fmt == "avif":
        data = image.heifsave_buffer(
            Q=max(1, o.avif_quality),
            effort=o.avif_effort,
            compression="av1",
            encoder="aom",
            bitdepth=8,
            keep=_KEEP_NONE,
        )
    else:
        data = image.pngsave_buffer(compression=o.png_compression, keep=_KEEP_NONE)
    return data
