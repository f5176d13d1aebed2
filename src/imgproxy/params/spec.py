"""What a request asks for (TransformSpec, from `params.parse`) and what one render makes of
it on a given source (Output, from `resolve`): the cache key is built from the Output."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import astuple, dataclass, replace

from ..config import EncodeOptions, Settings
from ..transform import geometry
from ..transform.geometry import Box, Geometry

ALPHA_FORMATS = frozenset(("avif", "jxl", "png", "webp"))
WHITE = (255, 255, 255, 255)
TRANSPARENT = (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class TransformSpec:
    """What one request asks for, fully parsed (query > header > settings), before the
    source is known."""

    path: str  # sanitised, relative to the root, "/"-separated
    transform: bool  # False: passthrough, the bytes are never decoded
    format: str | None = None  # output format; None = the source's own format
    target: int | None = None  # `size` x dpr (snapped): longest output edge before clamping
    algorithm: str = "auto"
    bw: bool = False  # `bw=1`: black and white
    width: int | None = None  # `w` x dpr
    height: int | None = None  # `h` x dpr
    fit: str = "inside"
    gravity: str = "center"
    background: tuple[int, int, int, int] | None = None  # `background`, RGBA
    quality: int | None = None  # `q`, snapped to IMAGE_PROXY_ALLOWED_QUALITIES
    only_format: bool = True  # no transform parameter but `format` (lossless JXL from JPEG)

    @property
    def is_passthrough(self) -> bool:
        return not self.transform

    @property
    def box(self) -> Box:
        return Box(self.target, self.width, self.height, self.fit, self.gravity)

    def cache_key(self, source_identity: str, output_salt: str = "") -> str:
        """The key of this request on a source whose header is not known: the request
        itself, resolved as far as the URL allows. The server keys `resolve(...)`'s
        Output instead, which also merges requests that make identical outputs."""
        unknown = Output(
            self.path,
            self.format or "-",
            self.box,
            None,
            self.algorithm if self.box != Box() else "-",
            self.bw,
            self.quality,
            self.background,
        )
        return unknown.cache_key(source_identity, output_salt)


@dataclass(frozen=True, slots=True)
class Output:
    """What one render makes: `resolve(spec, ...)` of a spec and its source's header facts.
    `geometry` is None when the header probe could not tell the upright size: the render
    then resolves `box` itself against the decoded header, and the key holds the request."""

    path: str
    format: str  # avif, jpeg, jxl, png or webp
    box: Box
    geometry: Geometry | None
    algorithm: str  # resolved (`none` when the size is kept) when geometry is known
    bw: bool = False
    quality: int | None = None  # the lossy encoder's quality; None: the format has none
    background: tuple[int, int, int, int] | None = None  # the padding's colour (`pad` only)
    recompress: bool = False  # lossless JPEG -> JPEG XL: the JPEG's own bytes, no decode

    def cache_key(self, source_identity: str, output_salt: str = "") -> str:
        """Key of the rendered output: the resolved output + the source's identity +
        `output_salt` (everything else that changes the bytes: encoder settings, codec
        library versions). Never the raw parameters: `?v=3`, the URL's spelling, a
        `Sec-CH-DPR` that nothing uses, a `fit` that cannot matter all leave it alone."""
        if self.recompress:
            shape = "recompress"
        elif self.geometry is None:
            shape = f"raw {self.box!r} {self.algorithm}"
        else:
            g = self.geometry
            shape = f"{g.resize} {g.canvas} {g.mode} {g.offset} {g.interesting} {self.algorithm}"
        raw = "\x00".join(
            (
                "v2",
                self.path,
                self.format,
                shape,
                "bw" if self.bw else "-",
                str(self.quality),
                str(self.background),
                source_identity,
                output_salt,
            )
        )
        return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()


def resolve(
    spec: TransformSpec,
    source_kind: str,
    source_format: str,
    size: tuple[int, int] | None,
    settings: Settings,
) -> Output:
    """The output `spec` makes of a source: `source_kind` its sniffed type, `source_format`
    the output format when the request names none, `size` its upright size from the header
    probe (None when the probe cannot tell). Pure: the same inputs, the same Output."""
    fmt = spec.format or source_format
    encode = settings.encode
    recompress = (
        fmt == "jxl" and source_kind == "jpeg" and spec.only_format and encode.jxl_recompress_jpeg
    )
    box = spec.box
    if recompress:
        return Output(spec.path, fmt, box, None, "none", recompress=True)
    quality = spec.quality if spec.quality is not None else default_quality(fmt, encode)
    if fmt == "png" or (fmt == "webp" and encode.webp_lossless):
        quality = None  # PNG and lossless WebP ignore q
    if size is None:
        return Output(spec.path, fmt, box, None, spec.algorithm, spec.bw, quality, spec.background)
    g = geometry.fit(box, *size)
    algorithm = geometry.algorithm(spec.algorithm, g, *size)
    background = None
    if g.mode == "pad":
        background = spec.background or (TRANSPARENT if fmt in ALPHA_FORMATS else WHITE)
    return Output(spec.path, fmt, box, g, algorithm, spec.bw, quality, background)


def output_salt(versions: Mapping[str, str], encode: EncodeOptions) -> str:
    """What changes the output bytes besides the request and the source: every codec
    library's version (`transform.codec_versions()`: computed, never hand-bumped, so an
    upgrade never serves bytes the old one made) and the encoder settings."""
    raw = repr((sorted(versions.items()), astuple(encode)))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def default_quality(fmt: str, encode: EncodeOptions) -> int | None:
    """The format's quality setting (what `q` overrides); None for PNG."""
    return {
        "jpeg": encode.jpeg_quality,
        "webp": encode.webp_quality,
        "avif": encode.avif_quality,
        "jxl": encode.jxl_quality,
    }.get(fmt)


@functools.lru_cache(maxsize=1024)
def as_format(spec: TransformSpec, fmt: str) -> TransformSpec:
    """`spec` as a transform to `fmt` (a negotiated format): what `format=<fmt>` would have
    parsed to. Memoised: `dataclasses.replace` of a frozen spec costs ~5-7 µs, a hit < 1 µs."""
    return replace(spec, transform=True, format=fmt)
