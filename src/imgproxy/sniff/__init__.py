"""Magic bytes -> image type, and header-only facts (dimensions, alpha), without decoding.

The file extension and an origin's Content-Type are never trusted: the type of a body is
what its first bytes say. AVIF, JPEG, PNG and WebP are supported, and GIF as a *source*
only (its first frame is decoded, as the original did; we never encode GIF). HEIC, SVG,
TIFF, text and everything else are `None`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..config import CONTENT_TYPES as CONTENT_TYPES  # format -> media type (one table)
from ..config import format_named
from .headers import ALPHA, DIMENSIONS, ORIENTATION

SNIFF_BYTES = 64  # enough for every signature below
# what `probe` wants: PNG chunks before IDAT, the AVIF `meta` box, a JPEG's EXIF and SOF
# (after EXIF thumbnails and ICC profiles: usually well under 64 KiB)
PROBE_BYTES = 64 * 1024
_JXL_CODESTREAM = b"\xff\x0a"
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \x0d\x0a\x87\x0a"

_AVIF_BRANDS = {b"avif", b"avis"}


def sniff(head: bytes) -> str | None:
    """The supported image type of a body from its first bytes, or None."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[4:8] == b"ftyp" and len(head) >= 16:
        size = struct.unpack(">I", head[:4])[0]
        box = head[8 : min(max(size, 16), len(head))]
        brands = {box[:4]} | {box[i : i + 4] for i in range(8, len(box) - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "avif"
    return None


def is_jxl(head: bytes) -> bool:
    """A JPEG XL codestream or container (what `format=jxl` writes)."""
    return head[:2] == _JXL_CODESTREAM or head[:12] == _JXL_CONTAINER


def source_format(kind: str, path: str) -> str:
    """The output format when the request names none ("the source's own format").

    A GIF source is the exception: the contract's output formats are AVIF, JPEG, PNG and
    WebP (`format=gif` is a 400, `Content-Type` of a transform is one of those four), and a
    GIF re-encode would quantise to 256 colours. A GIF only reaches a transform under a name
    with an allowed extension (`gif_disguised.png`), so it is encoded as the format that
    name promises: what the URL says is what the client and every cache in between expect.
    """
    if kind in CONTENT_TYPES and kind != "gif":
        return kind
    name = path.rpartition("/")[2]
    return format_named(name.rpartition(".")[2], served=True) or "png"


@dataclass(frozen=True, slots=True)
class Probe:
    """What the first bytes say: the type, the stored size (None when the head cannot tell;
    before any EXIF/irot rotation), whether the image may have alpha, and its EXIF
    orientation (1-8; None when the head cannot tell). `has_alpha` is conservative: True
    whenever the head does not prove the image opaque, so that an alpha source never
    negotiates to JPEG."""

    kind: str
    width: int | None
    height: int | None
    has_alpha: bool
    orientation: int | None = 1

    @property
    def upright(self) -> tuple[int, int] | None:
        """The size as displayed (what the render resizes), or None when not known."""
        if self.width is None or self.height is None or self.orientation is None:
            return None
        if self.orientation in (5, 6, 7, 8):  # the transposing orientations
            return self.height, self.width
        return self.width, self.height


def probe(head: bytes) -> Probe | None:
    """Type, dimensions and alpha of an image from its first bytes (`PROBE_BYTES` is plenty;
    fewer only makes the answer more conservative); None if it is not a supported image."""
    kind = sniff(head[:SNIFF_BYTES])
    if kind is None:
        return None
    try:
        dims = dimensions(head, kind)
        alpha = ALPHA[kind](head)
    except (struct.error, IndexError, ValueError):
        dims, alpha = None, None
    try:
        orientation = ORIENTATION[kind](head)
    except (struct.error, IndexError, ValueError):
        orientation = None
    width, height = dims if dims is not None else (None, None)
    return Probe(kind, width, height, True if alpha is None else alpha, orientation)


def dimensions(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) read from the header, or None when the header cannot tell.

    A cheap first line of defence against decompression bombs; the transform re-checks the
    header that libvips reads before it decodes anything.
    """
    read = DIMENSIONS.get(kind)
    try:
        return read(data) if read is not None else None
    except (struct.error, IndexError, ValueError):
        return None
