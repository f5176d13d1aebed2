"""ImageService: one request's work, from a resolved spec to a Reply.

    passthrough: locate (local, else fallback) -> conditional? 304 -> bytes -> sniff -> Reply
    transform:   locate -> key -> conditional? 304 -> cache lookup (memory, disk, redis)
                 -> single-flight (this worker, then the instance's lease, then the fleet's
                 lock) -> admission (the instance's bounded queue, else 503) -> executor:
                 permit, read, sniff, pixel limit, transform.render -> cache store -> Reply

Image work never runs on the event loop. Leaf modules report facts; this module turns them
into metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass

from . import flight, negotiate, params, sniff, transform
from .cache import CacheChain, Entry, MemoryTier
from .config import Settings
from .errors import (
    ImgProxyError,
    NotFound,
    Overloaded,
    RenderFailed,
    UnprocessableImage,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
)
from .httpdates import Conditional
from .metrics import Metrics
from .params import TransformSpec
from .sources import (
    Fetched,
    HttpSource,
    LocalFile,
    LocalSource,
    Located,
    OpenFile,
    read_capped,
    read_file,
)
from .transform import Rendered

log = logging.getLogger("imgproxy")

SMALL_FILE = 1024 * 1024  # read inline on the loop: a page-cached read beats a thread hop
STREAM_FILE = 32 * 1024 * 1024  # bigger passthrough files are streamed, not held in memory


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


class ImageService:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        io_executor: ThreadPoolExecutor,
        cache: CacheChain | None = None,
        http: HttpSource | None = None,
        admission: flight.Admission | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.io_executor = io_executor
        self.cache = cache
        self.local = LocalSource(settings.images.root_path)
        self.http = http
        limits = settings.limits
        self.admission = admission or flight.Admission(
            limits.transform_threads, limits.transform_queue
        )
        self.flight = flight.SingleFlight()
        # what else changes the output bytes besides the request: part of every cache key
        self.output_salt = hashlib.sha256(
            repr((transform.VERSION, astuple(settings.encode))).encode()
        ).hexdigest()[:16]
        # passthrough bytes of small local files, validated by (size, mtime) on every request
        self.files = MemoryTier(settings.cache.passthrough_size, SMALL_FILE)
        self._probes: dict[str, sniff.Probe | None] = {}  # path + identity -> header facts

    # -- sources -------------------------------------------------------------------------

    async def locate(self, rel: str) -> Located:
        try:
            return self.local.locate(rel)
        except NotFound:
            if self.http is None:
                raise
        try:
            located = await self.http.fetch(rel)
        except NotFound:
            self.metrics.fallback.labels("not_found").inc()
            raise
        except UpstreamTimeout:
            self.metrics.fallback.labels("timeout").inc()
            raise
        except UpstreamError:
            self.metrics.fallback.labels("error").inc()
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
        self, spec: TransformSpec, accept: str | None
    ) -> tuple[TransformSpec, Located | None, str | None]:
        """SPEC "Format negotiation", for a request without `format`: (the spec to serve,
        the source if it had to be located (pass it on: never look it up twice), the chosen
        format or None). The source's type and alpha come from its header bytes, never a
        decode; a chosen format equal to the source's own changes nothing, so a request
        without transform parameters stays a passthrough."""
        images = self.settings.images
        candidates = negotiate.acceptable(
            accept, images.preferred_formats, images.allowed_output_formats
        )
        if not candidates:  # `*/*`, no Accept...: nothing to learn from the source
            return spec, None, None
        located = await self.locate(spec.path)
        probe = self._probe(located)
        if probe is None:  # not an image: passthrough/transform give the usual 415/502
            return spec, located, None
        chosen = negotiate.pick(candidates, probe.has_alpha)
        if chosen is None or chosen == probe.kind:
            return spec, located, chosen
        return params.as_format(spec, chosen), located, chosen

    def _probe(self, located: Located) -> sniff.Probe | None:
        if isinstance(located, Fetched):  # a fallback body, already in memory
            return sniff.probe(located.data[: sniff.PROBE_BYTES])
        key = f"{located.path}\x00{located.identity}"  # a changed file has a new identity
        try:
            return self._probes[key]
        except KeyError:
            pass
        if len(self._probes) >= 10_000:
            self._probes.clear()
        # the first 4 KB of a page-cached file, inline: cheaper than a thread hop
        probe = self._probes[key] = sniff.probe(read_file(located.path, sniff.PROBE_BYTES))
        return probe

    # -- passthrough ---------------------------------------------------------------------

    async def passthrough(
        self, spec: TransformSpec, cond: Conditional, located: Located | None = None
    ) -> Reply:
        """The original bytes. The sniff runs before the conditional headers are read: a
        304 is only given where the request would otherwise be a 200. `located`: the source
        when negotiation already looked it up."""
        if located is None:
            located = await self.locate(spec.path)
        etag = f'"{located.identity}"'
        reply = Reply(200, "", etag, located.mtime)
        if isinstance(located, Fetched):
            reply.content_type = self._sniffed(located, located.data)
            reply.body = located.data
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
        if cond and cond.not_modified(etag, located.mtime):
            if reply.stream is not None:
                reply.stream.close()
                reply.stream = None
            reply.status, reply.body = 304, None  # the client holds these very bytes
        return reply

    def _sniffed(self, located: Located, head: bytes) -> str:
        kind = sniff.sniff(head[: sniff.SNIFF_BYTES])
        if kind is None:
            raise self._not_an_image(located)
        return sniff.CONTENT_TYPES[kind]

    async def _read_small(self, located: LocalFile) -> Entry:
        """A local file's bytes and sniffed type, from the per-worker file memo when its
        (size, mtime) identity still matches: a stat per request, no read, no sniff."""
        key = f"{located.path}\x00{located.identity}"
        entry = self.files.get(key)
        if entry is not None:
            return entry
        if located.size > SMALL_FILE:
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self.io_executor, read_file, located.path)
        else:
            body = read_file(located.path)
        entry = (body, self._sniffed(located, body))
        self.files.put(key, entry)
        return entry

    # -- transform -----------------------------------------------------------------------

    async def transform(
        self, spec: TransformSpec, cond: Conditional, located: Located | None = None
    ) -> Reply:
        if located is None:  # else negotiation already looked it up
            located = await self.locate(spec.path)
        key = spec.cache_key(located.identity, self.output_salt)
        etag = f'"{key[:40]}"'
        if cond:
            # the cheap checks first (type, file size, pixel limit from the header), so that
            # If-None-Match: * never turns a 415 or 422 into a 304
            self._check_source(located, self._head(located))
            if cond.not_modified(etag, located.mtime):
                ctype = sniff.CONTENT_TYPES.get(spec.format or "", "")
                return Reply(304, ctype, etag, located.mtime)

        if self.cache is None:
            (body, ctype), steps = await self.flight.run(key, lambda: self._render(located, spec))
            return Reply(200, ctype, etag, located.mtime, body=body, size=len(body), steps=steps)
        found = await self.cache.lookup(key)
        for tier, hit in found.consulted:
            self.metrics.cache.labels(tier, "hit" if hit else "miss").inc()
        steps = None
        if found.entry is not None:
            body, ctype = found.entry
        else:
            (body, ctype), steps = await self.flight.run(
                key, lambda: self._produce(key, located, spec)
            )
        reply = Reply(200, ctype, etag, located.mtime, body=body, size=len(body), steps=steps)
        reply.x_cache = "MISS" if found.entry is None else "HIT"
        reply.cache_tier = found.tier
        return reply

    HEAD_BYTES = 64 * 1024  # JPEG dimensions sit after EXIF/ICC segments: usually < 64 KiB

    @classmethod
    def _head(cls, located: Located) -> bytes:
        if isinstance(located, Fetched):
            return located.data
        return read_file(located.path, cls.HEAD_BYTES)

    def _check_source(self, located: Located, data: bytes) -> str:
        """The source's type, after the checks that need no decode: 415 (or 502 for the
        origin) when it is not a supported image, 422 when too big in bytes or pixels."""
        if located.size > self.settings.limits.max_source_bytes:
            raise UnprocessableImage("image file too large")
        kind = sniff.sniff(data[: sniff.SNIFF_BYTES])
        if kind is None:
            raise self._not_an_image(located)
        dims = sniff.dimensions(data, kind)
        if dims is not None and dims[0] * dims[1] > self.settings.limits.max_source_pixels:
            raise UnprocessableImage(
                f"image too large: {dims[0]}x{dims[1]} is over the pixel limit"
            )
        return kind

    async def _produce(self, key: str, located: Located, spec: TransformSpec) -> Made:
        """A miss, once per worker: one render per instance (the lease), one per fleet (the
        Redis lock); the others take its result (without step timings: they did not render)."""
        assert self.cache is not None
        cache = self.cache
        if cache.instance_lease is None:
            return await self._produce_here(key, located, spec)
        return await flight.once(
            cache.instance_lease,
            key,
            lambda: _taken(cache.instance_check(key)),
            lambda: self._produce_here(key, located, spec),
        )

    async def _produce_here(self, key: str, located: Located, spec: TransformSpec) -> Made:
        assert self.cache is not None
        fleet = self.cache.fleet
        if fleet is None:
            made = await self._render(located, spec)
        else:
            made = await flight.once(
                fleet,
                key,
                lambda: _taken(fleet.get(key)),
                lambda: self._render_for_fleet(key, located, spec),
            )
        await self.cache.store(key, made[0])  # the instance sees it before the lease goes
        return made

    async def _render_for_fleet(self, key: str, located: Located, spec: TransformSpec) -> Made:
        assert self.cache is not None and self.cache.fleet is not None
        made = await self._render(located, spec)
        await self.cache.fleet.put(key, made[0])  # the fleet sees it before the lock goes
        return made

    async def _render(self, located: Located, spec: TransformSpec) -> Made:
        """Admission (a place in the instance's queue, else 503), then the executor."""
        try:
            self.admission.enter()
        except Overloaded:
            self.metrics.overloaded.inc()
            raise
        loop = asyncio.get_running_loop()
        try:
            rendered = await loop.run_in_executor(self.executor, self._render_job, located, spec)
        except RenderFailed as exc:
            # logged here, once per render (coalesced waiters share it); the client gets
            # only the public reason from the app's error handler, which does not log
            cause = " ".join(str(exc.__cause__).split())  # libvips errors span lines
            log.error("render failed for %s: %s", spec.path, cause, exc_info=exc)
            raise
        finally:
            self.admission.leave()
        for step, seconds in rendered.steps.items():
            self.metrics.steps.labels(step).observe(seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "rendered %s -> %s %dx%d, %d bytes, %s",
                spec.path,
                rendered.format,
                rendered.width,
                rendered.height,
                len(rendered.data),
                " ".join(f"{k}={v * 1000:.1f}ms" for k, v in rendered.steps.items()),
            )
        self.metrics.transforms.labels(rendered.format).inc()
        return (rendered.data, sniff.CONTENT_TYPES[rendered.format]), rendered.steps

    def _render_job(self, located: Located, spec: TransformSpec) -> Rendered:
        """Runs in an executor thread: a render permit of the instance, then read (capped),
        sniff, check limits, transform."""
        self.metrics.queue_depth.inc()
        try:
            self.admission.acquire()
        except Overloaded:
            self.metrics.overloaded.inc()
            raise
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.transforms_running.inc()
        try:
            limits = self.settings.limits
            if isinstance(located, Fetched):
                data = located.data
            else:
                data = read_capped(located.path, limits.max_source_bytes)
            kind = self._check_source(located, data)
            plan = transform.Plan(
                source_type=kind,
                format=spec.format or sniff.source_format(kind, spec.path),
                target=spec.target,
                algorithm=spec.algorithm,
                max_pixels=limits.max_source_pixels,
                bw=spec.bw,
                encode=self.settings.encode,
            )
            return transform.render(data, plan)
        finally:
            self.metrics.transforms_running.dec()
            self.admission.release()

    # -- bookkeeping ---------------------------------------------------------------------

    def observe(self, fmt: str, status: str, kind: str, seconds: float, nbytes: int) -> None:
        self.metrics.requests.labels(fmt, status).inc()
        self.metrics.duration.labels(kind).observe(seconds)
        if nbytes:
            self.metrics.bytes_served.labels(kind).inc(nbytes)

    async def drain(self) -> None:
        """Wait for background cache writes (called on shutdown)."""
        if self.cache is not None:
            await self.cache.drain()


Made = tuple[Entry, dict[str, float] | None]  # a result and, when it was rendered here, its steps


async def _taken(found: Awaitable[Entry | None]) -> Made | None:
    """Another's result (no step timings: this request did not render)."""
    entry = await found
    return None if entry is None else (entry, None)
