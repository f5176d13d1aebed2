"""The instance memory tier's home: a directory on tmpfs made by the main process.

    prepare(settings)   main process (Sanic's main_process_start): size the budget, make
                        /dev/shm/imgproxy-<pid>-<random>/, hold a lock on it, tell the
                        workers through the environment (they are spawned after this)
    remove(path)        main process, at shutdown
    from_environment()  in a worker: (directory, bytes) or None

Budget (IMAGE_PROXY_CACHE_MEMORY_SIZE = B, W workers): each worker keeps a hot LRU of
min(B / 8W, 16 MiB) in its own heap, and the shared tmpfs tier gets the rest, B - W x hot,
SQLite's write-ahead log included: all workers together stay within B. Without a usable
tmpfs each worker keeps B / W on its own heap (one warning; no cross-worker hits).

A directory left behind by a main process that was SIGKILLed is removed by the next start
(its lock file is no longer locked). A live one never is, even across PID namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from ..config import Settings
from .store import WAL_HEADROOM

log = logging.getLogger("imgproxy.cache")

ENV_DIR = "IMGPROXY_INSTANCE_DIR"  # internal: main process -> workers
ENV_BYTES = "IMGPROXY_INSTANCE_BYTES"
PREFIX = "imgproxy-"
OWNER = ".owner"
HOT_MAX = 16 << 20
MIN_SHARED = 256 << 10  # below this the shared tier is not worth a database

_held: dict[str, int] = {}  # path -> fd of its locked owner file (main process)


@dataclass(frozen=True)
class Budget:
    hot: int  # per worker
    shared: int  # the tmpfs tier, all workers together


def plan(budget: int, workers: int, shared_ok: bool = True) -> Budget:
    workers = max(1, workers)
    if not shared_ok:
        return Budget(hot=budget // workers, shared=0)
    hot = min(budget // (8 * workers), HOT_MAX)
    return Budget(hot=hot, shared=budget - hot * workers)


def store_limit(shared: int) -> int:
    """diskcache's size_limit for a shared tier of `shared` bytes: the WAL sits on top."""
    return max(shared - WAL_HEADROOM, shared // 2)


def prepare(settings: Settings) -> str | None:
    """Main process: the tmpfs directory shared by this instance's workers, or None."""
    c = settings.cache
    if not c.enabled:
        return None
    budget = plan(c.memory_size, settings.server.workers)
    base = c.memory_path
    try:
        sweep(base)
        path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)
        fd = os.open(os.path.join(path, OWNER), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _held[path] = fd
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
    except OSError as exc:
        log.warning(
            "instance memory tier unavailable in %s (%s): each worker keeps its own %d bytes, "
            "renders are not shared between workers",
            base,
            exc,
            plan(c.memory_size, settings.server.workers, False).hot,
        )
        return None
    shared = budget.shared
    room = int(free * 0.8) - 2 * WAL_HEADROOM  # leave the rest of the tmpfs to others
    if shared > room:
        log.warning(
            "%s has %d bytes free: the instance memory tier gets %d of its %d bytes "
            "(give the container more shared memory: docker --shm-size, compose shm_size)",
            base,
            free,
            max(room, 0),
            shared,
        )
        shared = max(room, 0)
    os.environ[ENV_DIR] = path
    os.environ[ENV_BYTES] = str(shared if shared >= MIN_SHARED else 0)
    return path


def from_environment() -> tuple[str, int] | None:
    path = os.environ.get(ENV_DIR)
    if not path or not os.path.isdir(path):
        return None
    try:
        return path, int(os.environ.get(ENV_BYTES, "0"))
    except ValueError:
        return None


def remove(path: str | None) -> None:
    if not path:
        return
    shutil.rmtree(path, ignore_errors=True)
    fd = _held.pop(path, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    for name in (ENV_DIR, ENV_BYTES):
        os.environ.pop(name, None)


def sweep(base: str) -> None:
    """Remove instance directories whose main process is gone (its owner lock is free)."""
    for name in os.listdir(base):
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(base, name)
        try:
            fd = os.open(os.path.join(path, OWNER), os.O_RDWR)
        except OSError:
            continue  # not ours (no owner file), or no access
        if time.time() - os.fstat(fd).st_mtime < 60:
            os.close(fd)  # just made by an instance that is starting: not locked yet
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # alive
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        log.info("removed %s, left behind by a stopped instance", path)
