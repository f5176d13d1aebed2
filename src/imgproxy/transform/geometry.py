"""Output geometry: what a request's box makes of a source of a given (upright) size.

Pure integer arithmetic, shared by `params.resolve` (the cache key, from the header probe)
and `transform` (the render, from the decoded header), so both always agree:

    fit(box, width, height) -> Geometry    resize the source to `resize`, then crop or pad
                                           to `canvas` (SPEC "Exact boxes")

Rounding is half away from zero on exact fractions (`half_up`), never binary floats: a
short edge of exactly k.5 px is k+1 whatever the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

FITS = ("inside", "cover", "contain", "fill")
# the nine positions, then libvips' two content-aware crops (smartcrop `interesting`)
POSITIONS = (
    "center",
    "north",
    "south",
    "east",
    "west",
    "north-east",
    "north-west",
    "south-east",
    "south-west",
)
GRAVITIES = (*POSITIONS, "smart", "entropy")
INTERESTING = {"smart": "attention", "entropy": "entropy"}
AUTO_THRESHOLD = (4, 5)  # auto: thumbnail when output / source (longest edges) < 0.8


@dataclass(frozen=True, slots=True)
class Box:
    """What a request asks for, after `dpr` and IMAGE_PROXY_ALLOWED_SIZES: `target` (the
    longest edge, `size`), or `width` and/or `height` with `fit` and `gravity`; all None =
    keep the size."""

    target: int | None = None
    width: int | None = None
    height: int | None = None
    fit: str = "inside"
    gravity: str = "center"


@dataclass(frozen=True, slots=True)
class Geometry:
    """The source, upright, is resized to `resize`, then cropped (`crop`) or padded (`pad`)
    to `canvas`; `offset` is the crop's left/top in the resized image, or where the resized
    image sits on the padded canvas. `interesting` (`attention`, `entropy`): the crop is
    placed by libvips' smartcrop instead of `offset`."""

    resize: tuple[int, int]
    canvas: tuple[int, int]
    mode: str = ""  # "" (canvas == resize), "crop" or "pad"
    offset: tuple[int, int] = (0, 0)
    interesting: str = ""


def half_up(num: int, den: int) -> int:
    """num / den rounded half away from zero (both non-negative)."""
    return (2 * num + den) // (2 * den)


def fit(box: Box, width: int, height: int) -> Geometry:
    """The geometry of `box` on a `width` x `height` (upright) source. Never upscales:
    `inside` (and `size`, and `w` or `h` alone) keeps the source size when the box is larger;
    `cover`, `contain` and `fill` shrink a larger box by one factor until it fits inside
    the source (aspect kept), then apply."""
    size = (width, height)
    if box.target is not None:
        return _plain(_longest(box.target, width, height))
    w, h = box.width, box.height
    if w is None and h is None:
        return _plain(size)
    if h is None:  # width alone: the other edge follows the aspect ratio
        assert w is not None
        return _plain(_by_width(min(w, width), width, height))
    if w is None:
        return _plain(_by_height(min(h, height), width, height))
    if box.fit == "inside":
        if w * height <= h * width:  # the width binds
            return _plain(size if w >= width else _by_width(w, width, height))
        return _plain(size if h >= height else _by_height(h, width, height))
    if w > width or h > height:  # the box, scaled down by one factor to fit in the source
        if width * h <= height * w:
            w, h = width, max(1, half_up(h * width, w))
        else:
            w, h = max(1, half_up(w * height, h)), height
    canvas = (w, h)
    if box.fit == "fill":
        return _plain(canvas)
    if box.fit == "cover":
        if w * height >= h * width:  # wider than the source: the width binds
            resized = (w, max(h, half_up(height * w, width)))
        else:
            resized = (max(w, half_up(width * h, height)), h)
        if resized == canvas:
            return _plain(canvas)
        interesting = INTERESTING.get(box.gravity, "")
        offset = (0, 0) if interesting else _place(box.gravity, resized, canvas)
        return Geometry(resized, canvas, "crop", offset, interesting)
    # contain
    if w * height <= h * width:
        resized = (w, min(h, max(1, half_up(height * w, width))))
    else:
        resized = (min(w, max(1, half_up(width * h, height))), h)
    if resized == canvas:
        return _plain(canvas)
    return Geometry(resized, canvas, "pad", _place(box.gravity, canvas, resized))


def algorithm(requested: str, geometry: Geometry, width: int, height: int) -> str:
    """The resize algorithm a render uses: `none` when the source keeps its size, `auto`
    resolved (`thumbnail` when the output's longest edge is under 0.8 of the source's,
    else `lanczos3`), anything else as requested."""
    rw, rh = geometry.resize
    if (rw, rh) == (width, height):
        return "none"
    if requested != "auto":
        return requested
    num, den = AUTO_THRESHOLD
    return "thumbnail" if max(rw, rh) * den < num * max(width, height) else "lanczos3"


def _plain(size: tuple[int, int]) -> Geometry:
    return Geometry(size, size)


def _longest(target: int, width: int, height: int) -> tuple[int, int]:
    if target >= max(width, height):
        return width, height
    if width >= height:
        return _by_width(target, width, height)
    return _by_height(target, width, height)


def _by_width(w: int, width: int, height: int) -> tuple[int, int]:
    return w, max(1, half_up(height * w, width))


def _by_height(h: int, width: int, height: int) -> tuple[int, int]:
    return max(1, half_up(width * h, height)), h


def _place(gravity: str, outer: tuple[int, int], inner: tuple[int, int]) -> tuple[int, int]:
    """Left/top of `inner` within `outer` for a compass gravity (centre: rounded down)."""
    dx, dy = outer[0] - inner[0], outer[1] - inner[1]
    left = 0 if gravity.endswith("west") else dx if gravity.endswith("east") else dx // 2
    top = 0 if gravity.startswith("north") else dy if gravity.startswith("south") else dy // 2
    return left, top
