"""Request -> TransformSpec -> Output: the sanitised relative path, what the client asks
for, and, once the source's header is known, what will be rendered.

Everything a client controls is validated here, once, before any file is touched:

* the path is percent-decoded exactly once and every segment is checked (no `..`, `.`, empty
  or dot-leading segments, no NUL/control characters/backslashes, no encoded slashes, no
  double encoding, valid UTF-8 only). A path that fails is a 404, never a 400: probing for
  traversal learns nothing. Root confinement against symlinks happens in `sources`.
* only `format`, `size`, `resize_algorithm`, `dpr`, `bw=1`, `w`, `h`, `fit`, `gravity`,
  `background` and `q` are transform parameters; anything else (`bw=0` too) is ignored: it
  neither triggers a transform nor changes the cache key.

`parse(...) -> TransformSpec` needs the URL and headers only; `resolve(spec, ...) -> Output`
adds the facts of the source's header probe (its type and upright size) and is what the
cache key is built from: identical outputs (`size=800`, `size=801` and `size=5000` on an
800 px source; `w=h=400` and `size=400`; `q=77` and no `q` when 77 is the setting) share one
entry and one render.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from urllib.parse import parse_qsl, unquote

from ..config import ALGORITHMS, Settings, format_named
from ..errors import BadRequest, NotFound, UnsupportedMediaType
from ..transform import geometry
from .spec import (
    ALPHA_FORMATS,
    TRANSPARENT,
    WHITE,
    Output,
    TransformSpec,
    as_format,
    default_quality,
    output_salt,
    resolve,
)

__all__ = [
    "ALPHA_FORMATS",
    "TRANSPARENT",
    "WHITE",
    "Output",
    "TransformSpec",
    "as_format",
    "default_quality",
    "output_salt",
    "parse",
    "parse_path",
    "parse_query",
    "resolve",
]

TRANSFORM_PARAMS = (
    "format",
    "size",
    "resize_algorithm",
    "dpr",
    "bw",
    "w",
    "h",
    "fit",
    "gravity",
    "background",
    "q",
)
MAX_SIZE = 4294967295
MAX_BOX = 16384
MAX_PATH_CHARS = 1024
MAX_SEGMENT_BYTES = 255
HALF = Decimal("0.5")
# formats with an alpha channel: `contain` pads them transparent by default, JPEG white
_SIZE_RE = re.compile(r"\+?[0-9]{1,10}")
_BOX_RE = re.compile(r"\+?[0-9]{1,5}")
_Q_RE = re.compile(r"\+?[0-9]{1,3}")
_HEX_RE = re.compile(r"[0-9a-fA-F]{6}([0-9a-fA-F]{2})?")
_DPR_RE = re.compile(r"\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_PERCENT_HEX = re.compile(r"%[0-9a-fA-F]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\\ud800-\udfff]")  # + lone surrogates


def parse_path(raw_path: str) -> str:
    """The sanitised relative path of a raw (still percent-encoded) request path, its
    IMAGE_PROXY_STRIP_PATH prefix already removed (`signing.strip_prefix`, in `urls`)."""
    raw = raw_path[1:] if raw_path.startswith("/") else raw_path
    if not raw or len(raw) > MAX_PATH_CHARS * 3 or _ENCODED_SEPARATOR.search(raw):
        raise NotFound()
    try:
        path = unquote(raw, errors="strict")
    except UnicodeDecodeError:  # invalid or overlong UTF-8 (%c0%ae...)
        raise NotFound() from None
    if len(path) > MAX_PATH_CHARS or _CONTROL.search(path) or _PERCENT_HEX.search(path):
        raise NotFound()  # control chars, NUL, backslash tricks, double encoding
    segments = path.split("/")
    for seg in segments:
        if (
            not seg
            or seg.startswith(".")
            or len(seg.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES
        ):
            raise NotFound()  # "", ".", "..", dotfiles, absolute paths ("/etc" -> "", "etc")
    name = segments[-1]
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    if format_named(ext, served=True) is None:
        raise UnsupportedMediaType("unsupported file extension")
    return "/".join(segments)


def _one(args: dict[str, list[str]], name: str) -> str | None:
    values = args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{name} given more than once")
    return values[0]


def _parse_dpr(raw: str) -> Decimal | None:
    if not _DPR_RE.fullmatch(raw):
        return None
    value = Decimal(raw.lstrip("+"))
    if not Decimal(1) <= value <= Decimal(10):
        return None
    return value


def parse_query(query_string: str) -> dict[str, list[str]]:
    try:
        pairs: Iterable[tuple[str, str]] = parse_qsl(
            query_string, keep_blank_values=True, errors="replace", max_num_fields=64
        )
    except ValueError:
        raise BadRequest("too many query parameters") from None
    args: dict[str, list[str]] = {}
    for key, value in pairs:
        if key == "bw" and value != "1":
            continue  # only `bw=1` enables it; any other value is not a transform parameter
        if key in TRANSFORM_PARAMS:
            args.setdefault(key, []).append(value)
    return args


def snap(target: int, allowed: tuple[int, ...]) -> int:
    """IMAGE_PROXY_ALLOWED_SIZES (sorted): the nearest listed size at or above `target`, or the
    largest when `target` is above them all; `()` = any size. The cache key (and so the number
    of renders per source) follows the snapped size; never-upscale still applies afterwards."""
    if not allowed:
        return target
    return allowed[min(bisect.bisect_left(allowed, target), len(allowed) - 1)]


def snap_quality(q: int, allowed: tuple[int, ...]) -> int:
    """IMAGE_PROXY_ALLOWED_QUALITIES (sorted): the nearest listed value, a tie going to the
    higher one; `()` = any quality."""
    if not allowed:
        return q
    return min(allowed, key=lambda a: (abs(a - q), -a))


def header_dpr(raw: str | None, cap: Decimal) -> Decimal:
    """A `Sec-CH-DPR` value as used: unparsable or outside 1.0..10.0 is ignored (1), a used
    one is rounded up to a multiple of 0.5 and capped at IMAGE_PROXY_MAX_DPR, so one URL has
    a handful of header variants (a signed URL cannot be made to render many sizes)."""
    parsed = _parse_dpr(raw.strip()) if raw else None
    if parsed is None:  # browsers send what they send: a bad header is ignored
        return Decimal(1)
    stepped = (parsed / HALF).to_integral_value(rounding=ROUND_CEILING) * HALF
    return min(stepped, cap)


def _scaled(value: int, dpr: Decimal) -> int:
    # half away from zero: 101 x 2.5 = 253 (Python's round() would give 252)
    return int((Decimal(value) * dpr).to_integral_value(rounding=ROUND_HALF_UP))


def _keyword(args: dict[str, list[str]], name: str, allowed: tuple[str, ...]) -> str | None:
    raw = _one(args, name)
    if raw is None:
        return None
    value = raw.lower()
    if value not in allowed:
        raise BadRequest(f"invalid {name} (allowed {', '.join(allowed)})")
    return value


def _integer(
    args: dict[str, list[str]], name: str, pattern: re.Pattern[str], hi: int
) -> int | None:
    raw = _one(args, name)
    if raw is None:
        return None
    if not pattern.fullmatch(raw) or not 1 <= int(raw) <= hi:
        raise BadRequest(f"invalid {name} (allowed integer 1..{hi})")
    return int(raw)


def parse(
    raw_path: str, query_string: str, headers: Mapping[str, str], settings: Settings
) -> TransformSpec:
    """Build the spec for one request (`raw_path` as sent, the strip prefix removed: see
    `parse_path`); raises BadRequest, NotFound or UnsupportedMediaType."""
    path = parse_path(raw_path)
    args = parse_query(query_string)
    if not args:
        return TransformSpec(path=path, transform=False)

    fmt = _one(args, "format")
    if fmt is not None:
        fmt = format_named(fmt)
        if fmt is None:
            raise BadRequest("invalid format (allowed avif, jpeg, jpg, jxl, png, webp)")
        if fmt not in settings.images.allowed_output_formats:
            raise UnsupportedMediaType(f"output format {fmt} is not allowed here")

    size = _integer(args, "size", _SIZE_RE, MAX_SIZE)
    width = _integer(args, "w", _BOX_RE, MAX_BOX)
    height = _integer(args, "h", _BOX_RE, MAX_BOX)
    fit = _keyword(args, "fit", geometry.FITS)
    gravity = _keyword(args, "gravity", geometry.GRAVITIES)
    quality = _integer(args, "q", _Q_RE, 100)
    background = _background(_one(args, "background"))
    if size is not None and (width is not None or height is not None):
        raise BadRequest("size and w/h cannot be combined")
    if fit is not None and width is None and height is None:
        raise BadRequest("fit needs w or h")
    if gravity is not None and fit not in ("cover", "contain"):
        raise BadRequest("gravity needs fit=cover or fit=contain")
    if background is not None and fit != "contain":
        raise BadRequest("background needs fit=contain")

    algorithm = settings.images.resize_algorithm
    raw_alg = _one(args, "resize_algorithm")
    if raw_alg is not None:
        algorithm = raw_alg.lower()
        if algorithm not in ALGORITHMS:
            raise BadRequest(f"invalid resize_algorithm (allowed {', '.join(ALGORITHMS)})")

    raw_dpr = _one(args, "dpr")
    if raw_dpr is not None:
        parsed = _parse_dpr(raw_dpr)
        if parsed is None:
            raise BadRequest("invalid dpr (allowed 1.0..10.0)")
        dpr = parsed  # signed with the URL: its exact value, not capped
    else:
        dpr = header_dpr(headers.get("sec-ch-dpr"), settings.security.max_dpr)

    allowed = settings.security.allowed_sizes
    target = None
    if size is not None:
        target = snap(_scaled(size, dpr), allowed)
    if width is not None:
        width = _scaled(width, dpr)
    if height is not None:
        height = _scaled(height, dpr)
    if allowed and (width is not None or height is not None):
        width, height = _snap_box(width, height, allowed)
    if quality is not None:
        quality = snap_quality(quality, settings.security.allowed_qualities)
    return TransformSpec(
        path=path,
        transform=True,
        format=fmt,
        target=target,
        algorithm=algorithm,
        bw="bw" in args,  # repeated `bw=1` is still just on
        width=width,
        height=height,
        fit=fit or "inside",
        gravity=gravity or "center",
        background=background,
        quality=quality,
        only_format=args.keys() == {"format"},
    )


def _background(raw: str | None) -> tuple[int, int, int, int] | None:
    if raw is None:
        return None
    if not _HEX_RE.fullmatch(raw):
        raise BadRequest("invalid background (allowed RRGGBB or RRGGBBAA hex)")
    value = bytes.fromhex(raw if len(raw) == 8 else raw + "ff")
    return value[0], value[1], value[2], value[3]


def _snap_box(
    width: int | None, height: int | None, allowed: tuple[int, ...]
) -> tuple[int | None, int | None]:
    """IMAGE_PROXY_ALLOWED_SIZES on a box: its longest edge snaps like `size`, the other
    edge follows by the same factor (the box keeps its aspect)."""
    if width is None or height is None:
        return (snap(width, allowed) if width else None), (
            snap(height, allowed) if height else None
        )
    if width >= height:
        w = snap(width, allowed)
        return w, max(1, geometry.half_up(height * w, width))
    h = snap(height, allowed)
    return max(1, geometry.half_up(width * h, height)), h
