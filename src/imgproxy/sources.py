"""Where source bytes come from: the local root, then (optionally) the fallback origin.

    LocalSource   root confinement after resolving symlinks; stat gives the identity
    HttpSource    one shared httpx.AsyncClient per worker; total-time bound, bounded and
                  re-checked redirects, identity encoding, streamed body capped at max_size

Sources return facts (`Located`); `service` chains them (local, then the origin when the
file is missing) and decides what the facts mean for the response and the metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import quote

import aiofiles
import httpx

from .errors import NotFound, UpstreamError, UpstreamTimeout


@dataclass(frozen=True, slots=True)
class Located:
    """A source found by path: a local file (path set) or a fetched body (data set)."""

    origin: str  # "local" | "fallback"
    identity: str  # changes whenever the bytes change
    size: int
    mtime: float | None  # seconds since the epoch, for Last-Modified
    path: str | None = None
    data: bytes | None = None


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

    def locate(self, rel: str) -> Located:
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
    def _located(full: str, st: os.stat_result) -> Located:
        return Located(
            origin="local",
            identity=f"{st.st_size:x}-{st.st_mtime_ns:x}",
            size=st.st_size,
            mtime=st.st_mtime,
            path=full,
        )


def read_file(path: str, limit: int | None = None) -> bytes:
    """Blocking read of a whole file (small, page-cached files: faster than any async hop)."""
    try:
        # O_NOFOLLOW: `path` is a resolved real path; a symlink there now is a swap (ELOOP)
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError:
        raise NotFound() from None


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


async def stream_file(path: str, chunk_size: int = 256 * 1024):  # type: ignore[no-untyped-def]
    """Async chunks of a large file (aiofiles keeps the reads off the event loop)."""
    async with aiofiles.open(path, "rb", opener=_open_nofollow) as f:
        while chunk := await f.read(chunk_size):
            yield chunk


class HttpSource:
    """Fetches `{base}{relative path}` from the fallback origin, safely."""

    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient,
        max_size: int,
        timeout: float,
        max_redirects: int = 3,
    ) -> None:
        if not base_url.endswith("/"):
            base_url += "/"
        self.base = httpx.URL(base_url)
        self.client = client
        self.max_size = max_size
        self.timeout = timeout
        self.max_redirects = max_redirects

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

    async def fetch(self, rel: str) -> Located:
        url = self.url_for(rel)
        try:
            async with asyncio.timeout(self.timeout):  # total time: read timeouts are per chunk
                for _ in range(self.max_redirects + 1):
                    response = await self._send(url)
                    try:
                        if response.is_redirect and "location" in response.headers:
                            url = url.join(response.headers["location"])
                            self._check(url)
                            continue
                        return await self._read(response)
                    finally:
                        await response.aclose()
                raise UpstreamError("fallback origin redirected too many times")
        except TimeoutError:
            raise UpstreamTimeout() from None
        except httpx.TimeoutException:
            raise UpstreamTimeout() from None
        except httpx.HTTPError:
            raise UpstreamError("fallback origin unreachable") from None

    async def _send(self, url: httpx.URL) -> httpx.Response:
        def request() -> httpx.Request:
            return self.client.build_request("GET", url, headers={"Accept-Encoding": "identity"})

        try:
            return await self.client.send(request(), stream=True)
        except httpx.RemoteProtocolError:
            # A pooled keep-alive connection can hold bytes an earlier response sent past its
            # Content-Length; httpx then fails the *next* request on it. That connection is
            # closed now: retry once on a fresh one (GET is idempotent).
            return await self.client.send(request(), stream=True)

    async def _read(self, response: httpx.Response) -> Located:
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
        return Located(
            origin="fallback",
            identity="sha256-" + hashlib.sha256(data).hexdigest()[:32],
            size=len(data),
            mtime=_http_date(response.headers.get("last-modified")),
            data=data,
        )


def _http_date(value: str | None) -> float | None:
    """An origin's Last-Modified as a timestamp, or None unless it is a date we can send on
    (`Fri, 31 Dec 9999 23:59:59 -2359` parses, but is year 10000 in UTC)."""
    if not value:
        return None
    try:
        ts = parsedate_to_datetime(value).timestamp()
        datetime.fromtimestamp(ts, UTC)  # what formatdate() does with it
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return ts
