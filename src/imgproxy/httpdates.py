"""HTTP dates, ETags and conditional requests: the one place that parses or formats them.

format_date(seconds)        -> "Sun, 06 Nov 1994 08:49:37 GMT" (memoised)
parse_date(text)            -> seconds since the epoch, or None (never raises)
Conditional.from_headers()  -> the request's If-None-Match / If-Modified-Since
Conditional.not_modified()  -> RFC 9110 section 13.2.2 for a GET/HEAD: If-None-Match
                               wins; weak comparison; a date compared in whole seconds
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime


@functools.lru_cache(maxsize=4096)
def format_date(seconds: int) -> str:
    """An IMF-fixdate; memoised, since the same few mtimes are formatted again and again."""
    return formatdate(seconds, usegmt=True)


def parse_date(value: str | None) -> float | None:
    """A date header as a timestamp, or None unless it is a date we can send on
    (`Fri, 31 Dec 9999 23:59:59 -2359` parses, but is year 10000 in UTC)."""
    if not value:
        return None
    try:
        ts = parsedate_to_datetime(value).timestamp()
        datetime.fromtimestamp(ts, UTC)  # what formatdate() does with it
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return ts


def etag_matches(header: str, etag: str) -> bool:
    """Weak comparison of `etag` against an If-None-Match list (or `*`)."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == bare for t in header.split(","))


@dataclass(frozen=True, slots=True)
class Conditional:
    if_none_match: str | None = None
    if_modified_since: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Conditional:
        return cls(headers.get("if-none-match"), headers.get("if-modified-since"))

    def __bool__(self) -> bool:
        return self.if_none_match is not None or self.if_modified_since is not None

    def not_modified(self, etag: str, mtime: float | None) -> bool:
        if self.if_none_match is not None:  # RFC 9110: If-None-Match wins over the date
            return etag_matches(self.if_none_match, etag)
        if self.if_modified_since and mtime is not None:
            since = parse_date(self.if_modified_since)
            return since is not None and int(mtime) <= since
        return False
