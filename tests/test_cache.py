"""The transform cache: tiers, keys, freshness, degradation and single-flight."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diskcache
import pytest
import pyvips

from conftest import Resp, Server, photo
from imgproxy.cache import MemoryTier
from imgproxy.cache.breaker import OPEN_FIRST, OPEN_MAX, Breaker
from imgproxy.cache.chain import WriteBehind
from imgproxy.cache.memory import Entry

CACHE_ON = {"IMAGE_PROXY_ENABLE_CACHE": "true"}


def metric(server: Server, name: str, **labels: str) -> float:
    return server.metric(name, **labels)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    photo(400, 300).jpegsave(str(root / "a.jpg"))
    photo(200, 100).jpegsave(str(root / "b.jpg"))
    return root


def test_memory_tier_lru_by_bytes() -> None:
    tier = MemoryTier(max_bytes=10, max_item=6)
    assert tier.put("a", (b"aaaa", "t")) and tier.put("b", (b"bbbb", "t"))
    assert tier.get("a") is not None  # a is now the most recent
    assert tier.put("c", (b"cccc", "t"))  # evicts b (least recent)
    assert tier.get("b") is None and tier.get("a") is not None and tier.size == 8
    assert not tier.put("big", (b"x" * 7, "t"))  # over max_item: skipped
    assert tier.get("big") is None


def test_miss_then_hit(serve: Callable[..., Server], images: Path) -> None:
    s = serve(images, **CACHE_ON)
    first = s.get("/a.jpg?size=100&format=webp")
    second = s.get("/a.jpg?size=100&format=webp")
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    assert first.body == second.body
    assert second.headers["content-type"] == "image/webp"
    assert second.headers["etag"] == first.headers["etag"]
    assert metric(s, "image_cache_lookups_total", tier="memory", result="hit") == 1
    assert metric(s, "image_transforms_total") == 1


def test_no_x_cache_when_disabled_or_passthrough(
    serve: Callable[..., Server], images: Path
) -> None:
    assert "x-cache" not in serve(images).get("/a.jpg?size=100").headers
    assert "x-cache" not in serve(images, **CACHE_ON).get("/a.jpg").headers


def test_key_ignores_noise_but_not_dpr_header(serve: Callable[..., Server], images: Path) -> None:
    s = serve(images, **CACHE_ON)
    assert s.get("/a.jpg?size=100&v=1").headers["x-cache"] == "MISS"
    assert s.get("/a.jpg?v=2&size=100&utm_source=x").headers["x-cache"] == "HIT"
    assert s.get("/a.jpg?size=50&dpr=2").headers["x-cache"] == "HIT"  # same target edge
    r = s.get("/a.jpg?size=100", headers={"Sec-CH-DPR": "2"})
    assert r.headers["x-cache"] == "MISS"
    assert pyvips.Image.new_from_buffer(r.body, "").width == 200
    assert s.get("/a.jpg?size=100&format=png").headers["x-cache"] == "MISS"


def test_changed_source_is_never_served_stale(serve: Callable[..., Server], images: Path) -> None:
    s = serve(images, **CACHE_ON)
    old = s.get("/a.jpg?size=100&format=png")
    photo(300, 300).jpegsave(str(images / "a.jpg"))  # new content, new size
    st = (images / "a.jpg").stat()
    os.utime(images / "a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new = s.get("/a.jpg?size=100&format=png")
    assert new.headers["x-cache"] == "MISS"
    assert pyvips.Image.new_from_buffer(new.body, "").height == 100
    assert new.body != old.body and new.headers["etag"] != old.headers["etag"]
    (images / "a.jpg").unlink()
    assert s.get("/a.jpg?size=100&format=png").status == 404


def test_touched_source_renders_again(serve: Callable[..., Server], images: Path) -> None:
    s = serve(images, **CACHE_ON)
    s.get("/b.jpg?size=50")
    os.utime(images / "b.jpg", (time.time() + 5, time.time() + 5))
    assert s.get("/b.jpg?size=50").headers["x-cache"] == "MISS"
    assert metric(s, "image_transforms_total") == 2


def test_items_over_max_item_skip_memory(serve: Callable[..., Server], images: Path) -> None:
    s = serve(images, IMAGE_PROXY_CACHE_MAX_ITEM_SIZE="100", **CACHE_ON)
    assert s.get("/a.jpg?size=200&format=png").headers["x-cache"] == "MISS"
    assert s.get("/a.jpg?size=200&format=png").headers["x-cache"] == "MISS"


def disk_env(path: Path) -> dict[str, str]:
    return {
        **CACHE_ON,
        "IMAGE_PROXY_ENABLE_DISK_CACHE": "true",
        "IMAGE_PROXY_CACHE_DISK_PATH": str(path),
        "IMAGE_PROXY_CACHE_MEMORY_SIZE": "0",  # every hit below must come from disk
    }


def wait_for_hit(s: Server, url: str) -> None:
    for _ in range(100):
        if s.get(url).headers.get("x-cache") == "HIT":
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} never became a HIT")


def wait_for_disk_write(cache_dir: Path) -> None:
    """Until the background write has landed (a hit can come from the write in flight)."""
    for _ in range(100):
        with diskcache.Cache(str(cache_dir)) as c:
            if len(c):
                return
        time.sleep(0.05)
    raise AssertionError("nothing was written to the disk tier")


def test_disk_tier_hits(serve: Callable[..., Server], images: Path, tmp_path: Path) -> None:
    s = serve(images, **disk_env(tmp_path / "cache"))
    assert s.get("/a.jpg?size=64&format=avif").headers["x-cache"] == "MISS"
    wait_for_hit(s, "/a.jpg?size=64&format=avif")
    assert metric(s, "image_cache_lookups_total", tier="disk", result="hit") >= 1
    assert metric(s, "image_transforms_total") == 1


def test_disk_only_needs_enable_cache(
    serve: Callable[..., Server], images: Path, tmp_path: Path
) -> None:
    s = serve(
        images,
        IMAGE_PROXY_ENABLE_DISK_CACHE="true",
        IMAGE_PROXY_CACHE_DISK_PATH=str(tmp_path / "c"),
    )
    assert "x-cache" not in s.get("/a.jpg?size=64").headers
    assert not (tmp_path / "c").exists()


def test_deleted_cache_directory_does_not_break_requests(
    serve: Callable[..., Server], images: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    s = serve(images, **disk_env(cache_dir))
    s.get("/a.jpg?size=64")
    wait_for_hit(s, "/a.jpg?size=64")
    wait_for_disk_write(cache_dir)
    shutil.rmtree(cache_dir)
    r = s.get("/a.jpg?size=64")
    assert r.status == 200 and r.headers["x-cache"] == "MISS"
    assert pyvips.Image.new_from_buffer(r.body, "").width == 64
    wait_for_hit(s, "/a.jpg?size=64")  # reopened in a fresh directory
    wait_for_disk_write(cache_dir)
    shutil.rmtree(cache_dir)  # twice: dropped for good, still serving
    for _ in range(3):
        assert s.get("/a.jpg?size=65").status == 200


def test_unusable_cache_directory_degrades(
    serve: Callable[..., Server], images: Path, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    s = serve(images, **{**disk_env(not_a_dir), "IMAGE_PROXY_CACHE_MEMORY_SIZE": "1000000"})
    assert s.get("/a.jpg?size=64").headers["x-cache"] == "MISS"
    assert s.get("/a.jpg?size=64").headers["x-cache"] == "HIT"  # memory still works
    assert metric(s, "image_cache_errors_total", tier="disk") >= 1


def test_single_flight(serve: Callable[..., Server], images: Path) -> None:
    s = serve(images, **CACHE_ON)
    url = "/a.jpg?size=300&format=avif&resize_algorithm=lanczos3"
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: s.raw(url), range(20)))
    assert {r.status for r in responses} == {200}
    assert len({r.body for r in responses}) == 1
    assert metric(s, "image_transforms_total") == 1


def test_encoder_settings_are_part_of_the_key(
    serve: Callable[..., Server], images: Path, tmp_path: Path
) -> None:
    """The disk tier outlives a restart: a quality change must not serve the old bytes."""
    env = disk_env(tmp_path / "cache")
    url = "/a.jpg?size=200&format=jpeg"
    before = serve(images, **env).get(url)
    wait_for_disk_write(tmp_path / "cache")
    same = serve(images, **env).get(url)  # another process, same settings: the disk's bytes
    assert same.headers["x-cache"] == "HIT" and same.body == before.body
    lower = serve(images, IMAGE_PROXY_JPEG_QUALITY="30", **env).get(url)
    assert lower.headers["x-cache"] == "MISS"
    assert lower.headers["etag"] != before.headers["etag"]
    assert lower.body != before.body and len(lower.body) < len(before.body)
    webp = {**env, "IMAGE_PROXY_WEBP_LOSSLESS": "true"}
    assert serve(images, **webp).get(url).headers["x-cache"] == "MISS"  # any encoder field


def test_slow_disk_drops_writes_instead_of_queueing_them(
    serve: Callable[..., Server], images: Path, tmp_path: Path
) -> None:
    """With the disk tier's SQLite write lock held elsewhere, every write waits out its busy
    timeout: the writes waiting stay bounded (the extra ones are dropped and counted), and
    every request is still answered."""
    cache_dir = tmp_path / "cache"
    s = serve(images, **{**disk_env(cache_dir), "IMAGE_PROXY_CACHE_MEMORY_SIZE": "10000000"})
    assert s.app is not None
    chain = s.app.ctx.service.cache
    blocker = sqlite3.connect(str(cache_dir / "cache.db"), isolation_level=None, timeout=5)
    blocker.execute("BEGIN IMMEDIATE")  # a writer that never finishes
    try:
        most = 0
        for i in range(120):
            r = s.get(f"/b.jpg?size={10 + i}&format=png")
            assert r.status == 200 and pyvips.Image.new_from_buffer(r.body, "").width == 10 + i
            most = max(most, len(chain.disk_writes.pending))
        assert most <= chain.disk_writes.max_items
        assert metric(s, "image_cache_writes_dropped_total", tier="disk") >= 1
        assert s.get("/b.jpg?size=10&format=png").headers["x-cache"] == "HIT"  # memory
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_lease_is_refreshed_only_by_its_holder(tmp_path: Path) -> None:
    """A holder whose lease expired (and was taken by another worker) cannot extend the
    new holder's lease by refreshing its own."""
    import time

    from imgproxy.cache.store import Leases

    leases = Leases(str(tmp_path / "leases"))
    try:
        assert leases.acquire("k", "old", 0.01)
        time.sleep(0.05)  # expired
        assert leases.acquire("k", "new", 0.5)
        leases.refresh("k", "old", 3600)  # the old holder's keeper, late
        time.sleep(0.7)
        assert not leases.held("k")  # the new lease expired on its own
        assert leases.acquire("k", "next", 0.5)
        leases.refresh("k", "next", 3600)  # its holder's refresh works
        time.sleep(0.7)
        assert leases.held("k")
    finally:
        leases.close()


def test_breaker_opens_after_trip_failures_and_one_probe_closes_it() -> None:
    errors: list[int] = []
    breaker = Breaker(None, lambda: errors.append(1))
    state = breaker.state
    breaker.failure(ConnectionError("down"))
    assert breaker.closed and breaker.allow()  # one slow answer is not an outage
    breaker.failure(ConnectionError("down"))
    assert not breaker.closed and len(errors) == 2
    state[0] = 0.0  # the open time is over (no sleeping in tests)
    assert breaker.allow()  # half-open: this call is the probe
    assert not breaker.allow()  # the others skip while it runs
    breaker.success()
    assert breaker.closed and breaker.allow() and breaker.allow()


def test_breaker_open_time_doubles_per_failed_probe_up_to_its_cap() -> None:
    breaker = Breaker([0.0, 0.0, 0.0], lambda: None)
    opened: list[float] = []
    for _ in range(Breaker.TRIP + 5):
        before = time.monotonic()
        breaker.failure(TimeoutError())
        if not breaker.closed:
            opened.append(breaker.state[0] - before)
    expected = [min(OPEN_MAX, OPEN_FIRST * 2**n) for n in range(6)]  # 0.5, 1, 2, 4, 4, 4
    assert [round(o * 2) / 2 for o in opened] == expected


def test_write_behind_is_bounded_by_count_and_bytes_and_drains() -> None:
    written: dict[str, Entry] = {}
    drops: list[int] = []
    gate = threading.Event()

    def put(key: str, entry: Entry) -> bool:
        gate.wait(10)
        written[key] = entry
        return True

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            wb = WriteBehind(put, executor, 2, 10, lambda: drops.append(1))
            assert wb.submit("a", (b"aaaa", "t")) is not None
            assert wb.submit("a", (b"aaaa", "t")) is None  # already waiting: not twice
            assert wb.get("a") == (b"aaaa", "t")  # readable while it waits
            assert wb.submit("big", (b"x" * 7, "t")) is None  # 4 + 7 bytes > 10
            assert wb.submit("b", (b"bb", "t")) is not None
            assert wb.submit("c", (b"c", "t")) is None  # 2 items waiting already
            assert len(drops) == 2  # big and c; a duplicate is no drop
            gate.set()
            await wb.drain()
            await asyncio.sleep(0)  # the done callbacks
            assert (wb.pending, wb.bytes) == ({}, 0)
            assert sorted(written) == ["a", "b"]
            assert wb.submit("c", (b"c", "t")) is not None
            await wb.drain()

    asyncio.run(main())
    assert "c" in written


def test_remembered_answers_follow_a_changed_file_within_a_second(
    serve: Callable[..., Server], images: Path
) -> None:
    """A URL's answer (negotiated spec, key, ETag, headers) is learnt once per source
    identity: repeated hits and passthroughs carry the very same headers, and a file changed
    on disk shows within a second (SPEC: the identity may be memoised for at most 1 s per
    path), headers included."""
    s = serve(images, **CACHE_ON)
    ignore = {"x-request-id", "server-timing", "date"}

    def stable(r: Resp) -> dict[str, str]:
        return {k: v for k, v in r.headers.items() if k not in ignore}

    for url in ("/a.jpg", "/a.jpg?size=100&format=png"):
        s.get(url)
        first, second = s.get(url), s.get(url)
        assert stable(first) == stable(second) and first.body == second.body
    old_pass, old_hit = s.get("/a.jpg"), s.get("/a.jpg?size=100&format=png")
    assert old_hit.headers["x-cache"] == "HIT"
    photo(300, 200).jpegsave(str(images / "a.jpg"))
    later = time.time() + 10
    os.utime(images / "a.jpg", (later, later))
    time.sleep(1.0)
    new_pass = s.get("/a.jpg")
    assert new_pass.body == (images / "a.jpg").read_bytes()
    assert new_pass.headers["etag"] != old_pass.headers["etag"]
    assert new_pass.headers["last-modified"] != old_pass.headers["last-modified"]
    miss = s.get("/a.jpg?size=100&format=png")
    assert miss.headers["x-cache"] == "MISS" and miss.headers["etag"] != old_hit.headers["etag"]
    assert pyvips.Image.new_from_buffer(miss.body, "").width == 100
    hit = s.get("/a.jpg?size=100&format=png")
    assert hit.headers["x-cache"] == "HIT" and stable(hit) == {**stable(miss), "x-cache": "HIT"}
