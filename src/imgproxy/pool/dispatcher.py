"""The instance's render queue in the main process (issue 17.1, design c): see `renderers`
for the whole picture and the wire format.

`Dispatcher` is a thread with its own asyncio loop behind a Unix socket in a private (0700)
directory. It holds the instance's one first-in, first-out queue and passes each result back
to the worker that asked; it spawns the render processes and replaces one that dies. It never
unpickles a job or a result.

Jobs reach the render processes through one shared job socket (SOCK_SEQPACKET: a message is
a job, read whole by one reader), filled with the oldest jobs while fewer than `procs` sit in
it unclaimed: a process that finishes takes the next job at once, without a round trip through
this thread (a moment a core could idle), and the first free takes the oldest, so jobs start
in arrival order. `permits` mode gives a permit to the oldest waiting worker instead.
"""

from __future__ import annotations

import asyncio
import atexit
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
from typing import Any, cast

from .renderers import (
    _HEAD,
    BUSY,
    CANCEL_SLOTS,
    FREE,
    GO,
    HELLO_RENDERER,
    HELLO_WORKER,
    JOB,
    JOB_MAX,
    LOST,
    RESULT,
    START,
    WANT,
    _frame,
    job_channel,
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


_GONE = _Peer(cast(asyncio.StreamWriter, None), alive=False)  # the owner of a cancelled job


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
        self.queue: deque[_Entry] = deque()  # not yet in the job socket
        self.renderers: set[_Peer] = set()  # connected render processes
        self.pushed: dict[int, _Entry] = {}  # in the job socket, not yet claimed: seq -> job
        self.seq = 0
        self.jobs_in, self.jobs_out, self.cancelled = job_channel()
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
            self.jobs_in.close()  # EOF in the job socket: every render process ends
            for peer in list(self.peers):  # EOF for every worker
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
            args=(self.address, self.jobs_out, self.cancelled, self.target, self.args),
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
            for seq, entry in list(self.pushed.items()):  # every process stuck, or one died
                if now - entry.since > self.wait_max:  # between taking it and its START
                    self._cancel(seq)
                    entry.worker.send(_frame(BUSY, entry.call))
            self._dispatch()
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
                        self.renderers.add(peer)
                        self._dispatch()
                elif kind in (JOB, WANT):
                    self._admit(peer, call, body)
                elif kind == START:  # a render process took job `call` from the job socket
                    entry = self.pushed.pop(call, None)
                    peer.job = entry or _Entry(_GONE, 0, b"", 0.0)  # cancelled just after
                    if entry is not None:
                        entry.worker.send(_frame(START, entry.call))
                    self._dispatch()  # its place in the job socket is free
                elif kind == RESULT:
                    entry, peer.job = peer.job, None
                    if entry is not None:
                        entry.worker.send(_frame(RESULT, entry.call, body))
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

    def idle(self) -> int:
        """Render processes without a job (some may be about to take one from the socket)."""
        return sum(1 for r in self.renderers if r.alive and r.job is None)

    def waiting(self) -> int:
        """Jobs that no render process will start at once."""
        if self.mode == "permits":
            return len(self.queue)
        return len(self.queue) + max(0, len(self.pushed) - self.idle())

    def _admit(self, worker: _Peer, call: int, body: bytes) -> None:
        if self.mode != "permits" and _HEAD.size + len(body) > JOB_MAX:  # not one message
            log.error("render job of %d bytes refused: over JOB_MAX", len(body))
            worker.send(_frame(LOST, call))
            return
        has_slot = self.free > 0 if self.mode == "permits" else self.idle() > len(self.pushed)
        if not has_slot and self.waiting() >= self.queue_max:
            worker.send(_frame(BUSY, call))
            return
        self.queue.append(_Entry(worker, call, body, time.monotonic()))
        self._dispatch()

    def _dispatch(self) -> None:
        if self._stopped:
            return
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
            if len(self.pushed) >= self.procs:  # each process has one waiting for it
                return
            entry = queue.popleft()
            self.seq += 1
            try:
                self.jobs_in.send(_frame(JOB, self.seq, entry.body))
            except BlockingIOError:  # the socket's buffer is full: later
                queue.appendleft(entry)
                return
            except OSError:  # the job is lost; its worker answers 500 and logs it
                entry.worker.send(_frame(LOST, entry.call))
                continue
            self.cancelled[self.seq % CANCEL_SLOTS] = 0
            self.pushed[self.seq] = entry

    def _cancel(self, seq: int) -> None:
        """A job in the job socket that nobody wants any more: skipped, not rendered."""
        del self.pushed[seq]
        self.cancelled[seq % CANCEL_SLOTS] = 1

    def _worker_gone(self, worker: _Peer) -> None:
        """A worker died (or closed): its queued jobs go, its permits come back."""
        self.queue = deque(e for e in self.queue if e.worker is not worker)
        for seq in [seq for seq, e in self.pushed.items() if e.worker is worker]:
            self._cancel(seq)
        if worker.granted:
            self.free += worker.granted
            worker.granted = 0
        self._dispatch()

    def _renderer_gone(self, renderer: _Peer) -> None:
        self.renderers.discard(renderer)
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
