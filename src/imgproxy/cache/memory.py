"""MemoryTier: a per-process LRU bounded by bytes (the hot tier, the passthrough file memo).
The LRU is cachetools', whose owner this package is (`cache.LRUCache` for other memos).

Lives on the event loop: no locks. Items over `max_item` (and empty ones) are not kept.
"""

from __future__ import annotations

from cachetools import LRUCache as LRUCache  # the LRU, for every memo of the package's users

Entry = tuple[bytes, str]  # (body, content type)


def body_size(entry: Entry) -> int:
    return len(entry[0])


class MemoryTier:
    def __init__(self, max_bytes: int, max_item: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self.max_item = min(max_item, self.max_bytes)
        self._items: LRUCache[str, Entry] = LRUCache(max(1, self.max_bytes), body_size)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        """Bytes held."""
        return int(self._items.currsize)

    def get(self, key: str) -> Entry | None:
        return self._items.get(key)

    def put(self, key: str, entry: Entry) -> bool:
        n = len(entry[0])
        if n > self.max_item or n == 0:
            return False
        self._items[key] = entry
        return True
