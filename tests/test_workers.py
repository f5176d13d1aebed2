"""A worker killed from outside (SIGKILL, as the kernel's OOM killer does) is replaced.

Real `python -m imgproxy` servers in their own session; workers are found in /proc and
killed with SIGKILL. Sanic 25.12 alone leaves a killed worker dead, silently."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from conftest import (
    Server,
    kill_images,
    metric_total,
    raw_request,
    server_workers,
    subprocess_server,
)

pytestmark = pytest.mark.slow

DEADLINE = 10.0  # the contract: a new worker serves within 10 s of the kill


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return kill_images(tmp_path)


def env_for(root: Path, tmp_path: Path, workers: int) -> dict[str, str]:
    return {
        "IMAGE_PROXY_ROOT_PATH": str(root),
        "IMAGE_PROXY_WORKERS": str(workers),
        "IMAGE_PROXY_TRANSFORM_THREADS": "1",  # slow transforms queue up: they stay in flight
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }


def workers(main_pid: int) -> dict[str, int]:
    return server_workers(main_pid)


def own_metric(prom_dir: Path, pid: int, name: str = "image_requests_total") -> float:
    """One process's share of a metric: its own multiprocess files, summed on their own."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in prom_dir.glob(f"*_{pid}.db"):
            shutil.copy(f, tmp)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=tmp)  # type: ignore[no-untyped-call]
        return metric_total(generate_latest(registry).decode(), name)


def warnings_about_deaths(server: Server) -> list[str]:
    return [line for line in server.output if "WARNING" in line and " died " in line]


class Poller(threading.Thread):
    """Light load: one small passthrough after another, each on a new connection."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.results: list[tuple[float, str]] = []  # (start time, "200" or the failure)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                outcome = str(raw_request(self.port, "/small.png").status)
            except Exception as exc:  # reset, refused, or no answer at all (empty reply)
                outcome = repr(exc)
            self.results.append((started, outcome))
            self.stop.wait(0.05)


def test_killed_worker_is_replaced(images: Path, tmp_path: Path) -> None:
    """SIGKILL a worker that holds requests, under a light polling load: a new pid serves
    within 10 s, nothing sent after the kill fails, one WARNING line, /metrics right."""
    prom = tmp_path / "prom"
    with subprocess_server(env_for(images, tmp_path, workers=2)) as (server, proc):
        before = workers(proc.pid)
        assert len(before) == 2, before
        samples = raw_request(server.port, "/metrics").text
        assert "\nimage_worker_restarts_total 0.0\n" in samples  # there before any death
        poller = Poller(server.port)
        poller.start()

        # Slow transforms (one executor thread per worker) so the victim holds requests.
        slow: list[str] = []

        def one(i: int) -> None:
            try:
                url = f"/big.jpg?size={1800 - i}&format=avif&resize_algorithm=lanczos3"
                slow.append(str(raw_request(server.port, url).status))
            except Exception as exc:  # held by the victim: the connection dies with it
                slow.append(repr(exc))

        senders = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(6)]
        for t in senders:
            t.start()
        victim_name, victim = "", 0
        for _ in range(300):
            holding = {
                n: p
                for n, p in before.items()
                if own_metric(prom, p, "image_requests_in_flight") >= 1
            }
            if holding:
                victim_name, victim = next(iter(holding.items()))
                break
            time.sleep(0.05)
        assert victim, "no worker ever had a request in flight"

        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replacement = 0
        while time.monotonic() < killed_at + DEADLINE:
            now = workers(proc.pid)
            pid = now.get(victim_name, victim)
            if pid != victim and own_metric(prom, pid, "image_requests_total") > 0:
                replacement = pid
                break
            time.sleep(0.1)
        assert replacement, f"no new worker served within {DEADLINE} s: {workers(proc.pid)}"

        for t in senders:
            t.join(120)
        poller.stop.set()
        poller.join(30)
        after_kill = [r for started, r in poller.results if started > killed_at + 0.5]
        assert after_kill, "the poller sent nothing after the kill"
        assert set(after_kill) == {"200"}, [r for r in after_kill if r != "200"]
        answered = [r for r in slow if r.isdigit()]
        assert set(answered) <= {"200"}, slow  # the others lost their connection with the victim
        survivors = {p for n, p in before.items() if n != victim_name}
        assert set(workers(proc.pid).values()) == survivors | {replacement}

        # the watchdog counts the restart when it next looks (every `interval`), which may
        # be after the replacement's first answer on a loaded machine
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            samples = raw_request(server.port, "/metrics").text
            if metric_total(samples, "image_worker_restarts_total") >= 1:
                break
            time.sleep(0.1)
        for _ in range(4):  # whichever worker answers the scrape
            samples = raw_request(server.port, "/metrics").text
            assert metric_total(samples, "image_requests_in_flight") == 0  # not stuck at 1+
            assert metric_total(samples, "image_worker_restarts_total") == 1

    deaths = warnings_about_deaths(server)
    assert len(deaths) == 1, server.output
    assert f"pid {victim}" in deaths[0] and victim_name in deaths[0]
    assert "SIGKILL" in deaths[0] and "restarting" in deaths[0]


def test_crash_loop_stops_the_server(images: Path, tmp_path: Path) -> None:
    """The fourth death within 60 s is not restarted: an ERROR, and the server exits non-zero
    (a supervisor restarts the whole instance)."""
    with subprocess_server(env_for(images, tmp_path, workers=1)) as (server, proc):
        for death in range(4):
            ((name, pid),) = workers(proc.pid).items()
            os.kill(pid, signal.SIGKILL)
            if death == 3:
                break
            deadline = time.monotonic() + DEADLINE
            while workers(proc.pid).get(name, pid) == pid:
                assert time.monotonic() < deadline, f"{name} not replaced after death {death + 1}"
                time.sleep(0.1)
            assert server.raw("/health").status == 200  # waits in the backlog until it serves
        assert exit_status(proc) == 1
    assert len(warnings_about_deaths(server)) == 3, server.output
    errors = [line for line in server.output if "ERROR" in line and "crash loop" in line]
    assert len(errors) == 1, server.output


def exit_status(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("the server kept running after a crash loop")


def wait_for_new_worker(main_pid: int, name: str, old: int, timeout: float = DEADLINE) -> int:
    """The pid of the process now called `name`, once it is not `old` (0: any)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = workers(main_pid).get(name, 0)
        if pid and pid != old:
            return pid
        time.sleep(0.02)
    raise AssertionError(f"{name}: no new process within {timeout} s of {old}")


def test_worker_killed_during_startup_is_replaced(images: Path, tmp_path: Path) -> None:
    """SIGKILL a worker ~0.2 s after it started (before it ever served), then its replacement
    the same way: Sanic alone waits 30 s for its ack and stops the server; here a third
    process serves within seconds, and only that successful restart is counted."""
    env = env_for(images, tmp_path, workers=2)
    with subprocess_server(env, healthy=False) as (server, proc):
        name = "Sanic-Server-1-0"
        victim = wait_for_new_worker(proc.pid, name, 0, timeout=60)
        time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        second = wait_for_new_worker(proc.pid, name, victim)
        time.sleep(0.2)
        os.kill(second, signal.SIGKILL)
        third = wait_for_new_worker(proc.pid, name, second)
        deadline = time.monotonic() + 30
        while True:  # the whole server comes up: both workers acknowledged their start
            assert proc.poll() is None, server.output
            try:
                if server.raw("/health").status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, server.output
            time.sleep(0.1)
        served = set()
        for _ in range(200):  # new connections spread over both workers
            assert server.raw("/small.png").status == 200
            served = {n for n, p in workers(proc.pid).items() if own_metric(prom(tmp_path), p)}
            if len(served) == 2:
                break
        assert workers(proc.pid)[name] == third
        assert served == {"Sanic-Server-0-0", name}, served
        until(lambda: server.metric("image_worker_restarts_total") == 1)  # the one that came up
        for _ in range(4):
            assert server.metric("image_worker_restarts_total") == 1, "".join(server.output)
    assert len(warnings_about_deaths(server)) == 2, server.output
    assert not [line for line in server.output if "acknowledged" in line], server.output


def until(ok: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.05)


def prom(tmp_path: Path) -> Path:
    return tmp_path / "prom"


def test_crash_loop_limit_grows_with_the_workers(images: Path, tmp_path: Path) -> None:
    """Two workers: five deaths within a minute are replaced (SPEC: a crash loop is more
    than 2 x workers + 1), the sixth stops the server with exit status 1."""
    with subprocess_server(env_for(images, tmp_path, workers=2)) as (server, proc):
        for death in range(6):
            name = f"Sanic-Server-{death % 2}-0"
            pid = workers(proc.pid)[name]
            os.kill(pid, signal.SIGKILL)
            if death == 5:
                break
            wait_for_new_worker(proc.pid, name, pid)
            assert proc.poll() is None
        assert exit_status(proc) == 1
    assert len(warnings_about_deaths(server)) == 5, server.output
