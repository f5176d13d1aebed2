"""Fault injection: break things on purpose while load runs, and check what the clients saw
and what the server kept (issue 18). Real `python -m imgproxy` servers, a real
`redis-server`, SIGKILL/SIGSTOP from outside; a slow disk injected by
`tests/faultinject/sitecustomize.py` for the event-loop check.

Each test prints its figures (requests, non-2xx, p99 of the fault window): `pytest -s`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Server, photo, raw_request, server_workers, subprocess_server
from realredis import RedisServer, redis_server
from test_fleet import used_again
from test_workers import own_metric, until

pytestmark = pytest.mark.slow
__all__ = ["redis_server"]  # the fixture

FAULTINJECT = str(Path(__file__).with_name("faultinject"))
PASSTHROUGH_FILES = 150
DELAY = 0.05  # seconds each injected slow read takes


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    photo(800, 600).jpegsave(str(root / "a.jpg"), Q=85)
    photo(2400, 1800).jpegsave(str(root / "big.jpg"), Q=85)
    photo(60, 40).pngsave(str(root / "small.png"))
    photo(300, 250).pngsave(str(root / "pass.png"))  # a passthrough over a few KiB
    for n in range(PASSTHROUGH_FILES):  # files not yet read: each worker memoises them
        (root / f"pass-{n}.png").write_bytes((root / "pass.png").read_bytes())
    poisoned(root / "poison.jpg")
    return root


def poisoned(path: Path) -> None:
    """A JPEG with a valid header (type and size pass every check before decoding) and a
    body cut short: libvips fails on it, a 422, every time it is rendered."""
    photo(2400, 1800).jpegsave(str(path), Q=85)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def base_env(images: Path, tmp_path: Path, workers: int = 2, **extra: str) -> dict[str, str]:
    return {
        "IMAGE_PROXY_ROOT_PATH": str(images),
        "IMAGE_PROXY_WORKERS": str(workers),
        "IMAGE_PROXY_ENABLE_CACHE": "true",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        **extra,
    }


Target = str | tuple[str, dict[str, str]]  # a path, or a path and request headers


def target(t: Target) -> tuple[str, dict[str, str]]:
    return (t, {}) if isinstance(t, str) else t


@dataclass(frozen=True)
class Shot:
    started: float
    seconds: float
    status: str  # "200", or the failure


def mixed(i: int) -> str:
    """Hits, misses and passthrough, in turn."""
    kind = i % 4
    if kind == 0:
        return "/a.jpg?size=120&format=webp"  # a hit after the first
    if kind == 1:
        return f"/a.jpg?size={40 + (i // 4) % 700}&format={('jpeg', 'webp', 'png')[i % 3]}"
    if kind == 2:
        return "/pass.png"
    return "/small.png?size=30"


class Load:
    """`threads` clients sending `paths(i)` one after another, a new connection each."""

    def __init__(self, server: Server, paths: Callable[[int], Target], threads: int = 4) -> None:
        self.server = server
        self.paths = paths
        self.shots: list[Shot] = []
        self._n = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            path, headers = target(self.paths(next(self._n)))
            started = time.monotonic()
            try:
                status = str(raw_request(self.server.port, path, headers=headers).status)
            except Exception as exc:  # reset, refused, or no answer at all
                status = repr(exc)
            self.shots.append(Shot(started, time.monotonic() - started, status))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def wait(self, requests: int) -> None:
        end = len(self.shots) + requests
        until(lambda: len(self.shots) >= end, 120)


def p99(shots: list[Shot]) -> float:
    times = sorted(s.seconds for s in shots)
    return times[min(len(times) - 1, int(len(times) * 0.99))] if times else 0.0


def figures(name: str, shots: list[Shot], window: tuple[float, float] | None = None) -> str:
    bad = [s for s in shots if not s.status.startswith("2")]
    line = f"[faults] {name}: {len(shots)} requests, {len(bad)} non-2xx, p99 {p99(shots):.3f} s"
    if window is not None:
        inside = [s for s in shots if window[0] <= s.started < window[1]]
        line += f"; fault window: {len(inside)} requests, p99 {p99(inside):.3f} s"
    print(line)
    return line


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_redis_fault_mid_load(
    images: Path, tmp_path: Path, redis_server: RedisServer, fault: str
) -> None:
    """redis-server SIGKILLed mid-load then restarted (same port, empty), or SIGSTOPped for
    5 s then resumed: no request fails, the frozen window's p99 stays under 1 s, and the tier
    is used again within 10 s."""
    env = base_env(images, tmp_path, IMAGE_PROXY_REDIS_URL=redis_server.url)
    with subprocess_server(env) as (server, _), Load(server, mixed) as load:
        load.wait(40)
        began = time.monotonic()
        if fault == "killed":
            redis_server.kill()
            load.wait(60)
            redis_server.start()
        else:
            redis_server.pause()
            time.sleep(5)
            redis_server.resume()
        ended = time.monotonic()
        assert used_again(redis_server, server), "Redis was not used again within 10 s"
        load.wait(20)
    figures(f"redis {fault}", load.shots, (began, ended))
    assert [s for s in load.shots if s.status != "200"] == []
    window = [s for s in load.shots if began <= s.started < ended]
    assert len(window) >= 20, len(window)
    if fault == "frozen":
        assert p99(window) < 1.0  # a bound on stalling, not a benchmark


def kill_workers(server: Server, proc_pid: int, kills: int, rng: random.Random) -> list[int]:
    """`kills` SIGKILLs of a random live worker (one just started included), 0.8-1.1 s
    apart: within the crash-loop rate of 4 workers over a 5 s window (9 deaths, with room
    for a watchdog that sees two deaths in one look on a busy machine)."""
    killed: list[int] = []
    last = time.monotonic()
    while len(killed) < kills:
        time.sleep(rng.uniform(0.8, 1.1))
        output = "".join(server.output)
        assert "crash loop" not in output and time.monotonic() - last < 60, output
        # a killed process can take a while to exit on a busy machine: never kill it twice
        alive = set(server_workers(proc_pid).values()) - set(killed)
        if not alive:
            continue
        pid = rng.choice(sorted(alive))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
        last = time.monotonic()
    return killed


def renders_at_once(server: Server, threads: int) -> bool:
    """Start `threads` slow renders together: do they all run at the same time?"""
    done: list[int] = []

    def slow(i: int) -> None:
        url = f"/big.jpg?size={1900 - i}&format=avif&resize_algorithm=lanczos3"
        done.append(raw_request(server.port, url).status)

    senders = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(threads)]
    for t in senders:
        t.start()
    seen = 0.0
    while len(done) < threads:
        seen = max(seen, server.metric("image_transforms_running"))
        if seen >= threads:
            break
        time.sleep(0.02)
    for t in senders:
        t.join(120)
    assert set(done) == {200}, done
    return seen >= threads


def test_thirty_random_worker_kills(images: Path, tmp_path: Path) -> None:
    """30 SIGKILLs of random workers at random moments (start-up included), within the
    crash-loop rate: each death replaced, no permit lost, /metrics still sums them all."""
    threads = 2
    env = base_env(
        images,
        tmp_path,
        workers=4,
        IMAGE_PROXY_TRANSFORM_THREADS=str(threads),
        IMGPROXY_CRASH_WINDOW="5",
    )
    rng = random.Random(18)
    with subprocess_server(env) as (server, proc):
        with Load(server, mixed, threads=3) as load:
            start = time.monotonic()
            killed = kill_workers(server, proc.pid, 30, rng)
            end = time.monotonic()

            def all_up() -> bool:
                now = server_workers(proc.pid)
                return len(now) == 4 and not set(now.values()) & set(killed)

            until(all_up, 30)
            load.wait(20)
        assert proc.poll() is None
        figures("30 worker SIGKILLs", load.shots, (start, end))
        # no permit lost: TRANSFORM_THREADS renders still run at once
        assert renders_at_once(server, threads)
        # /metrics sums every worker, the new ones and the dead ones' counters
        before = server.metric("image_requests_total")
        for i in range(12):
            assert raw_request(server.port, f"/small.png?size={10 + i}").status == 200
        for _ in range(4):
            assert server.metric("image_requests_total") == before + 12
    deaths = [line for line in server.output if "WARNING" in line and " died " in line]
    missed = [pid for pid in killed if not [d for d in deaths if f"(pid {pid})" in d]]
    extra = [d for d in deaths if not any(f"(pid {pid})" in d for pid in killed)]
    assert not missed and not extra and len(deaths) == 30, (missed, extra, "".join(server.output))
    assert not [line for line in server.output if "crash loop" in line]


def test_worker_killed_mid_render_with_one_render_thread(images: Path, tmp_path: Path) -> None:
    """IMAGE_PROXY_TRANSFORM_THREADS=1: the worker running the instance's only render is
    killed; its permit comes back and the next renders are served (none hangs)."""
    env = base_env(images, tmp_path, IMAGE_PROXY_TRANSFORM_THREADS="1")
    with subprocess_server(env) as (server, proc):
        outcome: list[str] = []

        def slow() -> None:
            try:
                url = "/big.jpg?size=2000&format=avif&resize_algorithm=lanczos3"
                outcome.append(str(raw_request(server.port, url).status))
            except Exception as exc:  # its worker is killed: no answer
                outcome.append(repr(exc))

        sender = threading.Thread(target=slow, daemon=True)
        sender.start()
        prom = tmp_path / "prom"
        holder = 0
        until(lambda: server.metric("image_transforms_running") >= 1, 30)
        for pid in server_workers(proc.pid).values():
            if own_metric(prom, pid, "image_transforms_running") >= 1:
                holder = pid
        assert holder, "no worker is rendering"
        os.kill(holder, signal.SIGKILL)
        sender.join(60)
        started = time.monotonic()
        statuses = [
            raw_request(server.port, f"/a.jpg?size={200 + i}&format=webp").status for i in range(6)
        ]
        print(
            f"[faults] killed mid-render: 6 renders after the kill in {time.monotonic() - started:.2f} s"
        )
        assert statuses == [200] * 6


def waiters(i: int) -> Target:
    """Hits, misses, passthrough of files not read yet, renders of sources not probed yet,
    conditional renders, and every fifth request one of a burst of identical new misses
    (waiters of one key)."""
    if i % 5 == 0:
        return f"/a.jpg?size={300 + i // 40}&format=png"
    half = PASSTHROUGH_FILES // 2
    if i % 5 == 1:
        return f"/pass-{i // 5 % half}.png"
    if i % 5 == 2:
        return f"/a.jpg?size={60 + i % 90}&format=webp", {"If-None-Match": '"other"'}
    if i % 5 == 3:  # renders of sources not probed yet (their header is read once)
        return f"/pass-{half + i // 5 % half}.png?size=40&format=webp"
    return mixed(i)


def test_no_slow_callback_under_mixed_load(images: Path, tmp_path: Path) -> None:
    """asyncio debug mode, slow_callback_duration 20 ms, and a slow disk (every cache-store
    read and every file read over 4 KiB takes 50 ms): under hits, misses, passthrough,
    conditional renders and waiters of one key, no event-loop callback is slow: no read of a
    cache tier or of a file over a few KiB, and no wait, runs on the loop."""
    env = base_env(
        images,
        tmp_path,
        IMAGE_PROXY_TRANSFORM_THREADS="2",
        PYTHONASYNCIODEBUG="1",
        PYTHONPATH=FAULTINJECT,
        IMGPROXY_TEST_SLOW_READS=str(DELAY),
    )
    with subprocess_server(env) as (server, _):
        with Load(server, mixed, threads=2) as warm:
            warm.wait(40)  # every code path once per worker: imports and first calls done
        mark = len(server.output)
        with Load(server, waiters, threads=6) as load:
            load.wait(300)
        figures("asyncio debug, slow disk", load.shots)
        output = server.output[mark:]
    on_loop = [line for line in output if "faultinject: read on the event loop" in line]
    slow = [line for line in output if "Executing" in line and " took " in line]
    blocked = [line for line in slow if float(line.split(" took ")[1].split()[0]) >= DELAY]
    print(f"[faults] slow callbacks: {len(slow)} over 20 ms, {len(blocked)} over {DELAY} s")
    assert [s for s in load.shots if s.status != "200"] == []
    assert on_loop == [], "".join(on_loop)  # deterministic: no read ran on the loop at all
    # Wall-clock callbacks also measure the machine: with more runnable processes than cores
    # (other jobs), a few ms of CPU on the loop can take 80 ms. The timing check then only
    # reports; the check above still proves that no read ran on the loop.
    if os.getloadavg()[0] <= (os.cpu_count() or 1):
        assert blocked == [], "".join(blocked)


def test_a_poisoned_source_is_rendered_once_per_window(
    images: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """50 requests at once for a poisoned source, over two replicas of 2 workers sharing one
    Redis: one render attempt in all, and every client gets the same 422."""
    envs = [
        base_env(images, tmp_path / name, IMAGE_PROXY_REDIS_URL=redis_server.url)
        for name in ("a", "b")
    ]
    with subprocess_server(envs[0]) as (a, _), subprocess_server(envs[1]) as (b, _):
        url = "/poison.jpg?size=300&format=webp"
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda i: raw_request((a, b)[i % 2].port, url), range(50)))
        attempts = sum(
            s.metric(name)
            for s in (a, b)
            for name in ("image_transforms_total", "image_render_failures_total")
        )
    print(f"[faults] poisoned source: 50 requests, {attempts:.0f} render attempt(s)")
    assert {(r.status, r.body) for r in answers} == {(422, answers[0].body)}
    assert attempts == 1
