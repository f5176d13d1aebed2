"""The render pool: at most `transform_threads` renders at once per instance, a bounded queue
before them, 503 beyond.

    Job         what one render needs (picklable: it may cross a process boundary)
    execute()   the render itself: read (capped), sniff, limits, Plan, transform.render
    Pool.run()  admission (a place in the instance's queue, else 503) -> an executor thread:
                a permit of the instance (a multiprocessing.BoundedSemaphore acquired in the
                thread, never on the event loop) -> execute()
    Admission   the instance-wide counts behind it (admission.py)

The instance-wide counts and permits are `admission.Admission` (made by the main process,
shared by the workers).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import sniff, transform
from .admission import SLOT_WAIT, Admission, reclaim, shared_primitives
from .config import EncodeOptions, Limits
from .errors import (
    ImgProxyError,
    Overloaded,
    UnprocessableImage,
    UnsupportedMediaType,
    UpstreamError,
)
from .metrics import Metrics
from .params import Output
from .sources import read_capped
from .transform import Rendered

__all__ = ["SLOT_WAIT", "Admission", "Job", "Pool", "execute", "reclaim", "shared_primitives"]


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
    if job.data is not None:
        data = job.data
    else:
        assert job.path is not None
        data = read_capped(job.path, limits.max_source_bytes)
    kind = check_source(job.size, data, limits, job.data is not None)
    plan = render_plan(job.spec, kind, limits, encode)
    return transform.render(data, plan)


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


class Pool:
    """Today's design: instance-wide permits and a bounded queue (`Admission`) in front of
    a per-worker ThreadPoolExecutor (pyvips releases the GIL inside libvips)."""

    def __init__(
        self, limits: Limits, encode: EncodeOptions, metrics: Metrics, admission: Admission
    ) -> None:
        self.limits = limits
        self.encode = encode
        self.metrics = metrics
        self.admission = admission
        self.executor = ThreadPoolExecutor(limits.transform_threads, "imgproxy-vips")

    @classmethod
    def from_shared(
        cls, shared_ctx: Any, limits: Limits, encode: EncodeOptions, metrics: Metrics
    ) -> Pool:
        admission = Admission.from_shared(
            shared_ctx, limits.transform_threads, limits.transform_queue
        )
        return cls(limits, encode, metrics, admission)

    async def run(self, job: Job) -> Rendered:
        """Render `job`: Overloaded (503) when the instance's queue is full or no permit
        came within SLOT_WAIT; else what `execute` returns or raises."""
        try:
            self.admission.enter()
        except Overloaded:
            self.metrics.overloaded.inc()
            raise
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self._permitted, job)
        finally:
            self.admission.leave()

    def _permitted(self, job: Job) -> Rendered:
        """In an executor thread: a render permit of the instance, then the render."""
        self.metrics.queue_depth.inc()
        try:
            self.admission.acquire()
        except Overloaded:
            self.metrics.overloaded.inc()
            raise
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.transforms_running.inc()
        try:
            return execute(job, self.limits, self.encode)
        finally:
            self.metrics.transforms_running.dec()
            self.admission.release()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
