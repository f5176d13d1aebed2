"""One producer per key, in-process and fast: `SingleFlight`, `once()` over the instance's
lease (real diskcache leases in a temp dir) and over the fleet's (a real redis-server).

A failure travels like a result: the waiters of one flight get the holder's error at once,
and a source's failure answers for its key for a few seconds (a negative entry) instead of
a render per request. Every lease call runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from imgproxy import flight
from imgproxy.cache import FleetTier
from imgproxy.cache.store import Leases
from imgproxy.errors import NotFound, Overloaded, RenderFailed, UnprocessableImage, UpstreamError
from realredis import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture


class Producer:
    """A producer that counts its calls and fails (or answers) when told to."""

    def __init__(self, outcome: BaseException | str) -> None:
        self.outcome = outcome
        self.calls = 0
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        await self.go.wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


async def nothing() -> str | None:
    return None


class OffLoop:
    """The real lease table, recording the thread of every call (a blocking SQLite call on
    the event loop's thread would stall every request of the worker)."""

    def __init__(self, path: Path) -> None:
        self.leases = Leases(str(path))
        self.threads: set[int] = set()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.leases, name)

        def call(*args: Any) -> Any:
            self.threads.add(threading.get_ident())
            return fn(*args)

        return call


def instance_leases(path: Path, n: int) -> tuple[OffLoop, list[flight.InstanceLease]]:
    """`n` workers' leases over one lease table (each with its own threads, like workers)."""
    table = OffLoop(path)
    pools = [ThreadPoolExecutor(2) for _ in range(n)]
    return table, [flight.InstanceLease(table, lambda key: False, pool) for pool in pools]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_failure_reaches_every_waiter_at_once(tmp_path: Path) -> None:
    """The holder (one worker) fails with a 422: the waiter (another worker) raises the same
    error without producing, and no lease call ran on the event loop's thread."""

    async def main() -> None:
        table, (a, b) = instance_leases(tmp_path / "leases", 2)
        holder = Producer(UnprocessableImage("corrupt or truncated image"))
        waiter = Producer("should not run")
        first = asyncio.ensure_future(flight.once(a, "k", nothing, holder))
        await holder.started.wait()
        second = asyncio.ensure_future(flight.once(b, "k", nothing, waiter))
        await asyncio.sleep(0.05)  # the waiter polls the held lease meanwhile
        holder.go.set()
        for task in (first, second):
            with pytest.raises(UnprocessableImage, match="corrupt or truncated image"):
                await task
        assert (holder.calls, waiter.calls) == (1, 0)
        assert threading.get_ident() not in table.threads

        # a negative entry: the same key within FAILURE_TTL fails without a producer
        later = Producer("should not run either")
        with pytest.raises(UnprocessableImage):
            await flight.once(b, "k", nothing, later)
        assert later.calls == 0

    run(main())


@pytest.mark.parametrize(
    "error",
    [Overloaded(), RenderFailed()],
    ids=["503-is-this-moments", "500-is-ours"],
)
def test_our_own_failures_are_not_kept(tmp_path: Path, error: Exception) -> None:
    """A 503 is never a key's negative entry; our own 500 is kept only for its flight's
    waiters (SHARED_TTL), so a later request renders again."""

    async def main() -> None:
        _, (a,) = instance_leases(tmp_path / "leases", 1)
        failing = Producer(error)
        failing.go.set()
        with pytest.raises(type(error)):
            await flight.once(a, "k", nothing, failing)
        kept = await a.failure("k")
        if isinstance(error, Overloaded):
            assert kept is None
        else:
            assert kept is not None and kept[0] == 500
        single = flight.SingleFlight()
        with pytest.raises(type(error)):
            await single.run("k", failing)
        assert await single.run("k", _answer("ok")) == "ok"  # rendered again

    run(main())


def _answer(value: str) -> Callable[[], Awaitable[str]]:
    async def produce() -> str:
        return value

    return produce


def test_single_flight_remembers_a_source_failure() -> None:
    async def main() -> None:
        single = flight.SingleFlight(failure_ttl=60)
        failing = Producer(UpstreamError("fallback origin did not send a supported image"))
        failing.go.set()
        answers = await asyncio.gather(
            *(single.run("k", failing) for _ in range(5)), return_exceptions=True
        )
        assert failing.calls == 1 and all(isinstance(a, UpstreamError) for a in answers)
        again = Producer("not now")
        with pytest.raises(UpstreamError) as caught:
            await single.run("k", again)
        assert again.calls == 0 and caught.value.status == 502
        assert caught.value is not answers[0]  # a fresh exception: tracebacks do not pile up
        assert await single.run("other", _answer("ok")) == "ok"

    run(main())


def test_a_waiter_produces_when_the_holder_dies(tmp_path: Path) -> None:
    """A lease whose holder never releases it (a SIGKILLed worker) expires: a waiter then
    produces itself."""

    async def main() -> None:
        table, (b,) = instance_leases(tmp_path / "leases", 1)
        assert table.leases.acquire("k", "dead-worker", 0.2)
        waiter = Producer("mine")
        waiter.go.set()
        assert await flight.once(b, "k", nothing, waiter) == "mine"
        assert waiter.calls == 1

    run(main())


def test_cancelled_waiters_leave_the_lease_alone(tmp_path: Path) -> None:
    async def main() -> None:
        _, (a, b) = instance_leases(tmp_path / "leases", 2)
        holder = Producer("made")
        first = asyncio.ensure_future(flight.once(a, "k", nothing, holder))
        await holder.started.wait()
        waiters = [asyncio.ensure_future(flight.once(b, "k", nothing, holder)) for _ in range(3)]
        await asyncio.sleep(0.02)
        for w in waiters:
            w.cancel()
        holder.go.set()
        assert await first == "made"
        assert holder.calls == 1
        assert await a.acquire("k")  # released: free for the next producer

    run(main())


# -- the fleet's lease: a real redis-server ------------------------------------------------


def fleet(redis: RedisServer) -> FleetTier:
    return FleetTier(redis.url, ttl=60, prefix="t:", timeout=1.0)


def test_the_fleet_lock_hands_a_failure_to_its_waiters(redis_server: RedisServer) -> None:
    """Two replicas: the lock holder fails; the other replica's waiter reads the `ok=0` its
    release announced and raises the same error at once; a later request (another replica)
    gets the negative entry without producing."""

    async def main() -> None:
        a, b, c = fleet(redis_server), fleet(redis_server), fleet(redis_server)
        try:
            holder = Producer(UnprocessableImage("image too large: 9x9 is over the pixel limit"))
            waiter = Producer("should not run")
            first = asyncio.ensure_future(flight.once(a, "k", nothing, holder))
            await holder.started.wait()
            second = asyncio.ensure_future(flight.once(b, "k", nothing, waiter))
            await asyncio.sleep(0.05)
            holder.go.set()
            for task in (first, second):
                with pytest.raises(UnprocessableImage, match="over the pixel limit"):
                    await task
            assert (holder.calls, waiter.calls) == (1, 0)
            later = Producer("no")
            with pytest.raises(UnprocessableImage):
                await flight.once(c, "k", nothing, later)
            assert later.calls == 0
            assert await c.failure("other") is None
        finally:
            for tier in (a, b, c):
                await tier.close()

    run(main())


@pytest.fixture
def leases(tmp_path: Path) -> Iterator[Leases]:
    table = Leases(str(tmp_path / "leases"))
    assert table.available
    yield table
    table.close()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4)
    yield pool
    pool.shutdown()


def instance_lease(
    leases: Leases, executor: ThreadPoolExecutor, done: dict[str, bytes]
) -> flight.InstanceLease:
    """A lease whose `ready(key)` is "the value is in `done`" (the instance tier's role)."""
    return flight.InstanceLease(leases, lambda key: key in done, executor)


def test_single_flight_shares_one_task_and_outlives_a_cancelled_caller() -> None:
    calls = 0

    async def main() -> None:
        nonlocal calls
        sf = flight.SingleFlight()
        gate = asyncio.Event()

        async def produce() -> str:
            nonlocal calls
            calls += 1
            await gate.wait()
            return "rendered"

        first = asyncio.ensure_future(sf.run("k", produce))
        second = asyncio.ensure_future(sf.run("k", produce))
        await asyncio.sleep(0)
        assert len(sf) == 1
        first.cancel()  # a client that went away
        gate.set()
        assert await second == "rendered"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert len(sf) == 0

    asyncio.run(main())
    assert calls == 1


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (NotFound(), (404, NotFound.reason, flight.FAILURE_TTL)),
        (UnprocessableImage("corrupt image"), (422, "corrupt image", flight.FAILURE_TTL)),
        (ValueError("our bug"), (500, "internal error", flight.SHARED_TTL)),
        (Overloaded(), None),
        (asyncio.CancelledError(), None),
    ],
    ids=["source-404", "source-422", "our-500-briefly", "overload-never", "cancel-never"],
)
def test_what_waiters_are_told(exc: BaseException, expected: tuple[object, ...] | None) -> None:
    failure = flight.failure_of(exc)
    assert (tuple(failure) if failure else None) == expected
    if failure is not None:
        revived = flight.revive(failure)
        assert (revived.status, revived.reason) == failure[:2]


def test_once_elects_one_producer_and_the_waiters_take_its_result(
    leases: Leases, executor: ThreadPoolExecutor
) -> None:
    done: dict[str, bytes] = {}
    produced = 0

    async def main() -> list[bytes]:
        lease = instance_lease(leases, executor, done)

        async def check() -> bytes | None:
            return done.get("k")

        async def produce() -> bytes:
            nonlocal produced
            produced += 1
            await asyncio.sleep(0.05)  # the waiters find the lease held
            done["k"] = b"body"
            return b"body"

        return await asyncio.gather(*(flight.once(lease, "k", check, produce) for _ in range(4)))

    assert asyncio.run(main()) == [b"body"] * 4
    assert produced == 1
    assert not leases.held("k")  # the holder gave it back


def test_once_produces_alone_when_the_lease_table_fails(executor: ThreadPoolExecutor) -> None:
    """A lease table that cannot answer (its directory is gone) never costs the request."""
    broken = Leases("/proc/no/such/dir")
    assert not broken.available
    produced = 0

    async def main() -> bytes:
        lease = instance_lease(broken, executor, {})

        async def produce() -> bytes:
            nonlocal produced
            produced += 1
            return b"alone"

        async def check() -> bytes | None:
            return None

        return await flight.once(lease, "k", check, produce)

    assert asyncio.run(main()) == b"alone"
    assert produced == 1
