"""One cache and one render queue per instance: `python -m imgproxy` with 2 workers.

A render by any worker is a HIT for every worker; N identical concurrent misses over all
workers render once; at most IMAGE_PROXY_TRANSFORM_THREADS renders run in the instance and
at most IMAGE_PROXY_TRANSFORM_QUEUE wait, 503 + Retry-After beyond; a waiter whose render
leader died renders itself after a bounded wait."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import diskcache
import pytest
import pyvips

from conftest import photo, raw_request, subprocess_server

pytestmark = pytest.mark.slow


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    photo(800, 600).jpegsave(str(root / "a.jpg"))
    photo(3000, 2000).jpegsave(str(root / "big.jpg"), Q=90)
    return root


def env(root: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "IMAGE_PROXY_ROOT_PATH": str(root),
        "IMAGE_PROXY_WORKERS": "2",
        "IMAGE_PROXY_ENABLE_CACHE": "true",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        **extra,
    }


def served(prom: Path, main_pid: int) -> int:
    """How many worker processes have counted requests (the main process counts restarts)."""
    return len({p.stem.rsplit("_", 1)[1] for p in prom.glob("counter_*.db")} - {str(main_pid)})


def instance_dirs(main_pid: int | None = None) -> set[str]:
    """The instance tiers in /dev/shm (of the server whose main process is `main_pid`: other
    test runs on the machine make their own)."""
    prefix = "imgproxy-" if main_pid is None else f"imgproxy-{main_pid}-"
    return {d for d in os.listdir("/dev/shm") if d.startswith(prefix)}


def test_a_render_by_any_worker_is_a_hit_for_every_worker(images: Path, tmp_path: Path) -> None:
    url = "/a.jpg?size=200&format=webp"
    prom = tmp_path / "prom"
    with subprocess_server(env(images, tmp_path)) as (server, proc):
        assert len(instance_dirs(proc.pid)) == 1  # the instance's tmpfs tier
        first = raw_request(server.port, url)
        assert first.headers["x-cache"] == "MISS"
        # a new connection per request, 4 at a time, until both workers have answered
        # (the kernel's split is uneven, sometimes all on one worker for a while)
        answers = []
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for _ in range(50):
                answers += pool.map(lambda _: raw_request(server.port, url), range(8))
                if served(prom, proc.pid) == 2:
                    break
        assert served(prom, proc.pid) == 2, "one worker answered all"
        assert {a.headers["x-cache"] for a in answers} == {"HIT"}
        assert {a.body for a in answers} == {first.body}
        assert server.metric("image_transforms_total") == 1
    assert instance_dirs(proc.pid) == set()  # removed at shutdown


def test_concurrent_identical_misses_render_once_per_instance(images: Path, tmp_path: Path) -> None:
    url = "/a.jpg?size=700&format=avif&resize_algorithm=lanczos3"
    with subprocess_server(env(images, tmp_path)) as (server, _):
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: raw_request(server.port, url), range(20)))
        assert {a.status for a in answers} == {200}
        assert len({a.body for a in answers}) == 1
        assert pyvips.Image.new_from_buffer(answers[0].body, "").width == 700
        assert server.metric("image_transforms_total") == 1


def test_admission_is_per_instance(images: Path, tmp_path: Path) -> None:
    """One permit, no queue, for the whole instance: of slow different renders sent while
    one runs, spread over both workers, none runs beside it: 503 + Retry-After."""
    extra = {"IMAGE_PROXY_TRANSFORM_THREADS": "1", "IMAGE_PROXY_TRANSFORM_QUEUE": "0"}
    prom = tmp_path / "prom"
    with subprocess_server(env(images, tmp_path, **extra)) as (server, proc):
        answers = []
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            for round_ in range(3):  # until both workers got some (the kernel decides)
                futures = []
                for i in range(10):  # one at a time: each arrival is a new accept race
                    url = f"/big.jpg?size={1500 + 10 * round_ + i}&format=avif"
                    futures.append(pool.submit(raw_request, server.port, url))
                    time.sleep(0.03)
                answers = [f.result() for f in futures]
                if served(prom, proc.pid) == 2:
                    break
        assert served(prom, proc.pid) == 2, "one worker answered all"
        ok = [a for a in answers if a.status == 200]
        busy = [a for a in answers if a.status == 503]
        assert len(ok) + len(busy) == 10
        assert len(ok) <= 1, "two renders ran at once: admission is per worker"
        assert all(a.headers.get("retry-after") for a in busy)
        assert "cache-control" not in busy[0].headers
        # the permit came back: the instance renders again
        assert raw_request(server.port, "/a.jpg?size=50").status == 200


def _leader_pid(main_pid: int) -> int | None:
    """The pid in the instance's single-flight lease, if a render holds one."""
    for name in instance_dirs(main_pid):
        with diskcache.Cache(f"/dev/shm/{name}/leases") as leases:
            for key in leases.iterkeys():
                token = leases.get(key)
                if isinstance(token, str):
                    return int(token.split("-")[0])
    return None


def test_a_waiter_renders_when_the_leader_dies(images: Path, tmp_path: Path) -> None:
    """The leader is SIGKILLed mid-render, holding the lease and the instance's only render
    permit: the lease expires, the watchdog returns the permit, the next request renders."""
    url = "/big.jpg?size=2400&format=avif&resize_algorithm=lanczos3"
    one_permit = {"IMAGE_PROXY_TRANSFORM_THREADS": "1", "IMAGE_PROXY_TRANSFORM_QUEUE": "8"}
    with subprocess_server(env(images, tmp_path, **one_permit)) as (server, proc):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(raw_request, server.port, url)
            leader = None
            for _ in range(200):
                leader = _leader_pid(proc.pid)
                if leader is not None:
                    break
                time.sleep(0.02)
            assert leader is not None, "no lease taken for the render"
            os.kill(leader, signal.SIGKILL)  # mid-render, holding the lease
            with pytest.raises((OSError, IndexError)):  # connection lost, no answer
                first.result(60)
        # the other worker takes over once the lease expires: an answer, not a hang (and
        # not a 503 after waiting for a permit that died with the leader)
        answer = raw_request(server.port, url)
        assert answer.status == 200
        assert pyvips.Image.new_from_buffer(answer.body, "").width == 2400


def test_no_usable_tmpfs_degrades_to_per_worker_memory(images: Path, tmp_path: Path) -> None:
    extra = {"IMAGE_PROXY_CACHE_MEMORY_PATH": str(tmp_path / "missing")}
    with subprocess_server(env(images, tmp_path, **extra)) as (server, _proc):
        answers = [raw_request(server.port, "/a.jpg?size=90&format=png") for _ in range(10)]
        assert {a.status for a in answers} == {200}
        assert answers[0].headers["x-cache"] == "MISS" and "HIT" in {
            a.headers["x-cache"] for a in answers
        }
        assert server.metric("image_transforms_total") <= 2  # at most once per worker
    output = "".join(server.output)
    assert output.count("instance memory tier unavailable") == 1, output


def test_a_poisoned_source_renders_once_for_the_instance(images: Path, tmp_path: Path) -> None:
    """A valid header over a corrupt body, asked 20 times at once over both workers and then
    again: one render attempt; every client gets the same 422 (the holder's failure reaches
    the waiters of the other worker through the lease, then a negative entry answers)."""
    full = (images / "big.jpg").read_bytes()
    (images / "poisoned.jpg").write_bytes(full[: len(full) // 3])
    url = "/poisoned.jpg?size=300&format=webp"
    with subprocess_server(env(images, tmp_path)) as (server, _):
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: raw_request(server.port, url), range(20)))
        answers += [raw_request(server.port, url) for _ in range(10)]
        assert {a.status for a in answers} == {422}
        assert len({a.body for a in answers}) == 1
        assert server.metric("image_render_failures_total") == 1
