"""What a request is answered with (Reply) and what answering a URL taught (Known)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import params
from ..params import TransformSpec
from ..sources import LocalFile, OpenFile


@dataclass(slots=True)
class Reply:
    status: int  # 200 or 304
    content_type: str
    etag: str
    last_modified: float | None
    body: bytes | None = None
    stream: OpenFile | None = None  # large passthrough file, opened, streamed by the app
    size: int = 0
    x_cache: str | None = None  # "HIT" | "MISS" when the cache is enabled
    cache_tier: str | None = None  # memory | disk | redis | miss, when the cache is enabled
    steps: dict[str, float] | None = None  # seconds per step when a render ran for it
    headers: dict[str, str] | None = None  # the answer's headers, once built (`Known`)


@dataclass(slots=True)
class Known:
    """What answering a URL taught, valid while its source keeps this identity: the spec
    after negotiation, the key, the ETag, and the headers of a 200 (built once by
    `responses`; a MISS, a 304 and a HEAD build their own)."""

    identity: str
    spec: TransformSpec
    negotiated: str | None
    key: str | None  # transforms only
    etag: str
    output: params.Output | None = None  # transforms only: the resolved output
    headers: dict[str, str] = field(default_factory=dict)
    block: tuple[bytes, bytes] | None = None  # the headers, encoded as one (responses)
    source: LocalFile | None = None  # a local source, as located when this was learnt
    checked: float = float("-inf")  # time.monotonic() when `source` was last seen unchanged
