"""Settings: one frozen dataclass built from an environment mapping.

`Settings.from_env(environ)` validates every variable and raises one `ConfigError` that lists
*every* bad variable with its value and the allowed range, so an operator fixes them all at
once (the original silently fell back to defaults).  `VARS` is the single table of variables:
the parser, `--help`, the README and `.env.template` all follow it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

FORMATS = ("avif", "jpeg", "png", "webp")
ALGORITHMS = ("lanczos3", "thumbnail", "auto")
LOG_LEVELS = {
    "TRACE": "DEBUG",
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARN": "WARNING",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "OFF": "CRITICAL",
}
CPU_DEFAULTS = ("workers", "transform_threads")  # empty or unset: the CPU count
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


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


@dataclass(frozen=True)
class Var:
    env: str
    attr: str
    default: str
    parse: Callable[[str], Any]
    help: str
    group: str

    @property
    def shown_default(self) -> str:
        """The default as documented (`--help`, README)."""
        if self.attr in CPU_DEFAULTS:
            return "number of CPUs"
        return self.default or "(unset)"


MiB = 1024 * 1024

VARS: tuple[Var, ...] = (
    # server
    Var(
        "IMAGE_PROXY_BIND_ADDRESS",
        "bind",
        "0.0.0.0:8000",
        _bind,
        "TCP address and port to listen on",
        "Server",
    ),
    Var(
        "IMAGE_PROXY_WORKERS",
        "workers",
        "",
        _int(1, 256),
        "worker processes (default: number of CPUs)",
        "Server",
    ),
    Var(
        "IMAGE_PROXY_LOG_LEVEL",
        "log_level",
        "INFO",
        _log_level,
        "TRACE, DEBUG, INFO, WARN or ERROR (RUST_LOG is honoured too)",
        "Server",
    ),
    # images
    Var(
        "IMAGE_PROXY_ROOT_PATH",
        "root_path",
        "/app/data",
        _directory,
        "root directory of the images to serve",
        "Images",
    ),
    Var(
        "IMAGE_PROXY_STRIP_PATH",
        "strip_path",
        "",
        _strip_path,
        "URL path prefix removed before lookup (e.g. static/image/)",
        "Images",
    ),
    Var(
        "IMAGE_PROXY_RESIZE_ALGORITHM",
        "resize_algorithm",
        "auto",
        _choice(*ALGORITHMS),
        "lanczos3, thumbnail or auto (per-request resize_algorithm overrides)",
        "Images",
    ),
    Var(
        "IMAGE_PROXY_CACHE_CONTROL_HEADER",
        "cache_control",
        "public, max-age=31536000, no-transform",
        _text,
        "Cache-Control of image responses (empty: no header)",
        "Images",
    ),
    # encoders
    Var(
        "IMAGE_PROXY_AVIF_SPEED",
        "avif_speed",
        "6",
        _int(1, 10),
        "AVIF speed 1-10 (higher = faster); libvips effort = max(0, 9 - speed)",
        "Encoders",
    ),
    Var(
        "IMAGE_PROXY_AVIF_QUALITY",
        "avif_quality",
        "85",
        _int(0, 100),
        "AVIF quality 0-100",
        "Encoders",
    ),
    Var(
        "IMAGE_PROXY_JPEG_QUALITY",
        "jpeg_quality",
        "75",
        _int(0, 100),
        "JPEG quality 0-100",
        "Encoders",
    ),
    Var(
        "IMAGE_PROXY_WEBP_QUALITY",
        "webp_quality",
        "80",
        _int(0, 100),
        "WebP quality 0-100",
        "Encoders",
    ),
    Var(
        "IMAGE_PROXY_WEBP_EFFORT",
        "webp_effort",
        "4",
        _int(0, 6),
        "WebP effort 0-6 (higher = slower, smaller)",
        "Encoders",
    ),
    Var(
        "IMAGE_PROXY_PNG_COMPRESSION_LEVEL",
        "png_compression",
        "6",
        _int(0, 9),
        "PNG zlib level 0-9",
        "Encoders",
    ),
    # fallback origin
    Var(
        "IMAGE_PROXY_FALLBACK_IMAGE_URL",
        "fallback_url",
        "",
        _url,
        "base URL fetched when a file is missing locally (e.g. https://example.com/images/)",
        "Fallback",
    ),
    Var(
        "IMAGE_PROXY_FALLBACK_IMAGE_MAX_SIZE",
        "fallback_max_size",
        str(5 * MiB),
        _int(1, 1024 * MiB),
        "largest fallback body in bytes",
        "Fallback",
    ),
    Var(
        "IMAGE_PROXY_FALLBACK_TIMEOUT",
        "fallback_timeout",
        "10",
        _float(0.1, 300.0),
        "total seconds for one fallback fetch (connect to last byte)",
        "Fallback",
    ),
    Var(
        "IMAGE_PROXY_FALLBACK_MAX_REDIRECTS",
        "fallback_max_redirects",
        "3",
        _int(0, 10),
        "redirects followed (each re-checked against the base URL)",
        "Fallback",
    ),
    # cache
    Var(
        "IMAGE_PROXY_ENABLE_CACHE",
        "enable_cache",
        "false",
        _bool,
        "cache transformed images (per-worker memory tier)",
        "Cache",
    ),
    Var(
        "IMAGE_PROXY_CACHE_MEMORY_SIZE",
        "cache_memory_size",
        str(100 * MiB),
        _int(0, 1 << 40),
        "memory tier size per worker in bytes",
        "Cache",
    ),
    Var(
        "IMAGE_PROXY_CACHE_MAX_ITEM_SIZE",
        "cache_max_item_size",
        str(1 * MiB),
        _int(0, 1 << 40),
        "larger items skip the memory tier",
        "Cache",
    ),
    Var(
        "IMAGE_PROXY_ENABLE_DISK_CACHE",
        "enable_disk_cache",
        "false",
        _bool,
        "add a disk tier shared by all workers (needs ENABLE_CACHE)",
        "Cache",
    ),
    Var(
        "IMAGE_PROXY_CACHE_DISK_SIZE",
        "cache_disk_size",
        str(512 * MiB),
        _int(MiB, 1 << 50),
        "disk tier size in bytes",
        "Cache",
    ),
    Var(
        "IMAGE_PROXY_CACHE_DISK_PATH",
        "cache_disk_path",
        "./cache",
        _text,
        "disk tier directory (local disk, not NFS)",
        "Cache",
    ),
    Var(
        "IMAGE_PROXY_PASSTHROUGH_CACHE_SIZE",
        "passthrough_cache_size",
        str(64 * MiB),
        _int(0, 1 << 40),
        "per-worker memory for original files up to 1 MiB (revalidated by size+mtime per request)",
        "Cache",
    ),
    # limits
    Var(
        "IMAGE_PROXY_MAX_SOURCE_PIXELS",
        "max_source_pixels",
        str(8192 * 8192),
        _int(1, 1 << 40),
        "larger sources (width x height from the header) are refused with 422",
        "Limits",
    ),
    Var(
        "IMAGE_PROXY_MAX_SOURCE_BYTES",
        "max_source_bytes",
        str(128 * MiB),
        _int(1, 1 << 40),
        "larger source files are not transformed (422)",
        "Limits",
    ),
    Var(
        "IMAGE_PROXY_TRANSFORM_THREADS",
        "transform_threads",
        "",
        _int(1, 64),
        "concurrent transforms per worker (default: number of CPUs)",
        "Limits",
    ),
    Var(
        "IMAGE_PROXY_TRANSFORM_QUEUE",
        "transform_queue",
        "64",
        _int(0, 100000),
        "transforms waiting per worker before 503",
        "Limits",
    ),
    Var(
        "IMAGE_PROXY_VIPS_CONCURRENCY",
        "vips_concurrency",
        "1",
        _int(1, 64),
        "libvips threads per transform",
        "Limits",
    ),
)


@dataclass(frozen=True)
class Settings:
    # server
    bind: tuple[str, int]
    workers: int
    log_level: str
    # images
    root_path: str
    strip_path: str
    resize_algorithm: str
    cache_control: str
    # encoders
    avif_speed: int
    avif_quality: int
    jpeg_quality: int
    webp_quality: int
    webp_effort: int
    png_compression: int
    # fallback origin
    fallback_url: str
    fallback_max_size: int
    fallback_timeout: float
    fallback_max_redirects: int
    # cache
    enable_cache: bool
    cache_memory_size: int
    cache_max_item_size: int
    enable_disk_cache: bool
    cache_disk_size: int
    cache_disk_path: str
    passthrough_cache_size: int
    # limits
    max_source_pixels: int
    max_source_bytes: int
    transform_threads: int
    transform_queue: int
    vips_concurrency: int

    @property
    def avif_effort(self) -> int:
        """AVIF speed 1..10 -> libvips heifsave effort 0..8 (libvips sets aom speed = 9 - effort).

        speed 6 (default) -> effort 3 -> aom cpu-used 6; speed 9 and 10 -> effort 0 (aom's fastest).
        """
        return max(0, 9 - self.avif_speed)

    @property
    def disk_cache_enabled(self) -> bool:
        return self.enable_cache and self.enable_disk_cache

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        if "IMAGE_PROXY_LOG_LEVEL" not in env and "RUST_LOG" in env:
            env["IMAGE_PROXY_LOG_LEVEL"] = env["RUST_LOG"]
        values: dict[str, Any] = {}
        problems: list[str] = []
        for var in VARS:
            raw = env.get(var.env)
            if var.attr in CPU_DEFAULTS and not raw:
                values[var.attr] = cpu_count()
                continue
            try:
                values[var.attr] = var.parse(var.default if raw is None else raw)
            except ValueError as exc:
                shown = var.default if raw is None else raw
                problems.append(f"{var.env}={shown!r}: {exc}")
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(changes)
        return Settings(**current)
