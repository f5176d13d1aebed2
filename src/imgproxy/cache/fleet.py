"""FleetTier: the Redis/Valkey tier shared by every replica, and its single-flight lock.

    get / put       one value per key: b"<content type>\\n<body>", SET ... EX ttl
    acquire         SET lock NX PX (a Lua script that also clears the old `done` stream)
    refresh         PEXPIRE lock, only while it is still ours (compare-and-expire)
    release         DEL lock only if it is still ours (compare-and-delete), then XADD `done`
                    (ok=1; or ok=0 with the failure's status and reason, also kept in
                    `fail` for a few seconds: the same failing key is not re-rendered)
    wait            XREAD BLOCK on `done` (a second client: its socket timeout is longer);
                    ok=0 hands the holder's failure to every waiter at once
    failure         GET `fail`

Redis is never needed to answer. Every call is bounded by `asyncio.timeout` and socket
timeouts, with retries off. A value moves in time proportional to its size: `get` reads the
length and the first FIRST_BYTES in one round trip (most entries end there) and the rest, if
any, with a budget for its size, like `put`; big transfers use their own connections,
whose socket timeout is not the small-call one. A `rediss://` connection gets
TLS_CONNECT seconds for its handshake, not the 0.1 s of a call; two failures in a row open a circuit breaker (no Redis I/O
while open, 0.5 s doubling to 4 s, then one probe per worker), so a Redis that comes back
is used again within ~4 s. The breaker's state can live in shared memory (a `multiprocessing.RawArray`
made by the main process): one worker's failure then spares the others the timeout, and
the instance logs one warning per outage, not one per request or per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, MutableSequence
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from .breaker import Breaker, describe
from .memory import Entry

Failure = tuple[int, str, float]  # flight.Failure: (HTTP status, public reason, seconds kept)

log = logging.getLogger("imgproxy.cache")
T = TypeVar("T")

LOCK_TTL = 5.0  # seconds; the holder refreshes it, a dead holder's lock expires
DONE_TTL_MS = 60_000  # the `done` stream outlives the lock a little, for late waiters
WAIT_SLICE = 1.0  # one XREAD BLOCK; waiters re-check the lock and the value between
MAX_WAITERS = 16  # blocking XREADs per worker; more waiters poll instead
RATE = 20e6  # bytes per second a slow link still moves: a big value's extra time budget
FIRST_BYTES = 256 << 10  # read with the length in the first round trip of a `get`
MAX_BIG = 4  # connections per worker for big transfers
TLS_CONNECT = 1.0  # seconds for a TLS connection's set-up (TCP + handshake)

_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('del', KEYS[2])
  return 1
end
return 0
"""
_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
if ARGV[2] == '0' then
  redis.call('set', KEYS[3], ARGV[4] .. ' ' .. ARGV[5], 'PX', ARGV[6])
end
redis.call('xadd', KEYS[2], 'MAXLEN', '1', '*', 'ok', ARGV[2], 'status', ARGV[4], 'reason', ARGV[5])
redis.call('pexpire', KEYS[2], ARGV[3])
return 1
"""


def _failure(raw: object) -> Failure | None:
    """b"422 corrupt or truncated image" -> (422, "corrupt or truncated image")."""
    if not isinstance(raw, bytes):
        return None
    status, _, reason = raw.decode("utf-8", "replace").partition(" ")
    if not status.isdigit() or not 400 <= int(status) <= 599:
        return None
    return int(status), reason, 0.0


def connect_timeout(url: str, timeout: float) -> float:
    """A TLS handshake takes round trips and crypto on top of TCP's: not bounded by the
    small-call timeout (that would fail every connection to a distant `rediss://`)."""
    return max(timeout, TLS_CONNECT) if url.lower().startswith("rediss://") else timeout


def _client(url: str, max_connections: int, timeout: float, read_timeout: float | None) -> Any:
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,  # wait for a free connection at most this long
        socket_timeout=read_timeout,
        socket_connect_timeout=connect_timeout(url, timeout),
        retry=Retry(NoBackoff(), 0),  # the breaker retries, later
        health_check_interval=0,
    )
    return redis.asyncio.Redis(connection_pool=pool)


def _has_idle_connection(client: Any) -> bool:
    """Will the next command reuse a connected connection (no set-up to pay)? Reads
    redis-py's pool (private: an unknown pool counts as "must connect")."""
    idle: Any = getattr(client.connection_pool, "_available_connections", None) or ()
    return any(getattr(c, "is_connected", False) for c in idle)


class FleetTier:
    """The fleet's tier and lease: Redis behind a breaker (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        ttl: int,
        prefix: str,
        timeout: float,
        breaker_state: MutableSequence[float] | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.ttl = ttl
        self.prefix = prefix
        self.timeout = timeout
        self.on_error = on_error or (lambda: None)
        self.breaker = Breaker(breaker_state, self.on_error)
        self.refresh_every = LOCK_TTL / 3
        self.wait_max = 30.0  # a live, slow lock holder elsewhere: then render here anyway
        tls = url.lower().startswith("rediss://")
        self._connect = connect_timeout(url, timeout) if tls else 0.0  # added to a call's budget
        self._r = _client(url, 64, timeout, timeout)
        self._w = _client(url, MAX_WAITERS, timeout, WAIT_SLICE + timeout)
        # big values: no socket timeout of their own, each call's budget is sized for it
        self._big = _client(url, MAX_BIG, timeout, None)
        self._acquire = self._r.register_script(_ACQUIRE)
        self._refresh = self._r.register_script(_REFRESH)
        self._release = self._r.register_script(_RELEASE)
        self._waiters = asyncio.Semaphore(MAX_WAITERS)
        self._full_warned = False

    # -- keys: one hash tag per image, so a Redis Cluster keeps value, lock and stream together

    def _keys(self, key: str) -> tuple[str, str, str]:
        base = f"{self.prefix}{{{key}}}"
        return base, base + ":lock", base + ":done"

    def _fail_key(self, key: str) -> str:
        return f"{self.prefix}{{{key}}}:fail"

    async def _call(
        self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None, **kw: Any
    ) -> T | None:
        """`fn(*args)` within the timeout, or None (counted, breaker opened) if Redis fails."""
        if not self.breaker.allow():
            return None
        budget = timeout or self.timeout
        client = getattr(fn, "__self__", None)  # a client's method, or a script (on _r)
        if not hasattr(client, "connection_pool"):
            client = self._r
        if self._connect and not _has_idle_connection(client):
            budget += self._connect  # this call pays a TLS connection's set-up
        try:
            async with asyncio.timeout(budget):
                result = await fn(*args, **kw)
        except ResponseError as exc:  # the server answered: full (noeviction OOM), ...
            self.breaker.success()
            self.on_error()
            if not self._full_warned:
                self._full_warned = True
                log.warning("redis cache tier refused a command: %s", describe(exc))
            return None
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failure(exc)
            await self._drop_idle_connections()
            return None
        self.breaker.success()
        return result

    async def _drop_idle_connections(self) -> None:
        """After a failure every pooled connection is suspect (a restarted server closed
        them): reconnect fresh on the next probe instead of failing once per connection."""
        for client in (self._r, self._w, self._big):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await client.connection_pool.disconnect(inuse_connections=False)

    # -- values ---------------------------------------------------------------------------

    def _budget(self, nbytes: int) -> float:
        return self.timeout + nbytes / RATE  # a big value takes longer to move

    async def _head(self, name: str) -> tuple[int, bytes]:
        """The value's length and its first FIRST_BYTES, in one round trip."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.strlen(name)
            pipe.getrange(name, 0, FIRST_BYTES - 1)
            size, head = await pipe.execute()
        return int(size), bytes(head)

    async def get(self, key: str) -> Entry | None:
        name = self._keys(key)[0]
        got = await self._call(self._head, name, timeout=self._budget(FIRST_BYTES))
        if got is None or not got[0]:
            return None
        size, raw = got
        if size > len(raw):  # a big value: the rest, with a budget for its size
            rest = await self._call(
                self._big.getrange, name, len(raw), size - 1, timeout=self._budget(size)
            )
            if not isinstance(rest, bytes) or len(raw) + len(rest) != size:
                return None  # replaced or expired between the two reads
            raw += rest
        ctype, sep, body = raw.partition(b"\n")
        if not sep or not body or not ctype.startswith(b"image/"):
            return None
        return body, ctype.decode("ascii", "replace")

    async def put(self, key: str, entry: Entry) -> bool:
        body, ctype = entry
        value = ctype.encode("ascii") + b"\n" + body
        client = self._big if len(value) > FIRST_BYTES else self._r
        done = await self._call(
            client.set, self._keys(key)[0], value, ex=self.ttl, timeout=self._budget(len(value))
        )
        return bool(done)

    # -- the fleet-wide single-flight lock (flight.Lease) ----------------------------------

    async def acquire(self, key: str) -> str | None:
        """A token if the lock is (or may be) ours, None if another holds it. When the call
        fails the SET may still have landed: the caller renders and releases with the
        token all the same (a compare-and-delete, harmless if the lock is not ours)."""
        _, lock, done = self._keys(key)
        token = f"{os.getpid()}-{secrets.token_hex(8)}"
        got = await self._call(self._acquire, keys=[lock, done], args=[token, int(LOCK_TTL * 1000)])
        return None if got == 0 else token

    async def refresh(self, key: str, token: str) -> None:
        _, lock, _ = self._keys(key)
        await self._call(self._refresh, keys=[lock], args=[token, int(LOCK_TTL * 1000)])

    async def release(self, key: str, token: str, failure: Failure | None) -> None:
        _, lock, done = self._keys(key)
        status, reason, keep = failure or (0, "", 0.0)
        ok = 0 if failure else 1
        args = [token, ok, DONE_TTL_MS, status, reason, max(1, int(keep * 1000))]
        await self._call(self._release, keys=[lock, done, self._fail_key(key)], args=args)

    async def failure(self, key: str) -> Failure | None:
        return _failure(await self._call(self._r.get, self._fail_key(key)))

    async def wait(self, key: str, seconds: float) -> Failure | None:
        """Until the lock holder announces its result or failure (returned), or `seconds`
        pass."""
        seconds = min(seconds, WAIT_SLICE)
        if seconds <= 0:
            return None
        if self._waiters.locked() or not self.breaker.closed:
            await asyncio.sleep(min(seconds, 0.05))  # poll: the caller re-checks the value
            return None
        _, _, done = self._keys(key)
        async with self._waiters:
            streams = await self._call(
                self._w.xread,
                {done: "0-0"},
                count=1,
                block=max(1, int(seconds * 1000)),
                timeout=seconds + self.timeout,
            )
        try:  # [[stream, [(id, {b"ok": b"0", b"status": b"422", b"reason": b"..."})]]]
            fields = streams[0][1][0][1] if streams else {}
        except (IndexError, KeyError, TypeError):
            return None
        if fields.get(b"ok") != b"0":
            return None
        return _failure(fields.get(b"status", b"") + b" " + fields.get(b"reason", b""))

    async def warm_up(self) -> None:
        """At worker start: connect and load the scripts, so the first burst of requests
        does not pay connection set-up and NOSCRIPT round trips inside its timeouts."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(1.0, self.timeout) + self._connect):
                await self._r.ping()
                await self._w.ping()
                for script in (self._acquire, self._refresh, self._release):
                    await self._r.script_load(script.script)

    async def close(self) -> None:
        for client in (self._r, self._w, self._big):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await client.aclose(close_connection_pool=True)  # ours: from_url
