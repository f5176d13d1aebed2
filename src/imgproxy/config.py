"""Settings: frozen groups of variables, each declared once, built from an environment mapping.

Every variable is one dataclass field: `setting(env, default, parser, help)`. The groups
(server, images, encode, limits, cache, fallback, security, observability) are frozen
dataclasses; `Settings` holds one of each. `Settings.from_env(environ)` validates every
variable and raises one `ConfigError` that lists *every* bad variable with its value and the
allowed range, so an operator fixes them all at once (the original silently fell back to
defaults); a secret's value is never shown. `VARS` (derived from the fields) is the table that
`--help`, the README and `.env.template` follow.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar
from urllib.parse import urlsplit

# Every name a format goes by (`format=`, IMAGE_PROXY_ALLOWED_OUTPUT_FORMATS, file
# extensions), read through `format_named`: `jpg` and `jpeg` are one format.
FORMAT_NAMES = {
    "avif": "avif",
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "jxl": "jxl",
    "png": "png",
    "webp": "webp",
}
WRITE_ONLY = frozenset(("jxl",))  # JPEG XL is only written: no file is served by its extension
# output formats (`format=`, negotiation): the sources' and JPEG XL
FORMATS = ("avif", "jpeg", "jxl", "png", "webp")
CONTENT_TYPES = {
    "avif": "image/avif",
    "gif": "image/gif",  # a source only: never written
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "jxl": "image/jxl",  # an output only: JPEG XL sources are not decoded (no jxlload)
}
ALGORITHMS = ("lanczos3", "bicubic", "thumbnail", "auto")
LOG_LEVELS = {
    "TRACE": "DEBUG",
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARN": "WARNING",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "OFF": "CRITICAL",
}
MIN_SIGNATURE_KEY = 32
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


class ConfigError(Exception):
    """Every invalid variable at once; `str()` is the message printed at start."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def cpu_count() -> int:
    """CPUs this process may use: affinity, then a cgroup v2 quota if one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


# --- value parsers: each returns the value or raises ValueError("allowed ...") -------------


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        s = raw.strip()
        if not s.lstrip("+").isdigit() or not s.isascii():
            raise ValueError(f"not an integer (allowed {lo}..{hi})")
        v = int(s)
        if not lo <= v <= hi:
            raise ValueError(f"out of range (allowed {lo}..{hi})")
        return v

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            v = float(raw.strip().replace("_", "x"))
        except ValueError:
            raise ValueError(f"not a number (allowed {lo}..{hi})") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"out of range (allowed {lo}..{hi})")
        return v

    return parse


def _bool(raw: str) -> bool:
    s = raw.strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError("not a boolean (allowed true/false/1/0/yes/no/on/off)")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        s = raw.strip().lower()
        if s not in allowed:
            raise ValueError(f"not one of {', '.join(allowed)}")
        return s

    return parse


def _bind(raw: str) -> tuple[str, int]:
    s = raw.strip()
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("not HOST:PORT (e.g. 0.0.0.0:8000 or [::]:8000)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _directory(raw: str) -> str:
    if not raw.strip():
        raise ValueError("empty (allowed: an existing directory)")
    if not os.path.isdir(raw):
        raise ValueError("not an existing directory")
    return os.path.realpath(raw)


def _text(raw: str) -> str:
    return raw


def _strip_path(raw: str) -> str:
    if "\x00" in raw or "\\" in raw:
        raise ValueError("must be a plain URL path prefix such as static/image/")
    return "/".join(s for s in raw.split("/") if s)


def _url(raw: str) -> str:
    s = raw.strip()
    if not s:
        return ""
    parts = urlsplit(s)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not contain a query, fragment or credentials")
    return s if s.endswith("/") else s + "/"


def _log_level(raw: str) -> str:
    # RUST_LOG may look like "info" or "image_proxy=debug,hyper=warn": take the first level.
    for directive in raw.split(","):
        level = directive.rpartition("=")[2].strip().upper()
        if level in LOG_LEVELS:
            return LOG_LEVELS[level]
    raise ValueError("not a log level (allowed TRACE, DEBUG, INFO, WARN, ERROR)")


def _or_cpus(parse: Callable[[str], int], extra: int = 0) -> Callable[[str], int]:
    """Empty or unset: the CPU count (plus `extra`)."""

    def wrapped(raw: str) -> int:
        return cpu_count() + extra if not raw.strip() else parse(raw)

    return wrapped


def format_named(name: str, *, served: bool = False) -> str | None:
    """The format `name` stands for, in any case (`JPG` -> `jpeg`), else None. `served`: a
    file extension, so only the formats files are served as (not the write-only ones)."""
    fmt = FORMAT_NAMES.get(name.lower())
    return None if fmt is None or (served and fmt in WRITE_ONLY) else fmt


def _csv(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _formats(raw: str) -> tuple[str, ...]:
    """Comma list of formats (`jpg` = `jpeg`), order kept, duplicates dropped."""
    out: list[str] = []
    for item in _csv(raw):
        fmt = format_named(item)
        if fmt is None:
            raise ValueError(f"{item!r} is not a format (allowed avif, jpeg, jpg, jxl, png, webp)")
        if fmt not in out:
            out.append(fmt)
    return tuple(out)


def _format_set(raw: str) -> frozenset[str]:
    return frozenset(_formats(raw) or FORMATS)


def _sizes(raw: str) -> tuple[int, ...]:
    parse = _int(1, 65535)
    try:
        return tuple(sorted({parse(item) for item in _csv(raw)}))
    except ValueError:
        raise ValueError("not a comma list of integers 1..65535") from None


def _qualities(raw: str) -> tuple[int, ...]:
    parse = _int(1, 100)
    try:
        return tuple(sorted({parse(item) for item in _csv(raw)}))
    except ValueError:
        raise ValueError("not a comma list of integers 1..100") from None


def _dpr_cap(raw: str) -> Decimal:
    s = raw.strip()
    try:
        v = Decimal(s)
    except InvalidOperation:
        raise ValueError("not a number (allowed 1.0..10.0)") from None
    if not (v.is_finite() and Decimal(1) <= v <= Decimal(10)):
        raise ValueError("out of range (allowed 1.0..10.0)")
    return v


def _keys(raw: str) -> tuple[str, ...]:
    keys = tuple(_csv(raw))
    short = [i + 1 for i, k in enumerate(keys) if len(k) < MIN_SIGNATURE_KEY]
    if short:
        which = ", ".join(f"#{i}" for i in short)
        raise ValueError(f"key {which} shorter than {MIN_SIGNATURE_KEY} characters")
    return keys


def _header_name(raw: str) -> str:
    s = raw.strip()
    if s and not _HEADER_NAME.fullmatch(s):
        raise ValueError("not an HTTP header name (e.g. X-Cache; empty: no header)")
    return s


def _redis_url(raw: str) -> str:
    s = raw.strip()
    if s and urlsplit(s).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("not a redis://, rediss:// or unix:// URL")
    return s


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, default text, parser, help and documented default."""

    env: str
    default: str
    parse: Callable[[str], Any]
    help: str
    shown: str = ""  # the default as documented, when the raw default text is not it
    secret: bool = False  # never echo the value
    aliases: tuple[str, ...] = ()  # read when `env` is unset (RUST_LOG)
    attr: str = ""  # field name; set by the group
    group: str = ""  # group title; set by the group

    @property
    def shown_default(self) -> str:
        """The default as documented (`--help`, README)."""
        return self.shown or self.default or "(unset)"


def setting(
    env: str,
    default: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    shown: str = "",
    secret: bool = False,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field declaring the variable that fills it."""
    return field(metadata={"var": Var(env, default, parse, help, shown, secret, aliases)})


T = TypeVar("T")
MiB = 1024 * 1024
CPUS = "number of CPUs"


@dataclass(frozen=True)
class Server:
    bind: tuple[str, int] = setting(
        "IMAGE_PROXY_BIND_ADDRESS", "0.0.0.0:8000", _bind, "TCP address and port to listen on"
    )
    workers: int = setting(
        "IMAGE_PROXY_WORKERS", "", _or_cpus(_int(1, 256)), "worker processes", shown=CPUS
    )
    log_level: str = setting(
        "IMAGE_PROXY_LOG_LEVEL",
        "INFO",
        _log_level,
        "TRACE, DEBUG, INFO, WARN or ERROR (RUST_LOG is honoured too)",
        aliases=("RUST_LOG",),
    )


@dataclass(frozen=True)
class Images:
    root_path: str = setting(
        "IMAGE_PROXY_ROOT_PATH", "/app/data", _directory, "root directory of the images to serve"
    )
    strip_path: str = setting(
        "IMAGE_PROXY_STRIP_PATH",
        "",
        _strip_path,
        "URL path prefix removed before lookup (e.g. static/image/)",
    )
    resize_algorithm: str = setting(
        "IMAGE_PROXY_RESIZE_ALGORITHM",
        "auto",
        _choice(*ALGORITHMS),
        "lanczos3, bicubic, thumbnail or auto (per-request resize_algorithm overrides)",
    )
    cache_control: str = setting(
        "IMAGE_PROXY_CACHE_CONTROL_HEADER",
        "public, max-age=31536000, no-transform",
        _text,
        "Cache-Control of image responses (empty: no header)",
    )
    preferred_formats: tuple[str, ...] = setting(
        "IMAGE_PROXY_PREFERRED_FORMATS",
        "",
        _formats,
        "formats negotiated from Accept, in order (e.g. jxl,avif,webp; empty: no negotiation)",
    )
    allowed_output_formats: frozenset[str] = setting(
        "IMAGE_PROXY_ALLOWED_OUTPUT_FORMATS",
        "",
        _format_set,
        "output formats allowed (comma list; empty: all)",
    )
    cache_status_header: str = setting(
        "IMAGE_PROXY_CACHE_STATUS_HEADER",
        "X-Cache",
        _header_name,
        "name of the HIT/MISS header (empty: no header)",
    )


@dataclass(frozen=True)
class EncodeOptions:
    """Encoder settings; they change the output bytes, so they are part of the cache key."""

    avif_speed: int = setting(
        "IMAGE_PROXY_AVIF_SPEED",
        "6",
        _int(1, 10),
        "AVIF speed 1-10 (higher = faster); libvips effort = max(0, 9 - speed)",
    )
    avif_quality: int = setting(
        "IMAGE_PROXY_AVIF_QUALITY", "85", _int(0, 100), "AVIF quality 0-100"
    )
    jpeg_quality: int = setting(
        "IMAGE_PROXY_JPEG_QUALITY", "75", _int(0, 100), "JPEG quality 0-100"
    )
    webp_quality: int = setting(
        "IMAGE_PROXY_WEBP_QUALITY", "80", _int(0, 100), "WebP quality 0-100"
    )
    webp_effort: int = setting(
        "IMAGE_PROXY_WEBP_EFFORT", "4", _int(0, 6), "WebP effort 0-6 (higher = slower, smaller)"
    )
    webp_lossless: bool = setting(
        "IMAGE_PROXY_WEBP_LOSSLESS", "false", _bool, "encode WebP losslessly"
    )
    jxl_quality: int = setting(
        "IMAGE_PROXY_JXL_QUALITY", "77", _int(1, 100), "JPEG XL quality 1-100"
    )
    jxl_effort: int = setting(
        "IMAGE_PROXY_JXL_EFFORT", "4", _int(1, 9), "JPEG XL effort 1-9 (higher = slower, smaller)"
    )
    jxl_recompress_jpeg: bool = setting(
        "IMAGE_PROXY_JXL_RECOMPRESS_JPEG",
        "true",
        _bool,
        "a JPEG asked for as JPEG XL with no other transform parameter is recompressed "
        "losslessly (rebuilds the JPEG bit for bit, ~20 % smaller)",
    )
    png_compression: int = setting(
        "IMAGE_PROXY_PNG_COMPRESSION_LEVEL", "6", _int(0, 9), "PNG zlib level 0-9"
    )
    fast_codecs: bool = setting(
        "IMAGE_PROXY_FAST_CODECS",
        "true",
        _bool,
        "decode JPEG with simplejpeg, encode JPEG/lossy WebP with Pillow (faster builds of "
        "the same libjpeg-turbo/libwebp, same pixels); false: libvips for every codec",
    )

    @property
    def avif_effort(self) -> int:
        """AVIF speed 1..10 -> libvips heifsave effort 0..8 (libvips sets aom speed = 9 - effort).

        speed 6 (default) -> effort 3 -> aom cpu-used 6; speed 9 and 10 -> effort 0 (aom's fastest).
        """
        return max(0, 9 - self.avif_speed)


@dataclass(frozen=True)
class Limits:
    max_source_pixels: int = setting(
        "IMAGE_PROXY_MAX_SOURCE_PIXELS",
        str(8192 * 8192),
        _int(1, 1 << 40),
        "larger sources (width x height from the header) are refused with 422",
    )
    max_source_bytes: int = setting(
        "IMAGE_PROXY_MAX_SOURCE_BYTES",
        str(128 * MiB),
        _int(1, 1 << 40),
        "larger source files are not transformed (422)",
    )
    transform_threads: int = setting(
        "IMAGE_PROXY_TRANSFORM_THREADS",
        "",
        # one more than the cores: a render process never waits for its next job while a
        # core idles (bench/README.md -> Render pool)
        _or_cpus(_int(1, 64), extra=1),
        "concurrent transforms per instance (all workers together)",
        shown="number of CPUs + 1",
    )
    transform_queue: int = setting(
        "IMAGE_PROXY_TRANSFORM_QUEUE",
        "64",
        _int(0, 100000),
        "transforms waiting per instance (all workers together) before 503",
    )
    vips_concurrency: int = setting(
        "IMAGE_PROXY_VIPS_CONCURRENCY", "1", _int(1, 64), "libvips threads per transform"
    )
    render_pool: str = setting(
        "IMAGE_PROXY_RENDER_POOL",
        "processes",
        _choice("processes", "threads"),
        "processes: TRANSFORM_THREADS render processes fed by one queue per instance; "
        "threads: renders in the HTTP workers' threads (less memory)",
    )


@dataclass(frozen=True)
class Cache:
    enabled: bool = setting(
        "IMAGE_PROXY_ENABLE_CACHE",
        "false",
        _bool,
        "cache transformed images (one memory tier per instance, shared by its workers)",
    )
    memory_size: int = setting(
        "IMAGE_PROXY_CACHE_MEMORY_SIZE",
        str(100 * MiB),
        _int(0, 1 << 40),
        "memory tier size in bytes for the whole instance (all workers together)",
    )
    max_item_size: int = setting(
        "IMAGE_PROXY_CACHE_MAX_ITEM_SIZE",
        str(1 * MiB),
        _int(0, 1 << 40),
        "larger items skip the memory tier",
    )
    memory_path: str = setting(
        "IMAGE_PROXY_CACHE_MEMORY_PATH",
        "/dev/shm",
        _text,
        "tmpfs directory holding the instance memory tier (shared by the workers)",
    )
    disk_enabled: bool = setting(
        "IMAGE_PROXY_ENABLE_DISK_CACHE",
        "false",
        _bool,
        "add a disk tier shared by all workers (needs ENABLE_CACHE)",
    )
    disk_size: int = setting(
        "IMAGE_PROXY_CACHE_DISK_SIZE", str(512 * MiB), _int(MiB, 1 << 50), "disk tier size in bytes"
    )
    disk_path: str = setting(
        "IMAGE_PROXY_CACHE_DISK_PATH",
        "./cache",
        _text,
        "disk tier directory (local disk, not NFS)",
    )
    passthrough_size: int = setting(
        "IMAGE_PROXY_PASSTHROUGH_CACHE_SIZE",
        str(64 * MiB),
        _int(0, 1 << 40),
        "memory for original files up to 1 MiB, whole instance (each worker keeps its share; revalidated by size+mtime per request)",
    )
    decoded_size: int = setting(
        "IMAGE_PROXY_DECODED_CACHE_SIZE",
        str(96 * MiB),
        _int(0, 1 << 40),
        "memory for decoded JPEG sources (the DCT-scaled pixels, reused by other sizes and "
        "formats of the same file), whole instance (each render process keeps its share; "
        "an entry over a quarter of a share is not kept; 0: off)",
    )
    redis_url: str = setting(
        "IMAGE_PROXY_REDIS_URL",
        "",
        _redis_url,
        "Redis/Valkey tier shared by all replicas (redis://, rediss://, unix://; empty: off)",
        secret=True,  # may hold a password
    )
    redis_ttl: int = setting(
        "IMAGE_PROXY_REDIS_TTL", "604800", _int(1, 1 << 31), "seconds a Redis entry lives"
    )
    redis_prefix: str = setting(
        "IMAGE_PROXY_REDIS_PREFIX", "imgproxy:", _text, "prefix of every Redis key"
    )
    redis_timeout: float = setting(
        "IMAGE_PROXY_REDIS_TIMEOUT",
        "0.1",
        _float(0.005, 5.0),
        "seconds one Redis call may take before the tier is skipped",
    )


@dataclass(frozen=True)
class Fallback:
    url: str = setting(
        "IMAGE_PROXY_FALLBACK_IMAGE_URL",
        "",
        _url,
        "base URL fetched when a file is missing locally (e.g. https://example.com/images/)",
    )
    max_size: int = setting(
        "IMAGE_PROXY_FALLBACK_IMAGE_MAX_SIZE",
        str(5 * MiB),
        _int(1, 1024 * MiB),
        "largest fallback body in bytes",
    )
    timeout: float = setting(
        "IMAGE_PROXY_FALLBACK_TIMEOUT",
        "10",
        _float(0.1, 300.0),
        "total seconds for one fallback fetch (connect to last byte)",
    )
    max_redirects: int = setting(
        "IMAGE_PROXY_FALLBACK_MAX_REDIRECTS",
        "3",
        _int(0, 10),
        "redirects followed (each re-checked against the base URL)",
    )
    revalidate_after: float = setting(
        "IMAGE_PROXY_FALLBACK_REVALIDATE_AFTER",
        "60",
        _float(0.0, 86400.0),
        "seconds a fallback answer without ETag/Last-Modified is reused before a new fetch",
    )
    memo_size: int = setting(
        "IMAGE_PROXY_FALLBACK_MEMO_SIZE",
        str(64 * MiB),
        _int(0, 1 << 40),
        "memory for fallback bodies kept for revalidation, whole instance (each worker keeps its share)",
    )


@dataclass(frozen=True)
class Security:
    signature_keys: tuple[str, ...] = setting(
        "IMAGE_PROXY_SIGNATURE_KEYS",
        "",
        _keys,
        "HMAC-SHA256 URL signing keys, comma-separated, each >= 32 chars (empty: no signing)",
        secret=True,
    )
    allowed_sizes: tuple[int, ...] = setting(
        "IMAGE_PROXY_ALLOWED_SIZES",
        "",
        _sizes,
        "target edges allowed, comma-separated; others snap up to the next one (empty: any)",
    )
    allowed_qualities: tuple[int, ...] = setting(
        "IMAGE_PROXY_ALLOWED_QUALITIES",
        "",
        _qualities,
        "q values allowed, comma-separated; others snap to the nearest, a tie to the higher (empty: any)",
    )
    max_dpr: Decimal = setting(  # noqa: RUF009 (Decimal is immutable)
        "IMAGE_PROXY_MAX_DPR",
        "3",
        _dpr_cap,
        "cap of a used Sec-CH-DPR (rounded up to a multiple of 0.5 first); the dpr parameter is not capped",
    )


@dataclass(frozen=True)
class Observability:
    server_timing: bool = setting(
        "IMAGE_PROXY_SERVER_TIMING", "true", _bool, "send a Server-Timing header"
    )
    access_log: bool = setting("IMAGE_PROXY_ACCESS_LOG", "false", _bool, "log one line per request")
    log_format: str = setting(
        "IMAGE_PROXY_LOG_FORMAT",
        "text",
        _choice("text", "json"),
        "text or json (every line one JSON object)",
    )


GROUPS: tuple[tuple[str, str, type], ...] = (
    ("server", "Server", Server),
    ("images", "Images", Images),
    ("encode", "Encoders", EncodeOptions),
    ("limits", "Limits", Limits),
    ("cache", "Cache", Cache),
    ("fallback", "Fallback", Fallback),
    ("security", "Security", Security),
    ("observability", "Observability", Observability),
)


def _vars_of(title: str, group: type) -> list[Var]:
    out = []
    for f in fields(group):
        var: Var = f.metadata["var"]
        out.append(Var(**{**var.__dict__, "attr": f.name, "group": title}))
    return out


VARS: tuple[Var, ...] = tuple(v for _, title, g in GROUPS for v in _vars_of(title, g))


def vars_by_group() -> list[tuple[str, list[Var]]]:
    """VARS under their group titles, in order: the layout of `--help` and .env.template."""
    return [(title, _vars_of(title, g)) for _, title, g in GROUPS]


@dataclass(frozen=True)
class Settings:
    server: Server
    images: Images
    encode: EncodeOptions
    limits: Limits
    cache: Cache
    fallback: Fallback
    security: Security
    observability: Observability

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        problems: list[str] = []
        groups: dict[str, Any] = {
            name: group_from_env(group, env, problems) for name, _, group in GROUPS
        }
        if problems:
            raise ConfigError(problems)
        return cls(**groups)


def group_from_env(group: type[T], env: Mapping[str, str], problems: list[str]) -> T:
    """One group's values from `env`; bad variables are appended to `problems`."""
    values: dict[str, Any] = {}
    for f in fields(group):  # type: ignore[arg-type]
        var: Var = f.metadata["var"]
        raw = env.get(var.env)
        for alias in var.aliases:
            raw = env.get(alias) if raw is None else raw
        text = var.default if raw is None else raw
        try:
            values[f.name] = var.parse(text)
        except ValueError as exc:
            shown = "<secret>" if var.secret else repr(text)
            problems.append(f"{var.env}={shown}: {exc}")
    return group(**values) if len(values) == len(fields(group)) else None  # type: ignore[arg-type,return-value]


def default_encode_options() -> EncodeOptions:
    return group_from_env(EncodeOptions, {}, [])
