"""Admission primitives shared by processes: a SIGKILLed worker's render permits come back
with `release_worker` (what the main process's watchdog calls)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from types import SimpleNamespace
from typing import Any

import pytest

from imgproxy import flight
from imgproxy.errors import Overloaded


def hold_two_permits(shared: dict[str, Any], ready: Any) -> None:
    """A worker (index 1) that takes two permits and never gives them back."""
    admission = flight.Admission(
        3, 0, shared["flight_slots"], shared["flight_held"], shared["flight_pending"], 1
    )
    admission.enter()
    admission.acquire()
    admission.acquire()
    ready.set()
    signal.pause()


def test_a_killed_workers_permits_are_given_back() -> None:
    ctx = multiprocessing.get_context("spawn")
    shared = flight.shared_primitives(threads=3, workers=2)
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
    here = flight.Admission(
        3, 0, shared["flight_slots"], shared["flight_held"], shared["flight_pending"], 0
    )
    assert here.admitted() == 1  # the dead worker's queue place is still counted
    here.acquire(wait=0.05)  # the one permit it left
    with pytest.raises(Overloaded):
        here.acquire(wait=0.05)  # two leaked
    here.release()
    assert flight.release_worker(SimpleNamespace(**shared), 1) == 2
    assert here.admitted() == 0
    for _ in range(3):
        here.acquire(wait=0.05)  # all three again
    assert flight.release_worker(SimpleNamespace(**shared), 1) == 0  # nothing twice


def test_queue_bound_counts_every_worker() -> None:
    shared = flight.shared_primitives(threads=1, workers=2)
    a = flight.Admission(
        1, 1, shared["flight_slots"], shared["flight_held"], shared["flight_pending"], 0
    )
    b = flight.Admission(
        1, 1, shared["flight_slots"], shared["flight_held"], shared["flight_pending"], 1
    )
    a.enter()
    b.enter()  # one running + one queued, over two workers
    with pytest.raises(Overloaded):
        a.enter()
    with pytest.raises(Overloaded):
        b.enter()
    b.leave()
    a.enter()
    assert a.admitted() == 2
