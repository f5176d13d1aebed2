"""Every way to run gives the same server (SPEC "Ways to run"): the Sanic CLI, with and
without --dev, gets the worker watchdog, the permit return, the multiprocess metrics
directory (/metrics sums every worker) and one render queue per instance, like
`python -m imgproxy`. Real `sanic` subprocesses; workers found in /proc."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import kill_images, raw_request, server_workers, subprocess_server

pytestmark = pytest.mark.slow

SANIC = str(Path(sys.executable).with_name("sanic"))
FACTORY = "imgproxy.app:create_app"
DEADLINE = 10.0


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return kill_images(tmp_path)


def answered_by(output: list[str]) -> set[str]:
    """The pids in the access lines of image requests (text log: `... [pid] INFO ...`)."""
    return {line.split("[")[1].split("]")[0] for line in output if " GET /small.png" in line}


def wait_until(ok, timeout: float = DEADLINE) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("extra", "count"),
    [([], 2), (["--dev"], 1)],
    ids=["sanic-cli", "sanic-cli-dev"],
)
def test_the_sanic_cli_is_the_same_server(
    images: Path, tmp_path: Path, extra: list[str], count: int
) -> None:
    cmd = [SANIC, FACTORY, "--factory", "--host", "127.0.0.1", "--port", "{port}", *extra]
    if count > 1:
        cmd += ["--workers", str(count)]
    env = {
        "IMAGE_PROXY_ROOT_PATH": str(images),
        "IMAGE_PROXY_TRANSFORM_THREADS": "1",
        "IMAGE_PROXY_WORKERS": "1",  # the CLI's --workers wins: sized from what Sanic starts
        "IMAGE_PROXY_ACCESS_LOG": "true",  # its lines name the worker's pid
    }
    with subprocess_server(env, cmd=cmd) as (server, proc):
        before = server_workers(proc.pid)
        assert len(before) == count, before
        sent = 0
        while sent < 6 or len(answered_by(server.output)) < count:  # until both answered
            assert raw_request(server.port, f"/small.png?size={20 + sent}").status == 200
            sent += 1
            assert sent < 300, server.output
        wait_until(lambda: len(answered_by(server.output)) == count)
        for _ in range(4):  # whichever worker answers the scrape sees them all
            assert server.metric("image_requests_total") == sent

        # a worker killed mid-render (one render permit for the instance) is replaced, gives
        # its permit back, and the next renders are served
        holder: list[str] = []

        def slow() -> None:
            try:
                url = "/big.jpg?size=2000&format=avif&resize_algorithm=lanczos3"
                holder.append(str(raw_request(server.port, url).status))
            except Exception as exc:  # held by a killed worker: no answer at all
                holder.append(repr(exc))

        t = threading.Thread(target=slow, daemon=True)
        t.start()
        wait_until(lambda: server.metric("image_transforms_running") >= 1, 30)
        busy = server_workers(proc.pid)
        for pid in busy.values():  # the render runs in one of them: kill them all
            os.kill(pid, signal.SIGKILL)
        t.join(30)
        wait_until(lambda: set(server_workers(proc.pid).values()).isdisjoint(busy.values()))
        wait_until(lambda: len(server_workers(proc.pid)) == count)
        r = raw_request(server.port, "/small.png?size=33&format=webp")  # needs the permit
        assert r.status == 200
        wait_until(lambda: server.metric("image_worker_restarts_total") == count)
        assert server.metric("image_requests_total") >= sent + 1  # the dead ones' counts stay
    deaths = [line for line in server.output if "WARNING" in line and " died " in line]
    assert len(deaths) == count, server.output
    dev_lines = [line for line in server.output if "auto-reload:" in line and "WARNING" in line]
    assert len(dev_lines) == (1 if extra else 0), server.output
