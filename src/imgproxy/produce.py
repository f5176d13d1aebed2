"""How a rendered answer is made, once per key:

    produce(key): tiers.get -> hit | once(key) -> pool.run -> tiers.put

`once` is layered: one task per worker (`flight.SingleFlight`), one render per instance (the
instance lease) and per fleet (the Redis lock, when Redis is on). A waiter takes the
holder's result from the tiers, or its failure from the lease; the holder stores its result
in each tier before it lets its lease go, so a waiter that sees the lease gone finds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from concurrent.futures import Executor
from dataclasses import dataclass

from . import flight, params, transform
from .cache import CacheChain, Entry
from .config import CONTENT_TYPES, Settings
from .errors import ImgProxyError, Overloaded, RenderFailed, UpstreamError
from .metrics import Metrics, adder
from .params import Output
from .pool import Job, Pool, check_source
from .sources import Fetched, Located, read_file

log = logging.getLogger("imgproxy")

HEAD_BYTES = 64 * 1024  # JPEG dimensions sit after EXIF/ICC segments: usually < 64 KiB

Made = tuple[Entry, dict[str, float] | None]  # a result and, when it was rendered here, its steps


@dataclass(slots=True)
class Produced:
    entry: Entry  # (body, content type)
    tier: str | None  # memory | disk | redis | miss; None when the cache is off
    steps: dict[str, float] | None  # seconds per step when a render ran for this request


class Producer:
    def __init__(
        self, settings: Settings, metrics: Metrics, pool: Pool, cache: CacheChain | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool = pool
        self.cache = cache
        self.flight = flight.SingleFlight()
        self.instance_lease = (
            flight.InstanceLease(cache.leases, cache.stored, cache.lease_executor)
            if cache is not None and cache.leases is not None
            else None
        )
        self._lookups = {  # (tier, hit) -> its counter's adder, bound once
            (tier, hit): adder(metrics.cache.labels(tier, "hit" if hit else "miss"))
            for tier in ("memory", "disk", "redis")
            for hit in (True, False)
        }
        # what else changes the output bytes besides the request: part of every cache key
        # every codec library's version (computed) and the encoder settings
        self.output_salt = params.output_salt(transform.codec_versions(), settings.encode)

    def key(self, output: Output, located: Located) -> str:
        """The key of a resolved output (params.resolve, after the header probe)."""
        return output.cache_key(located.identity, self.output_salt)

    async def check(self, located: Located, io: Executor | None = None) -> str:
        """The checks a render would run first, from the source's head (type, file size,
        pixel limit): for a conditional request, so a 304 is only given where a 200 would be.
        The head (64 KiB) is read in `io`, never on the event loop."""
        if isinstance(located, Fetched):
            head, fetched = located.data, True
        else:
            loop = asyncio.get_running_loop()
            head = await loop.run_in_executor(io, read_file, located.path, HEAD_BYTES)
            fetched = False
        try:
            return check_source(located.size, head, self.settings.limits, fetched)
        except UpstreamError:
            self.metrics.fallback.labels("not_image").inc()
            raise

    def hot(self, key: str) -> Entry | None:
        """This worker's hot tier alone (a dict lookup, counted like `produce`'s): the
        cheapest hit, tried first."""
        entry = self.cache.hot.get(key) if self.cache is not None else None
        if entry is not None:
            self._lookups[("memory", True)]()
        return entry

    async def produce(self, key: str, located: Located, spec: Output) -> Produced:
        if isinstance(located, Fetched):
            job = Job(None, located.data, located.size, spec)
        else:
            job = Job(located.path, None, located.size, spec)
        cache = self.cache
        if cache is None:
            entry, steps = await self.flight.run(key, lambda: self._render(job))
            return Produced(entry, None, steps)
        found = await cache.lookup(key)
        for consulted in found.consulted:
            self._lookups[consulted]()
        if found.entry is not None:
            return Produced(found.entry, found.tier, None)
        entry, steps = await self.flight.run(key, lambda: self._instance(key, job))
        return Produced(entry, "miss", steps)

    async def _instance(self, key: str, job: Job) -> Made:
        """A miss, once per worker: one render per instance (the lease); the others take
        its result (without step timings: they did not render)."""
        assert self.cache is not None
        cache, lease = self.cache, self.instance_lease
        if lease is None:
            return await self._fleet(key, job)
        return await flight.once(
            lease, key, lambda: _taken(cache.instance_check(key)), lambda: self._fleet(key, job)
        )

    async def _fleet(self, key: str, job: Job) -> Made:
        assert self.cache is not None
        fleet = self.cache.fleet
        if fleet is None:
            made = await self._render(job)
        else:
            made = await flight.once(
                fleet, key, lambda: _taken(fleet.get(key)), lambda: self._render_for_fleet(key, job)
            )
        await self.cache.store(key, made[0])  # the instance sees it before the lease goes
        return made

    async def _render_for_fleet(self, key: str, job: Job) -> Made:
        assert self.cache is not None and self.cache.fleet is not None
        made = await self._render(job)
        await self.cache.fleet.put(key, made[0])  # the fleet sees it before the lock goes
        return made

    async def _render(self, job: Job) -> Made:
        spec = job.spec
        try:
            rendered = await self.pool.run(job)
        except RenderFailed as exc:
            # logged here, once per render (coalesced waiters share it); the client gets
            # only the public reason from the app's error handler, which does not log
            cause = " ".join(str(exc.__cause__).split())  # libvips errors span lines
            log.error("render failed for %s: %s", spec.path, cause, exc_info=exc)
            self.metrics.render_failures.labels("500").inc()
            raise
        except Overloaded:
            raise  # no render was attempted
        except Exception as exc:
            status = exc.status if isinstance(exc, ImgProxyError) else 500
            self.metrics.render_failures.labels(str(status)).inc()
            if isinstance(exc, UpstreamError):  # the only one a render raises: no image
                self.metrics.fallback.labels("not_image").inc()
            raise
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
        return (rendered.data, CONTENT_TYPES[rendered.format]), rendered.steps

    async def close(self) -> None:
        """Wait for background cache writes, then close the tiers and the pool."""
        if self.cache is not None:
            await self.cache.close()
        self.pool.close()


async def _taken(found: Awaitable[Entry | None]) -> Made | None:
    """Another's result (no step timings: this request did not render)."""
    entry = await found
    return None if entry is None else (entry, None)
