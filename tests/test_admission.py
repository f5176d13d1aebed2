"""Admission primitives shared by processes: a SIGKILLed worker's render permits come back
with `reclaim` (what the main process's watchdog calls), wherever the kill landed."""

from __future__ import annotations

import multiprocessing
import os
import signal
from types import SimpleNamespace
from typing import Any

import pytest

from imgproxy import admission as adm
from imgproxy.errors import Overloaded


def admitted(admission: adm.Admission) -> int:
    """Renders admitted over all workers (queued + running)."""
    return sum(admission.pending)


def hold_two_permits(shared: dict[str, Any], ready: Any) -> None:
    """A worker (index 1) that takes two permits and never gives them back."""
    admission = adm.Admission.for_worker(SimpleNamespace(**shared), 3, 0, 1)
    admission.enter()
    admission.acquire()
    admission.acquire()
    ready.set()
    signal.pause()


def test_a_killed_workers_permits_are_given_back() -> None:
    ctx = multiprocessing.get_context("spawn")
    shared = adm.shared_primitives(threads=3, workers=2)
    ready = ctx.Event()
    worker = ctx.Process(target=hold_two_permits, args=(shared, ready))
    worker.start()
    try:
        assert ready.wait(60)
        os.kill(worker.pid or 0, signal.SIGKILL)
        worker.join(10)
    finally:
        if worker.is_alive():
            worker.kill()
    here = adm.Admission.for_worker(SimpleNamespace(**shared), 3, 0, 0)
    assert admitted(here) == 1  # the dead worker's queue place is still counted
    here.acquire(wait=0.05)  # the one permit it left
    with pytest.raises(Overloaded):
        here.acquire(wait=0.05)  # two leaked
    here.release()
    assert adm.reclaim(SimpleNamespace(**shared), 1, 3) == 2
    assert admitted(here) == 0
    for _ in range(3):
        here.acquire(wait=0.05)  # all three again
    assert adm.reclaim(SimpleNamespace(**shared), 1, 3) == 0  # nothing twice


def test_queue_bound_counts_every_worker() -> None:
    shared = adm.shared_primitives(threads=1, workers=2)
    a = adm.Admission.for_worker(SimpleNamespace(**shared), 1, 1, 0)
    b = adm.Admission.for_worker(SimpleNamespace(**shared), 1, 1, 1)
    a.enter()
    b.enter()  # one running + one queued, over two workers
    with pytest.raises(Overloaded):
        a.enter()
    with pytest.raises(Overloaded):
        b.enter()
    b.leave()
    a.enter()
    assert admitted(a) == 2


class DiesInside:
    """The shared semaphore, but the process is SIGKILLed right after it took a permit (or
    right before it gives one back): the kill lands between the semaphore and the count."""

    def __init__(self, real: Any, when: str) -> None:
        self.real, self.when = real, when

    def acquire(self, timeout: float) -> bool:
        got = bool(self.real.acquire(timeout=timeout))
        if self.when == "acquire":
            os.kill(os.getpid(), signal.SIGKILL)
        return got

    def release(self) -> None:
        if self.when == "release":
            os.kill(os.getpid(), signal.SIGKILL)
        self.real.release()


def die_between(shared: dict[str, Any], when: str) -> None:
    """Worker 1: holds one permit cleanly, then dies inside the bookkeeping of another."""
    ns = SimpleNamespace(**shared)
    admission = adm.Admission.for_worker(ns, 3, 0, 1)
    admission.acquire()
    admission.acquire()  # a second one, to give back below when `when` is release
    admission.slots = DiesInside(shared["flight_slots"], when)
    if when == "acquire":
        admission.acquire()
    else:
        admission.release()


@pytest.mark.parametrize("when", ["acquire", "release"])
def test_a_kill_inside_the_bookkeeping_loses_no_permit(when: str) -> None:
    """SIGKILL between `slots.acquire()` and the count (or between the count and
    `slots.release()`): the main process still gets every permit back, and no more."""
    ctx = multiprocessing.get_context("spawn")
    shared = adm.shared_primitives(threads=3, workers=2)
    ns = SimpleNamespace(**shared)
    other = adm.Admission.for_worker(ns, 3, 0, 0)
    worker = ctx.Process(target=die_between, args=(shared, when))
    worker.start()
    worker.join(60)
    assert worker.exitcode == -signal.SIGKILL
    # the dead worker held 3 (acquire) or 2 (release) permits, one of them not in its count
    dead_held = 3 if when == "acquire" else 2
    assert shared["flight_slots"].get_value() == 3 - dead_held
    assert adm.reclaim(ns, 1, 3) == dead_held
    for _ in range(3):
        other.acquire(wait=0.05)  # all three again
    with pytest.raises(Overloaded):
        other.acquire(wait=0.05)  # and not a fourth
    assert adm.reclaim(ns, 1, 3) == 0


def test_settle_never_returns_a_permit_a_live_worker_holds() -> None:
    """A live worker's permits are not "lost" even when a dead one was unsure."""
    shared = adm.shared_primitives(threads=2, workers=2)
    ns = SimpleNamespace(**shared)
    live = adm.Admission.for_worker(ns, 2, 0, 0)
    live.acquire()
    live.acquire()
    assert adm.settle(ns, 2, unsure=2) == 0
    assert shared["flight_slots"].get_value() == 0
