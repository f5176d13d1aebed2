"""CacheChain: the tiers in lookup order, promotion, bounded write-behind.

    lookup:  hot (this worker's LRU) -> shared (the instance's tmpfs tier, a thread: a
             SQLite read never runs on the event loop) -> disk (a thread) -> redis (async,
             bounded) -> miss
    a hit is copied into every tier above the one that answered (promotion)
    store:   after a render: hot now; shared awaited (it is what the other workers read);
             disk write-behind; the caller puts it into Redis while it holds the fleet lock

Blocking stores are written from small thread pools through `WriteBehind`: at most
`max_items` / `max_bytes` writes wait per store; beyond that a write is dropped (and
counted), never queued, so a slow disk cannot grow memory. Writes still waiting answer
lookups. `tier` names in facts and metrics: memory (hot or shared: both are the
instance's memory tier), disk, redis, miss. The instance's lease table (`leases`) is opened
here with the tiers; `flight.InstanceLease` coordinates over it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .fleet import FleetTier
from .memory import Entry, MemoryTier
from .store import Leases, Store

STORE_WAIT = 0.1  # seconds a render waits for its write into the instance's shared tier
MAX_DISK_READS = 16  # disk lookups waiting for a thread; beyond, the disk tier is skipped
WRITES_WAITING = 64  # write-behind per store and worker: writes waiting; beyond, dropped
SHARED_WRITE_BYTES = 16 << 20  # ... and their bytes, for the instance's shared tier
DISK_WRITE_BYTES = 32 << 20  # ... and for the disk tier


@dataclass(slots=True)
class Lookup:
    entry: Entry | None
    tier: str  # memory | disk | redis | miss
    consulted: list[tuple[str, bool]] = field(default_factory=list)  # (tier, hit), for metrics


@dataclass(eq=False)
class WriteBehind:
    """Background writes into one blocking store, bounded by count and bytes."""

    put: Callable[[str, Entry], bool]
    executor: ThreadPoolExecutor
    max_items: int
    max_bytes: int
    on_drop: Callable[[], None]
    pending: dict[str, Entry] = field(default_factory=dict)
    bytes: int = 0
    _futures: set[asyncio.Future[bool]] = field(default_factory=set)

    def get(self, key: str) -> Entry | None:
        return self.pending.get(key)

    def submit(self, key: str, entry: Entry) -> asyncio.Future[bool] | None:
        """The write's future, or None when it was dropped (queue full) or is already
        waiting."""
        if key in self.pending:
            return None
        n = len(entry[0])
        if len(self.pending) >= self.max_items or self.bytes + n > self.max_bytes:
            self.on_drop()
            return None
        self.pending[key] = entry
        self.bytes += n
        fut = asyncio.get_running_loop().run_in_executor(self.executor, self.put, key, entry)
        self._futures.add(fut)
        fut.add_done_callback(lambda f: self._done(f, key, n))
        return fut

    def _done(self, fut: asyncio.Future[bool], key: str, n: int) -> None:
        self._futures.discard(fut)
        self.pending.pop(key, None)
        self.bytes -= n
        if not fut.cancelled():
            fut.exception()

    async def drain(self) -> None:
        if self._futures:
            await asyncio.gather(*self._futures, return_exceptions=True)


class CacheChain:
    def __init__(
        self,
        hot: MemoryTier,
        *,
        shared: Store | None = None,
        disk: Store | None = None,
        fleet: FleetTier | None = None,
        leases: Leases | None = None,
        max_item: int,
        on_drop: Callable[[str], None] = lambda tier: None,
    ) -> None:
        self.hot = hot
        self.shared = shared
        self.disk = disk
        self.fleet = fleet
        self.max_item = max_item
        # tmpfs writes and leases; disk reads; disk writes: a disk that is slow to write
        # (busy, or its SQLite write lock held) never delays a lookup
        self._fast = ThreadPoolExecutor(2, thread_name_prefix="imgproxy-cache")
        self._shared_reads = ThreadPoolExecutor(2, thread_name_prefix="imgproxy-shared-read")
        self._reads = ThreadPoolExecutor(2, thread_name_prefix="imgproxy-disk-read")
        self._slow = ThreadPoolExecutor(2, thread_name_prefix="imgproxy-disk-write")
        self.shared_writes = (
            WriteBehind(
                shared.put,
                self._fast,
                WRITES_WAITING,
                SHARED_WRITE_BYTES,
                lambda: on_drop("memory"),
            )
            if shared is not None
            else None
        )
        self.disk_writes = (
            WriteBehind(
                disk.put, self._slow, WRITES_WAITING, DISK_WRITE_BYTES, lambda: on_drop("disk")
            )
            if disk is not None
            else None
        )
        self._disk_reads = 0
        # the instance's single-flight lease table, and the threads its calls run in
        self.leases = leases if leases is not None and leases.available else None
        self.lease_executor = self._fast
        self._leases = leases

    # -- lookup ---------------------------------------------------------------------------

    async def _memory_get(self, key: str) -> Entry | None:
        entry = self.hot.get(key)
        if entry is None and self.shared is not None and self.shared.available:
            entry = self._pending(self.shared_writes, key)
            if entry is None:
                loop = asyncio.get_running_loop()
                entry = await loop.run_in_executor(self._shared_reads, self.shared.get, key)
            if entry is not None:
                self.hot.put(key, entry)
        return entry

    @staticmethod
    def _pending(writes: WriteBehind | None, key: str) -> Entry | None:
        return writes.get(key) if writes is not None else None

    async def _disk_get(self, key: str) -> Entry | None:
        entry = self._pending(self.disk_writes, key)
        if entry is not None or self.disk is None:
            return entry
        if self._disk_reads >= MAX_DISK_READS:
            return None  # the disk is slow: skip it rather than queue behind it
        self._disk_reads += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._reads, self.disk.get, key)
        finally:
            self._disk_reads -= 1

    @property
    def has_memory(self) -> bool:
        return self.hot.max_bytes > 0 or self.shared is not None

    async def lookup(self, key: str) -> Lookup:
        consulted: list[tuple[str, bool]] = []
        entry = await self._memory_get(key)
        if self.has_memory:
            consulted.append(("memory", entry is not None))
        if entry is not None:
            return Lookup(entry, "memory", consulted)
        if self.disk is not None and self.disk.available:
            entry = await self._disk_get(key)
            consulted.append(("disk", entry is not None))
            if entry is not None:
                self._promote(key, entry, below_memory=False)
                return Lookup(entry, "disk", consulted)
        if self.fleet is not None and self.fleet.breaker.closed:
            entry = await self.fleet.get(key)
            consulted.append(("redis", entry is not None))
            if entry is not None:
                self._promote(key, entry, below_memory=True)
                return Lookup(entry, "redis", consulted)
        return Lookup(None, "miss", consulted)

    def stored(self, key: str) -> bool:
        """Blocking: is `key` in the instance's shared tier (a waiter's cheap poll)?"""
        return self.shared is not None and self.shared.contains(key)

    async def instance_check(self, key: str) -> Entry | None:
        """What another worker of this instance may have stored meanwhile (for waiters)."""
        entry = await self._memory_get(key)
        if entry is None and self.disk is not None and self.disk.available:
            entry = await self._disk_get(key)
            if entry is not None:
                self.hot.put(key, entry)
        return entry

    # -- store ----------------------------------------------------------------------------

    def _fits_memory(self, entry: Entry) -> bool:
        return 0 < len(entry[0]) <= self.max_item

    @staticmethod
    def _write(
        store: Store | None, writes: WriteBehind | None, key: str, entry: Entry
    ) -> asyncio.Future[bool] | None:
        if store is None or writes is None or not store.available:
            return None
        return writes.submit(key, entry)

    def _promote(self, key: str, entry: Entry, below_memory: bool) -> None:
        if self._fits_memory(entry):
            self.hot.put(key, entry)
            self._write(self.shared, self.shared_writes, key, entry)
        if below_memory:
            self._write(self.disk, self.disk_writes, key, entry)

    async def store(self, key: str, entry: Entry) -> None:
        """A fresh render (or a fleet result): visible to every worker of the instance when
        this returns (the caller still holds the instance lease)."""
        shared_write = None
        if self._fits_memory(entry):
            self.hot.put(key, entry)
            shared_write = self._write(self.shared, self.shared_writes, key, entry)
        disk_write = self._write(self.disk, self.disk_writes, key, entry)
        # What the other workers read: the shared tier, or (memory size 0, or an item too
        # big for memory) the disk tier. Waiting for it while the lease is still held spares
        # them a second render; a slow disk is not waited for longer than STORE_WAIT.
        if shared_write is None and self.leases is not None:
            shared_write = disk_write
        if shared_write is not None:
            await asyncio.wait({shared_write}, timeout=STORE_WAIT)

    # -- lifecycle ------------------------------------------------------------------------

    async def warm_up(self) -> None:
        if self.fleet is not None:
            await self.fleet.warm_up()

    async def drain(self) -> None:
        for writes in (self.shared_writes, self.disk_writes):
            if writes is not None:
                await writes.drain()

    async def close(self) -> None:
        await self.drain()
        if self.fleet is not None:
            await self.fleet.close()
        for pool in (self._fast, self._shared_reads, self._reads, self._slow):
            pool.shutdown(wait=True)
        for store in (self.shared, self.disk, self._leases):
            if store is not None:
                store.close()
