"""The main process's worker watchdog: Sanic 25.12 never replaces a worker that died.

Sanic's monitor loop marks a worker killed from outside (SIGKILL from the kernel's OOM killer,
`kill -9`) FAILED and leaves it dead: the instance runs on fewer workers for good and nothing
is logged (STACK-NOTES §9.2). `start_watchdog`, a `main_process_ready` listener wired by
`__main__`, starts a thread that for each death logs one WARNING, runs the death hooks
(`app.ctx.on_worker_death`: e.g. return the admission permits the worker held), drops the
worker's live gauges from `/metrics`, counts `image_worker_restarts_total` and asks Sanic's
monitor to start the worker again. More than `MAX_DEATHS` deaths within `WINDOW` seconds is a
crash loop: one ERROR, the server stops and `__main__` exits 1, so a supervisor restarts it.

Imported by `__main__` only: it lives beside `app` (it needs sanic's worker manager) and runs
in the main process, never in a worker.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from sanic import Sanic
from sanic.worker.constants import ProcessState

from .metrics import MainMetrics, mark_process_dead

log = logging.getLogger("imgproxy")

DeathHook = Callable[[int, int], None]  # (worker index, pid) of a worker that died
INTERVAL = 0.5  # seconds between looks at the workers' states (a restart takes ~0.5-1 s more)
MAX_DEATHS = 3  # deaths allowed within WINDOW; one more is a crash loop
WINDOW = 60.0
SERVER_PREFIX = "Sanic-Server-"  # Sanic names its server processes Sanic-Server-<index>-0
DEAD = (ProcessState.FAILED, ProcessState.COMPLETED)  # set by Sanic's monitor from exit codes


async def start_watchdog(app: Sanic[Any, Any]) -> None:
    """`main_process_ready`: the worker manager exists; the workers are about to start."""
    app.ctx.watchdog = Watchdog(app.manager, getattr(app.ctx, "on_worker_death", []))
    app.ctx.watchdog.start()


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


class Watchdog:
    def __init__(
        self,
        manager: Any,  # sanic.worker.manager.WorkerManager (untyped)
        hooks: list[DeathHook],
        interval: float = INTERVAL,
        max_deaths: int = MAX_DEATHS,
        window: float = WINDOW,
    ) -> None:
        self.manager = manager
        self.hooks = hooks
        self.interval = interval
        self.max_deaths = max_deaths
        self.window = window
        self.crash_loop = False
        self.metrics = MainMetrics()  # in the main process: its own counter file, summed
        self._handled: dict[str, int] = {}  # worker name -> pid whose death was handled
        self._deaths: list[float] = []  # monotonic times of the deaths within the window
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

    def _run(self) -> None:
        # Until every worker has acknowledged its start, Sanic's wait_for_ack() loop re-queues
        # monitor messages, and a worker that dies is Sanic's own startup failure (it stops
        # the server after 30 s). Then its monitor loop syncs every state at once: ACKED, or
        # already FAILED for a worker killed right after its ack (so not `is ACKED`).
        while not self._stopping():
            servers = self._servers()
            if servers and all(p.state >= ProcessState.ACKED for p in servers):
                break
            time.sleep(self.interval)
        while not self._stopping():
            time.sleep(self.interval)
            for process in self._servers():
                if process.state not in DEAD or self._handled.get(process.name) == process.pid:
                    continue
                if self._stopping():  # a worker ending in a shutdown is no death
                    return
                self._handled[process.name] = process.pid
                if not self._on_death(process.name, process.pid, process.exitcode):
                    return

    def _on_death(self, name: str, pid: int, exitcode: int | None) -> bool:
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
        index = int(name.removeprefix(SERVER_PREFIX).split("-")[0])
        for hook in self.hooks:
            try:
                hook(index, pid)
            except Exception:
                log.exception("worker death hook %r failed", hook)
        mark_process_dead(pid)  # its in-flight and queue gauges leave the sum
        if crash_loop:
            self.crash_loop = True
            self.manager.monitor_publisher.send("__TERMINATE__")
            return False
        self.metrics.worker_restarts.inc()
        # The message a worker's `app.m.restart()` sends: restart() runs on the monitor thread.
        self.manager.monitor_publisher.send(f"{name}:")
        return True
