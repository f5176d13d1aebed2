"""Passthrough: a source's original bytes, never decoded, sniffed before anything is sent.

Small local files are kept in a per-worker memo keyed by their identity (so a rewritten
file is read afresh); files over STREAM_FILE are streamed from a descriptor opened before
the response starts; a HEAD or a 304 reads only the first bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .. import sniff
from ..cache import Entry, MemoryTier
from ..config import Settings
from ..errors import ImgProxyError
from ..httpdates import Conditional
from ..sources import Fetched, LocalFile, Located, OpenFile, read_file
from .reply import Known, Reply

SMALL_FILE = 1024 * 1024  # the biggest file kept in the per-worker passthrough memo
INLINE_READ = 4096  # SPEC: a file read over a few KiB never runs on the event loop
STREAM_FILE = 32 * 1024 * 1024  # bigger passthrough files are streamed, not held in memory


class Passthrough:
    def __init__(
        self,
        settings: Settings,
        io_executor: ThreadPoolExecutor,
        not_an_image: Callable[[Located], ImgProxyError],
    ) -> None:
        # small local files, validated by their identity on every request; the setting is
        # the instance's: each worker keeps its share
        share = settings.cache.passthrough_size // settings.server.workers
        self.files = MemoryTier(share, SMALL_FILE)
        self.io_executor = io_executor
        self.not_an_image = not_an_image

    async def reply(
        self, known: Known, cond: Conditional, located: Located, head: bool = False
    ) -> Reply:
        """The original bytes, sniffed before the conditional headers are read (a 304 only
        where a 200 would be). A HEAD or a 304 reads only the first bytes (length: stat)."""
        etag = known.etag
        reply = Reply(200, "", etag, located.mtime)
        not_modified = bool(cond) and cond.not_modified(etag, located.mtime)
        if isinstance(located, Fetched):
            reply.content_type = self._sniffed(located, located.data)
            reply.body = located.data
        elif head or not_modified:
            entry = self.files.get(located.key)
            sniffed = entry[1] if entry else self._sniffed(located, self._head(located))
            reply.content_type, reply.size = sniffed, located.size
        elif located.size > STREAM_FILE:
            stream = OpenFile(located.path)  # open first: the length is the open file's
            try:
                reply.content_type = self._sniffed(located, stream.head)
            except ImgProxyError:
                stream.close()
                raise
            reply.stream, reply.size = stream, stream.size
        else:
            reply.body, reply.content_type = await self._read_small(located)
        if reply.body is not None:
            reply.size = len(reply.body)
            reply.headers = None if head else known.headers
        if not_modified:
            reply.status, reply.body, reply.headers = 304, None, None  # the client has them
        return reply

    @staticmethod
    def _head(located: LocalFile) -> bytes:
        return read_file(located.path, sniff.SNIFF_BYTES)

    def _sniffed(self, located: Located, head: bytes) -> str:
        kind = sniff.sniff(head[: sniff.SNIFF_BYTES])
        if kind is None:
            raise self.not_an_image(located)
        return sniff.CONTENT_TYPES[kind]

    async def _read_small(self, located: LocalFile) -> Entry:
        """A local file's bytes and sniffed type, from the per-worker file memo when its
        (size, mtime) identity still matches: a stat per request, no read, no sniff."""
        key = located.key
        entry = self.files.get(key)
        if entry is not None:
            return entry
        if located.size > INLINE_READ:  # a slow disk must not stall every request
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self.io_executor, read_file, located.path)
        else:
            body = read_file(located.path)
        entry = (body, self._sniffed(located, body))
        self.files.put(key, entry)
        return entry
