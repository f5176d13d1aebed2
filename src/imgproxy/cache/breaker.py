"""The fleet tier's circuit breaker: Redis is never needed to answer, so after TRIP
failures in a row no Redis I/O is tried while the breaker is open (0.5 s, doubling to 4 s per
failed probe), then one call per worker probes. Its state can live in shared memory (a
`multiprocessing.RawArray` made by the main process): one worker's failure then spares the
others the timeout, and the instance logs one warning per outage, not one per request.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, MutableSequence
from typing import Any

log = logging.getLogger("imgproxy.cache")

OPEN_FIRST, OPEN_MAX = 0.5, 4.0  # breaker open time: doubles per failed probe

# Breaker state slots (a RawArray('d', 3) shared by the workers, or a plain list)
_OPEN_UNTIL, _FAILURES, _DOWN = 0, 1, 2


def shared_breaker_state() -> Any:
    """Breaker state shared by the workers; call in the main process (main_process_start)."""
    return multiprocessing.get_context("spawn").RawArray("d", 3)


class Breaker:
    """Closed until TRIP consecutive failures (one slow answer on a busy machine is not an
    outage); then open for 0.5 s, doubling up to 4 s per failed probe; half-open: one call
    per worker probes, a success closes it."""

    TRIP = 2

    def __init__(self, state: MutableSequence[float] | None, on_error: Callable[[], None]) -> None:
        self.state: MutableSequence[float] = state if state is not None else [0.0, 0.0, 0.0]
        self.on_error = on_error
        self.probing = False

    @property
    def closed(self) -> bool:
        return self.state[_FAILURES] < self.TRIP

    def allow(self) -> bool:
        s = self.state
        if s[_FAILURES] < self.TRIP:
            return True
        if time.monotonic() < s[_OPEN_UNTIL] or self.probing:
            return False
        self.probing = True  # half-open: this call is the probe; the worker's others skip
        return True

    def success(self) -> None:
        self.probing = False
        s = self.state
        if s[_FAILURES]:
            s[_FAILURES] = s[_OPEN_UNTIL] = 0.0
            if s[_DOWN]:
                s[_DOWN] = 0.0
                log.warning("redis cache tier is reachable again")

    def failure(self, exc: BaseException) -> None:
        self.probing = False
        self.on_error()
        s = self.state
        n = s[_FAILURES] + 1
        s[_FAILURES] = n
        if n < self.TRIP:
            return
        s[_OPEN_UNTIL] = time.monotonic() + min(OPEN_MAX, OPEN_FIRST * 2 ** (n - self.TRIP))
        if not s[_DOWN]:
            s[_DOWN] = 1.0
            log.warning(
                "redis cache tier unavailable, serving without it (retrying in the background): %s",
                describe(exc),
            )


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
