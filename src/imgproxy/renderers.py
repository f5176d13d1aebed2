"""Render processes fed by one first-in, first-out queue per instance (issue 17.1, design c).

    main process     Dispatcher: a thread with its own asyncio loop behind a Unix socket in
                     a private (0700) directory. It holds the instance's one queue, hands the
                     oldest job to an idle render process and passes the result back to the
                     worker that asked. More than `queue` jobs waiting: the newcomer gets
                     BUSY (503). A job that waited `wait_max` seconds: BUSY.
    render process   `serve_renders`: connect, then forever one job in, `fn(job)`, one
                     reply out: at most `procs` renders at once per instance, and none of
                     them waits on an HTTP loop's GIL.
    HTTP worker      Client: one connection; `await client.call(job)`. Never blocks its
                     loop: asyncio streams only.

FIFO by construction: there is one queue and one dispatcher. Nothing is lost by a death:
a worker that dies closes its connection (its queued jobs are dropped, a running one's
result is discarded and its render process freed); a render process that dies closes its
connection (its job's worker gets LOST at once: a 500, never a hang) and is replaced.

The same dispatcher also runs design (b), `permits`: the worker renders in its own threads
and only its permit comes from the instance's queue (WANT -> GO ... FREE); a dead worker's
permits come back when its connection closes.

Frames: `!IBQ` (body length, kind, call id) + body. The dispatcher never unpickles a job or
a result; bodies are pickles made by the worker (the job) and the render process (the reply).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ImgProxyError, Overloaded, RenderFailed

log = logging.getLogger("imgproxy")

_HEAD = struct.Struct("!IBQ")
HELLO_WORKER, HELLO_RENDERER, JOB, START, RESULT, BUSY, LOST, WANT, GO, FREE = range(1, 11)
RESPAWN_PAUSE = 0.5  # seconds before replacing a render process that died young
YOUNG = 5.0  # a render process that died within this many seconds of its start


def _frame(kind: int, call: int, body: bytes = b"") -> bytes:
    return _HEAD.pack(len(body), kind, call) + body


# -- the main process's dispatcher -------------------------------------------------------


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
        self._ready.set()  # the workers may connect; jobs wait for the render processes
        if self.mode == "processes":
            for _ in range(self.procs):
                await self._loop.run_in_executor(None, self._spawn)
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


# -- a render process ------------------------------------------------------------------------


def serve_renders(address: str, target: Callable[..., Any] | None, args: tuple[Any, ...]) -> None:
    """A render process: `target(*args)` gives the function that renders one job; then jobs
    from the dispatcher, one at a time, until it closes the connection."""
    # A render process lives as long as its connection: it ends when the dispatcher closes it
    # (shutdown) or the main process dies. SIGTERM/SIGINT sent to the whole process group
    # (Ctrl-C, `kill -- -PGID`) reach the main process, which stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _name_process(b"imgproxy-render")
    assert target is not None
    fn = target(*args)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    sock.sendall(_frame(HELLO_RENDERER, os.getpid()))
    stream = sock.makefile("rb")
    while True:
        head = stream.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        size, _kind, call = _HEAD.unpack(head)
        body = stream.read(size)
        try:
            reply: tuple[Any, ...] = ("ok", fn(pickle.loads(body)))
        except ImgProxyError as exc:
            reply = ("err", type(exc), exc.reason, _cause(exc))
        except Exception as exc:  # the server's own failure: a 500, logged by the worker
            reply = ("err", RenderFailed, None, f"{type(exc).__name__}: {exc}")
        sock.sendall(_frame(RESULT, call, pickle.dumps(reply, protocol=5)))


def _name_process(name: bytes) -> None:
    """What `ps -o comm` and `top` show (Linux prctl PR_SET_NAME); best effort."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None)
        libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)


def _cause(exc: BaseException) -> str | None:
    cause = exc.__cause__
    return None if cause is None else f"{type(cause).__name__}: {cause}"


def rebuild(reply: tuple[Any, ...]) -> Any:
    """A render process's reply in the worker: the value, or the same ImgProxyError class
    with the same reason (its cause, as text, chained for the log)."""
    if reply[0] == "ok":
        return reply[1]
    _, cls, reason, cause = reply
    exc = cls(reason) if reason is not None else cls()
    if cause is not None:
        exc.__cause__ = RenderCause(cause)
    return exc


class RenderCause(Exception):
    """The text of an error raised in a render process (its traceback stays there)."""


# -- the worker's side -------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    future: asyncio.Future[Any]
    on_start: Callable[[], None] | None


class Client:
    """One HTTP worker's connection to the dispatcher."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._calls: dict[int, _Call] = {}
        self._next = 0
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, writer = await asyncio.open_unix_connection(self.address)
                except OSError as exc:
                    raise RenderFailed() from exc
                writer.write(_frame(HELLO_WORKER, os.getpid()))
                self._writer = writer
                self._reader_task = asyncio.ensure_future(self._read(reader))
        assert self._writer is not None
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size, kind, call = _HEAD.unpack(await reader.readexactly(_HEAD.size))
                body = await reader.readexactly(size) if size else b""
                pending = self._calls.get(call)
                if pending is None:
                    continue
                if kind in (START, GO):
                    if kind == GO:
                        del self._calls[call]
                        if pending.future.done():  # its waiter was cancelled: give it back
                            if self._writer is not None:
                                self._writer.write(_frame(FREE, 0))
                            continue
                        pending.future.set_result(None)
                    if pending.on_start is not None:
                        pending.on_start()
                    continue
                del self._calls[call]
                if pending.future.done():
                    continue
                if kind == RESULT:
                    pending.future.set_result(body)
                elif kind == BUSY:
                    pending.future.set_exception(Overloaded())
                else:  # LOST: the render process died with this job
                    pending.future.set_exception(_lost("its render process died during the render"))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self._writer is not None:
                self._writer.close()
            self._writer = None
            calls, self._calls = self._calls, {}
            for pending in calls.values():
                if not pending.future.done():
                    pending.future.set_exception(_lost("the render queue closed"))

    async def _send(self, kind: int, body: bytes, on_start: Callable[[], None] | None) -> Any:
        writer = await self._connect()
        self._next += 1
        call = self._next
        future = asyncio.get_running_loop().create_future()
        self._calls[call] = _Call(future, on_start)
        writer.write(_frame(kind, call, body))
        return await future

    async def call(self, job: Any, on_start: Callable[[], None] | None = None) -> Any:
        """Render `job` in a render process: its value, or its ImgProxyError raised here."""
        body = await self._send(JOB, pickle.dumps(job, protocol=5), on_start)
        result = rebuild(pickle.loads(body))
        if isinstance(result, BaseException):
            raise result
        return result

    @contextlib.asynccontextmanager
    async def permit(self, on_start: Callable[[], None] | None = None) -> Any:
        """Permits mode: hold one of the instance's permits, in FIFO order across workers."""
        await self._send(WANT, b"", on_start)
        try:
            yield
        finally:
            if self._writer is not None:
                self._writer.write(_frame(FREE, 0))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()


def _lost(why: str) -> RenderFailed:
    exc = RenderFailed()
    exc.__cause__ = RenderCause(why)
    return exc
