"""What one render is given (Plan), shares between its steps (Work) and returns (Rendered)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import pyvips

from ..config import EncodeOptions
from .geometry import Box, Geometry


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one render needs besides the bytes, resolved by the service."""

    source_type: str  # sniffed: avif, gif, jpeg, png or webp
    format: str  # output: avif, jpeg, jxl, png or webp
    encode: EncodeOptions
    max_pixels: int  # width x height from the header, checked before decoding
    target: int | None = None  # longest output edge (`size`); None = keep the size
    algorithm: str = "auto"  # auto, thumbnail, lanczos3 or bicubic
    bw: bool = False
    box: Box | None = None  # w/h/fit/gravity (instead of `target`)
    quality: int | None = None  # the lossy encoder's quality; None: the format's setting
    background: tuple[int, int, int, int] | None = None  # `pad` colour, RGBA
    recompress: bool = False  # JPEG -> JPEG XL losslessly (a JPEG source only)
    # the source's identity for the decoded memo (memo.py): a local file's (path, dev,
    # inode, size, mtime_ns), memo.CONTENT (the bytes' digest), or None: never memoised
    source_id: tuple[Hashable, ...] | None = None

    @property
    def request(self) -> Box:
        return self.box if self.box is not None else Box(target=self.target)


@dataclass
class Rendered:
    data: bytes
    format: str
    width: int
    height: int
    steps: dict[str, float] = field(default_factory=dict)


@dataclass
class Work:
    """What the steps share: the input, the plan, the header's facts, the image so far."""

    data: bytes
    plan: Plan
    image: pyvips.Image = None
    orientation: int = 1
    size: tuple[int, int] = (0, 0)  # resized size, upright
    stored: tuple[int, int] = (0, 0)  # resized size before orientation
    geometry: Geometry | None = None
    algorithm: str = "none"  # resolved: none, thumbnail, lanczos3 or bicubic
    resizing: bool = False
    upright: bool = False  # libvips' thumbnail has applied the orientation already
    decoded: bool = False  # the pixels are in memory: a libvips failure is ours, not the input's
    # fastcodecs' decoded buffer, which libvips reads without owning it: alive for the
    # render (pyvips' copy_memory does not carry new_from_memory's reference along)
    pixels: Any = None
    output: bytes = b""


@dataclass(frozen=True)
class Step:
    name: str
    phase: str  # decode | resize | encode: the key its time is reported under
    run: Callable[[Work], pyvips.Image]
    materialise: bool = False  # pixels into memory after this step (ends a timed phase)
