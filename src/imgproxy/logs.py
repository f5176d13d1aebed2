"""Log lines: plain text (default) or one JSON object per line, for the whole process.

    configure(level, fmt)   the loggers of the process: ours, Sanic's, everyone else's
    access(...)             one line per request (IMAGE_PROXY_ACCESS_LOG)
    request_id(incoming)    X-Request-ID: the client's, when it is sane, else a new one

`IMAGE_PROXY_LOG_FORMAT=json` makes every line the process writes one JSON object with at
least `ts`, `level`, `msg` (plus `logger`, `pid`; a traceback goes in `exc`, never across
lines). Sanic's loggers get our formatter (Sanic keeps a formatter that is not its own), the
root logger catches the rest (asyncio, warnings), uncaught exceptions in threads and
`sys.unraisablehook` are logged, and in the real server processes stray writes to
stdout/stderr (print, the traceback multiprocessing prints when a worker dies) are wrapped
into JSON records too. Only C code writing to fd 2 itself can escape (libvips: its warnings
are switched off with VIPS_WARNING=0 in JSON mode).

Runs in the main process and again in every worker: Sanic's workers rebuild the app from
the factory, which calls `configure` first. stdlib `logging` only.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
ACCESS = "imgproxy.access"
REQUEST_ID_MAX = 128
# the attributes every LogRecord has; anything else on a record came in through `extra=`
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)
_SANIC_OUT = ("sanic.root", "sanic.server", "sanic.websockets", "sanic.access")
_REAL_STREAMS: tuple[TextIO, TextIO] | None = None  # (stdout, stderr) before any wrapping


def request_id(incoming: str | None) -> str:
    """The client's X-Request-ID if it is 1-128 characters of printable ASCII (0x20-0x7e,
    space included; Sanic strips the ends), else a new one (32 hex characters)."""
    if incoming and len(incoming) <= REQUEST_ID_MAX and all(" " <= c <= "~" for c in incoming):
        return incoming
    return new_request_id()


# a version 4 UUID from this process's random 64-bit prefix and a 62-bit counter: unique
# across processes and restarts, without a syscall per request
_ID_PREFIX = int.from_bytes(os.urandom(8)) << 64
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(8)) >> 2)
_V4_KEEP = ~((0xF << 76) | (0x3 << 62))  # the version nibble and the variant bits
_V4_SET = (0x4 << 76) | (0x2 << 62)  # version 4, RFC 4122 variant
_COUNTER_BITS = (1 << 62) - 1


def new_request_id() -> str:
    """A new version 4 UUID in hex (32 characters), as `uuid.uuid4().hex` looks, in a third
    of its time: it runs for every request that brings no id."""
    n = _ID_PREFIX | next(_ID_COUNTER) & _COUNTER_BITS
    return "%032x" % (n & _V4_KEEP | _V4_SET)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, pid, msg, the record's `extra` fields,
    and `exc` (the formatted traceback) or `stack` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _iso(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


def configure(level: str, fmt: str, whole_process: bool = False) -> None:
    """Set up logging for `fmt` ("text" or "json"): our loggers, and Sanic's in JSON mode.
    Handlers others added to our loggers (an embedding app, a test) are left alone.
    `whole_process` (a real server process, never a test runner): in JSON mode also the
    root logger, warnings, sys.stdout/sys.stderr and the exception hooks."""
    out, err = _REAL_STREAMS or (sys.stdout, sys.stderr)
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)

    def handler(stream: TextIO) -> logging.Handler:
        h = _Handler(stream)
        h.setFormatter(formatter)
        return h

    _attach("imgproxy", level, handler(err))
    _attach(ACCESS, "INFO", handler(out))  # its own switch: IMAGE_PROXY_ACCESS_LOG
    if fmt != "json":  # Sanic keeps its own handlers and format
        for name in ("sanic.root", "sanic.error", "sanic.access"):
            logging.getLogger(name).setLevel(level)
        return
    for name in _SANIC_OUT:
        _attach(name, level, handler(out), only=True)
    _attach("sanic.error", level, handler(err), only=True)
    if whole_process:
        _attach("", "WARNING", handler(err), only=True)  # asyncio, py.warnings, the rest
        _attach("imgproxy.stdout", level, handler(out))  # stray writes, see _JsonLines
        logging.captureWarnings(True)
        _take_over_streams()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours: replaced, not added again, when `configure` runs again."""


def _attach(name: str, level: str, handler: logging.Handler, only: bool = False) -> None:
    logger = logging.getLogger(name)
    for old in list(logger.handlers):
        if only or isinstance(old, _Handler):
            logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    if name:
        logger.propagate = False


def access(
    method: str,
    path: str,
    status: int,
    nbytes: int,
    duration_ms: float,
    cache: str | None,
    fmt: str | None,
    rid: str,
) -> None:
    """One access line: text `GET /a.jpg?size=9 200 1234B 5.67ms cache=memory format=webp
    id=...`; in JSON mode the same values are fields of the record."""
    log = logging.getLogger(ACCESS)
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {
        "method": method,
        "path": path,
        "status": status,
        "bytes": nbytes,
        "duration_ms": round(duration_ms, 2),
        "cache": cache,
        "format": fmt,
        "request_id": rid,
    }
    log.info(
        "%s %s %d %dB %.2fms cache=%s format=%s id=%s",
        method,
        _printable(path),
        status,
        nbytes,
        duration_ms,
        cache or "-",
        fmt or "-",
        _printable(rid),
        extra=fields,
    )


def _printable(text: str) -> str:
    """Control and non-ASCII characters escaped: a text log line stays one line."""
    if text.isascii() and text.isprintable():
        return text
    return (
        text.encode("ascii", "backslashreplace")
        .decode()
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )


# -- JSON mode in a server process: nothing escapes as plain text -------------------------


class _JsonLines(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr in JSON mode. A line that is already a JSON
    object passes through; other text becomes records of the logger `imgproxy.<stream>`:
    a printed traceback (multiprocessing prints one when a worker dies) is one record with
    the traceback in `exc`, any other line one record."""

    _TB_CONTINUES = (
        " ",
        "\t",
        "Traceback (most recent call last):",
        "During handling",
        "The above",
    )

    def __init__(self, real: TextIO, name: str, level: int) -> None:
        super().__init__()
        self.real = real
        self.log = logging.getLogger(f"imgproxy.{name}")
        self.level = level
        self._buf = ""
        self._tb: list[str] | None = None
        self._lock = threading.RLock()
        self._busy = False

    # what callers ask of a console stream
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.real.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._lock:
            if self._busy:  # a failure while logging: never loop
                self.real.write(s)
                return len(s)
            self._buf += s
            while "\n" in self._buf:
                line, self._buf = self._buf.split("\n", 1)
                self._line(line)
        return len(s)

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                line, self._buf = self._buf, ""
                self._line(line)
            if self._tb is not None:
                tb, self._tb = self._tb, None
                self._emit(tb[-1], "\n".join(tb))
            self.real.flush()

    def _line(self, line: str) -> None:
        if self._tb is not None:
            self._tb.append(line)
            if not line.startswith(self._TB_CONTINUES) and line.strip():
                tb, self._tb = self._tb, None  # "SomeError: message" ends the block
                self._emit(line, "\n".join(tb))
            return
        if line.startswith("Traceback (most recent call last):"):
            self._tb = [line]
        elif _is_json_object(line):
            self.real.write(line + "\n")
        elif line.strip():
            self._emit(line, None)

    def _emit(self, msg: str, exc: str | None) -> None:
        self._busy = True
        try:
            record = self.log.makeRecord(self.log.name, self.level, "(stream)", 0, msg, (), None)
            record.exc_text = exc
            self.log.handle(record)
        finally:
            self._busy = False


def _is_json_object(line: str) -> bool:
    if not (line.startswith("{") and line.endswith("}")):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _take_over_streams() -> None:
    global _REAL_STREAMS
    if _REAL_STREAMS is None:
        _REAL_STREAMS = (sys.stdout, sys.stderr)
    out, err = _REAL_STREAMS
    sys.stdout = _JsonLines(out, "stdout", logging.INFO)
    sys.stderr = _JsonLines(err, "stderr", logging.ERROR)
    log = logging.getLogger("imgproxy")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log.critical("uncaught %s: %s", kind.__name__, exc, exc_info=(kind, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread else "?"
        info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
        log.error("uncaught exception in thread %s", name, exc_info=info)

    def unraisable_hook(u: Any) -> None:
        info = (type(u.exc_value), u.exc_value, u.exc_traceback) if u.exc_value else None
        log.error("%s: %r", u.err_msg or "exception ignored in", u.object, exc_info=info)

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook
