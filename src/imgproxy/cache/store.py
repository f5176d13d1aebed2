"""Store: one diskcache directory, shared by every worker that opens it.

Used twice: as the instance memory tier (a directory on tmpfs, /dev/shm) and as the disk
tier (IMAGE_PROXY_CACHE_DISK_PATH, survives restarts). `Leases` is a small diskcache next to
the instance tier that holds the single-flight leases (atomic `add` with an expiry).

A store never fails a request: an error, a full volume, an unwritable or deleted directory
degrade it (with one warning) instead. A deleted directory is noticed by the inode of its
database file (diskcache keeps writing into an unlinked SQLite file otherwise, and workers
silently split) and reopened once; if that fails the store is dropped for the life of the
worker. Eviction is least-recently-stored: with least-recently-used every read is a write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import diskcache

from .memory import Entry

log = logging.getLogger("imgproxy.cache")

# tmpfs pages are RAM: keep SQLite's write-ahead log small (it sits on top of size_limit;
# measured: ~4 MiB with the defaults, 1 MiB with these) and its per-connection page cache
# small (the mmap'd tmpfs pages are read in place).
WAL_HEADROOM = 1 << 20
TMPFS_PRAGMAS = {
    "sqlite_wal_autocheckpoint": 128,  # pages (4 KiB): checkpoint every ~512 KiB
    "sqlite_journal_size_limit": WAL_HEADROOM // 2,  # truncate the WAL to this after one
    "sqlite_cache_size": 256,  # pages per connection
}


class Store:
    def __init__(
        self,
        path: str,
        size_limit: int,
        *,
        name: str = "disk",
        tmpfs: bool = False,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.path = os.path.abspath(path)
        self.name = name
        # The SQLite file's inode, not the directory's: we hold the database open, so its
        # inode cannot be reused by a new file while we compare (a directory's can).
        self._db = os.path.join(self.path, diskcache.core.DBNAME)
        self.on_error = on_error or (lambda: None)
        self._options: dict[str, Any] = {
            "size_limit": size_limit,
            "eviction_policy": "least-recently-stored",  # reads stay reads
            # SQLite busy timeout: a contended write gives up (the write is dropped, a read
            # is a miss) instead of piling up; tmpfs writes take microseconds.
            "timeout": 0.05 if tmpfs else 1.0,
        }
        if tmpfs:
            self._options.update(TMPFS_PRAGMAS, sqlite_mmap_size=size_limit + (8 << 20))
        self.available = True
        self._lock = threading.Lock()
        self._cache: Any = None
        self._inode: int | None = None
        self._reopened = False
        try:
            self._open()
        except Exception as exc:  # unwritable, not a directory, corrupt database ...
            self._drop(f"cannot open {self.path}: {exc}")

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        self._cache = diskcache.Cache(self.path, **self._options)
        self._inode = os.stat(self._db).st_ino

    def _drop(self, why: str) -> None:
        if self.available:
            log.warning("%s cache tier disabled, serving without it: %s", self.name, why)
        self.available = False
        self.on_error()
        cache, self._cache = self._cache, None
        if cache is not None:
            with contextlib.suppress(Exception):
                cache.close()

    def _handle(self) -> Any:
        """The open cache, reopened once if its directory was deleted or replaced."""
        if not self.available:
            return None
        try:
            inode: int | None = os.stat(self._db).st_ino
        except OSError:
            inode = None
        if inode == self._inode:
            return self._cache
        with self._lock:
            if not self.available or inode == self._inode:
                return self._cache
            if self._reopened:
                self._drop(f"{self.path} was deleted or replaced again")
                return None
            log.warning(
                "%s cache directory %s was deleted or replaced; reopening", self.name, self.path
            )
            self._reopened = True
            old = self._cache
            try:
                self._open()
            except Exception as exc:
                self._drop(f"cannot reopen {self.path}: {exc}")
                return None
            if old is not None:
                with contextlib.suppress(Exception):
                    old.close()
            return self._cache

    def get(self, key: str) -> Entry | None:
        cache = self._handle()
        if cache is None:
            return None
        try:
            value, tag = cache.get(key, default=None, tag=True, retry=False)
        except diskcache.Timeout:
            return None  # busy: a miss, not a failure
        except Exception as exc:
            self._drop(f"read failed: {exc}")
            return None
        if not isinstance(value, bytes) or not isinstance(tag, str):
            return None
        return value, tag

    def contains(self, key: str) -> bool:
        cache = self._handle()
        try:
            return cache is not None and key in cache
        except Exception:
            return False

    def put(self, key: str, entry: Entry) -> bool:
        cache = self._handle()
        if cache is None:
            return False
        try:
            return bool(cache.set(key, entry[0], tag=entry[1], retry=False))
        except diskcache.Timeout:
            return False
        except Exception as exc:  # disk full, unwritable, ...
            self._drop(f"write failed: {exc}")
            return False

    def close(self) -> None:
        if self._cache is not None:
            with contextlib.suppress(Exception):
                self._cache.close()


class Leases:
    """Single-flight leases shared by the workers of one instance: `acquire` is one atomic
    SQLite insert that fails while an unexpired lease exists; a holder that dies loses its
    lease when it expires. Never evicted by size (its own database, policy `none`).

    Every call may block (SQLite): call them from a thread (`flight.InstanceLease` does)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cache: Any = None
        try:
            self._cache = diskcache.Cache(
                path, eviction_policy="none", timeout=0.05, **TMPFS_PRAGMAS
            )
        except Exception as exc:
            log.warning("instance single-flight leases unavailable (%s): %s", path, exc)

    @property
    def available(self) -> bool:
        return self._cache is not None

    def acquire(self, key: str, token: str, ttl: float) -> bool | None:
        """True: ours; False: somebody holds it; None: the lease store failed."""
        try:
            return bool(self._cache.add(key, token, expire=ttl, retry=False))
        except Exception:
            return None

    def refresh(self, key: str, token: str, ttl: float) -> None:
        """Extend the lease, only while it is still `token`'s (one that expired and was
        taken by another worker stays theirs)."""
        with contextlib.suppress(Exception), self._cache.transact(retry=False):
            if self._cache.get(key, retry=False) == token:
                self._cache.touch(key, expire=ttl, retry=False)

    def release(self, key: str, token: str) -> None:
        with contextlib.suppress(Exception), self._cache.transact(retry=False):
            if self._cache.get(key, retry=False) == token:
                self._cache.delete(key, retry=False)

    def held(self, key: str) -> bool:
        try:
            return self._cache.get(key, retry=False) is not None
        except Exception:
            return False

    def mark(self, key: str, value: object, ttl: float) -> None:
        """A short-lived note beside the leases (a failed producer's outcome)."""
        with contextlib.suppress(Exception):
            self._cache.set(key, value, expire=ttl, retry=False)

    def marked(self, key: str) -> object:
        try:
            return self._cache.get(key, retry=False)
        except Exception:
            return None

    def close(self) -> None:
        if self._cache is not None:
            with contextlib.suppress(Exception):
                self._cache.close()
