"""The main process's worker watchdog: Sanic 25.12 never replaces a worker that died.

Sanic's monitor loop marks a worker killed from outside (SIGKILL from the kernel's OOM killer,
`kill -9`) FAILED and leaves it dead: the instance runs on fewer workers for good and nothing
is logged (STACK-NOTES §9.2). A worker that dies before every worker acknowledged its start
is worse: Sanic's start-up loop waits for its ack and stops the whole server after 30 s.

`start_watchdog` (a `main_process_ready` listener of the app, so every way to run gets it:
`python -m imgproxy`, the .pyz, `sanic imgproxy.app:create_app --factory`) starts a thread
that looks at every server process's own exit status (not Sanic's state, which is only synced
after start-up) and, for each death, at any moment:

- logs one WARNING, runs the death hooks (`app.ctx.on_worker_death`: return the render
  permits the worker held) and drops the worker's live gauges from `/metrics`;
- restarts it: through Sanic's monitor loop once it runs (the message a worker's
  `app.m.restart()` sends), directly while Sanic still waits for start-up acks (its loop
  would only re-queue the message);
- counts `image_worker_restarts_total` once the new process acknowledged its start (a
  replacement that dies first is one more death, not a restart), and asks again if a
  replacement did not appear within RETRY seconds.

More than 2 x workers + 1 deaths within WINDOW seconds is a crash loop: one ERROR, the server
stops and the process exits 1, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sanic import Sanic
from sanic.worker.constants import ProcessState

from .metrics import MainMetrics, mark_process_dead, started_metrics

log = logging.getLogger("imgproxy")

DeathHook = Callable[[int, int], None]  # (worker index, pid) of a worker that died
INTERVAL = 0.1  # seconds between looks at the workers (Sanic's own monitor polls at 0.1 s)
# crash loop: more than 2 x workers + 1 deaths within this many seconds (SPEC: 60).
# IMGPROXY_CRASH_WINDOW is internal: the fault-injection tests shorten it to fit 30 kills
# into a short run at the same rate.
WINDOW = float(os.environ.get("IMGPROXY_CRASH_WINDOW") or 60.0)
RETRY = 5.0  # a replacement that did not appear after this long is asked for again
SERVER_PREFIX = "Sanic-Server-"  # Sanic names its server processes Sanic-Server-<index>-0
# States in which a process that is not running is no death: Sanic is stopping or
# replacing it itself (auto-reload, the inspector)
NOT_A_DEATH = (ProcessState.RESTARTING, ProcessState.JOINED, ProcessState.TERMINATED)


def worker_index(name: str) -> int:  # the index in a server's name: Sanic-Server-<index>-0
    return int(name.removeprefix(SERVER_PREFIX).split("-")[0])


def crash_loop_limit(workers: int) -> int:
    """Deaths allowed within WINDOW (SPEC: a crash loop is more than 2 x workers + 1)."""
    return 2 * max(1, workers) + 1


async def start_watchdog(app: Sanic[Any, Any]) -> None:
    """`main_process_ready`: the worker manager exists; the workers are about to start."""
    watchdog = Watchdog(app.manager, getattr(app.ctx, "on_worker_death", []))
    app.ctx.watchdog = watchdog
    watchdog.start()


def crash_looped(app: Sanic[Any, Any]) -> bool:
    """After `Sanic.serve` returned: did the watchdog stop the server?"""
    watchdog: Watchdog | None = getattr(app.ctx, "watchdog", None)
    return watchdog is not None and watchdog.crash_loop


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _exit_failed() -> None:
    """atexit, after a crash loop: exit 1 whoever runs the server (the Sanic CLI returns 0
    once its serve() returns; `python -m imgproxy` returns 1 itself)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed or broken: nothing left to say there
            stream.flush()
    os._exit(1)


class Watchdog:
    def __init__(
        self,
        manager: Any,  # sanic.worker.manager.WorkerManager (untyped)
        hooks: list[DeathHook],
        interval: float = INTERVAL,
        window: float = WINDOW,
    ) -> None:
        self.manager = manager
        self.hooks = hooks
        self.interval = interval
        self.window = window
        self.max_deaths = crash_loop_limit(int(getattr(manager, "num_server", 1)))
        self.crash_loop = False
        self.metrics = MainMetrics()  # in the main process: its own counter file, summed
        self._handled: set[int] = set()  # pids whose death was handled
        self._waiting: dict[str, tuple[int, float]] = {}  # name -> (dead pid, asked at)
        self._deaths: list[float] = []  # monotonic times of the deaths within the window
        self._acked_for: set[str] = set()  # replacements acknowledged to Sanic by us
        self._thread = threading.Thread(target=self._run, name="imgproxy-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _stopping(self) -> bool:
        return bool(self.manager._shutting_down)  # private in Sanic 25.12: set on shutdown

    def _servers(self) -> list[Any]:
        try:
            processes = list(self.manager.transient_processes)
        except RuntimeError:  # the manager's dict changed under us (scaling): look again later
            return []
        return [p for p in processes if p.name.startswith(SERVER_PREFIX)]

    def _acks_done(self) -> bool:
        """Has Sanic's start-up loop (wait_for_ack) finished? Until then it re-queues monitor
        messages instead of handling them."""
        try:
            return bool(self.manager._all_workers_ack())  # private in Sanic 25.12
        except Exception:  # its state dict (a SyncManager proxy) is gone: shutting down
            return False

    def _acked(self, name: str) -> bool:
        """Has the process now called `name` acknowledged its start? (Sanic's own copy of
        the state in `process.state` is only synced once its monitor loop runs.)"""
        try:
            return bool(self.manager.worker_state[name].get("state") == ProcessState.ACKED.name)
        except Exception:  # gone, or the SyncManager is stopping
            return False

    def _started(self, name: str, pid: int) -> bool:
        """Did the replacement `pid` get through its start? Its ack, or (when the watchdog
        acknowledged it for Sanic, see _restart) its own metrics files."""
        if name in self._acked_for:
            if not started_metrics(pid):
                return False
            self._acked_for.discard(name)
            return True
        return self._acked(name)

    def _run(self) -> None:
        acked = False
        while not self._stopping():
            time.sleep(self.interval)
            acked = acked or self._acks_done()  # once done, Sanic's monitor loop runs
            try:
                if not self._look(acked):
                    return
            except Exception:  # never let one odd look end the watchdog
                log.exception("worker watchdog: unexpected error; still watching")

    def _look(self, acked: bool) -> bool:
        for process in self._servers():
            if self._stopping():
                return False
            name, pid = process.name, process.pid
            waiting = self._waiting.get(name)
            if waiting is not None:
                if pid is not None and pid != waiting[0] and process.is_alive():
                    if self._started(name, pid):  # the replacement is up: the restart succeeded
                        del self._waiting[name]
                        self.metrics.worker_restarts.inc()
                        log.info("worker %s replaced: pid %d serves", name, pid)
                    continue
                if pid is None or pid in self._handled:  # no replacement running yet
                    if time.monotonic() - waiting[1] > RETRY:
                        log.warning("worker %s: no replacement yet; asking again", name)
                        self._restart(name, waiting[0], acked)
                    continue
                # else: the replacement died too (a new pid): one more death, below
            if pid is None or process.state in NOT_A_DEATH:
                continue  # not started yet, or Sanic itself is stopping or replacing it
            if pid in self._handled or process.exitcode is None:
                continue  # handled, or alive
            self._handled.add(pid)
            if not self._on_death(name, pid, process.exitcode, acked):
                return False
        return True

    def _on_death(self, name: str, pid: int, exitcode: int | None, acked: bool) -> bool:
        """Handle one death; False when it was one too many (the server is stopping)."""
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < self.window] + [now]
        crash_loop = len(self._deaths) > self.max_deaths
        how = describe_exit(exitcode)
        if crash_loop:
            log.error(
                "worker %s (pid %d) died (%s): %d deaths within %.0f s, a crash loop; "
                "stopping the server",
                name,
                pid,
                how,
                len(self._deaths),
                self.window,
            )
        else:
            log.warning("worker %s (pid %d) died (%s); restarting", name, pid, how)
        index = worker_index(name)
        for hook in self.hooks:
            try:
                hook(index, pid)
            except Exception:
                log.exception("worker death hook %r failed", hook)
        mark_process_dead(pid)  # its in-flight and queue gauges leave the sum
        if crash_loop:
            self.crash_loop = True
            atexit.register(_exit_failed)
            self.manager.monitor_publisher.send("__TERMINATE__")
            if not acked:
                self._end_startup_wait()
            return False
        self._restart(name, pid, acked)
        return True

    def _restart(self, name: str, pid: int, acked: bool) -> None:
        self._waiting[name] = (pid, time.monotonic())  # asked again after RETRY if need be
        try:
            if acked:
                # The message a worker's `app.m.restart()` sends: restart() runs on the
                # monitor thread, serialised with its state syncing.
                self.manager.monitor_publisher.send(f"{name}:")
            else:
                # Sanic's start-up loop only re-queues messages, and waits for every worker's
                # ack for 30 s in all before it stops the server (kills during start-up can
                # outlast that): restart it from here (its state syncing does not run yet)
                # and acknowledge it for Sanic; the watchdog supervises the replacement.
                self.manager.restart(process_names=[name])
                state = self.manager.worker_state[name]
                self.manager.worker_state[name] = {**state, "state": ProcessState.ACKED.name}
                self._acked_for.add(name)
        except Exception as exc:  # e.g. Sanic's monitor loop began meanwhile and raced us
            log.warning("worker %s: restart failed (%s); trying again in %.0f s", name, exc, RETRY)

    def _end_startup_wait(self) -> None:
        """A crash loop before every worker ever acknowledged its start: Sanic's start-up loop
        would re-queue our __TERMINATE__ until every worker acks (forever, if they keep
        dying), and its own way out SIGKILLs the whole process group, this process included.
        Mark every worker acknowledged, so that the loop ends and the monitor loop takes the
        message: an orderly stop (the workers are stopped), exit status 1."""
        for process in self._servers():
            try:
                state = self.manager.worker_state[process.name]
                self.manager.worker_state[process.name] = {**state, "state": "ACKED"}
            except Exception:  # the state dict is gone: Sanic is stopping anyway
                continue


class Spread:
    """Keep-alive connections spread over the workers (in each worker).

    The workers accept on one socket: whichever is awake first takes every connection that
    is waiting, so a burst of new keep-alive connections (a load balancer's or a CDN's pool,
    a benchmark's) often lands 8/0 or 7/1 on two workers, and one core serves them all for
    as long as they live. Each worker publishes its open connections (Sanic's own set) in
    its slot of a shared array; every EVERY requests a worker over its fair share (more than
    ceil(total / workers)) answers with `Connection: close`, and the client's next
    connection goes to whichever worker accepts first: the less busy one."""

    EVERY = 8  # requests between looks at the counts
    PUBLISH = 0.25  # seconds between publications of this worker's count

    def __init__(self, counts: Any, index: int) -> None:
        self.counts = counts  # multiprocessing RawArray("i", workers), or a list in tests
        self.index = index
        self.connections: Any = ()  # Sanic's set of this worker's open connections
        self.tick = self.EVERY
        counts[index] = 0  # a replacement starts afresh

    @classmethod
    def for_worker(cls, counts: Any) -> Spread | None:
        """This worker's, when it is one of several (`counts` from `shared_array`)."""
        name = os.environ.get("SANIC_WORKER_NAME", "")
        if counts is None or len(counts) < 2 or not name.startswith(SERVER_PREFIX):
            return None
        index = worker_index(name)
        return cls(counts, index) if index < len(counts) else None

    def publish(self) -> int:
        mine = self.counts[self.index] = len(self.connections)  # also each PUBLISH seconds
        return mine

    def over(self, stream: Any) -> bool:
        """Should the connection of this request (`stream`: Sanic's Http) close after its
        response? Cheap: a counter, and every EVERY requests a look at the counts."""
        self.tick -= 1
        if self.tick:
            return False
        self.tick = self.EVERY
        self.connections = stream.protocol.connections
        mine = self.publish()
        if mine < 2:
            return False
        total: int = sum(self.counts)
        workers = len(self.counts)
        return mine * workers > total + workers - 1  # mine > ceil(total / workers)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Publish this worker's count now and every PUBLISH seconds (an idle one's too)."""
        self.publish()
        loop.call_later(self.PUBLISH, self.start, loop)


def shared_array(workers: int) -> Any:
    """Main process: the array `Spread` counts in (one slot per worker), or None for one."""
    return multiprocessing.RawArray("i", workers) if workers > 1 else None
