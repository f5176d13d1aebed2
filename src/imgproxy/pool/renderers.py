"""Render processes fed by one first-in, first-out queue per instance (issue 17.1, design c).

    main process     Dispatcher (dispatcher.py): a thread with its own asyncio loop behind
                     a Unix socket in a private (0700) directory. It holds the instance's
                     one queue, feeds the oldest jobs into the shared job socket (at most
                     `procs` unclaimed) and passes each result back to the worker that
                     asked. More than `queue` jobs waiting: the newcomer gets BUSY (503).
                     A job that waited `wait_max` seconds: BUSY.
    render process   `serve_renders`: connect, then forever: the next job from the job
                     socket, START, `fn(job)`, one reply out: at most `procs` renders at
                     once per instance, none of them waits on an HTTP loop's GIL, and a
                     process that finishes finds the next job already there.
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
import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ImgProxyError, Overloaded, RenderFailed

log = logging.getLogger("imgproxy")

_HEAD = struct.Struct("!IBQ")
JOB_MAX = 256 * 1024  # bytes of one job message (a path and a spec; fetched bodies are spilled)
CANCEL_SLOTS = 4096  # cancel flags, by job number modulo this (far more than ever sit unclaimed)
HELLO_WORKER, HELLO_RENDERER, JOB, START, RESULT, BUSY, LOST, WANT, GO, FREE = range(1, 11)


def _frame(kind: int, call: int, body: bytes = b"") -> bytes:
    return _HEAD.pack(len(body), kind, call) + body


def job_channel() -> tuple[socket.socket, socket.socket, Any]:
    """The shared job socket: (the dispatcher's end, the render processes' end, the cancel
    flags). A job in it whose worker went away, or that waited too long, is skipped by the
    process that takes it: `cancelled[seq % CANCEL_SLOTS]`, shared with the processes."""
    jobs_in, jobs_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    jobs_in.setblocking(False)
    jobs_in.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * JOB_MAX)
    return jobs_in, jobs_out, multiprocessing.get_context("spawn").RawArray("b", CANCEL_SLOTS)


# -- a render process ------------------------------------------------------------------------


def serve_renders(
    address: str,
    jobs: socket.socket,
    cancelled: Any,
    target: Callable[..., Any] | None,
    args: tuple[Any, ...],
) -> None:
    """A render process: `target(*args)` gives the function that renders one job; then jobs
    from the shared job socket `jobs`, one at a time, until the dispatcher closes it."""
    # A render process lives as long as the job socket: it ends when the dispatcher closes it
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
    while True:
        try:
            message = jobs.recv(JOB_MAX)
            if len(message) < _HEAD.size:  # EOF: the dispatcher stopped
                return
            _size, _kind, call = _HEAD.unpack_from(message)
            if cancelled[call % CANCEL_SLOTS]:  # its worker went away meanwhile
                continue
            sock.sendall(_frame(START, call))  # the job is this process's from now on
        except OSError:
            return
        try:
            reply: tuple[Any, ...] = ("ok", fn(pickle.loads(message[_HEAD.size :])))
        except ImgProxyError as exc:
            reply = ("err", type(exc), exc.reason, _cause(exc))
        except Exception as exc:  # the server's own failure: a 500, logged by the worker
            reply = ("err", RenderFailed, None, f"{type(exc).__name__}: {exc}")
        try:
            sock.sendall(_frame(RESULT, call, pickle.dumps(reply, protocol=5)))
        except OSError:  # the dispatcher is gone
            return


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
