"""The decoded-source memo: a JPEG's DCT-scaled pixels, kept for the next render of the same
source at the same scale (issue 17, "decoded-source memo").

A 12 MP JPEG rendered to 400 px spends ~85 % of its CPU in the 1/8 decode; front-ends ask
for many outputs of one source within minutes (srcset widths x formats x DPR), and each of
those renders decodes the same file again. One memo per process that renders, byte-bounded
(least recently used first out), keyed by the source's identity and the shrink factor:

    a local file      (path, st_dev, st_ino, st_size, st_mtime_ns) from one stat before
                      the read (pool.execute): a file replaced or rewritten is a new key
    bytes (fallback)  ("sha256", digest): ~2 ms for 3 MB, computed only when the memo
                      applies, against ~27 ms for the decode it saves

Only simplejpeg's decodes at shrink 2, 4 or 8 are kept (a full decode of a big image is too
large to keep); an entry over a quarter of the memo is never kept. The buffers are made
read-only by fastcodecs (libvips only reads them) and a render holds its own reference
(`Work.pixels`), so an eviction during a render frees nothing in use. The memo only saves
a decode: the pixels, and so the output bytes, are the ones a decode would give.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Hashable

from cachetools import LRUCache

from ..fastcodecs import Pixels

CONTENT: tuple[Hashable, ...] = ("content",)  # Plan.source_id: identify the bytes by their digest


def _size(pixels: Pixels) -> int:
    return pixels.nbytes


class DecodedMemo(LRUCache[Hashable, Pixels]):
    """cachetools' byte-bounded LRU (`len`, `currsize`), thread-safe for `get` and `put` (a
    threads-mode worker's render threads share it); `capacity` bytes, 0: off. `hits`,
    `misses` and `refused` count lookups and oversized entries."""

    def __init__(self, capacity: int) -> None:
        super().__init__(max(1, capacity), getsizeof=_size)
        self.capacity = capacity
        self.max_entry = capacity // 4
        self._lock = threading.Lock()
        self.hits = self.misses = self.refused = 0

    def __bool__(self) -> bool:  # on or off, not empty or not
        return self.capacity > 0

    def get(self, key: Hashable, default: None = None) -> Pixels | None:  # type: ignore[override]
        with self._lock:
            got = super().get(key)
            if got is None:
                self.misses += 1
            else:
                self.hits += 1
            return got

    def put(self, key: Hashable, pixels: Pixels) -> bool:
        """Keep `pixels` under `key` unless over a quarter of the memo; True if kept."""
        if pixels.nbytes > self.max_entry:
            with self._lock:
                self.refused += 1
            return False
        with self._lock:
            self[key] = pixels
        return True


def memo_key(source_id: tuple[Hashable, ...], data: bytes, shrink: int) -> Hashable:
    """The memo's key for a decode of `data` at 1/`shrink`: the source's identity, or the
    bytes' digest when the plan asked for it (`CONTENT`)."""
    if source_id == CONTENT:
        source_id = ("sha256", hashlib.sha256(data).digest())
    return (source_id, shrink)
