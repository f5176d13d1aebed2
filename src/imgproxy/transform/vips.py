"""libvips set up once per process (`configure`: each knob with its reason), and the
version of every codec in use (`codec_versions`, `VERSION`: part of every cache key)."""

from __future__ import annotations

import importlib.metadata

import pyvips

from .. import fastcodecs

# What produced the bytes, for the cache key (the disk and Redis tiers outlive upgrades):
# every codec library's version, computed, and PIPELINE, bumped by hand whenever a change of
# ours in transform/ changes output bytes. Both go into `codec_versions`.
PIPELINE = 2

# our four, and GIF sources (first frame; the libvips type is Nsgif, not Gif)
_LOADERS = tuple(f"VipsForeignLoad{name}" for name in ("Jpeg", "Png", "Webp", "Heif", "Nsgif"))


def codec_versions() -> dict[str, str]:
    """Every library that decodes or encodes, with the version in use: computed (libvips,
    and pyvips-binary, which builds its codecs in; Pillow, its libjpeg-turbo and libwebp;
    simplejpeg; the JPEG XL encoder), never hand-bumped; and our own PIPELINE."""
    libvips = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    return {
        "libvips": libvips,
        "pyvips-binary": _dist_version("pyvips-binary"),
        **fastcodecs.VERSIONS,
        "imgproxy-pipeline": str(PIPELINE),
    }


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # a libvips of the system's
        return "none"


VERSION = "; ".join(f"{k} {v}" for k, v in codec_versions().items())


def configure(concurrency: int) -> None:
    """Set libvips up once per worker process."""
    # A proxy rarely sees the same buffer twice; libvips' operation cache would only hold
    # memory, and it serves stale pixels when a file is rewritten under the same name.
    pyvips.cache_set_max(0)
    # Parallelism comes from the executor threads (one image each); libvips' own pipeline
    # threads on top would oversubscribe the cores.
    pyvips.concurrency_set(concurrency)
    # Only the formats we read may ever reach a decoder (our four, and GIF's first frame):
    # no SVG, TIFF, PDF, matrix/CSV/raw loaders, whatever a file claims to be.
    pyvips.block_untrusted_set(True)
    pyvips.operation_block_set("VipsForeignLoad", True)
    for name in _LOADERS:
        pyvips.operation_block_set(name, False)
