"""The instance's render queue in the main process (issue 17.1, design c): see `renderers`
for the whole picture and the wire format.

`Dispatcher` is a thread with its own asyncio loop behind a Unix socket in a private (0700)
directory. It holds the instance's one first-in, first-out queue, hands the oldest job to an
idle render process (or, in `permits` mode, a permit to the oldest waiting worker) and passes
each result back to the worker that asked; it spawns the render processes and replaces one
that dies. It never unpickles a job or a result.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .renderers import (
    _HEAD,
    BUSY,
    FREE,
    GO,
    HELLO_RENDERER,
    HELLO_WORKER,
    JOB,
    LOST,
    RESULT,
    START,
    WANT,
    _frame,
    serve_renders,
)

log = logging.getLogger("imgproxy")

RESPAWN_PAUSE = 0.5  # seconds before replacing a render process that died young
YOUNG = 5.0  # a render process that died within this many seconds of its start


@dataclass(eq=False)
class _Peer:
    writer: asyncio.StreamWriter
    pid: int = 0
    alive: bool = True
    granted: int = 0  # permits mode: permits this worker holds
    job: _Entry | None = None  # render process: the job it runs
    started: float = field(default_factory=time.monotonic)

    def send(self, data: bytes) -> None:
        if self.alive:
            self.writer.write(data)


@dataclass(eq=False, slots=True)
class _Entry:
    worker: _Peer
    call: int
    body: bytes  # the job (processes) or b"" (permits)
    since: float


class Dispatcher:
    """The instance's render queue. `procs` render processes (`mode="processes"`) or
    `procs` permits (`mode="permits"`); start() in the main process (Sanic's
    `main_process_start`), before the workers are spawned."""

    def __init__(
        self,
        procs: int,
        queue: int,
        wait_max: float,
        mode: str = "processes",
        target: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
    ) -> None:
        self.procs, self.queue_max, self.wait_max, self.mode = procs, queue, wait_max, mode
        self.target, self.args = target, args
        self.dir = tempfile.mkdtemp(prefix="imgproxy-pool-")  # 0700: only this user connects
        self.address = os.path.join(self.dir, "queue.sock")
        self.queue: deque[_Entry] = deque()
        self.idle: deque[_Peer] = deque()  # render processes waiting for a job
        self.free = procs if mode == "permits" else 0
        self.children: dict[int, Any] = {}  # pid -> multiprocessing.Process
        self.peers: set[_Peer] = set()  # every connection: workers and render processes
        self.handlers: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped = False
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="imgproxy-pool", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)
        # before multiprocessing's own exit handler, which would join the render processes
        atexit.register(self.stop)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)
        for proc in list(self.children.values()):
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_unix_server(self._serve, self.address)
        if self.mode == "processes":
            for _ in range(self.procs):
                await self._loop.run_in_executor(None, self._spawn)
        # only now may Sanic start its workers (`start` waits for this): it sets
        # SANIC_WORKER_NAME in this process's environment while it spawns each one, and a
        # render process spawned meanwhile would carry a worker's name from birth
        self._ready.set()  # the workers may connect; jobs wait for the render processes
        sweeper = asyncio.ensure_future(self._sweep())
        try:
            await self._stop.wait()
        finally:
            sweeper.cancel()
            server.close()
            for peer in list(self.peers):  # EOF for every render process and worker
                peer.alive = False
                peer.writer.close()
            if self.handlers:
                await asyncio.wait(self.handlers, timeout=2)

    def _spawn(self) -> None:
        """Start one render process (in an executor thread: a spawn takes a moment)."""
        if self._stopped:
            return
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(
            target=serve_renders,
            args=(self.address, self.target, self.args),
            name="imgproxy-render",
            daemon=True,  # ends with the main process
        )
        proc.start()
        assert proc.pid is not None
        self.children[proc.pid] = proc

    async def _sweep(self) -> None:
        """Jobs that waited `wait_max`: BUSY, like a full queue."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            while self.queue and now - self.queue[0].since > self.wait_max:
                entry = self.queue.popleft()
                entry.worker.send(_frame(BUSY, entry.call))
            for pid, proc in list(self.children.items()):
                if not proc.is_alive():  # reaped here; its connection's EOF did the rest
                    proc.join(0)
                    del self.children[pid]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _Peer(writer)
        role = 0
        task = asyncio.current_task()
        assert task is not None
        self.peers.add(peer)
        self.handlers.add(task)
        try:
            while True:
                size, kind, call = _HEAD.unpack(await reader.readexactly(_HEAD.size))
                body = await reader.readexactly(size) if size else b""
                if kind in (HELLO_WORKER, HELLO_RENDERER):
                    role, peer.pid = kind, call
                    if kind == HELLO_RENDERER:
                        self.idle.append(peer)
                        self._dispatch()
                elif kind in (JOB, WANT):
                    self._admit(peer, call, body)
                elif kind == RESULT:
                    entry, peer.job = peer.job, None
                    if entry is not None:
                        entry.worker.send(_frame(RESULT, entry.call, body))
                    self.idle.append(peer)
                    self._dispatch()
                elif kind == FREE:
                    peer.granted -= 1
                    self.free += 1
                    self._dispatch()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the peer went away, or the dispatcher stops
        finally:
            self.peers.discard(peer)
            self.handlers.discard(task)
            peer.alive = False
            writer.close()
            if role == HELLO_RENDERER:
                self._renderer_gone(peer)
            elif role == HELLO_WORKER:
                self._worker_gone(peer)

    def _admit(self, worker: _Peer, call: int, body: bytes) -> None:
        has_slot = self.free > 0 if self.mode == "permits" else bool(self.idle)
        if not has_slot and len(self.queue) >= self.queue_max:
            worker.send(_frame(BUSY, call))
            return
        self.queue.append(_Entry(worker, call, body, time.monotonic()))
        self._dispatch()

    def _dispatch(self) -> None:
        queue = self.queue
        while queue:
            if not queue[0].worker.alive:
                queue.popleft()
                continue
            if self.mode == "permits":
                if self.free <= 0:
                    return
                entry = queue.popleft()
                self.free -= 1
                entry.worker.granted += 1
                entry.worker.send(_frame(GO, entry.call))
                continue
            while self.idle and not self.idle[0].alive:
                self.idle.popleft()
            if not self.idle:
                return
            renderer = self.idle.popleft()
            entry = queue.popleft()
            renderer.job = entry
            renderer.send(_frame(JOB, entry.call, entry.body))
            entry.worker.send(_frame(START, entry.call))

    def _worker_gone(self, worker: _Peer) -> None:
        """A worker died (or closed): its queued jobs go, its permits come back."""
        self.queue = deque(e for e in self.queue if e.worker is not worker)
        if worker.granted:
            self.free += worker.granted
            worker.granted = 0
        self._dispatch()

    def _renderer_gone(self, renderer: _Peer) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(renderer)
        entry, renderer.job = renderer.job, None
        proc = self.children.pop(renderer.pid, None)
        code = None
        if proc is not None:
            proc.join(0.05)  # the socket closes a moment before the process is gone
            code = proc.exitcode
        if self._stopped:
            return
        if entry is not None:
            entry.worker.send(_frame(LOST, entry.call))
        log.warning(
            "render process %d ended (exit %s)%s; starting another",
            renderer.pid,
            code,
            " during a render: its request failed" if entry is not None else "",
        )
        young = time.monotonic() - renderer.started < YOUNG
        assert self._loop is not None
        loop = self._loop
        loop.call_later(
            RESPAWN_PAUSE if young else 0.0, lambda: loop.run_in_executor(None, self._spawn)
        )
