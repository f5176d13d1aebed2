"""Fault injection for tests/test_faults.py: a slow disk, in the server under test only (this
directory is put on its PYTHONPATH, so every process of it imports this at start).

IMGPROXY_TEST_SLOW_READS=<seconds>: every read of a cache store (diskcache `get` and `in`)
and every file read of more than 4 KiB (imgproxy's `read_file`) first sleeps that long, in
whatever thread it runs. Off the event loop that only slows the one request; on it, it
stalls every request of the worker, and asyncio's debug mode reports the slow callback.
A read made on a thread that runs an event loop also prints one line, `faultinject: read on
the event loop: ...`, whatever its timing.
"""

from __future__ import annotations

import os
import time
from typing import Any

DELAY = float(os.environ.get("IMGPROXY_TEST_SLOW_READS") or 0)
SMALL = 4096  # SPEC: reads up to a few KiB may run on the loop


def _slow(what: str) -> None:
    if asyncio_events._get_running_loop() is not None:
        print(f"faultinject: read on the event loop: {what}", file=sys.stderr, flush=True)
    time.sleep(DELAY)


if DELAY:
    import sys
    from asyncio import events as asyncio_events

    from diskcache import core

    import imgproxy.sources
    from imgproxy.sources import local

    _get, _contains, _read = core.Cache.get, core.Cache.__contains__, local.read_file

    def get(self: Any, *args: Any, **kwargs: Any) -> Any:
        _slow(f"diskcache get {self.directory}")
        return _get(self, *args, **kwargs)

    def contains(self: Any, key: Any) -> bool:
        _slow(f"diskcache contains {self.directory}")
        return bool(_contains(self, key))

    def read_file(path: str, limit: int | None = None) -> bytes:
        if limit is None or limit > SMALL:
            _slow(f"file {path} ({limit} bytes)")
        return _read(path, limit)

    core.Cache.get = get  # type: ignore[method-assign]
    core.Cache.__contains__ = contains  # type: ignore[method-assign]
    local.read_file = read_file
    imgproxy.sources.read_file = read_file  # type: ignore[attr-defined]
