"""The transform cache: the whole tier chain, owned here (the only diskcache/redis user).

    hot      this worker's LRU (a slice of the memory budget)            memory.MemoryTier
    shared   the instance's memory tier: diskcache on tmpfs, every worker store.Store
    disk     IMAGE_PROXY_ENABLE_DISK_CACHE: diskcache, survives restarts store.Store
    redis    IMAGE_PROXY_REDIS_URL: every replica                        fleet.FleetTier

`chain.CacheChain` runs lookups, promotion and write-behind; `instance` sizes and makes the
tmpfs directory in the main process. `open_chain()` builds a worker's chain from settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableSequence

from ..config import Settings
from . import instance
from .breaker import shared_breaker_state
from .chain import CacheChain, Lookup
from .fleet import FleetTier
from .memory import Entry, LRUCache, MemoryTier
from .store import Leases, Store

__all__ = [
    "CacheChain",
    "Entry",
    "FleetTier",
    "LRUCache",
    "Lookup",
    "MemoryTier",
    "Store",
    "instance",
    "open_chain",
    "shared_breaker_state",
]

log = logging.getLogger("imgproxy.cache")


def open_chain(
    settings: Settings,
    *,
    breaker_state: MutableSequence[float] | None = None,
    on_error: Callable[[str], None] = lambda tier: None,
    on_drop: Callable[[str], None] = lambda tier: None,
) -> CacheChain:
    """A worker's chain (in `before_server_start`), over what the main process prepared."""
    c = settings.cache
    home = instance.from_environment()
    budget = instance.plan(c.memory_size, settings.server.workers, home is not None)
    shared = leases = None
    if home is not None:
        path, shared_bytes = home
        if shared_bytes:
            shared = Store(
                os.path.join(path, "memory"),
                instance.store_limit(shared_bytes),
                name="instance memory",
                tmpfs=True,
                on_error=lambda: on_error("memory"),
            )
        else:
            budget = instance.plan(c.memory_size, settings.server.workers, False)
        leases = Leases(os.path.join(path, "leases"))
    disk = None
    if c.disk_enabled:
        disk = Store(c.disk_path, c.disk_size, name="disk", on_error=lambda: on_error("disk"))
    fleet = None
    if c.redis_url:
        fleet = FleetTier(
            c.redis_url,
            ttl=c.redis_ttl,
            prefix=c.redis_prefix,
            timeout=c.redis_timeout,
            breaker_state=breaker_state,
            on_error=lambda: on_error("redis"),
        )
    return CacheChain(
        MemoryTier(budget.hot, c.max_item_size),
        shared=shared,
        disk=disk,
        fleet=fleet,
        leases=leases,
        max_item=c.max_item_size,
        on_drop=on_drop,
    )
