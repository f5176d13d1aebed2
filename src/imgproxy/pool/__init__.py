"""The render pool: at most `IMAGE_PROXY_TRANSFORM_THREADS` renders at once per instance, the
rest in one first-in, first-out queue for the whole instance, beyond
`IMAGE_PROXY_TRANSFORM_QUEUE` waiting: 503 (SPEC "Render queue").

    Job        what one render needs (picklable: it crosses a process boundary): the source's
               path (or a fallback origin's body), its size, the spec           (job.py)
    execute()  the render itself, wherever it runs: read (capped), sniff, limits, Plan,
               transform.render                                                 (job.py)
    Pool       `await pool.run(job) -> Rendered`, `close()`; three backends:
      ProcessPool  (default, IMAGE_PROXY_RENDER_POOL=processes) render processes behind the
                   instance's dispatcher (dispatcher.py): FIFO by construction, no render
                   waits on an HTTP loop's GIL, a worker or a render process that dies
                   loses nothing
      PermitPool   (IMAGE_PROXY_RENDER_POOL=threads) the worker renders in its own threads;
                   the permit comes from the same dispatcher, in the same FIFO order
      ThreadPool   one process without a main process (tests, `--single-process`): an
                   executor of `threads` threads is the FIFO queue

`start_instance()` runs in the main process (Sanic's `main_process_start`) and starts the
dispatcher; `open_pool()` runs in each worker and picks the backend from what it finds in
`app.shared_ctx`. The designs measured against each other: bench/README.md -> Render pool.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

from ..config import EncodeOptions, Limits, Settings
from ..errors import Overloaded
from ..metrics import Metrics
from ..transform import Rendered
from . import renderers
from .dispatcher import Dispatcher
from .job import SETTLE_NS, Job, check_source, execute, file_identity, renderer, tune_allocator

__all__ = [
    "SETTLE_NS",
    "SLOT_WAIT",
    "Job",
    "Pool",
    "check_source",
    "execute",
    "file_identity",
    "open_pool",
    "renderer",
    "start_instance",
]

SLOT_WAIT = 30.0  # seconds a queued render waits for its turn before its 503


def decoded_share(pool: Pool, settings: Settings) -> int:
    """The decoded memo of an HTTP worker (IMAGE_PROXY_DECODED_CACHE_SIZE is the
    instance's): none when render processes render, the worker's share when its threads
    do, all of it when it is the only process."""
    if isinstance(pool, ProcessPool):
        return 0
    if isinstance(pool, PermitPool):
        return settings.cache.decoded_size // settings.server.workers
    return settings.cache.decoded_size


class Pool(Protocol):
    async def run(self, job: Job) -> Rendered:
        """Render `job`: Overloaded (503) when the instance's queue is full or the job
        waited SLOT_WAIT; else what `execute` returns or raises, as the same class."""

    def close(self) -> None: ...


class _Tally:
    """One job in the gauges: queued until it starts, running until it ends; a refusal
    counted once."""

    __slots__ = ("metrics", "started")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics, self.started = metrics, False
        metrics.queue_depth.inc()

    def start(self) -> None:
        self.started = True
        self.metrics.queue_depth.dec()
        self.metrics.transforms_running.inc()

    def end(self, exc: BaseException | None) -> None:
        if self.started:
            self.metrics.transforms_running.dec()
        else:
            self.metrics.queue_depth.dec()
        if isinstance(exc, Overloaded):
            self.metrics.overloaded.inc()


class ThreadPool:
    """One process: `threads` executor threads are the permits, the executor's own queue
    is the FIFO queue; `queue` more may wait, beyond that 503."""

    def __init__(self, limits: Limits, encode: EncodeOptions, metrics: Metrics) -> None:
        self.limits, self.encode, self.metrics = limits, encode, metrics
        self.capacity = limits.transform_threads + limits.transform_queue
        self.executor = ThreadPoolExecutor(limits.transform_threads, "imgproxy-render")
        self.admitted = 0

    async def run(self, job: Job) -> Rendered:
        if self.admitted >= self.capacity:
            self.metrics.overloaded.inc()
            raise Overloaded()
        self.admitted += 1
        tally = _Tally(self.metrics)
        error = None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self._job, job, tally)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.admitted -= 1
            tally.end(error)

    def _job(self, job: Job, tally: _Tally) -> Rendered:
        tally.start()
        return execute(job, self.limits, self.encode)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class ProcessPool:
    """Render processes behind the instance's dispatcher (dispatcher.py)."""

    def __init__(self, address: str, metrics: Metrics) -> None:
        self.client = renderers.Client(address)
        self.metrics = metrics
        self.spill: str | None = None

    async def run(self, job: Job) -> Rendered:
        spilled = None
        if job.data is not None:  # a fetched body goes by path, not as a pickled copy
            if self.spill is None:
                self.spill = _spill_dir()
            spilled = await asyncio.get_running_loop().run_in_executor(
                None, _spill, self.spill, job.data
            )
            job = replace(job, data=None, path=spilled)
        tally = _Tally(self.metrics)
        error = None
        try:
            rendered: Rendered = await self.client.call((job, spilled is not None), tally.start)
            return rendered
        except BaseException as exc:
            error = exc
            raise
        finally:
            tally.end(error)
            if spilled is not None:
                os.unlink(spilled)

    def close(self) -> None:
        self.client.close()
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)


class PermitPool:
    """The worker renders in its own threads; the permit comes from the instance's queue."""

    def __init__(
        self, address: str, limits: Limits, encode: EncodeOptions, metrics: Metrics
    ) -> None:
        self.client = renderers.Client(address)
        self.limits, self.encode, self.metrics = limits, encode, metrics
        self.executor = ThreadPoolExecutor(limits.transform_threads, "imgproxy-render")

    async def run(self, job: Job) -> Rendered:
        tally = _Tally(self.metrics)
        error = None
        try:
            async with self.client.permit(tally.start):
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    self.executor, execute, job, self.limits, self.encode
                )
        except BaseException as exc:
            error = exc
            raise
        finally:
            tally.end(error)

    def close(self) -> None:
        self.client.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


# -- wiring ----------------------------------------------------------------------------------


def start_instance(settings: Settings) -> tuple[Dispatcher, dict[str, Any]]:
    """Main process: the dispatcher (and its render processes) and what the workers need to
    find it (`app.shared_ctx` entries)."""
    limits = settings.limits
    mode = "permits" if limits.render_pool == "threads" else "processes"
    dispatcher = Dispatcher(
        limits.transform_threads,
        limits.transform_queue,
        SLOT_WAIT,
        mode=mode,
        target=renderer,
        args=(settings,),
    )
    dispatcher.start()
    ctx = multiprocessing.get_context("spawn")
    address = ctx.RawArray("c", 256)
    address.value = f"{mode}:{dispatcher.address}".encode()
    return dispatcher, {"pool_address": address}


def open_pool(shared_ctx: Any, limits: Limits, encode: EncodeOptions, metrics: Metrics) -> Pool:
    """In a worker: the instance's pool when the main process made one, else threads."""
    raw = getattr(shared_ctx, "pool_address", None)
    if raw is not None and raw.value:
        mode, _, address = raw.value.decode().partition(":")
        if mode != "permits":
            return ProcessPool(address, metrics)
        pool: Pool = PermitPool(address, limits, encode, metrics)
    else:
        pool = ThreadPool(limits, encode, metrics)
    tune_allocator()  # this worker renders, in its own threads
    return pool


def _spill_dir() -> str:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="imgproxy-spill-", dir=base)


def _spill(directory: str, data: bytes) -> str:
    fd, path = tempfile.mkstemp(dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
