"""Where source bytes come from: the local root, then (optionally) the fallback origin.

    LocalSource   root confinement after resolving symlinks; stat gives the identity
    HttpSource    owns the httpx client (one per worker); total-time bound, bounded and
                  re-checked redirects, identity encoding, streamed body capped at max_size;
                  remembers recent bodies with the origin's validators and revalidates them
                  with a conditional GET (a 304 costs no body)

Sources return facts (`Located`: a `LocalFile` or a `Fetched` body); `service` chains them
(local, then the origin when the file is missing) and decides what the facts mean for the
response and the metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import quote

import aiofiles
import httpx

from .config import Fallback
from .errors import NotFound, UnprocessableImage, UpstreamError, UpstreamTimeout
from .httpdates import parse_date


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A regular file under the root, as stat saw it."""

    origin: ClassVar[str] = "local"
    path: str  # resolved real path
    size: int
    mtime: float  # seconds since the epoch, for Last-Modified
    identity: str  # changes whenever the bytes change (size + mtime in ns)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A body from the fallback origin, with the validators it came with."""

    origin: ClassVar[str] = "fallback"
    data: bytes
    mtime: float | None  # the origin's Last-Modified, if it is a usable date
    identity: str  # a hash of the body
    etag: str | None = None  # the origin's validators, for revalidation
    last_modified: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)


Located = LocalFile | Fetched


class LocalSource:
    RESOLVE_TTL = 1.0  # seconds a resolved (realpath'd) path is reused
    RESOLVE_MAX = 10_000  # entries kept before the memo is cleared

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip(os.sep) + os.sep
        # rel -> (real path, expiry, (st_dev, st_ino) of the file it led to)
        self._resolved: dict[str, tuple[str, float, tuple[int, int]]] = {}

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
        now = time.monotonic()
        hit = self._resolved.get(rel)
        if hit is not None and hit[1] > now:
            st = self._lstat(hit[0])
            if (st.st_dev, st.st_ino) == hit[2]:
                return self._located(hit[0], st)
        full = self.resolve(rel)
        st = self._lstat(full)
        if len(self._resolved) >= self.RESOLVE_MAX:
            self._resolved.clear()
        self._resolved[rel] = (full, now + self.RESOLVE_TTL, (st.st_dev, st.st_ino))
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
        return LocalFile(full, st.st_size, st.st_mtime, f"{st.st_size:x}-{st.st_mtime_ns:x}")


def _open_nofollow(path: str, flags: int = os.O_RDONLY) -> int:
    # O_NOFOLLOW: `path` is a resolved real path; a symlink there now is a swap (ELOOP)
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def read_file(path: str, limit: int | None = None) -> bytes:
    """Blocking read of a file, or of its first `limit` bytes (small, page-cached files:
    faster than any async hop)."""
    try:
        with open(_open_nofollow(path), "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError:
        raise NotFound() from None


def read_capped(path: str, cap: int) -> bytes:
    """The whole file, but never more than `cap` bytes: a file that grew past the size
    checked at stat time is refused (422) instead of being read in full."""
    data = read_file(path, cap + 1)
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


@dataclass(slots=True)
class _Remembered:
    fetched: Fetched
    checked: float  # monotonic time of the last answer from the origin


class HttpSource:
    """Fetches `{base}{relative path}` from the fallback origin, safely, and not again and
    again: a body the origin sent with an ETag or Last-Modified is revalidated with a
    conditional GET (304: no body); one sent without either is reused for
    `revalidate_after` seconds. Remembered bodies are bounded by `memo_bytes` (LRU)."""

    def __init__(self, settings: Fallback, user_agent: str, memo_bytes: int = 32 << 20) -> None:
        self.base = httpx.URL(settings.url if settings.url.endswith("/") else settings.url + "/")
        self.max_size = settings.max_size
        self.timeout = settings.timeout
        self.max_redirects = settings.max_redirects
        self.revalidate_after = settings.revalidate_after
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout, connect=min(5.0, settings.timeout)),
            follow_redirects=False,  # redirects are followed by hand and re-checked (SSRF)
            trust_env=False,  # no HTTP(S)_PROXY / NO_PROXY surprises from the environment
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            headers={"User-Agent": user_agent},
        )
        self.memo_bytes = memo_bytes
        self._memo: OrderedDict[str, _Remembered] = OrderedDict()
        self._memo_size = 0

    async def aclose(self) -> None:
        await self.client.aclose()

    def url_for(self, rel: str) -> httpx.URL:
        """Base + each segment percent-encoded; refuses anything that would leave the base."""
        segments = rel.split("/")
        if any(s in ("", ".", "..") for s in segments):
            raise NotFound()
        url = httpx.URL(str(self.base) + "/".join(quote(s, safe="") for s in segments))
        self._check(url)
        return url

    def _check(self, url: httpx.URL) -> None:
        b = self.base
        # `url.path` is percent-decoded: a redirect to `/base/%2e%2e/x` or `/base/..%2fx`
        # starts with the base but leaves it once the origin decodes it.
        segments = url.path.split("/")
        if (
            (url.scheme, url.host, url.port) != (b.scheme, b.host, b.port)
            or not url.path.startswith(b.path)
            or any(s in (".", "..") or "\\" in s or "\x00" in s for s in segments)
        ):
            raise UpstreamError("fallback origin redirected outside its base URL")

    async def fetch(self, rel: str) -> Fetched:
        url = self.url_for(rel)
        known = self._memo.get(rel)
        validators: dict[str, str] = {}
        if known is not None:
            f = known.fetched
            if f.etag is None and f.last_modified is None:
                if time.monotonic() - known.checked < self.revalidate_after:
                    self._memo.move_to_end(rel)
                    return f
            else:
                if f.etag is not None:
                    validators["If-None-Match"] = f.etag
                if f.last_modified is not None:
                    validators["If-Modified-Since"] = f.last_modified
        try:
            async with asyncio.timeout(self.timeout):  # total time: read timeouts are per chunk
                for _ in range(self.max_redirects + 1):
                    response = await self._send(url, validators)
                    try:
                        if response.is_redirect and "location" in response.headers:
                            url = self._follow(url, response.headers["location"])
                            continue
                        if response.status_code == 304 and known is not None:
                            known.checked = time.monotonic()
                            self._memo.move_to_end(rel)
                            return known.fetched
                        fetched = await self._read(response)
                        break
                    finally:
                        await response.aclose()
                else:
                    raise UpstreamError("fallback origin redirected too many times")
        except NotFound:
            self._forget(rel)
            raise
        except TimeoutError:
            raise UpstreamTimeout() from None
        except httpx.TimeoutException:
            raise UpstreamTimeout() from None
        except httpx.HTTPError:
            raise UpstreamError("fallback origin unreachable") from None
        self._remember(rel, fetched)
        return fetched

    def _follow(self, url: httpx.URL, location: str) -> httpx.URL:
        try:
            target = url.join(location)
        except (httpx.InvalidURL, ValueError):  # e.g. "http://[::1": not an HTTPError
            raise UpstreamError("fallback origin sent an invalid redirect") from None
        self._check(target)
        return target

    async def _send(self, url: httpx.URL, validators: dict[str, str]) -> httpx.Response:
        def request() -> httpx.Request:
            headers = {"Accept-Encoding": "identity", **validators}
            return self.client.build_request("GET", url, headers=headers)

        try:
            return await self.client.send(request(), stream=True)
        except httpx.RemoteProtocolError:
            # A pooled keep-alive connection can hold bytes an earlier response sent past its
            # Content-Length; httpx then fails the *next* request on it. That connection is
            # closed now: retry once on a fresh one (GET is idempotent).
            return await self.client.send(request(), stream=True)

    async def _read(self, response: httpx.Response) -> Fetched:
        if response.status_code in (404, 410):
            raise NotFound()
        if response.status_code != 200:
            raise UpstreamError(f"fallback origin answered {response.status_code}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UpstreamError("fallback origin sent an encoded body")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_size:
            raise UpstreamError("fallback image too large")
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > self.max_size:
                raise UpstreamError("fallback image too large")
        data = bytes(body)
        last_modified = response.headers.get("last-modified")
        mtime = parse_date(last_modified)
        return Fetched(
            data=data,
            mtime=mtime,
            identity="sha256-" + hashlib.sha256(data).hexdigest()[:32],
            etag=_printable(response.headers.get("etag")),
            last_modified=_printable(last_modified) if mtime is not None else None,
        )

    def _remember(self, rel: str, fetched: Fetched) -> None:
        self._forget(rel)
        if fetched.size > self.memo_bytes:
            return
        self._memo[rel] = _Remembered(fetched, time.monotonic())
        self._memo_size += fetched.size
        while self._memo_size > self.memo_bytes:
            _, old = self._memo.popitem(last=False)
            self._memo_size -= old.fetched.size

    def _forget(self, rel: str) -> None:
        old = self._memo.pop(rel, None)
        if old is not None:
            self._memo_size -= old.fetched.size


def _printable(value: str | None) -> str | None:
    """A validator we can send back: short printable ASCII only."""
    if value is None or len(value) > 256 or not value.isascii() or not value.isprintable():
        return None
    return value
