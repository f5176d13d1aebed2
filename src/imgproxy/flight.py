"""Admission and single-flight: one bounded render queue per instance, one render per key.

    SingleFlight   in-worker: identical concurrent misses share one task (first, cheapest)
    once()         across workers or replicas: a `Lease` (the instance's diskcache lease,
                   the fleet's Redis lock) elects one producer; the others wait for it,
                   then take its result with `check()`, and produce themselves when the
                   holder died (its lease expires) or after `wait_max`
    Admission      at most `threads` renders at once over all workers of the instance
                   (a multiprocessing.BoundedSemaphore acquired in the executor thread,
                   never on the event loop) and at most `queue` more waiting: beyond, 503

The instance-wide primitives are made by the main process (`shared_primitives()`, in
Sanic's `main_process_start`) and reach the workers through `app.shared_ctx`. Each worker
writes only its own slot of the `held`/`pending` arrays, so when a worker dies the main
process can give its permits back: `release_worker(shared_ctx, index)`. Without them (one
in-process server, tests) the same classes run on thread-local equivalents.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableSequence
from typing import Any, Protocol, TypeVar

from .errors import Overloaded

log = logging.getLogger("imgproxy")
T = TypeVar("T")

SLOT_WAIT = 30.0  # seconds a queued render waits for a permit before its 503


# -- single-flight --------------------------------------------------------------------------


class SingleFlight:
    """Identical concurrent calls in one worker share one task. The task outlives a client
    that disconnects, so its result still reaches the cache."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def run(self, key: str, produce: Callable[[], Awaitable[T]]) -> T:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(produce())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        result: T = await asyncio.shield(task)
        return result

    def _done(self, key: str, task: asyncio.Future[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise


class Lease(Protocol):
    """A named lock with an expiry, shared by workers (or replicas)."""

    refresh_every: float  # the holder extends its lease this often while it produces
    wait_max: float  # a waiter produces itself after this long, whatever the holder does

    async def acquire(self, key: str) -> str | None:
        """A token: ours. None: held by another. "": cannot coordinate, go alone."""

    async def refresh(self, key: str, token: str) -> None: ...

    async def release(self, key: str, token: str, ok: bool) -> None: ...

    async def wait(self, key: str, seconds: float) -> None:
        """Return when the holder may be done (or `seconds` passed): the caller re-checks."""


async def once(
    lease: Lease,
    key: str,
    check: Callable[[], Awaitable[T | None]],
    produce: Callable[[], Awaitable[T]],
) -> T:
    """`produce()` by one holder of `lease`; the others get its result through `check()`."""
    deadline = time.monotonic() + lease.wait_max
    while True:
        token = await lease.acquire(key)
        if token is not None:
            if token:  # somebody may have finished between our lookup and our lease
                found = await check()
                if found is not None:
                    await lease.release(key, token, True)
                    return found
            return await _lead(lease, key, token, produce)
        await lease.wait(key, deadline - time.monotonic())
        found = await check()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            log.warning(
                "single-flight: waited %.0f s for another render; rendering", lease.wait_max
            )
            return await produce()


async def _lead(lease: Lease, key: str, token: str, produce: Callable[[], Awaitable[T]]) -> T:
    if not token:
        return await produce()

    async def keep() -> None:
        while True:
            await asyncio.sleep(lease.refresh_every)
            await lease.refresh(key, token)

    keeper = asyncio.ensure_future(keep())
    ok = False
    try:
        result = await produce()
        ok = True
        return result
    finally:
        keeper.cancel()
        await lease.release(key, token, ok)


# -- admission ------------------------------------------------------------------------------


def shared_primitives(threads: int, workers: int) -> dict[str, Any]:
    """The instance's render permits and per-worker counts. Call in the main process only
    (Sanic's `main_process_start`): made anywhere earlier, multiprocessing objects fix the
    start method to `fork` and Sanic refuses to start."""
    ctx = multiprocessing.get_context("spawn")
    slots = workers * 2 + 8  # room for restarted and scaled workers (Sanic-Server-<n>-0)
    return {
        "flight_slots": ctx.BoundedSemaphore(threads),
        "flight_held": ctx.RawArray("i", slots),  # permits held, per worker
        "flight_pending": ctx.RawArray("i", slots),  # renders admitted (queued + running)
    }


def release_worker(shared_ctx: Any, index: int) -> int:
    """Give back what worker `index` held when it died (call from the main process, e.g. a
    watchdog, before the worker is replaced). Returns the number of permits released."""
    held = getattr(shared_ctx, "flight_held", None)
    pending = getattr(shared_ctx, "flight_pending", None)
    slots = getattr(shared_ctx, "flight_slots", None)
    if held is None or pending is None or slots is None or not 0 <= index < len(held):
        return 0
    n, held[index], pending[index] = held[index], 0, 0
    released = 0
    for _ in range(max(0, n)):
        try:
            slots.release()
        except ValueError:  # already full: a permit was returned twice
            break
        released += 1
    return released


def worker_index() -> int | None:
    """This worker's number from Sanic's `SANIC_WORKER_NAME` (Sanic-Server-<n>-<m>)."""
    parts = os.environ.get("SANIC_WORKER_NAME", "").split("-")
    if len(parts) >= 3 and parts[0] == "Sanic" and parts[1] == "Server" and parts[2].isdigit():
        return int(parts[2])
    return None


class Admission:
    """At most `threads` renders at once and `queue` more waiting, over all the workers
    that share `slots`, `held` and `pending`."""

    def __init__(
        self,
        threads: int,
        queue: int,
        slots: Any = None,
        held: MutableSequence[int] | None = None,
        pending: MutableSequence[int] | None = None,
        index: int = 0,
    ) -> None:
        shared = slots is not None and held is not None and pending is not None
        if not shared or not 0 <= index < len(held or ()):
            slots, held, pending, index = threading.BoundedSemaphore(threads), [0], [0], 0
            self.shared = False
        else:
            self.shared = True
        self.threads = threads
        self.capacity = threads + queue
        self.slots = slots
        self.held: MutableSequence[int] = held  # type: ignore[assignment]
        self.pending: MutableSequence[int] = pending  # type: ignore[assignment]
        self.index = index
        self._lock = threading.Lock()  # this worker's threads update held[index]

    @classmethod
    def from_shared(cls, shared_ctx: Any, threads: int, queue: int) -> Admission:
        index = worker_index()
        admission = cls(
            threads,
            queue,
            getattr(shared_ctx, "flight_slots", None),
            getattr(shared_ctx, "flight_held", None),
            getattr(shared_ctx, "flight_pending", None),
            index if index is not None else -1,
        )
        if not admission.shared and index is not None:
            log.warning("render admission is per worker: no shared slot for worker %s", index)
        return admission

    def admitted(self) -> int:
        return sum(self.pending)

    def enter(self) -> None:
        """On the event loop, before submitting a render: count it, or refuse (503). The
        count goes up first, so two workers racing for the last place both see it taken
        (a rare spurious 503), never both get it."""
        self.pending[self.index] += 1
        if sum(self.pending) > self.capacity:
            self.pending[self.index] -= 1
            raise Overloaded()

    def leave(self) -> None:
        self.pending[self.index] -= 1

    def acquire(self, wait: float = SLOT_WAIT) -> None:
        """In the executor thread: take one of the instance's render permits, or 503."""
        if not self.slots.acquire(timeout=wait):
            raise Overloaded()
        with self._lock:
            self.held[self.index] += 1

    def release(self) -> None:
        with self._lock:
            self.held[self.index] -= 1
        self.slots.release()
