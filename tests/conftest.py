"""Shared fixtures: a corpus of generated images, a real in-process server, a subprocess server.

Every test talks real HTTP to a real Sanic server and decodes what comes back with pyvips.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pyvips
from sanic import Sanic

from imgproxy.app import create_app
from imgproxy.config import Settings

Sanic.test_mode = True

MAGIC = {
    "jpeg": lambda b: b[:3] == b"\xff\xd8\xff",
    "png": lambda b: b[:8] == b"\x89PNG\r\n\x1a\n",
    "webp": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP",
    "avif": lambda b: b[4:8] == b"ftyp" and b"avif" in b[8:32],
    "jxl": lambda b: b[:2] == b"\xff\x0a" or b[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n",
}
DJXL = shutil.which("djxl")


def need_djxl() -> str:
    """djxl (Debian libjxl-tools, installed by build/system-deps.sh): JPEG XL is decoded by
    the reference decoder (pyvips-binary has no jxlload). Missing: skip, or fail in CI."""
    if DJXL is None:
        reason = "djxl not found (Debian package libjxl-tools)"
        if os.environ.get("CI"):
            pytest.fail(f"JPEG XL tests cannot run in CI: {reason}")
        pytest.skip(reason)
    return DJXL


def djxl(body: bytes, suffix: str = ".png") -> bytes:
    """The JPEG XL `body` decoded by djxl into `suffix`'s format (`.jpg`: the original JPEG
    rebuilt bit for bit when `body` carries reconstruction data)."""
    tool = need_djxl()
    with tempfile.TemporaryDirectory(prefix="imgproxy-djxl-") as tmp:
        src, out = Path(tmp, "in.jxl"), Path(tmp, "out" + suffix)
        src.write_bytes(body)
        subprocess.run([tool, str(src), str(out)], check=True, capture_output=True, timeout=60)
        return out.read_bytes()


def decode(body: bytes) -> pyvips.Image:
    """Any of our outputs as pixels (JPEG XL through djxl)."""
    if MAGIC["jxl"](body):
        body = djxl(body)
    return pyvips.Image.new_from_buffer(body, "")


def photo(width: int, height: int, bands: int = 3) -> pyvips.Image:
    """A photo-like image: smooth gradients plus noise, so encoders do real work."""
    x = pyvips.Image.xyz(width, height)
    grad = (x[0] * (255 / max(1, width)) + x[1] * (128 / max(1, height))).cast("uchar")
    noise = pyvips.Image.gaussnoise(width, height, mean=0, sigma=12)
    base = (grad + noise).cast("uchar")
    img = base.bandjoin([(255 - base).cast("uchar"), (base // 2 + 60).cast("uchar")])
    img = img.copy(interpretation="srgb")
    if bands == 4:
        alpha = (x[0] * (255 / max(1, width))).cast("uchar")
        img = img.bandjoin(alpha)
    return img


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (IDAT is one compressed empty row)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def build_corpus(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    land = photo(1200, 900)
    land.jpegsave(str(root / "landscape.jpg"), Q=85)
    photo(600, 900).jpegsave(str(root / "portrait.jpg"), Q=85)
    photo(101, 50).jpegsave(str(root / "small.jpg"), Q=90)
    photo(1, 1).pngsave(str(root / "one.png"))
    photo(1, 1).jpegsave(str(root / "one.jpg"))
    photo(300, 200, bands=4).pngsave(str(root / "alpha.png"))
    photo(800, 600).webpsave(str(root / "photo.webp"), Q=80)
    photo(320, 240).heifsave(str(root / "photo.avif"), compression="av1", Q=60, effort=0)
    photo(6000, 4000).jpegsave(str(root / "huge.jpg"), Q=80)
    # EXIF orientation 6: stored 1200x900 landscape, displays as 900x1200 portrait
    rotated = land.copy()
    rotated.set_type(pyvips.GValue.gint_type, "orientation", 6)
    rotated.jpegsave(str(root / "rotated.jpg"), Q=85)
    # lies and damage
    photo(40, 30).gifsave(str(root / "gif-named.png"))  # decoded by its bytes (first frame)
    photo(40, 30).tiffsave(str(root / "tiff-named.png"))  # TIFF is never decoded: 415
    (root / "text.jpg").write_text("hello, I am not an image\n")
    full = (root / "landscape.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "bomb.png").write_bytes(png_bomb(30000, 30000))
    (root / "notes.txt").write_text("plain text")
    (root / "empty.jpg").write_bytes(b"")
    (root / "dir.jpg").mkdir(exist_ok=True)
    sub = root / "photos"
    sub.mkdir(exist_ok=True)
    photo(640, 480).jpegsave(str(sub / "sample.jpg"), Q=85)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "images"
    build_corpus(root)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(root: Path, **env: str) -> Settings:
    base = {"IMAGE_PROXY_ROOT_PATH": str(root), "IMAGE_PROXY_WORKERS": "1"}
    base.update(env)
    return Settings.from_env(base)


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` whose labels include `labels`, in a scrape."""
    want = set(labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        sample, _, label_text = name_labels.partition("{")
        if sample == name and want <= set(re.findall(r'(\w+)="([^"]*)"', label_text)):
            total += float(value)
    return total


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def image(self) -> pyvips.Image:
        return decode(self.body)


def raw_request(
    port: int, target: str | bytes, method: str = "GET", headers: dict[str, str] | None = None
) -> Resp:
    """Send one request byte-for-byte (no client-side path normalisation)."""
    t = target if isinstance(target, bytes) else target.encode("latin-1")
    lines = [method.encode() + b" " + t + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return Resp(int(status_line.split()[1]), hdrs, body)


@dataclass
class Server:
    """A running server (in-process or subprocess) spoken to over real HTTP."""

    port: int
    client: httpx.Client = field(init=False)
    app: Sanic | None = None
    output: list[str] = field(default_factory=list)  # a subprocess server's log lines so far

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw: object) -> Resp:
        r = self.client.get(path, **kw)  # type: ignore[arg-type]
        return Resp(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)

    def request(self, method: str, path: str, **kw: object) -> Resp:
        r = self.client.request(method, path, **kw)  # type: ignore[arg-type]
        return Resp(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)

    def metric(self, name: str, **labels: str) -> float:
        return metric_total(raw_request(self.port, "/metrics").text, name, **labels)

    def raw(self, target: str | bytes, method: str = "GET", **kw: dict[str, str]) -> Resp:
        return raw_request(self.port, target, method, **kw)


@contextlib.contextmanager
def app_server(settings: Settings) -> Iterator[Server]:
    """The real Sanic app on a free port, served by an event loop in a background thread
    (listeners run once, like in a worker), so any HTTP client, raw sockets included, works."""
    port = free_port()
    app = create_app(settings)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, object] = {}

    async def run() -> None:
        srv = await app.create_server(
            host="127.0.0.1", port=port, return_asyncio_server=True, access_log=False
        )
        assert srv is not None
        state["srv"] = srv
        await srv.startup()
        await srv.before_start()
        await srv.after_start()
        ready.set()
        stop = asyncio.Event()
        state["stop"] = stop
        await stop.wait()
        await srv.before_stop()
        srv.close()
        await srv.wait_closed()
        # as Sanic's own shutdown (server/runners.py _cleanup): idle keep-alive connections
        # close now, busy ones get a moment, the rest are aborted. Left open, their sockets
        # are collected later, in another test, where the ResourceWarning lands inside
        # whatever runs then (once inside Sanic's ast.parse: "AST constructor recursion
        # depth mismatch", a failed start)
        for conn in list(srv.connections):
            conn.close_if_idle()
        for _ in range(100):
            if not srv.connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(srv.connections):
            conn.abort()
        await srv.after_stop()
        await asyncio.sleep(0)  # let the aborted transports run their close callbacks
        current = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not current]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def target() -> None:
        try:
            loop.run_until_complete(run())
        except BaseException as exc:  # surfaced to the test below
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    if not ready.wait(30) or "error" in state:
        raise RuntimeError(f"in-process server failed to start: {state.get('error')}")
    server = Server(port)
    server.app = app
    try:
        yield server
    finally:
        server.client.close()
        loop.call_soon_threadsafe(state["stop"].set)  # type: ignore[attr-defined]
        thread.join(30)
        loop.close()


@pytest.fixture
def serve(corpus: Path) -> Iterator[Callable[..., Server]]:
    """serve(**env) -> a running in-process server on the corpus (one per test)."""
    stack = contextlib.ExitStack()

    def start(root: Path | None = None, **env: str) -> Server:
        return stack.enter_context(app_server(make_settings(root or corpus, **env)))

    with stack:
        yield start


@pytest.fixture
def server(serve: Callable[..., Server]) -> Server:
    return serve()


@contextlib.contextmanager
def subprocess_server(
    env: dict[str, str],
    cmd: list[str] | None = None,
    timeout: float = 60,
    healthy: bool = True,
) -> Iterator[tuple[Server, subprocess.Popen[bytes]]]:
    """`python -m imgproxy` (or `cmd`, where `{port}` is replaced by the port) in its own
    session; SIGTERM to the group on exit. `healthy=False`: yield at once, while it starts."""
    port = free_port()
    if cmd is not None:
        cmd = [arg.replace("{port}", str(port)) for arg in cmd]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_PROXY_")}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    full_env.update({"IMAGE_PROXY_BIND_ADDRESS": f"127.0.0.1:{port}"})
    full_env.update(env)
    proc = subprocess.Popen(
        cmd or [sys.executable, "-m", "imgproxy"],
        env=full_env,
        stdin=subprocess.DEVNULL,  # `sanic --dev` would start a REPL on a terminal
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Sanic SIGKILLs its own process group on some failures
    )
    server = Server(port)
    # Drain its output as it comes (a full pipe would block the server's logging).
    reader = threading.Thread(target=_drain, args=(proc, server.output), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while healthy:
            if proc.poll() is not None:
                reader.join(10)
                out = "".join(server.output)
                raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
            try:
                if server.client.get("/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            time.sleep(0.1)
        yield server, proc
    finally:
        server.client.close()
        stop_process_group(proc)
        reader.join(10)
        if proc.stdout:
            proc.stdout.close()


def _drain(proc: subprocess.Popen[bytes], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.decode("utf-8", "replace"))


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (Sanic's SyncManager child)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (by PPid from /proc/*/stat: no CONFIG_PROC_CHILDREN needed)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    pids = [pid]
    for p in pids:
        pids.extend(c for c, parent in parents.items() if parent == p and c not in pids)
    return pids


def server_workers(main_pid: int) -> dict[str, int]:
    """Sanic's server workers by name. Sanic sets SANIC_WORKER_NAME while it spawns each one,
    so it is in the worker's start environment (the SyncManager child has none)."""
    found = {}
    for pid in process_tree(main_pid)[1:]:  # children, then their children
        try:
            if int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]) != main_pid:
                continue  # a worker's own child (it inherited the variable)
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if state == "Z":
            continue  # dead, not yet reaped
        if b"resource_tracker" in cmdline:
            continue  # multiprocessing's tracker, spawned while a worker's name was set
        if comm == "imgproxy-render":
            continue  # a render process respawned while a worker's name was set
        for item in environ:
            if item.startswith(b"SANIC_WORKER_NAME=Sanic-Server-"):
                found[item.partition(b"=")[2].decode()] = pid
    return found


def kill_images(tmp_path: Path) -> Path:
    """Images for the worker-death tests: a big JPEG (slow AVIF renders stay in flight) and
    a small PNG (a cheap passthrough)."""
    root = tmp_path / "images"
    root.mkdir()
    photo(2400, 1800).jpegsave(str(root / "big.jpg"), Q=85)
    photo(60, 40).pngsave(str(root / "small.png"))
    return root
