"""The fallback origin: `{base}{relative path}` fetched safely, and not again and again.

One httpx client per worker; total-time bound; bounded redirects, each re-checked against the
base; identity encoding; the streamed body capped at max_size; recent bodies remembered with
the origin's validators and revalidated with a conditional GET (a 304 costs no body).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from cachetools import LRUCache

from ..config import Fallback
from ..errors import NotFound, UpstreamError, UpstreamTimeout
from ..httpdates import parse_date


@dataclass(frozen=True, slots=True)
class Fetched:
    """A body from the fallback origin, with the validators it came with."""

    data: bytes
    mtime: float | None  # the origin's Last-Modified, if it is a usable date
    identity: str  # a hash of the body
    etag: str | None = None  # the origin's validators, for revalidation
    last_modified: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(slots=True)
class _Remembered:
    fetched: Fetched
    checked: float  # monotonic time of the last answer from the origin


class HttpSource:
    """Fetches `{base}{relative path}` from the fallback origin, safely, and not again and
    again: a body the origin sent with an ETag or Last-Modified is revalidated with a
    conditional GET (304: no body); one sent without either is reused for
    `revalidate_after` seconds. Remembered bodies are bounded by `memo_bytes` (LRU)."""

    def __init__(self, settings: Fallback, user_agent: str, memo_bytes: int) -> None:
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
        self._memo: LRUCache[str, _Remembered] = LRUCache(max(1, memo_bytes), _remembered_size)

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
                            return known.fetched
                        fetched = await self._read(response)
                        break
                    finally:
                        await response.aclose()
                else:
                    raise UpstreamError("fallback origin redirected too many times")
        except NotFound:
            self._memo.pop(rel, None)
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
        self._memo.pop(rel, None)
        if fetched.size <= self.memo_bytes:
            self._memo[rel] = _Remembered(fetched, time.monotonic())


def _remembered_size(remembered: _Remembered) -> int:
    return remembered.fetched.size


def _printable(value: str | None) -> str | None:
    """A validator we can send back: short printable ASCII only."""
    if value is None or len(value) > 256 or not value.isascii() or not value.isprintable():
        return None
    return value
