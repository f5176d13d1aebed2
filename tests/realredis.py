"""A real `redis-server` for tests: loopback, a free port, a temp dir, no persistence.

`make test` installs the Debian package `redis-server` when it is missing; without it the
tests that need one are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import free_port

BINARY = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, workdir: Path, tls: bool = False) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls_files(self.dir) if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=none"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.tls:
            return redis.Redis(port=self.port, socket_timeout=5, ssl=True, ssl_cert_reqs="none")
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        args = {"port": str(self.port), "bind": "127.0.0.1", "save": "", "appendonly": "no"}
        if self.tls:
            cert, key = self.tls
            args.update(
                {
                    "port": "0",
                    "tls-port": str(self.port),
                    "tls-cert-file": str(cert),
                    "tls-key-file": str(key),
                    "tls-ca-cert-file": str(cert),
                    "tls-auth-clients": "no",
                }
            )
        argv = [
            BINARY,
            *(x for k, v in args.items() for x in (f"--{k}", v)),
            "--dir",
            str(self.dir),
        ]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.kill()


IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def need_redis() -> None:
    """Skip without redis-server, except in CI (CI=true), where that is a failure: the suite
    there must prove the fleet tier and the faults around it."""
    if not os.path.exists(BINARY):
        why = "redis-server is not installed (make test installs it)"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    need_redis()
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


class SlowLink:
    """A TCP proxy on loopback in front of `port`: each connection's first answer waits
    `first_delay` seconds (a distant TLS handshake), and answers move at `rate` bytes/s
    (a slow link). Threads, one pair per connection."""

    def __init__(self, port: int, first_delay: float = 0.0, rate: float | None = None) -> None:
        import socket
        import threading

        self.target = port
        self.first_delay = first_delay
        self.rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, upstream]
            for args in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: Any, dst: Any, answers: bool) -> None:
        first = answers and self.first_delay > 0
        chunk = 16 << 10
        try:
            while data := src.recv(chunk):
                if first:
                    time.sleep(self.first_delay)
                    first = False
                if answers and self.rate:
                    for i in range(0, len(data), chunk):
                        dst.sendall(data[i : i + chunk])
                        time.sleep(min(chunk, len(data) - i) / self.rate)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(2)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 (openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
