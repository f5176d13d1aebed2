"""What one image request is:

    serve: spec (urls) -> locate -> passthrough: the bytes  |  negotiate -> transform: key
    -> conditional? 304 -> produce (tiers -> once -> pool -> tiers) -> Reply

What follows from the URL and the source's identity (the negotiated spec, the key, the ETag,
the headers of a 200) is learnt once and kept with the parsed URL (`Known`, in `reply`); a
URL answered before from this worker's memory takes `quick`, without an await. The original
bytes are `passthrough`'s.

Image work never runs on the event loop. Leaf modules report facts; this module (and
`produce`) turn them into metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import monotonic

from .. import negotiate, params, sniff
from ..cache import Entry, LRUCache
from ..config import Settings
from ..errors import (
    ImgProxyError,
    NotFound,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
    status_label,
)
from ..httpdates import Conditional
from ..metrics import Metrics, adder, observer
from ..params import TransformSpec
from ..params.urls import Parsed
from ..produce import Producer
from ..sources import Fetched, HttpSource, LocalFile, LocalSource, Located, read_file
from .passthrough import Passthrough
from .reply import Known, Reply

__all__ = ["ImageService", "Known", "Outcome", "Reply"]

PROBES_MAX = 10_000  # header probes remembered per worker (least recently used go first)
CHECK_EVERY = 0.5  # seconds an answer held in memory trusts its local source unchanged
_OUTCOMES = {NotFound: "not_found", UpstreamTimeout: "timeout"}  # fallback fetches, else error


@dataclass(slots=True)
class Outcome:
    """What the metrics say of one request, filled in as it is learnt."""

    label: str  # `format` of image_requests_total
    kind: str = "other"  # passthrough | transform


class ImageService:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        producer: Producer,
        http: HttpSource | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.producer = producer
        self.http = http
        self.local = LocalSource(settings.images.root_path)
        self.io_executor = ThreadPoolExecutor(2, thread_name_prefix="imgproxy-io")
        self.passthrough = Passthrough(settings, self.io_executor, self._not_an_image)
        # path + identity -> header facts
        self._probes: LRUCache[str, sniff.Probe | None] = LRUCache(PROBES_MAX)
        # children bound once (a labels() lookup costs more than the increment), written
        # through metrics.adder/observer (this loop is their only writer)
        m, kinds = metrics, ("passthrough", "transform", "other")
        self._requests: dict[tuple[str, int], Callable[..., None]] = {}
        self._duration = {k: observer(m.duration.labels(k)) for k in kinds}
        self._bytes = {k: adder(m.bytes_served.labels(k)) for k in kinds}

    @property
    def cache(self):  # type: ignore[no-untyped-def]
        return self.producer.cache

    async def serve(
        self, parsed: Parsed, cond: Conditional, accept: str | None, head: bool, out: Outcome
    ) -> Reply:
        """One image request, from its parsed URL to the Reply."""
        spec = parsed.get()
        out.kind = "passthrough" if spec.is_passthrough else "transform"
        located = await self.locate(spec.path)  # every time: a swapped file shows at once
        known = parsed.known
        if not isinstance(known, Known) or known.identity != located.identity:
            known = parsed.known = await self._learn(spec, accept, located)
            if isinstance(located, LocalFile):
                known.source = located
        if known.negotiated:
            out.label = known.negotiated
        if known.spec.is_passthrough:
            return await self.passthrough.reply(known, cond, located, head)
        out.kind = "transform"
        return await self.transform(known, cond, located, head)

    def quick(self, parsed: Parsed) -> tuple[Entry, Known, str, str | None] | None:
        """A 200 answered from this worker's memory without a single await: a hot-tier hit
        or a memoised passthrough file, when this URL was answered before, its local source
        is unchanged and nothing conditional was asked. (entry, known, kind, the cache tier
        that answered: memory, or None for a passthrough) or None: the full path.

        "Unchanged" is one lstat against the (dev, inode, size, mtime) the answer was made
        from, at most every CHECK_EVERY seconds per URL (SPEC: the identity may be memoised
        for at most 1 s per path): a rewritten, removed or swapped file shows within that."""
        known = parsed.known
        if not isinstance(known, Known) or not known.headers or known.source is None:
            return None
        now = monotonic()
        if now - known.checked >= CHECK_EVERY:
            if not self.local.unchanged(known.source):
                return None
            known.checked = now
        if known.key is None:
            entry = self.passthrough.files.get(known.source.key)
            return (entry, known, "passthrough", None) if entry else None
        entry = self.producer.hot(known.key)
        return (entry, known, "transform", "memory") if entry else None

    async def _learn(self, spec: TransformSpec, accept: str | None, located: Located) -> Known:
        negotiated = None
        if accept is not None and spec.format is None:
            spec, _, negotiated = await self.negotiate(spec, accept, located)
        if spec.is_passthrough:
            return Known(located.identity, spec, negotiated, None, f'"{located.identity}"')
        output = await self.resolve(spec, located)
        key = self.producer.key(output, located)
        return Known(located.identity, spec, negotiated, key, f'"{key[:40]}"', output)

    # -- sources -------------------------------------------------------------------------

    async def locate(self, rel: str) -> Located:
        try:
            return self.local.locate(rel)
        except NotFound:
            if self.http is None:
                raise
        try:
            located = await self.http.fetch(rel)
        except (NotFound, UpstreamError) as exc:
            self.metrics.fallback.labels(_OUTCOMES.get(type(exc), "error")).inc()
            raise
        self.metrics.fallback.labels("ok").inc()
        return located

    def _not_an_image(self, located: Located) -> ImgProxyError:
        if isinstance(located, Fetched):
            self.metrics.fallback.labels("not_image").inc()
            return UpstreamError("fallback origin did not send a supported image")
        return UnsupportedMediaType("not a supported image")

    # -- format negotiation --------------------------------------------------------------

    async def negotiate(
        self, spec: TransformSpec, accept: str | None, located: Located | None = None
    ) -> tuple[TransformSpec, Located | None, str | None]:
        """SPEC "Format negotiation" (no `format` asked): (the spec to serve, the source if
        it was located, the chosen format or None). Type and alpha come from the header
        bytes; choosing the source's own format changes nothing (a passthrough stays one)."""
        images = self.settings.images
        candidates = negotiate.acceptable(
            accept, images.preferred_formats, images.allowed_output_formats
        )
        if not candidates:  # `*/*`, no Accept...: nothing to learn from the source
            return spec, located, None
        if located is None:
            located = await self.locate(spec.path)
        probe = await self._probe(located)
        if probe is None:  # not an image: passthrough/transform give the usual 415/502
            return spec, located, None
        chosen = negotiate.pick(candidates, probe.has_alpha)
        if chosen is None or chosen == probe.kind:
            return spec, located, chosen
        return params.as_format(spec, chosen), located, chosen

    async def _probe(self, located: Located) -> sniff.Probe | None:
        if isinstance(located, Fetched):  # a fallback body, already in memory
            return sniff.probe(located.data[: sniff.PROBE_BYTES])
        key = located.key
        try:
            return self._probes[key]
        except KeyError:
            pass
        # the first 64 KiB, once per file identity: in a thread (SPEC: a file read over a
        # few KiB never runs on the event loop; a slow disk would stall every request)
        loop = asyncio.get_running_loop()
        head = await loop.run_in_executor(
            self.io_executor, read_file, located.path, sniff.PROBE_BYTES
        )
        probe = self._probes[key] = sniff.probe(head)
        return probe

    # -- transform -----------------------------------------------------------------------

    async def transform(
        self, known: Known, cond: Conditional, located: Located, head: bool = False
    ) -> Reply:
        output, key, etag = known.output, known.key, known.etag
        assert output is not None and key is not None
        if cond:
            # the cheap checks first (type, file size, pixel limit from the header), so that
            # If-None-Match: * never turns a 415 or 422 into a 304
            await self.producer.check(located, self.io_executor)
            if cond.not_modified(etag, located.mtime):
                return Reply(304, sniff.CONTENT_TYPES[output.format], etag, located.mtime)
        else:
            entry = self.producer.hot(key)
            if entry is not None:  # the hot path: no lookup chain, headers already built
                body, ctype = entry
                return Reply(200, ctype, etag, located.mtime, body, None, len(body), "HIT",
                             "memory", None, None if head else known.headers)  # fmt: skip
        made = await self.producer.produce(key, located, output)
        body, ctype = made.entry
        reply = Reply(200, ctype, etag, located.mtime, body=body, size=len(body), steps=made.steps)
        if made.tier is not None:
            reply.x_cache = "MISS" if made.tier == "miss" else "HIT"
            reply.cache_tier = made.tier
        if not head and made.tier != "miss":  # a HIT (or no cache): the same headers each time
            reply.headers = known.headers
        return reply

    async def resolve(self, spec: TransformSpec, located: Located) -> params.Output:
        """The output `spec` makes of this source, from its header probe (memoised per
        identity): what the cache key is built from. Not an image: 415 (502 from the origin)."""
        probe = await self._probe(located)
        if probe is None:
            raise self._not_an_image(located)
        source_format = sniff.source_format(probe.kind, spec.path)
        return params.resolve(spec, probe.kind, source_format, probe.upright, self.settings)

    # -- bookkeeping ---------------------------------------------------------------------

    def observe(self, fmt: str, status: int, kind: str, seconds: float, nbytes: int) -> None:
        count = self._requests.get((fmt, status))
        if count is None:
            count = adder(self.metrics.requests.labels(fmt, status_label(status)))
            self._requests[(fmt, status)] = count
        count()
        self._duration[kind](seconds)
        if nbytes:
            self._bytes[kind](nbytes)

    async def close(self) -> None:
        """Background cache writes drained, tiers, pool and clients closed (on shutdown)."""
        await self.producer.close()
        self.io_executor.shutdown(wait=True)
        if self.http is not None:
            await self.http.aclose()
