"""The render pool (SPEC "Render queue"): one first-in, first-out queue per instance, at most
IMAGE_PROXY_TRANSFORM_THREADS renders at once, 503 + Retry-After beyond
IMAGE_PROXY_TRANSFORM_QUEUE waiting, nothing lost when a worker or a render process dies.

The dispatcher's rules are checked with real render processes running `pool_targets.scripted`
(jobs that wait on a gate file, so order never depends on timing); the HTTP rules on a real
`python -m imgproxy` with 2 workers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pool_targets
from conftest import make_settings, photo, raw_request, subprocess_server
from imgproxy import params, pool
from imgproxy.errors import Overloaded, RenderFailed, UnprocessableImage
from imgproxy.metrics import Metrics
from imgproxy.pool import renderers
from imgproxy.pool.dispatcher import Dispatcher
from imgproxy.pool.job import RENDER_NICE, tune_allocator

pytestmark = pytest.mark.slow


@pytest.fixture
def dispatcher(request: pytest.FixtureRequest) -> Iterator[Dispatcher]:
    procs, queue, mode = getattr(request, "param", (1, 4, "processes"))
    d = Dispatcher(procs, queue, 30.0, mode=mode, target=pool_targets.scripted, args=(None,))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def until(check: Any, what: str, seconds: float = 30.0) -> None:
    """Wait for a state (not a timed assert: the bound only stops a broken test hanging)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def idle(d: Dispatcher, n: int) -> bool:
    return d.idle() == n


async def queued(d: Dispatcher, n: int) -> None:
    await asyncio.get_running_loop().run_in_executor(
        None, until, lambda: d.waiting() == n, f"{n} queued"
    )


def test_jobs_from_different_workers_run_in_arrival_order(
    dispatcher: Dispatcher, tmp_path: Path
) -> None:
    """Two connections (two workers) queue jobs alternately behind a blocker: the one
    render process takes them in the order they arrived, whichever worker sent them."""
    until(lambda: idle(dispatcher, 1), "the render process is up")
    blocker, gate = tmp_path / "blocker", tmp_path / "gate"

    async def run() -> list[Any]:
        a, b = renderers.Client(dispatcher.address), renderers.Client(dispatcher.address)
        first = asyncio.ensure_future(a.call(("gate", str(blocker), "blocker")))
        await queued(dispatcher, 0)  # running, not queued
        calls = []
        for i in range(4):
            client = (a, b)[i % 2]
            calls.append(asyncio.ensure_future(client.call(("gate", str(gate), i))))
            await queued(dispatcher, i + 1)  # each has arrived before the next is sent
        gate.touch()
        blocker.touch()
        results = [await first, *[await c for c in calls]]
        a.close()
        b.close()
        return results

    results = asyncio.run(run())
    assert [tag for tag, _, _ in results] == ["blocker", 0, 1, 2, 3]
    assert [n for _, _, n in results] == [1, 2, 3, 4, 5], "not first in, first out"


def test_beyond_the_queue_a_render_is_refused(dispatcher: Dispatcher, tmp_path: Path) -> None:
    """1 render at once, 4 waiting: the sixth is refused at once (Overloaded: 503 with
    Retry-After); the five admitted all render."""
    until(lambda: idle(dispatcher, 1), "the render process is up")
    gate = tmp_path / "gate"

    async def run() -> tuple[list[Any], BaseException | None]:
        c = renderers.Client(dispatcher.address)
        admitted = [asyncio.ensure_future(c.call(("gate", str(gate), i))) for i in range(5)]
        await queued(dispatcher, 4)
        refused = None
        try:
            await c.call(("gate", str(gate), "late"))
        except Overloaded as exc:
            refused = exc
        gate.touch()
        done = [await f for f in admitted]
        c.close()
        return done, refused

    done, refused = asyncio.run(run())
    assert isinstance(refused, Overloaded) and refused.status == 503 and refused.retry_after
    assert [tag for tag, _, _ in done] == [0, 1, 2, 3, 4]


def test_a_worker_that_goes_away_gives_its_places_back(
    dispatcher: Dispatcher, tmp_path: Path
) -> None:
    """A worker holds the render and every queue place, then its connection closes (as
    when it is killed): the running render finishes into the void, the queued ones are
    dropped, and another worker gets all 1 + 4 places."""
    until(lambda: idle(dispatcher, 1), "the render process is up")
    gate = tmp_path / "gate"

    async def run() -> list[Any]:
        dying = renderers.Client(dispatcher.address)
        doomed = [asyncio.ensure_future(dying.call(("gate", str(gate), i))) for i in range(5)]
        await queued(dispatcher, 4)
        dying.close()
        await asyncio.get_running_loop().run_in_executor(
            None, until, lambda: not dispatcher.waiting(), "the dead worker's jobs dropped"
        )
        gate.touch()
        other = renderers.Client(dispatcher.address)
        await asyncio.get_running_loop().run_in_executor(
            None, until, lambda: idle(dispatcher, 1), "the render process is free again"
        )
        results = await asyncio.gather(
            *[other.call(("gate", str(gate), f"x{i}")) for i in range(5)]
        )
        other.close()
        for task in doomed:  # their connection closed: each failed, none hangs
            with contextlib.suppress(RenderFailed):
                await task
        return results

    results = asyncio.run(run())
    assert [tag for tag, _, _ in results] == [f"x{i}" for i in range(5)]
    # the dead worker's next job already sat in the job socket: skipped, not rendered
    assert [n for _, _, n in results] == [2, 3, 4, 5, 6]


def test_a_render_process_killed_mid_render_fails_its_job_and_is_replaced(
    dispatcher: Dispatcher, tmp_path: Path
) -> None:
    until(lambda: idle(dispatcher, 1), "the render process is up")
    pidfile, gate = tmp_path / "pid", tmp_path / "gate"
    gate.touch()

    async def run() -> tuple[BaseException | None, Any]:
        c = renderers.Client(dispatcher.address)
        hung = asyncio.ensure_future(c.call(("hang", str(pidfile))))
        waiting = asyncio.ensure_future(c.call(("gate", str(gate), "next")))
        await asyncio.get_running_loop().run_in_executor(
            None, until, pidfile.exists, "the render started"
        )
        victim = int(pidfile.read_text() or 0) or int(pidfile.read_text())
        os.kill(victim, signal.SIGKILL)
        failure = None
        try:
            await hung
        except RenderFailed as exc:
            failure = exc
        result = await waiting  # the queued job runs on the replacement
        c.close()
        return failure, (victim, result)

    failure, (victim, (tag, pid, n)) = asyncio.run(run())
    assert isinstance(failure, RenderFailed) and failure.status == 500
    assert "died" in str(failure.__cause__)
    assert tag == "next" and pid != victim and n == 1


def test_errors_keep_their_class_status_and_reason(dispatcher: Dispatcher) -> None:
    async def run() -> tuple[BaseException, BaseException]:
        c = renderers.Client(dispatcher.address)
        errors = []
        for job in (("raise", "image too large: 9x9"), ("surprise",)):
            try:
                await c.call(job)
            except Exception as exc:
                errors.append(exc)
        c.close()
        return errors[0], errors[1]

    mine, ours = asyncio.run(run())
    assert type(mine) is UnprocessableImage
    assert (mine.status, mine.reason) == (422, "image too large: 9x9")
    assert type(ours) is RenderFailed and ours.status == 500
    assert "ValueError: unknown job" in str(ours.__cause__)


@pytest.mark.parametrize("dispatcher", [(1, 0, "permits")], indirect=True)
def test_permits_in_arrival_order_and_back_from_a_worker_that_goes_away(
    dispatcher: Dispatcher,
) -> None:
    """Design (b): one permit, no queue. A holder's connection closes with the permit
    taken: it comes back, the next worker gets it."""

    async def run() -> tuple[BaseException | None, bool]:
        holder, other = (renderers.Client(dispatcher.address) for _ in range(2))
        entered = asyncio.Event()

        async def hold() -> None:
            async with holder.permit():
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.ensure_future(hold())
        await entered.wait()
        refused = None
        try:
            async with other.permit():
                pass
        except Overloaded as exc:
            refused = exc
        task.cancel()
        holder.close()  # never sent FREE: the permit comes back with the connection
        await asyncio.get_running_loop().run_in_executor(
            None, until, lambda: dispatcher.free == 1, "the permit came back"
        )
        async with other.permit():
            got = True
        other.close()
        return refused, got

    refused, got = asyncio.run(run())
    assert isinstance(refused, Overloaded)
    assert got


# -- over HTTP -------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    photo(3000, 2000).jpegsave(str(root / "big.jpg"), Q=90)
    photo(400, 300).jpegsave(str(root / "small.jpg"))
    return root


def served(prom: Path, main_pid: int) -> int:
    """How many worker processes counted requests (not the main process's own files)."""
    return len({p.stem.rsplit("_", 1)[1] for p in prom.glob("counter_*.db")} - {str(main_pid)})


lock = threading.Lock()


def arrived(server: Any) -> float:
    """Renders that reached the instance's queue: waiting, running or done."""
    return (
        server.metric("image_transform_queue_depth")
        + server.metric("image_transforms_running")
        + server.metric("image_transforms_total")
    )


def test_fifo_across_workers_over_http(images: Path, tmp_path: Path) -> None:
    """2 workers, 1 render at once: slow renders sent one after another, each on a new
    connection (the kernel spreads them over both workers), complete in the order they
    were sent."""
    prom = tmp_path / "prom"
    env = {
        "IMAGE_PROXY_ROOT_PATH": str(images),
        "IMAGE_PROXY_WORKERS": "2",
        "IMAGE_PROXY_TRANSFORM_THREADS": "1",
        "IMAGE_PROXY_TRANSFORM_QUEUE": "32",
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
    }
    with subprocess_server(env) as (server, proc):
        for round_ in range(3):  # until both workers took part (the kernel decides)
            order: list[int] = []

            def get(i: int, round_: int = round_, order: list[int] = order) -> int:
                url = f"/big.jpg?size={1000 + 20 * round_ + i}&format=avif"
                status = raw_request(server.port, url).status
                with lock:
                    order.append(i)
                return status

            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                futures = []
                for i in range(8):
                    futures.append(ex.submit(get, i))
                    # the next one is sent once this one waits in the queue (or runs)
                    until(
                        lambda i=i: (
                            server.metric("image_transform_queue_depth")
                            + server.metric("image_transforms_running")
                            >= min(i + 1, 8)
                        ),
                        "the request reached the queue",
                    )
                statuses = [f.result() for f in futures]
            assert statuses == [200] * 8
            assert order == list(range(8)), "a request overtook one that arrived before it"
            if served(prom, proc.pid) == 2:
                break
        assert served(prom, proc.pid) == 2, "one worker answered all"


def test_a_render_process_killed_mid_request_is_a_500_and_is_replaced(
    images: Path, tmp_path: Path
) -> None:
    env = {
        "IMAGE_PROXY_ROOT_PATH": str(images),
        "IMAGE_PROXY_WORKERS": "2",
        "IMAGE_PROXY_TRANSFORM_THREADS": "1",
    }
    with subprocess_server(env) as (server, proc):
        until(lambda: len(render_processes(proc.pid)) == 1, "the render process is up")
        (victim,) = render_processes(proc.pid)
        assert niceness(victim) == niceness(proc.pid) + RENDER_NICE
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            slow = ex.submit(raw_request, server.port, "/big.jpg?size=2900&format=avif")
            until(lambda: server.metric("image_transforms_running") == 1, "the render runs")
            os.kill(victim, signal.SIGKILL)
            answer = slow.result()
        assert answer.status == 500
        assert answer.body == b"image could not be rendered"
        until(
            lambda: len(render_processes(proc.pid)) == 1 and render_processes(proc.pid) != [victim],
            "a new render process",
        )
        assert raw_request(server.port, "/small.jpg?size=100&format=webp").status == 200
        assert server.metric("image_transforms_running") == 0
        log = "".join(server.output)
        assert f"render process {victim} ended" in log
        (replacement,) = render_processes(proc.pid)
        assert niceness(replacement) == niceness(proc.pid) + RENDER_NICE


def niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_the_allocator_is_tuned_where_renders_run() -> None:
    """glibc's mallopt is found and takes both thresholds (it answers 0 on a refusal)."""
    assert tune_allocator()


def render_processes(main_pid: int) -> list[int]:
    """The main process's render processes (they name themselves imgproxy-render)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.rpartition(")")
        if int(rest.split()[1]) == main_pid and name.endswith("(imgproxy-render"):
            found.append(int(entry.name))
    return sorted(found)


def test_thread_backend_in_one_process(tmp_path: Path) -> None:
    """No main process (tests, --single-process): threads, the same 503 rule."""
    settings = make_settings(
        tmp_path, IMAGE_PROXY_TRANSFORM_THREADS="1", IMAGE_PROXY_TRANSFORM_QUEUE="0"
    )
    photo(400, 300).jpegsave(str(tmp_path / "a.jpg"))
    p = pool.open_pool(object(), settings.limits, settings.encode, Metrics())
    assert isinstance(p, pool.ThreadPool)
    spec = params.parse("/a.jpg", "size=100&format=webp", {}, settings)
    output = params.resolve(spec, "jpeg", "jpeg", (400, 300), settings)
    job = pool.Job(str(tmp_path / "a.jpg"), None, (tmp_path / "a.jpg").stat().st_size, output)

    async def run() -> tuple[Any, BaseException | None]:
        first = asyncio.ensure_future(p.run(job))
        await asyncio.sleep(0)  # the first one takes its place
        refused = None
        try:
            await p.run(job)  # the one thread is taken and nothing may wait
        except Overloaded as exc:
            refused = exc
        return await first, refused

    rendered, refused = asyncio.run(run())
    p.close()
    assert rendered.format == "webp" and max(rendered.width, rendered.height) == 100
    assert isinstance(refused, Overloaded)
