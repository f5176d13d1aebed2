"""Local files under the root: confinement after resolving symlinks, identity from stat,
and the three ways their bytes are read (whole, capped, or opened before a response streams)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import aiofiles
from cachetools import TTLCache

from ..errors import NotFound, UnprocessableImage


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A regular file under the root, as stat saw it."""

    path: str  # resolved real path
    size: int
    mtime: float  # seconds since the epoch, for Last-Modified
    identity: str  # changes whenever the bytes change (size + mtime in ns)
    stamp: tuple[int, int, int, int] = (0, 0, 0, 0)  # (st_dev, st_ino, size, mtime_ns)

    @property
    def key(self) -> str:
        """Path and identity: what a memo of this file's bytes or facts is keyed by (a
        changed file has a new identity, so a new key)."""
        return f"{self.path}\x00{self.identity}"


class LocalSource:
    RESOLVE_TTL = 1.0  # seconds a resolved (realpath'd) path is reused
    RESOLVE_MAX = 10_000  # paths remembered (least recently used go first)

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip(os.sep) + os.sep
        # rel -> (real path, (st_dev, st_ino) of the file it led to), for RESOLVE_TTL
        self._resolved: TTLCache[str, tuple[str, tuple[int, int]]] = TTLCache(
            self.RESOLVE_MAX, self.RESOLVE_TTL
        )

    def resolve(self, rel: str) -> str:
        """The real path of `rel`, which must stay under the root; NotFound otherwise.

        `rel` is already percent-decoded and segment-checked (params); resolving symlinks
        *after* decoding and *then* comparing against the real root is what makes a symlink
        (or a decoded `..`) unable to escape: the check sees the path the kernel will open.
        """
        full = os.path.realpath(os.path.join(self.root, rel))
        if not full.startswith(self._prefix):
            raise NotFound()
        return full

    def locate(self, rel: str) -> LocalFile:
        """Stat `rel` under the root; NotFound if missing, not a file, or outside the root.

        realpath costs ~20 µs (an lstat per component), so its answer is memoised for a
        second, together with the identity (device, inode) of the file it led to. A memoised
        path is only trusted while it still leads to that same file: a file or a directory
        on the way swapped for a symlink (or a file replaced) makes it resolve afresh.
        """
        hit = self._resolved.get(rel)
        if hit is not None:
            st = self._lstat(hit[0])
            if (st.st_dev, st.st_ino) == hit[1]:
                return self._located(hit[0], st)
        full = self.resolve(rel)
        st = self._lstat(full)
        self._resolved[rel] = (full, (st.st_dev, st.st_ino))
        return self._located(full, st)

    @staticmethod
    def _lstat(full: str) -> os.stat_result:
        try:
            # lstat: a resolved path has no symlinks; if its last component is one now, the
            # file was swapped for a link since: refuse it (read_file opens with O_NOFOLLOW).
            st = os.lstat(full)
        except (OSError, ValueError):
            raise NotFound() from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound()
        return st

    @staticmethod
    def _located(full: str, st: os.stat_result) -> LocalFile:
        identity = f"{st.st_size:x}-{st.st_mtime_ns:x}"
        return LocalFile(full, st.st_size, st.st_mtime, identity, _stamp(st))

    @staticmethod
    def unchanged(located: LocalFile) -> bool:
        """One lstat: is `located` still the regular file it was, the same bytes? (What an
        answer held in memory needs; a swapped file or directory on the way, a symlink now,
        a rewrite or a removal all say no, at once.)"""
        try:
            st = os.lstat(located.path)
        except (OSError, ValueError):
            return False
        return stat.S_ISREG(st.st_mode) and _stamp(st) == located.stamp


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_nofollow(path: str, flags: int = os.O_RDONLY) -> int:
    # O_NOFOLLOW: `path` is a resolved real path; a symlink there now is a swap (ELOOP)
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def read_file(path: str, limit: int | None = None) -> bytes:
    """Blocking read of a file, or of its first `limit` bytes (small, page-cached files:
    faster than any async hop)."""
    with _reading(path) as f:
        return f.read() if limit is None else f.read(limit)


@contextlib.contextmanager
def _reading(path: str) -> Iterator[BinaryIO]:
    """The file at the resolved `path`, open for reading; NotFound for any OSError (a
    vanished file, a symlink swapped in, a read error)."""
    try:
        with open(_open_nofollow(path), "rb") as f:
            yield f
    except OSError:
        raise NotFound() from None


def read_capped(path: str, cap: int) -> bytes:
    """The whole file, but never more than `cap` bytes: a file over `cap`, or one that grew
    past it since the stat, is refused (422) instead of being read in full.

    The buffer is sized from the open file's own fstat (+1 byte to notice growth), never
    from `cap`: `read(cap + 1)` would allocate all of `cap` (128 MiB by default, a fresh
    mmap the kernel zeroes and unmaps on every call), ~2 ms per 3 MB read instead of 0.15."""
    with _reading(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            raise UnprocessableImage("image file too large")
        data = f.read(size + 1)
        if len(data) > size:  # growing while we read: the rest, still capped
            data += f.read(cap + 1 - len(data))
    if len(data) > cap:
        raise UnprocessableImage("image file too large")
    return data


class OpenFile:
    """A large file opened *before* the response starts: its length comes from the open
    descriptor, so a file deleted, swapped or resized meanwhile cannot break the response
    or its Content-Length (we send exactly `size` bytes of the file we opened)."""

    CHUNK = 256 * 1024

    def __init__(self, path: str) -> None:
        try:
            self._fd = _open_nofollow(path)
            st = os.fstat(self._fd)
        except OSError:
            raise NotFound() from None
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise NotFound()
        self.size = st.st_size
        self.head = os.pread(self._fd, 64, 0)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Async chunks of exactly `size` bytes (aiofiles keeps reads off the event loop);
        a file truncated meanwhile ends early and the connection says so."""
        left = self.size
        async with aiofiles.open(self._fd, "rb", closefd=False) as f:
            while left > 0:
                chunk = await f.read(min(self.CHUNK, left))
                if not chunk:
                    raise OSError("file shrank while it was sent")
                left -= len(chunk)
                yield chunk

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
