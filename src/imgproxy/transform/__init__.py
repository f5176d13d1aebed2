"""The only module that imports pyvips: bytes in, encoded image out.

`render(data, plan)` runs `STEPS`, a visible list of small steps, each `(work) -> image`:

    header   read the header only; refuse bombs (pixel limit) before a pixel is decoded;
             the output geometry (`geometry.fit`: size, box, fit, never upscale)
    load     decode, shrinking on load where it can (JPEG DCT shrink, libvips `thumbnail`),
             for `cover`/`contain`/`fill` too; JPEG through `fastcodecs` (simplejpeg) when
             it can give libvips' exact pixels, its scaled decodes kept for the next render
             of the same source (memo.py)
    resize   to the exact resized size, Lanczos3 or cubic, alpha premultiplied
    orient   apply EXIF orientation (after the resize: rotating the small image is cheaper)
    colour   convert to sRGB (embedded ICC profile honoured), 8 bits
    canvas   `cover`: crop to the box by gravity (`smart`/`entropy`: libvips smartcrop);
             `contain`: pad to the box with the background
    bw       `bw=1`: luminance (Rec. 709 weights on linear light), one grey band (+ alpha)
    flatten  JPEG only: alpha onto white
    encode   metadata stripped (EXIF, XMP, ICC); JPEG and lossy WebP through `fastcodecs`
             (Pillow's -O3 builds of libjpeg-turbo/libwebp), JPEG XL through fastcodecs
             (libjxl), the rest through libvips

A JPEG asked for as JPEG XL with nothing else (`Plan.recompress`) skips the steps after
`header`: its DCT coefficients are recompressed losslessly, never decoded.

libvips evaluates lazily: the loop times each step into its phase (`decode`, `resize`,
`encode`: the metrics' keys) and puts the pixels in memory at the end of the first two, so
each timing means what it says. That also gives a libvips failure its meaning: before the
decoded pixels are in memory it is the input's (corrupt, truncated: 422), after, it is ours
(an encoder missing or refusing, WebP's 16383 px limit, out of memory: 500). Runs in
executor threads: pyvips releases the GIL inside libvips.
"""

from __future__ import annotations

import contextlib
import time

import pyvips

from .. import fastcodecs
from ..errors import RenderFailed, UnprocessableImage
from . import geometry
from .geometry import Box
from .memo import CONTENT, DecodedMemo, memo_key
from .ops import encode_jxl, fast_encode, is_srgb_profile, jpeg_shrink, resize_exact
from .vips import VERSION, codec_versions, configure
from .work import Plan, Rendered, Step, Work

__all__ = [
    "CONTENT",
    "STEPS",
    "VERSION",
    "DecodedMemo",
    "Plan",
    "Rendered",
    "codec_versions",
    "configure",
    "configure_memo",
    "decoded_memo",
    "render",
]

_KEEP_NONE = pyvips.enums.ForeignKeep.NONE
_AVIF = {"compression": "av1", "encoder": "aom", "bitdepth": 8}
_KERNELS = {"lanczos3": "lanczos3", "thumbnail": "lanczos3", "bicubic": "cubic"}
# this process's decoded-source memo (memo.py); off until configure_memo
decoded_memo = DecodedMemo(0)


def configure_memo(capacity: int) -> None:
    """This process's decoded-source memo: `capacity` bytes (0: off), empty."""
    global decoded_memo
    decoded_memo = DecodedMemo(capacity)


def output_size(width: int, height: int, target: int | None) -> tuple[int, int]:
    """Box fit of the longest edge to `target`, never upscaling; the short edge is rounded
    half away from zero and at least 1 px."""
    return geometry.fit(Box(target=target), width, height).canvas


def render(data: bytes, plan: Plan) -> Rendered:
    """Transform one image. Raises UnprocessableImage (422) for corrupt or oversized input,
    RenderFailed (500, the libvips error chained as its cause) for our own failures."""
    work = Work(data, plan)
    timings = {"decode": 0.0, "resize": 0.0, "encode": 0.0}
    steps = STEPS
    if plan.recompress and plan.source_type == "jpeg":
        done = _recompress(work, timings)
        if done is not None:
            return done
        steps = STEPS[1:]  # libjxl declined: decode and encode, the header is read
    for step in steps:
        t0 = time.perf_counter()
        try:
            work.image = step.run(work)
            if step.materialise:
                work.image = work.image.copy_memory()
                work.decoded = True
        except pyvips.Error as exc:
            if work.decoded or "out of memory" in str(exc):
                raise RenderFailed() from exc
            raise UnprocessableImage("corrupt or truncated image") from exc
        timings[step.phase] += time.perf_counter() - t0
    image = work.image
    return Rendered(work.output, plan.format, image.width, image.height, timings)


# -- the steps ---------------------------------------------------------------------------


def check_header(w: Work) -> pyvips.Image:
    header = pyvips.Image.new_from_buffer(w.data, "")
    width, height = header.width, header.height
    if width * height > w.plan.max_pixels:
        raise UnprocessableImage(f"image too large: {width}x{height} is over the pixel limit")
    w.orientation = header.get("orientation") if header.get_typeof("orientation") else 1
    swap = w.orientation in (5, 6, 7, 8)
    upright = (height, width) if swap else (width, height)
    w.geometry = geometry.fit(w.plan.request, *upright)
    w.algorithm = geometry.algorithm(w.plan.algorithm, w.geometry, *upright)
    w.size = w.geometry.resize
    w.stored = (w.size[1], w.size[0]) if swap else w.size
    w.resizing = w.size != upright
    return header


def load(w: Work) -> pyvips.Image:
    """Decode as little as the output needs. The one decision between three ways:

    * no resize, or `lanczos3`/`bicubic` (quality first): a full decode;
    * `thumbnail`, JPEG: DCT shrink-on-load (1/8, 1/4, 1/2), the kernel finishes the job
      (JPEG either way through `_load_jpeg`: simplejpeg or libvips, the same pixels);
    * `thumbnail`, other formats: libvips' `thumbnail` streams decode and resize in one
      pass (bounded memory for big PNGs; WebP/AVIF shrink on load) and orients.
    """
    header, (tw, th) = w.image, w.size
    how = w.algorithm if w.resizing else "full"
    if w.plan.source_type == "jpeg":  # a full decode is DCT shrink 1
        shrink = jpeg_shrink(header.width, header.height, *w.stored) if how == "thumbnail" else 1
        return _load_jpeg(w, header, shrink)
    if how == "thumbnail":
        w.upright = True
        # the fail_on= keyword is ignored by thumbnail_buffer; the option string is not
        return pyvips.Image.thumbnail_buffer(
            w.data, tw, height=th, size="force", option_string="fail_on=truncated"
        )
    return pyvips.Image.new_from_buffer(w.data, "", fail_on="truncated", access="sequential")


def resize(w: Work) -> pyvips.Image:
    width, height = w.size if w.upright else w.stored
    return resize_exact(w.image, width, height, _KERNELS.get(w.plan.algorithm, "lanczos3"))


def orient(w: Work) -> pyvips.Image:
    if w.upright or w.orientation in (0, 1) or not 1 <= w.orientation <= 8:
        return w.image
    return w.image.autorot()


def colour(w: Work) -> pyvips.Image:
    image = w.image
    if image.get_typeof("icc-profile-data") and not is_srgb_profile(image.get("icc-profile-data")):
        # a broken profile: fall back to libvips' own conversion below
        with contextlib.suppress(pyvips.Error):
            image = image.icc_transform("srgb", embedded=True, intent="relative")
    if image.interpretation != "srgb":
        image = image.colourspace("srgb")
    if image.format != "uchar":
        image = image.cast("uchar")
    return image


def canvas(w: Work) -> pyvips.Image:
    """`cover`: the box cut out of the resized image; `contain`: the resized image on a
    canvas of the box's size, in the background colour (an alpha band added when the
    colour is not opaque)."""
    image, g = w.image, w.geometry
    if g is None or not g.mode:
        return image
    cw, ch = g.canvas
    if g.mode == "crop":
        if g.interesting:
            return image.smartcrop(cw, ch, interesting=g.interesting)
        return image.crop(g.offset[0], g.offset[1], cw, ch)
    r, gr, b, a = w.plan.background or (255, 255, 255, 255)
    if a < 255 and not image.hasalpha():
        image = image.bandjoin_const([255])
    colour = [r, gr, b, a] if image.hasalpha() else [r, gr, b]
    if image.bands - (1 if image.hasalpha() else 0) == 1:  # grey (+ alpha)
        colour = [round(0.2126 * r + 0.7152 * gr + 0.0722 * b), *colour[3:]]
    return image.embed(g.offset[0], g.offset[1], cw, ch, extend="background", background=colour)


def black_and_white(w: Work) -> pyvips.Image:
    """libvips' sRGB -> B_W goes through linear light and takes Y = 0.2126 R + 0.7152 G +
    0.0722 B (Rec. 709), then re-applies the sRGB curve: pure green is far brighter than pure
    red or blue, unlike a channel average. The result stays one grey band (+ alpha): JPEG and
    PNG then write true greyscale (smaller), and libvips' WebP and AVIF savers, which have
    no grey mode, expand it to R = G = B themselves."""
    return w.image.colourspace("b-w") if w.plan.bw else w.image


def flatten(w: Work) -> pyvips.Image:
    image = w.image
    if w.plan.format == "jpeg" and image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    return image


def encode(w: Work) -> pyvips.Image:
    image, fmt, o, q = w.image, w.plan.format, w.plan.encode, w.plan.quality
    if fmt == "jxl":
        w.output = encode_jxl(image, o.jxl_quality if q is None else q, o.jxl_effort)
        return image
    fast = fast_encode(image, fmt, o, q) if o.fast_codecs else None
    if fast is not None:
        w.output = fast
    elif fmt == "jpeg":
        w.output = image.jpegsave_buffer(
            Q=max(1, o.jpeg_quality if q is None else q), optimize_coding=True, keep=_KEEP_NONE
        )
    elif fmt == "webp":
        w.output = image.webpsave_buffer(
            Q=o.webp_quality if q is None else q,
            effort=o.webp_effort,
            lossless=o.webp_lossless,
            keep=_KEEP_NONE,
        )
    elif fmt == "avif":
        w.output = image.heifsave_buffer(
            Q=max(1, o.avif_quality if q is None else q),
            effort=o.avif_effort,
            keep=_KEEP_NONE,
            **_AVIF,
        )
    else:
        w.output = image.pngsave_buffer(compression=o.png_compression, keep=_KEEP_NONE)
    return image


STEPS: tuple[Step, ...] = (
    Step("header", "decode", check_header),
    Step("load", "decode", load, materialise=True),
    Step("resize", "resize", resize),
    Step("orient", "resize", orient, materialise=True),
    Step("colour", "encode", colour),
    Step("canvas", "resize", canvas),
    Step("bw", "encode", black_and_white),
    Step("flatten", "encode", flatten),
    Step("encode", "encode", encode),
)


# -- helpers -----------------------------------------------------------------------------


def _load_jpeg(w: Work, header: pyvips.Image, shrink: int) -> pyvips.Image:
    """A JPEG at 1/`shrink`: simplejpeg's pixels are libvips' own (same IDCT, upsampling
    and rounding), ~35 % cheaper at 1/2 and ~15 % at 1/8 (bench/codecs.py); libvips does
    whatever simplejpeg declines (CMYK, corrupt or truncated data, tiny images). A decode
    at 1/2, 1/4 or 1/8 of an identified source goes through the process's memo."""
    fast = _decode_jpeg(w.data, shrink, w.plan) if w.plan.encode.fast_codecs else None
    if fast is None:
        return pyvips.Image.new_from_buffer(
            w.data, "", shrink=shrink, fail_on="truncated", access="sequential"
        )
    w.pixels = fast.data
    image = pyvips.Image.new_from_memory(fast.data, fast.width, fast.height, fast.bands, "uchar")
    # what the later steps read from the header: the ICC profile (colour) and the EXIF
    # orientation (orient, via autorot); a fresh image of ours, so set in place
    for name in ("icc-profile-data", "orientation"):
        if header.get_typeof(name):
            image.set_type(header.get_typeof(name), name, header.get(name))
    if w.plan.format == "png":  # the one encoder that writes the resolution (pHYs)
        image = image.copy(xres=header.xres, yres=header.yres)
    return image


def _decode_jpeg(data: bytes, shrink: int, plan: Plan) -> fastcodecs.Pixels | None:
    current = decoded_memo  # configure_memo may swap it meanwhile: use one
    if shrink < 2 or plan.source_id is None or not current:
        return fastcodecs.decode_jpeg(data, shrink)
    key = memo_key(plan.source_id, data, shrink)
    fast = current.get(key)
    if fast is None:
        fast = fastcodecs.decode_jpeg(data, shrink)
        if fast is not None:
            current.put(key, fast)
    return fast


def _recompress(w: Work, timings: dict[str, float]) -> Rendered | None:
    """Lossless JPEG -> JPEG XL after the header check (pixel limit); None when libjxl
    cannot transcode this JPEG (the caller decodes and encodes instead)."""
    t0 = time.perf_counter()
    try:
        header = check_header(w)
    except pyvips.Error as exc:
        raise UnprocessableImage("corrupt or truncated image") from exc
    w.image = header
    timings["decode"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fastcodecs.recompress_jpeg(w.data, header.width, header.height, w.plan.encode.jxl_effort)
    timings["encode"] += time.perf_counter() - t0
    if out is None:
        return None
    width, height = (
        (header.height, header.width)
        if w.orientation in (5, 6, 7, 8)
        else (header.width, header.height)
    )
    return Rendered(out, "jxl", width, height, timings)
