"""Admission: at most `threads` renders at once over all workers of the instance (a
multiprocessing.BoundedSemaphore acquired in the render thread, never on the event loop)
and at most `queue` more waiting: beyond, 503.

The instance-wide primitives are made by the main process (`shared_primitives()`, in
Sanic's `main_process_start`) and reach the workers through `app.shared_ctx`. Each worker
writes only its own slot of the `held`/`moving`/`pending` arrays, so when a worker dies the
main process can give its permits back: `release_worker(shared_ctx, index)`. A SIGKILL can
land anywhere, so the bookkeeping is ordered for that: `moving` counts a worker's threads
inside an acquire or a release (marked before the semaphore is touched, cleared after
`held` is updated), so a dead worker's permits are `held` for sure plus at most `moving`
more, which `settle()` finds from the semaphore's own count. Without the shared primitives
(one in-process server, tests) the same classes run on thread-local equivalents.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import MutableSequence
from typing import Any

from .errors import Overloaded

log = logging.getLogger("imgproxy")

SLOT_WAIT = 30.0  # seconds a queued render waits for a permit before its 503


def shared_primitives(threads: int, workers: int) -> dict[str, Any]:
    """The instance's render permits and per-worker counts. Call in the main process only
    (Sanic's `main_process_start`): made anywhere earlier, multiprocessing objects fix the
    start method to `fork` and Sanic refuses to start."""
    ctx = multiprocessing.get_context("spawn")
    slots = workers * 2 + 8  # room for restarted and scaled workers (Sanic-Server-<n>-0)
    return {
        "flight_slots": ctx.BoundedSemaphore(threads),
        "flight_held": ctx.RawArray("i", slots),  # permits held, per worker
        "flight_moving": ctx.RawArray("i", slots),  # threads inside acquire/release
        "flight_pending": ctx.RawArray("i", slots),  # renders admitted (queued + running)
    }


def _give_back(slots: Any, n: int) -> int:
    released = 0
    for _ in range(max(0, n)):
        try:
            slots.release()
        except ValueError:  # already full: nothing (more) was missing
            break
        released += 1
    return released


def release_worker(shared_ctx: Any, index: int) -> tuple[int, int]:
    """Give back what worker `index` held when it died (call from the main process, e.g. a
    watchdog, before the worker is replaced: the new one reuses the slot). Returns (permits
    released, permits that may also have been lost: threads that were inside an acquire or
    a release when it died; `settle()` decides those)."""
    held: Any = getattr(shared_ctx, "flight_held", None)
    moving: Any = getattr(shared_ctx, "flight_moving", None)
    pending: Any = getattr(shared_ctx, "flight_pending", None)
    slots: Any = getattr(shared_ctx, "flight_slots", None)
    if None in (held, moving, pending, slots) or not 0 <= index < len(held):
        return 0, 0
    n, unsure = held[index], moving[index]
    held[index] = moving[index] = pending[index] = 0
    return _give_back(slots, n), max(0, unsure)


def reclaim(shared_ctx: Any, index: int, threads: int) -> int:
    """Everything worker `index` held when it died, given back (main process, before the
    worker is replaced). Returns the number of permits released."""
    released, unsure = release_worker(shared_ctx, index)
    return released + settle(shared_ctx, threads, unsure)


def missing_permits(shared_ctx: Any, threads: int) -> int | None:
    """Permits neither free nor counted in `held`, at one moment; None when a count changed
    during the look. Never too low: a live thread between its semaphore call and its count
    can only make it higher, for the microseconds it takes."""
    held, slots = shared_ctx.flight_held, shared_ctx.flight_slots
    before = sum(held)
    free = slots.get_value()
    return threads - free - before if sum(held) == before else None


def settle(shared_ctx: Any, threads: int, unsure: int, looks: int = 5, gap: float = 0.02) -> int:
    """Main process, after `release_worker` said `unsure` permits of a dead worker may be
    lost: release the ones that are missing in every one of `looks` looks (a live worker's
    thread between its semaphore call and its count is there for microseconds; a lost permit
    stays missing), never more than `unsure`. Returns the number released."""
    if unsure <= 0 or getattr(shared_ctx, "flight_slots", None) is None:
        return 0
    lost, seen = unsure, 0
    for _ in range(looks * 20):
        missing = missing_permits(shared_ctx, threads)
        if missing is None:
            continue  # a count moved meanwhile: look again
        lost, seen = min(lost, missing), seen + 1
        if lost <= 0:
            return 0
        if seen == looks:
            return _give_back(shared_ctx.flight_slots, lost)
        time.sleep(gap)
    return 0  # never a quiet look: keep the permits rather than hand out one too many


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
        moving: MutableSequence[int] | None = None,
    ) -> None:
        shared = None not in (slots, held, pending, moving)
        if not shared or not 0 <= index < len(held or ()):
            slots, held, pending, moving = threading.BoundedSemaphore(threads), [0], [0], [0]
            index = 0
            self.shared = False
        else:
            self.shared = True
        self.threads = threads
        self.capacity = threads + queue
        self.slots = slots
        self.held: MutableSequence[int] = held  # type: ignore[assignment]
        self.moving: MutableSequence[int] = moving  # type: ignore[assignment]
        self.pending: MutableSequence[int] = pending  # type: ignore[assignment]
        self.index = index
        self._lock = threading.Lock()  # this worker's threads update held[index]

    @classmethod
    def for_worker(cls, shared_ctx: Any, threads: int, queue: int, index: int) -> Admission:
        """Worker `index`'s view of the primitives in `shared_ctx` (see shared_primitives)."""
        return cls(
            threads,
            queue,
            getattr(shared_ctx, "flight_slots", None),
            getattr(shared_ctx, "flight_held", None),
            getattr(shared_ctx, "flight_pending", None),
            index,
            getattr(shared_ctx, "flight_moving", None),
        )

    @classmethod
    def from_shared(cls, shared_ctx: Any, threads: int, queue: int) -> Admission:
        index = worker_index()
        admission = cls.for_worker(shared_ctx, threads, queue, -1 if index is None else index)
        if not admission.shared and index is not None:
            log.warning("render admission is per worker: no shared slot for worker %s", index)
        return admission

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

    # A SIGKILL may land between any two lines below. `moving` goes up before the semaphore
    # is touched and down only after `held` says what happened, so at every point a dead
    # worker's permits are `held`, plus at most `moving` (see release_worker and settle).

    def acquire(self, wait: float = SLOT_WAIT) -> None:
        """In the executor thread: take one of the instance's render permits, or 503."""
        with self._lock:
            self.moving[self.index] += 1
        got = False
        try:
            got = self.slots.acquire(timeout=wait)
        finally:
            with self._lock:
                if got:
                    self.held[self.index] += 1
                self.moving[self.index] -= 1
        if not got:
            raise Overloaded()

    def release(self) -> None:
        with self._lock:
            self.moving[self.index] += 1
            self.held[self.index] -= 1
        try:
            self.slots.release()
        finally:
            with self._lock:
                self.moving[self.index] -= 1
