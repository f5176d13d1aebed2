"""The render job, wherever it runs (a render process, a worker's thread): what it needs
(`Job`, picklable), the checks that need no decode (`check_source`), and `execute`: read
(capped), sniff, limits, Plan, transform.render. `renderer` is a render process's start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

from .. import sniff, transform
from ..config import EncodeOptions, Limits, Settings
from ..errors import ImgProxyError, UnprocessableImage, UnsupportedMediaType, UpstreamError
from ..params import Output
from ..sources import read_capped, read_file
from ..transform import Rendered

SETTLE_NS = 2_000_000_000  # a file modified more recently is not memoised decoded
# glibc malloc in a process that renders: blocks below MMAP_BELOW come from the heap, which
# keeps up to TRIM_ABOVE free before giving memory back (bench/README.md -> Allocator)
MMAP_BELOW = 8 << 20
TRIM_ABOVE = 32 << 20
# a render process's niceness: the HTTP workers and the dispatcher, which keep the queue
# fed and answer cheap requests, run first when they wake (bench/README.md -> Allocator)
RENDER_NICE = 3


@dataclass(frozen=True, slots=True)
class Job:
    """One render. Picklable: it may cross a process boundary."""

    path: str | None  # a local file, read (capped) inside the job
    data: bytes | None  # a fallback origin's body
    size: int  # the located source's size in bytes
    spec: Output  # what to render: the resolved output (params.resolve)


def not_an_image(fetched: bool) -> ImgProxyError:
    if fetched:  # the origin's fault, not the client's
        return UpstreamError("fallback origin did not send a supported image")
    return UnsupportedMediaType("not a supported image")


def check_source(size: int, head: bytes, limits: Limits, fetched: bool) -> str:
    """The source's type, after the checks that need no decode: 415 (or 502 for the origin)
    when it is not a supported image, 422 when too big in bytes or pixels."""
    if size > limits.max_source_bytes:
        raise UnprocessableImage("image file too large")
    kind = sniff.sniff(head[: sniff.SNIFF_BYTES])
    if kind is None:
        raise not_an_image(fetched)
    dims = sniff.dimensions(head, kind)
    if dims is not None and dims[0] * dims[1] > limits.max_source_pixels:
        raise UnprocessableImage(f"image too large: {dims[0]}x{dims[1]} is over the pixel limit")
    return kind


def execute(job: Job, limits: Limits, encode: EncodeOptions) -> Rendered:
    """One render, in a thread or a render process: read (capped), sniff, limits, render."""
    source_id: tuple[Hashable, ...] | None
    if job.data is not None:
        data, source_id = job.data, transform.CONTENT
    else:
        assert job.path is not None
        source_id = file_identity(job.path) if transform.decoded_memo else None
        data = read_capped(job.path, limits.max_source_bytes)
    kind = check_source(job.size, data, limits, job.data is not None)
    plan = replace(render_plan(job.spec, kind, limits, encode), source_id=source_id)
    return transform.render(data, plan)


def file_identity(path: str) -> tuple[str, int, int, int, int] | None:
    """A local file's identity for the decoded memo, from a stat *before* the read: a file
    replaced meanwhile can only put its new pixels under its old identity, which no later
    stat gives. None (not memoised) when the file changed in the last `SETTLE_NS`: a
    filesystem's coarse timestamps could give a rewrite within one tick the same mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # the read says what is wrong
    if time.time_ns() - st.st_mtime_ns < SETTLE_NS:
        return None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def tune_allocator() -> bool:
    """Keep a render's big buffers (the source's bytes, ~3 MB for a 12 MP photo; libvips'
    regions) on the heap, reused by the next render, instead of glibc's default: a fresh
    mmap per buffer that the kernel zeroes page by page and unmaps at free, ~2 ms of system
    time per W2 render. Fixed thresholds also stop glibc's own sliding ones, which trim the
    heap between renders. False where there is no glibc `mallopt` (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_BELOW)) and bool(
        mallopt(m_trim_threshold, TRIM_ABOVE)
    )


def render_plan(output: Output, kind: str, limits: Limits, encode: EncodeOptions) -> transform.Plan:
    """The render of a resolved output, for a source of the sniffed `kind`: transform
    resolves `box` against the decoded header itself (`geometry.fit`, the same arithmetic
    the key was built with)."""
    return transform.Plan(
        source_type=kind,
        format=output.format,
        encode=encode,
        max_pixels=limits.max_source_pixels,
        algorithm=output.algorithm,
        bw=output.bw,
        box=output.box,
        quality=output.quality,
        background=output.background,
        recompress=output.recompress,
    )


# -- the render process's side -------------------------------------------------------------


def renderer(settings: Settings) -> Callable[[tuple[Job, bool]], Rendered]:
    """In a new render process: set libvips up, return the function that renders a job."""
    transform.configure(settings.limits.vips_concurrency)
    tune_allocator()
    with contextlib.suppress(OSError):
        os.nice(RENDER_NICE)
    limits, encode = settings.limits, settings.encode
    transform.configure_memo(settings.cache.decoded_size // limits.transform_threads)

    def render(item: tuple[Job, bool]) -> Rendered:
        job, spilled = item
        if spilled:  # a fetched body the worker wrote to tmpfs: the bytes, as fetched
            assert job.path is not None
            job = replace(job, data=read_file(job.path), path=None)
        return execute(job, limits, encode)

    return render
