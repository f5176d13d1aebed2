"""One producer per key: in a worker, across the workers of an instance, across the fleet.

    SingleFlight    in-worker: identical concurrent calls share one task; a failure is
                    remembered for FAILURE_TTL (a negative entry), so a failing key is not
                    produced again and again
    once()          across workers or replicas: a `Lease` elects one producer; the others
                    wait for it, then take its result with `check()` or its failure from the
                    lease, and produce themselves when the holder died (its lease expires) or
                    after `wait_max`
    InstanceLease   the instance's backend: diskcache leases on tmpfs, polled off the loop
    (the fleet's backend is the Redis lock of `cache.FleetTier`)

A failure travels like a result: the holder writes it (status and public reason) where the
waiters look; they raise it at once instead of producing again. A failure that belongs to
the source (4xx, or a 502: the origin's body is no image) is kept FAILURE_TTL seconds, so
later requests get it too (a negative entry); our own 500 only SHARED_TTL, long enough for
the current waiters (a 500 may be transient: out of memory); a 503 (Overloaded) is this
moment's and is never shared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, TypeVar

from . import errors
from .errors import ImgProxyError, Overloaded

log = logging.getLogger("imgproxy")
T = TypeVar("T")

FAILURE_TTL = 5.0  # seconds a source's failure answers for its key instead of a re-render
SHARED_TTL = 1.0  # seconds our own failure (500) is kept: for the waiters of that flight
LEASE_TTL = 3.0  # seconds; the instance lease's holder refreshes it, a dead holder's expires
POLL_FIRST, POLL_MAX = 0.002, 0.02  # instance waiters' poll interval (each poll in a thread)


class Failure(NamedTuple):
    """What crosses processes of a failed producer."""

    status: int  # HTTP status
    reason: str  # the public one-line reason
    ttl: float = SHARED_TTL  # seconds it is kept for requests after this flight


Shared = tuple[int, str, float]  # a Failure as the backends return it


def failure_of(exc: BaseException, ttl: float = FAILURE_TTL) -> Failure | None:
    """What waiters elsewhere are told of `exc` (None: nothing, they try themselves), and
    for how long (`ttl` for the source's faults, SHARED_TTL for ours)."""
    if isinstance(exc, Overloaded) or not isinstance(exc, Exception):
        return None
    if not isinstance(exc, ImgProxyError):  # our own bug: a 500 for everyone, logged once
        return Failure(500, ImgProxyError.reason)
    if exc.status < 500 or exc.status == 502:
        return Failure(exc.status, exc.reason, ttl)
    return Failure(exc.status, exc.reason)


def revive(failure: Shared) -> ImgProxyError:
    """A fresh exception for a shared failure (never the same object twice: a re-raised
    exception keeps growing its traceback)."""
    status, reason = failure[0], failure[1]
    kind = _BY_STATUS.get(status, ImgProxyError)
    exc = kind(reason)
    exc.status = status
    return exc


_BY_STATUS: dict[int, type[ImgProxyError]] = {
    cls.status: cls
    for cls in (
        *errors.UpstreamError.__subclasses__(),
        *reversed(ImgProxyError.__subclasses__()),
    )
}


class SingleFlight:
    """Identical concurrent calls in one worker share one task. The task outlives a client
    that disconnects, so its result still reaches the cache. A failed key answers with its
    failure for `failure_ttl` seconds."""

    def __init__(self, failure_ttl: float = FAILURE_TTL) -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._failed: dict[str, tuple[float, Failure]] = {}  # key -> (expiry, failure)
        self.failure_ttl = failure_ttl

    def __len__(self) -> int:
        return len(self._inflight)

    async def run(self, key: str, produce: Callable[[], Awaitable[T]]) -> T:
        task = self._inflight.get(key)
        if task is None:
            failed = self._failed.get(key)
            if failed is not None:
                if failed[0] > time.monotonic():
                    raise revive(failed[1])
                del self._failed[key]
            task = asyncio.ensure_future(produce())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        result: T = await asyncio.shield(task)
        return result

    def _done(self, key: str, task: asyncio.Future[Any]) -> None:
        self._inflight.pop(key, None)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: no "exception was never retrieved" noise
        failure = failure_of(exc, self.failure_ttl) if exc is not None else None
        if failure is not None and failure.ttl > SHARED_TTL:  # this flight's waiters have it
            now = time.monotonic()
            if len(self._failed) >= 1024:  # bounded: drop the expired, else all
                self._failed = {k: v for k, v in self._failed.items() if v[0] > now}
                if len(self._failed) >= 1024:
                    self._failed.clear()
            self._failed[key] = (now + failure.ttl, failure)


class Lease(Protocol):
    """A named lock with an expiry, shared by workers (or replicas)."""

    refresh_every: float  # the holder extends its lease this often while it produces
    wait_max: float  # a waiter produces itself after this long, whatever the holder does

    async def acquire(self, key: str) -> str | None:
        """A token: ours. None: held by another. "": cannot coordinate, go alone."""

    async def refresh(self, key: str, token: str) -> None: ...

    async def release(self, key: str, token: str, failure: Failure | None) -> None:
        """Give the lease up; `failure`: the producer failed, tell waiters for FAILURE_TTL."""

    async def wait(self, key: str, seconds: float) -> Shared | None:
        """Return when the holder may be done (or `seconds` passed): the caller re-checks.
        The holder's failure when it announced one."""

    async def failure(self, key: str) -> Shared | None:
        """A failure of this key's producer within the last FAILURE_TTL seconds."""


async def once(
    lease: Lease,
    key: str,
    check: Callable[[], Awaitable[T | None]],
    produce: Callable[[], Awaitable[T]],
) -> T:
    """`produce()` by one holder of `lease`; the others get its result through `check()`,
    or its failure."""
    deadline = time.monotonic() + lease.wait_max
    while True:
        token = await lease.acquire(key)
        if token is not None:
            if token:  # somebody may have finished between our lookup and our lease
                found = await check()
                failed = None if found is not None else await lease.failure(key)
                if found is not None or failed is not None:
                    await lease.release(key, token, None)
                    if failed is not None:
                        raise revive(failed)
                    return found  # type: ignore[return-value]
            return await _lead(lease, key, token, produce)
        failed = await lease.wait(key, deadline - time.monotonic())
        if failed is not None:
            raise revive(failed)
        found = await check()
        if found is not None:
            return found
        failed = await lease.failure(key)
        if failed is not None:
            raise revive(failed)
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
    failure: Failure | None = None
    try:
        return await produce()
    except BaseException as exc:
        failure = failure_of(exc)
        raise
    finally:
        keeper.cancel()
        await lease.release(key, token, failure)


class LeaseStore(Protocol):
    """The instance's lease table (`cache.Leases`: a diskcache on tmpfs). Blocking."""

    def acquire(self, key: str, token: str, ttl: float) -> bool | None: ...
    def refresh(self, key: str, token: str, ttl: float) -> None: ...
    def release(self, key: str, token: str) -> None: ...
    def held(self, key: str) -> bool: ...
    def mark(self, key: str, value: Any, ttl: float) -> None: ...
    def marked(self, key: str) -> Any: ...


class InstanceLease:
    """Lease over the instance's lease table. Every call runs in `executor` (SQLite: never
    on the event loop); waiters poll with short async sleeps until the lease is gone, the
    value is there (`ready(key)`, also blocking) or the holder's failure is."""

    refresh_every = LEASE_TTL / 3
    wait_max = 60.0

    def __init__(
        self, leases: LeaseStore, ready: Callable[[str], bool], executor: ThreadPoolExecutor
    ) -> None:
        self.leases = leases
        self.ready = ready
        self.executor = executor

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def acquire(self, key: str) -> str | None:
        token = f"{os.getpid()}-{secrets.token_hex(8)}"
        attempt = asyncio.get_running_loop().run_in_executor(
            self.executor, self.leases.acquire, key, token, LEASE_TTL
        )
        try:
            got = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # a waiter cancelled while its insert runs in the thread: a lease it gets after
            # all is given back at once, not held until it expires
            attempt.add_done_callback(lambda f: self._abandon(f, key, token))
            raise
        if got is None:
            return ""  # the lease store failed: produce without coordination
        return token if got else None

    def _abandon(self, attempt: asyncio.Future[bool | None], key: str, token: str) -> None:
        if not attempt.cancelled() and attempt.exception() is None and attempt.result():
            self.executor.submit(self.leases.release, key, token)

    async def refresh(self, key: str, token: str) -> None:
        await self._run(self.leases.refresh, key, token, LEASE_TTL)

    async def release(self, key: str, token: str, failure: Failure | None) -> None:
        await self._run(self._release, key, token, failure)

    def _release(self, key: str, token: str, failure: Failure | None) -> None:
        if failure is not None:  # before the lease goes: a waiter that sees it gone sees this
            self.leases.mark("failed:" + key, (failure.status, failure.reason), failure.ttl)
        self.leases.release(key, token)

    async def failure(self, key: str) -> Failure | None:
        return _as_failure(await self._run(self.leases.marked, "failed:" + key))

    async def wait(self, key: str, seconds: float) -> Failure | None:
        end = time.monotonic() + seconds
        delay = POLL_FIRST
        while time.monotonic() < end:
            await asyncio.sleep(delay)
            if await self._run(self._settled, key):
                return None  # the caller's check() and failure() tell which
            delay = min(delay * 2, POLL_MAX)
        return None

    def _settled(self, key: str) -> bool:
        return not self.leases.held(key) or self.ready(key)


def _as_failure(value: Any) -> Failure | None:
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and isinstance(value[0], int)
        and isinstance(value[1], str)
    ):
        return Failure(int(value[0]), value[1])
    return None
