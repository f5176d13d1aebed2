"""MemoryTier: a per-process LRU bounded by bytes (the hot tier, the passthrough file memo).

Lives on the event loop: no locks. Items over `max_item` (and empty ones) are not kept.
"""

from __future__ import annotations

from collections import OrderedDict

Entry = tuple[bytes, str]  # (body, content type)


class MemoryTier:
    def __init__(self, max_bytes: int, max_item: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self.max_item = min(max_item, self.max_bytes)
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
