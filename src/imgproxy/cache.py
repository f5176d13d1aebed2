"""The transform cache: a per-worker memory tier in front of a disk tier shared by workers.

    MemoryTier  LRU bounded by bytes; items over max_item skip it; lives on the event loop
    DiskTier    diskcache (SQLite + files) bounded by size; blocking: call it from a thread
    TieredCache the two together; lookups memory -> disk (promote) -> miss

The disk tier never fails a request: an error, a full disk, an unwritable or deleted
directory degrade it (with one warning) instead. A deleted directory is noticed by the inode
of its database file (diskcache keeps writing into an unlinked SQLite file otherwise, and
workers silently split) and reopened once; if that fails the tier is dropped for the life of
the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import diskcache

log = logging.getLogger("imgproxy.cache")

Entry = tuple[bytes, str]  # (body, content type)


class MemoryTier:
    def __init__(self, max_bytes: int, max_item: int) -> None:
        self.max_bytes = max_bytes
        self.max_item = min(max_item, max_bytes)
        self.size = 0
        self._items: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Entry | None:
        entry = self._items.get(key)
        if entry is not None:
            self._items.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> bool:
        n = len(entry[0])
        if n > self.max_item or n == 0:
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= len(old[0])
        self._items[key] = entry
        self.size += n
        while self.size > self.max_bytes:
            _, (body, _) = self._items.popitem(last=False)
            self.size -= len(body)
        return True


class DiskTier:
    def __init__(
        self, path: str, size_limit: int, on_error: Callable[[], None] | None = None
    ) -> None:
        self.path = os.path.abspath(path)
        # The SQLite file's inode, not the directory's: we hold the database open, so its
        # inode cannot be reused by a new file while we compare (a directory's can).
        self._db = os.path.join(self.path, diskcache.core.DBNAME)
        self.size_limit = size_limit
        self.on_error = on_error or (lambda: None)
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
        self._cache = diskcache.Cache(
            self.path,
            size_limit=self.size_limit,
            eviction_policy="least-recently-stored",  # reads stay reads (LRU writes on every get)
            timeout=1.0,  # SQLite busy timeout: a contended write gives up instead of piling up
        )
        self._inode = os.stat(self._db).st_ino

    def _drop(self, why: str) -> None:
        if self.available:
            log.warning("disk cache disabled, serving from memory only: %s", why)
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
            log.warning("disk cache directory %s was deleted or replaced; reopening", self.path)
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
            self._cache.close()


class TieredCache:
    """memory -> disk -> miss. Memory calls are cheap (event loop); disk calls block."""

    def __init__(self, memory: MemoryTier, disk: DiskTier | None = None) -> None:
        self.memory = memory
        self.disk = disk

    def get_memory(self, key: str) -> Entry | None:
        return self.memory.get(key)

    def get_disk(self, key: str) -> Entry | None:
        return self.disk.get(key) if self.disk is not None else None

    def put_memory(self, key: str, entry: Entry) -> None:
        self.memory.put(key, entry)

    def put_disk(self, key: str, entry: Entry) -> None:
        if self.disk is not None:
            self.disk.put(key, entry)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
