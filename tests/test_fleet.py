"""The fleet tier: two instances (`python -m imgproxy`, 2 workers each) sharing a real
`redis-server`. Renders are shared and single-flighted across the fleet; Redis killed or
frozen mid-traffic never costs a request (one warning, a counter), and a Redis that comes
back is used again."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyvips

from conftest import Server, photo, raw_request, subprocess_server
from imgproxy.cache import Entry, FleetTier
from realredis import RedisServer, SlowLink, need_redis, redis_server

pytestmark = pytest.mark.slow
__all__ = ["redis_server"]  # the fixture


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    photo(800, 600).jpegsave(str(root / "a.jpg"))
    return root


def env(root: Path, prom: Path, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "IMAGE_PROXY_ROOT_PATH": str(root),
        "IMAGE_PROXY_WORKERS": "2",
        "IMAGE_PROXY_ENABLE_CACHE": "true",
        "IMAGE_PROXY_REDIS_URL": redis_url,
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
        **extra,
    }


@contextlib.contextmanager
def two_instances(
    images: Path, tmp_path: Path, redis: RedisServer, **extra: str
) -> Iterator[tuple[Server, Server]]:
    with (
        subprocess_server(env(images, tmp_path / "prom-a", redis.url, **extra)) as (a, _),
        subprocess_server(env(images, tmp_path / "prom-b", redis.url, **extra)) as (b, _),
    ):
        yield a, b


def test_replicas_share_renders_through_redis(
    images: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    extra = {"IMAGE_PROXY_REDIS_TTL": "1000", "IMAGE_PROXY_REDIS_PREFIX": "img-test:"}
    with two_instances(images, tmp_path, redis_server, **extra) as (a, b):
        # fleet single-flight: 20 identical concurrent misses split over both -> 1 render
        url = "/a.jpg?size=700&format=avif&resize_algorithm=lanczos3"
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda i: raw_request((a, b)[i % 2].port, url), range(20)))
        assert {r.status for r in answers} == {200}
        assert len({r.body for r in answers}) == 1
        assert a.metric("image_transforms_total") + b.metric("image_transforms_total") == 1

        # a render on one replica is a HIT on the other, from Redis
        first = raw_request(a.port, "/a.jpg?size=150&format=webp")
        again = raw_request(b.port, "/a.jpg?size=150&format=webp")
        assert first.headers["x-cache"] == "MISS" and again.headers["x-cache"] == "HIT"
        assert again.body == first.body and again.headers["etag"] == first.headers["etag"]
        assert pyvips.Image.new_from_buffer(again.body, "").width == 150
        assert b.metric("image_cache_lookups_total", tier="redis", result="hit") >= 1
        assert a.metric("image_transforms_total") + b.metric("image_transforms_total") == 2

        # keys carry the prefix, values the TTL
        client = redis_server.client()
        keys = [k.decode() for k in client.keys("*")]
        assert keys and all(k.startswith("img-test:") for k in keys)
        values = [k for k in keys if not k.endswith((":lock", ":done"))]
        assert len(values) == 2
        assert all(0 < client.ttl(k) <= 1000 for k in values)


class Load:
    """Requests for new renders (so every one asks Redis) in a background thread."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.n = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.n += 1
            url = f"/a.jpg?size={20 + self.n}&format=jpeg"
            self.statuses.append(raw_request(self.server.port, url).status)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def wait(self, requests: int) -> None:
        end = self.n + requests
        while self.n < end:
            time.sleep(0.01)


def warnings(output: str) -> int:
    return len(re.findall(r"redis cache tier unavailable", output))


def used_again(redis: RedisServer, server: Server, within: float = 10.0) -> bool:
    """A new render reaches Redis within `within` seconds (asking now and then)."""
    client = redis.client()
    client.flushall()
    deadline = time.monotonic() + within
    n = 0
    while time.monotonic() < deadline:
        n += 1
        raw_request(server.port, f"/a.jpg?size={500 + n}&format=png")
        if any(not k.endswith((b":lock", b":done")) for k in client.keys("*")):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("outage", ["killed", "frozen"])
def test_redis_outage_costs_no_request(
    images: Path, tmp_path: Path, redis_server: RedisServer, outage: str
) -> None:
    # a timeout above this shared machine's scheduling noise, so the one warning is the outage's
    extra = {"IMAGE_PROXY_REDIS_TIMEOUT": "0.5"}
    with subprocess_server(env(images, tmp_path / "prom", redis_server.url, **extra)) as (
        server,
        _proc,
    ):
        with Load(server) as load:
            load.wait(10)
            if outage == "killed":
                redis_server.kill()
            else:
                redis_server.pause()
            load.wait(40)
            if outage == "killed":
                redis_server.start()  # same port, empty
            else:
                redis_server.resume()
            load.wait(5)
        assert load.statuses and set(load.statuses) == {200}
        assert server.metric("image_cache_errors_total", tier="redis") >= 1
        assert used_again(redis_server, server), "Redis was not used again within 10 s"
    output = "".join(server.output)
    assert warnings(output) == 1, output
    serving = output.split("Received signal SIGTERM")[0]  # Sanic's own shutdown races aside
    assert "Traceback" not in serving and "ERROR" not in serving


def fleet_tier(url: str, timeout: float = 0.1) -> FleetTier:
    return FleetTier(url, ttl=60, prefix="slow:", timeout=timeout)


def test_a_big_entry_is_read_over_a_slow_link(redis_server: RedisServer) -> None:
    """A 6 MB entry over a 60 MB/s link takes over 0.1 s to move: `get` (like `put`) has a
    budget for its size (0.1 s + 6 MB at 20 MB/s = 0.4 s) instead of the 0.1 s of a small
    call, so it is read, not a failure (4x the link's time: room for a loaded machine)."""
    body = os.urandom(6_000_000)
    redis_server.client().set("slow:{big}", b"image/png\n" + body)
    link = SlowLink(redis_server.port, rate=60e6)

    async def run() -> tuple[Entry | None, bool, float]:
        tier = fleet_tier(f"redis://127.0.0.1:{link.port}/0")
        try:
            got = await tier.get("big")
            stored = await tier.put("big2", (body, "image/png"))
            return got, stored, tier.breaker.state[1]
        finally:
            await tier.close()

    try:
        got, stored, failures = asyncio.run(run())
    finally:
        link.close()
    assert got == (body, "image/png")
    assert stored and redis_server.client().strlen("slow:{big2}") == len(body) + 10
    assert failures == 0  # nothing counted against the breaker


def test_a_tls_handshake_is_not_bounded_by_the_call_timeout(tmp_path: Path) -> None:
    """rediss:// to a server whose handshake takes 0.3 s (a distant TLS Redis): the 0.1 s
    call timeout does not apply to setting up the connection."""
    need_redis()
    server = RedisServer(tmp_path / "redis-tls", tls=True)
    link = SlowLink(server.port, first_delay=0.3)
    try:
        server.client().set("slow:{k}", b"image/webp\nbytes")

        async def run() -> Entry | None:
            tier = fleet_tier(f"rediss://127.0.0.1:{link.port}/0?ssl_cert_reqs=none")
            try:
                return await tier.get("k")  # no warm-up: the first call connects
            finally:
                await tier.close()

        assert asyncio.run(run()) == (b"bytes", "image/webp")
    finally:
        link.close()
        server.stop()
