#!/usr/bin/env python3
"""Throughput benchmark of OUR server against in-process floors (not part of the test suite).

    .venv/bin/python bench/bench.py                 # all workloads, 10 s each (~6 min)
    .venv/bin/python bench/bench.py --only W2,W5 --duration 5
    .venv/bin/python bench/bench.py --quick          # 3 s per workload, 1 s warm-up
    .venv/bin/python bench/bench.py --smoke          # 1 s, W1 + W5, tiny floor: a CI liveness check
    .venv/bin/python bench/bench.py --env IMAGE_PROXY_VIPS_CONCURRENCY=2 --only W4

For each workload a fresh server (`python -m imgproxy`, own session / process group) is started on
127.0.0.1, checked with one request, warmed up with wrk (discarded) and measured with wrk
(8 connections, 2 threads, box size rotating over 380..419 like the shared harness). The table
reports req/s, p50/p99, mean response bytes (incl. headers, as wrk counts them), the server's
CPU in cores (utime+stime of its process group over the measured window) and the peak RSS of
the largest worker (VmHWM: each workload has a fresh server, so this is that workload's peak).

Floors, in-process, no HTTP, 2 processes x 1 libvips thread (like the shared raw_limit.py):
  decode  decode only, at the JPEG DCT shrink our transform chooses
  render  our full `imgproxy.transform.render` (header, decode, resize, colour, encode)
`ours/render` is the HTTP overhead + scheduling loss; `ours/decode` shows how far we are from
the bare decode.

Cache section: W1 passthrough, W6 with the memory tier (IMAGE_PROXY_ENABLE_CACHE=true), W6
with the disk tier only (memory tier 0 bytes), W6-inst (instance tmpfs tier hits: 40 URLs over a
4 MiB budget) and W6-redis (memory 0, a local redis-server: Redis-tier hits), each as a ratio to
the W1 passthrough req/s, and to nginx static W1 when nginx is installed (it is started on
127.0.0.1 with a temp config). `--only-cache W6-mem,W6-inst` picks rows.

Everything bulky lives in /tmp/imgproxy-bench (corpus, paths, logs). Needs `wrk` (apt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from _util import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.environ.get("IMGPROXY_BENCH_DIR", "/tmp/imgproxy-bench")
SHARED_CORPUS = "/work/shared/bench/make_corpus.py"
LUA = os.path.join(HERE, "wrk_rotate.lua")
SIZES = list(range(380, 420))
BIG = "photo-8660x5774.jpg"  # 50 MP

# id -> (template, source file, output format or None, description)
WORKLOADS = {
    "W1": ("/photo-1200.jpg", "photo-1200.jpg", None, "passthrough 1200 px JPEG (301 KB)"),
    "W2": (
        "/photo-4000x3000.jpg?size={size}&format=jpeg",
        "photo-4000x3000.jpg",
        "jpeg",
        "12 MP JPEG -> ~400 JPEG q75",
    ),
    "W3": (
        "/photo-4000x3000.jpg?size={size}&format=webp",
        "photo-4000x3000.jpg",
        "webp",
        "12 MP JPEG -> ~400 WebP q80",
    ),
    "W4": (
        "/photo-4000x3000.jpg?size={size}&format=avif",
        "photo-4000x3000.jpg",
        "avif",
        "12 MP JPEG -> ~400 AVIF q85 effort 3",
    ),
    "W5": (
        "/photo-1200.jpg?size={size}&format=webp",
        "photo-1200.jpg",
        "webp",
        "1200 px JPEG -> ~400 WebP q80",
    ),
    "W7": ("/" + BIG + "?size={size}&format=jpeg", BIG, "jpeg", "50 MP JPEG -> ~400 JPEG (RSS)"),
    # issue 20: boxes beside W2's `size`, JPEG XL beside W3/W4 (same source, same ~400 px)
    "W2c": (
        "/photo-4000x3000.jpg?w={size}&h={h169}&fit=cover&format=jpeg",
        "photo-4000x3000.jpg",
        "jpeg",
        "12 MP JPEG -> ~400x225 cover (16:9 card) JPEG q75",
    ),
    "W2s": (
        "/photo-4000x3000.jpg?w={size}&h={size}&fit=cover&format=jpeg",
        "photo-4000x3000.jpg",
        "jpeg",
        "12 MP JPEG -> ~400x400 cover (square) JPEG q75",
    ),
    "W3j": (
        "/photo-4000x3000.jpg?size={size}&format=jxl&q=77",
        "photo-4000x3000.jpg",
        "jxl",
        "12 MP JPEG -> ~400 JPEG XL q77 effort 4",
    ),
}
# floors of the box workloads render the same box (`size` is the default)
FLOOR_BOX = {
    "W2c": lambda s: {"w": s, "h": round(s * 9 / 16), "fit": "cover"},
    "W2s": lambda s: {"w": s, "h": s, "fit": "cover"},
}


def expand(template: str, size: int) -> str:
    """A workload URL for one box size: {size}, and {h169} its 16:9 height."""
    return template.format(size=size, h169=round(size * 9 / 16))


CACHE_WORKLOADS = {
    # id -> (template, extra env, description)
    "W6-miss": ("/photo-1200.jpg?size=400&format=webp", {}, "W6, cache off (miss path)"),
    "W6-mem": (
        "/photo-1200.jpg?size=400&format=webp",
        {"IMAGE_PROXY_ENABLE_CACHE": "true"},
        "W6, memory-tier hit",
    ),
    "W6-disk": (
        "/photo-1200.jpg?size=400&format=webp",
        {
            "IMAGE_PROXY_ENABLE_CACHE": "true",
            "IMAGE_PROXY_CACHE_MEMORY_SIZE": "0",
            "IMAGE_PROXY_ENABLE_DISK_CACHE": "true",
        },
        "W6, disk-tier hit (memory tier 0)",
    ),
    # 40 URLs (~23 KB each) over a 4 MiB budget: each worker's hot tier holds 256 KiB (~11
    # answers), the shared tmpfs tier all 40, so most answers come from the shared tier
    "W6-inst": (
        "/photo-1200.jpg?size={size}&format=webp",
        {"IMAGE_PROXY_ENABLE_CACHE": "true", "IMAGE_PROXY_CACHE_MEMORY_SIZE": str(4 << 20)},
        "W5 URLs, instance-tier (tmpfs) hits, hot tier ~11 items",
    ),
    # memory tier 0: every request a Redis GET (a redis-server is started for it)
    "W6-redis": (
        "/photo-1200.jpg?size=400&format=webp",
        {"IMAGE_PROXY_ENABLE_CACHE": "true", "IMAGE_PROXY_CACHE_MEMORY_SIZE": "0"},
        "W6, Redis-tier hit (memory tier 0)",
    ),
}
SLOW = {"W4": 3}  # duration multiplier (AVIF: few requests per second)

# Format negotiation (IMAGE_PROXY_PREFERRED_FORMATS): the browsers' real `<img>` Accept strings
CHROME_ACCEPT = "image/jxl,image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX_OLD_ACCEPT = "image/webp,*/*"
NEGOTIATE_ENV = {"IMAGE_PROXY_ENABLE_CACHE": "true", "IMAGE_PROXY_PREFERRED_FORMATS": "avif,webp"}
NEGOTIATED_WORKLOADS = {
    # id -> (template, extra env, request headers, description); cache on: the hit path
    "W6-neg-avif": (
        "/photo-1200.jpg?size=400",
        NEGOTIATE_ENV,
        {"Accept": CHROME_ACCEPT},
        "W6 without format, Chrome's Accept -> AVIF, memory-tier hit",
    ),
    "W6-neg-webp": (
        "/photo-1200.jpg?size=400",
        NEGOTIATE_ENV,
        {"Accept": FIREFOX_OLD_ACCEPT},
        "W6 without format, old Firefox's Accept -> WebP, memory-tier hit",
    ),
}


# -- corpus ------------------------------------------------------------------------------


def ensure_corpus(corpus: str) -> None:
    os.makedirs(corpus, exist_ok=True)
    need = ("photo-1200.jpg", "photo-4000x3000.jpg")
    if not all(os.path.exists(os.path.join(corpus, n)) for n in need):
        if os.path.exists(SHARED_CORPUS):
            wheels = "/tmp/bench/wheels" if os.path.isdir("/tmp/bench/wheels") else f"{WORK}/wheels"
            subprocess.run([sys.executable, SHARED_CORPUS, corpus, "--wheels", wheels], check=True)
        else:
            _synthetic_corpus(corpus)
    if not os.path.exists(os.path.join(corpus, BIG)):
        import pyvips

        src = pyvips.Image.new_from_file(os.path.join(corpus, "photo-4000x3000.jpg"))
        big = src.resize(8660 / src.width, vscale=5774 / src.height, kernel="cubic")
        noise = pyvips.Image.gaussnoise(big.width, big.height, sigma=4, mean=0)
        big = (big + noise).cast("uchar")
        tmp = os.path.join(corpus, BIG + ".tmp")
        big.jpegsave(tmp, Q=90, keep="none")
        os.replace(tmp, os.path.join(corpus, BIG))


def _synthetic_corpus(corpus: str) -> None:
    """Photo-like stand-ins when the shared corpus builder is not around."""
    import pyvips

    def photo(w: int, h: int, seed: int) -> pyvips.Image:
        base = pyvips.Image.perlin(max(8, w // 8), max(8, h // 8), cell_size=32, seed=seed)
        rgb = base.bandjoin([base * 0.8, base * 1.2]).linear(128, 128).cast("uchar")
        rgb = rgb.resize(w / rgb.width, vscale=h / rgb.height, kernel="cubic")
        noise = pyvips.Image.gaussnoise(w, h, sigma=4)
        return (rgb + noise).cast("uchar").copy(interpretation="srgb")

    photo(1200, 810, 1).jpegsave(os.path.join(corpus, "photo-1200.jpg"), Q=90, keep="none")
    photo(4000, 3000, 2).jpegsave(os.path.join(corpus, "photo-4000x3000.jpg"), Q=90, keep="none")


# -- process-group accounting ------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 (pgrp), after pid and (comm)
            pids.append(int(d))
    return pids


def group_ticks(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime + stime
        except OSError:
            pass
    return total


def peak_rss_mb(pgid: int) -> dict[int, float]:
    """VmHWM of every process of the group except its leader (Sanic's main process)."""
    out = {}
    for pid in group_pids(pgid):
        if pid == pgid:
            continue
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        out[pid] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return out


def busy_ticks() -> int:
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return sum(f) - f[3] - f[4]  # all but idle and iowait


def quiesce(max_wait: float = 60.0, threshold: float = 0.15) -> float:
    """Wait until the machine is idle (other jobs share it); returns the seconds waited."""
    t0 = time.monotonic()
    tck = os.sysconf("SC_CLK_TCK")
    while time.monotonic() - t0 < max_wait:
        b0 = busy_ticks()
        time.sleep(0.5)
        if (busy_ticks() - b0) / tck / 0.5 < threshold:
            break
    return time.monotonic() - t0


# -- servers -----------------------------------------------------------------------------


def wait_port(port: int, timeout: float = 60) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


class Server:
    def __init__(self, corpus: str, env_extra: dict[str, str], log: str, port: int) -> None:
        env = dict(os.environ)
        env.update(
            IMAGE_PROXY_ROOT_PATH=corpus,
            IMAGE_PROXY_BIND_ADDRESS=f"127.0.0.1:{port}",
            IMAGE_PROXY_LOG_LEVEL="WARNING",
        )
        env.update(env_extra)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.port = port
        self.log = log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imgproxy"],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=ROOT,
            )
        self.pgid = self.proc.pid
        if not wait_port(port, 60):
            self.stop()
            raise RuntimeError(f"server did not listen on {port}; see {log}")
        time.sleep(0.5)  # every worker up

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 3)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            t0 = time.time()
            while time.time() - t0 < wait and group_pids(self.pgid):
                time.sleep(0.1)
            if not group_pids(self.pgid):
                break
        self.proc.wait(timeout=5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Nginx:
    """nginx static for the W1 anchor (2 workers, sendfile), like the shared harness."""

    def __init__(self, corpus: str, port: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="nginx-", dir=WORK)
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as fh:
            fh.write(
                f"worker_processes 2; daemon off; pid {self.dir}/nginx.pid;\n"
                f"error_log {self.dir}/error.log;\n"
                "events { worker_connections 1024; }\n"
                "http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;\n"
                f"  client_body_temp_path {self.dir}; proxy_temp_path {self.dir};\n"
                f"  fastcgi_temp_path {self.dir}; uwsgi_temp_path {self.dir};"
                f" scgi_temp_path {self.dir};\n"
                f"  server {{ listen 127.0.0.1:{port}; root {corpus}; }} }}\n"
            )
        self.proc = subprocess.Popen(
            ["nginx", "-c", conf, "-p", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        self.port = port
        if not wait_port(port, 10):
            self.stop()
            raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        with_suppress_kill(self.pgid)
        self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    """redis-server on 127.0.0.1 for the Redis-tier row: no persistence, a temp dir."""

    def __init__(self, port: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="redis-", dir=WORK)
        self.port = port
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen(
            [*argv, "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not wait_port(port, 10):
            self.stop()
            raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        with_suppress_kill(self.proc.pid)
        self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


def with_suppress_kill(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            if not group_pids(pgid):
                return
            time.sleep(0.1)


# -- load --------------------------------------------------------------------------------


def paths_file(template: str) -> str:
    import random

    if "{size}" in template:
        paths = [expand(template, s) for s in SIZES]
        random.Random(42).shuffle(paths)
    else:
        paths = [template]
    fd, name = tempfile.mkstemp(prefix="paths-", suffix=".txt", dir=WORK)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(paths) + "\n")
    return name


def wrk(
    port: int,
    paths: str,
    duration: float,
    conc: int = 8,
    threads: int = 2,
    headers: dict[str, str] | None = None,
) -> dict:
    cmd = [
        "wrk", f"-t{threads}", f"-c{conc}", f"-d{max(1, round(duration))}s", "--timeout", "60s",
        *(a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")),
        "-s", LUA, f"http://127.0.0.1:{port}", "--", paths,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120).stdout
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            r = json.loads(line[len("BENCHJSON ") :])
            secs = r["duration_us"] / 1e6
            r["rps"] = r["requests"] / secs if secs else 0.0
            r["errors"] = sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_timeout"))
            return r
    raise RuntimeError(f"wrk gave no summary:\n{out}")


def check(port: int, path: str, headers: dict[str, str] | None = None) -> str:
    """One request: status, sniffed format, pixel size (visible rather than silently fast)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=120) as resp:
        body = resp.read()
        status = resp.status
    try:
        import pyvips

        if body[:2] == b"\xff\x0a" or body[4:8] == b"JXL ":  # no jxlload: ask djxl
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "x.jxl"), "wb") as fh:
                    fh.write(body)
                subprocess.run(["djxl", f"{tmp}/x.jxl", f"{tmp}/x.png"], capture_output=True)
                im = pyvips.Image.new_from_file(f"{tmp}/x.png")
            return f"{status} jxl {im.width}x{im.height}"
        im = pyvips.Image.new_from_buffer(body, "")
        fmt = im.get("vips-loader").replace("load_buffer", "").replace("heif", "avif")
        return f"{status} {fmt} {im.width}x{im.height}"
    except Exception as exc:
        return f"{status} ? ({exc.__class__.__name__})"


def renders(port: int) -> float | None:
    """Transforms actually rendered so far (all workers), from /metrics; None if unavailable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("image_transforms_total")
    )


def measure(
    port: int,
    pgid: int | None,
    template: str,
    duration: float,
    warmup: float,
    headers: dict[str, str] | None = None,
) -> dict:
    paths = paths_file(template)
    try:
        first = expand(template, SIZES[0])
        result: dict = {"check": check(port, first, headers)}
        if warmup > 0:
            wrk(port, paths, warmup, headers=headers)
        quiesce()
        tck = os.sysconf("SC_CLK_TCK")
        t0 = group_ticks(pgid) if pgid else 0
        n0 = renders(port) if pgid else None
        b0, c0 = busy_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.monotonic()
        r = wrk(port, paths, duration, headers=headers)
        wall = time.monotonic() - w0
        n1 = renders(port) if n0 is not None else None
        if n0 is not None and n1 is not None and r["requests"]:
            # < 1 when identical concurrent misses were coalesced (single-flight)
            result["renders_per_req"] = (n1 - n0) / r["requests"]
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / wall
        busy = (busy_ticks() - b0) / tck / wall
        if pgid:
            result["cpu"] = (group_ticks(pgid) - t0) / tck / wall
            result["foreign"] = max(0.0, busy - result["cpu"] - client)
            rss = peak_rss_mb(pgid)
            result["rss_mb"] = max(rss.values()) if rss else 0.0
            result["rss_all"] = sorted(round(v, 1) for v in rss.values())
        result.update(
            rps=r["rps"],
            p50=r["lat_p50_us"] / 1000,
            p99=r["lat_p99_us"] / 1000,
            bytes=r["bytes"] / max(1, r["requests"]),
            requests=r["requests"],
            errors=r["errors"],
            non2xx=r["non2xx"],
        )
        return result
    finally:
        os.unlink(paths)


def combine(parts: list[tuple[dict, dict | None]]) -> dict:
    """Slices of one workload -> one row; floor ratios are per-slice (paired) means."""
    ms = [m for m, _ in parts]
    secs = [m["requests"] / m["rps"] if m["rps"] else 0.0 for m in ms]
    r = dict(ms[-1])  # check, peak RSS (VmHWM only grows)
    r["requests"] = sum(m["requests"] for m in ms)
    r["rps"] = r["requests"] / sum(secs) if sum(secs) else 0.0
    r["p50"] = sorted(m["p50"] for m in ms)[len(ms) // 2]
    r["p99"] = max(m["p99"] for m in ms)
    r["bytes"] = sum(m["bytes"] * m["requests"] for m in ms) / max(1, r["requests"])
    for k in ("errors", "non2xx"):
        r[k] = sum(m[k] for m in ms)
    for k in ("cpu", "foreign"):
        r[k] = sum(m.get(k, 0.0) for m in ms) / len(ms)
    if all("renders_per_req" in m for m in ms):
        r["renders_per_req"] = sum(m["renders_per_req"] * m["requests"] for m in ms) / max(
            1, r["requests"]
        )
    fl = [(m, f) for m, f in parts if f]
    if fl:
        r["floor"] = {k: sum(f[k] for _, f in fl) / len(fl) for k in fl[0][1]}
        r["ratio_render"] = sum(m["rps"] / f["render"] for m, f in fl) / len(fl)
        r["ratio_decode"] = sum(m["rps"] / f["decode"] for m, f in fl) / len(fl)
    r["slices"] = [round(m["rps"], 1) for m in ms]
    return r


def idle_single(port: int, template: str, n: int) -> dict:
    """Latency of sequential single requests (1 connection, idle server)."""
    lat = []
    for i in range(n):
        path = template.format(size=SIZES[(i * 7) % len(SIZES)])
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as resp:
            resp.read()
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    return {"n": n, "median_ms": lat[len(lat) // 2], "min_ms": lat[0], "max_ms": lat[-1]}


# -- negotiation overhead ----------------------------------------------------------------


def negotiation_overhead(corpus: str, env_extra: dict[str, str], window: float, pairs: int) -> dict:
    """Per-request cost of format negotiation on a cache hit. One server (cache on,
    `IMAGE_PROXY_PREFERRED_FORMATS=avif,webp`), one cache entry, asked for in alternating wrk
    windows `neg explicit explicit neg ...` (ABBA: a linear drift of the VM hits both alike):
      neg       /photo-1200.jpg?size=400              Chrome's Accept -> negotiated AVIF
      explicit  /photo-1200.jpg?size=400&format=avif  the same Accept, no negotiation
    Reported: req/s and server CPU per request (process-group ticks / requests) of each, and
    neg/explicit ratios (the target: negotiation costs < 5 %)."""
    urls = {"neg": "/photo-1200.jpg?size=400", "explicit": "/photo-1200.jpg?size=400&format=avif"}
    hdr = {"Accept": CHROME_ACCEPT}
    port = free_port()
    env = {**NEGOTIATE_ENV, **env_extra}
    files = {k: paths_file(u) for k, u in urls.items()}
    windows: dict[str, list[dict]] = {k: [] for k in urls}
    out: dict = {"window_s": window, "pairs": pairs, "urls": urls}
    try:
        with Server(corpus, env, os.path.join(WORK, "server-neg.log"), port) as srv:
            seen: dict[str, tuple] = {}
            for k, u in urls.items():  # the first requests render (per worker); then hits
                check(port, u, hdr)
                for _ in range(8):
                    req = urllib.request.Request(f"http://127.0.0.1:{port}{u}", headers=hdr)
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        ctype, body = resp.headers.get("Content-Type"), resp.read()
                        hit = seen.get(k, (0, 0, 0))[1] or resp.headers.get("X-Cache") == "HIT"
                        seen[k] = (ctype, hit, hashlib.sha256(body).hexdigest())
            out["check"] = {k: f"{v[0]} hit={v[1]}" for k, v in seen.items()}
            out["same_entry"] = seen["neg"] == seen["explicit"] and seen["neg"][1]
            for k in urls:
                wrk(port, files[k], 2, headers=hdr)  # warm-up, discarded
            quiesce(max_wait=20)
            tck = os.sysconf("SC_CLK_TCK")
            order = [k for _ in range(pairs) for k in ("neg", "explicit", "explicit", "neg")]
            for k in order:
                t0 = group_ticks(srv.pgid)
                r = wrk(port, files[k], window, headers=hdr)
                ticks = group_ticks(srv.pgid) - t0
                windows[k].append(
                    {
                        "rps": r["rps"],
                        "cpu_us": ticks / tck / max(1, r["requests"]) * 1e6,
                        "p50": r["lat_p50_us"] / 1000,
                        "bad": r["errors"] + r["non2xx"],
                    }
                )
    finally:
        for f in files.values():
            os.unlink(f)
    for k, ws in windows.items():
        out[k] = {
            "rps": sum(w["rps"] for w in ws) / len(ws),
            "cpu_us": sum(w["cpu_us"] for w in ws) / len(ws),
            "p50": sorted(w["p50"] for w in ws)[len(ws) // 2],
            "windows": [round(w["rps"]) for w in ws],
        }
    out["errors"] = sum(w["bad"] for ws in windows.values() for w in ws)
    out["rps_ratio"] = out["neg"]["rps"] / out["explicit"]["rps"]
    out["cpu_ratio"] = out["neg"]["cpu_us"] / out["explicit"]["cpu_us"]
    # per ABBA block (windows 2i, 2i+1 of each side are neighbours in time): the median of
    # the paired ratios shrugs off a block that another job on the machine disturbed
    for key in ("rps", "cpu_us"):
        ratios = sorted(
            (windows["neg"][2 * i][key] + windows["neg"][2 * i + 1][key])
            / (windows["explicit"][2 * i][key] + windows["explicit"][2 * i + 1][key])
            for i in range(pairs)
        )
        out[f"{key}_paired_median"] = ratios[len(ratios) // 2]
        out[f"{key}_paired"] = [round(r, 3) for r in ratios]
    return out


_NEG_MICRO = """
import asyncio, json, sys, time
from imgproxy import params
from imgproxy.config import Settings
from imgproxy.metrics import Metrics
from imgproxy.pool import Admission, Pool
from imgproxy.produce import Producer
from imgproxy.service import ImageService
s = Settings.from_env({"IMAGE_PROXY_ROOT_PATH": sys.argv[1],
                       "IMAGE_PROXY_PREFERRED_FORMATS": "avif,webp"})
async def main():
    m = Metrics()
    renders = Pool(s.limits, s.encode, m, Admission(1, 0))
    svc = ImageService(s, m, Producer(s, m, renders))
    spec = params.parse("/photo-1200.jpg", "size=400", {}, s)
    fns = {"negotiate": lambda: svc.negotiate(spec, sys.argv[2]),
           "locate": lambda: svc.locate(spec.path)}
    best = dict.fromkeys(fns, 1e9)
    for _ in range(15):  # interleaved rounds; the minimum is the least disturbed
        for k, f in fns.items():
            n, t = 20000, time.perf_counter()
            for _ in range(n):
                await f()
            best[k] = min(best[k], (time.perf_counter() - t) / n * 1e6)
    print(json.dumps(best))
asyncio.run(main())
"""


def negotiation_micro(corpus: str) -> dict:
    """In-process cost of `ImageService.negotiate()` (Accept memo, header probe memo, spec
    memo) beyond the `locate()` it passes on (which the explicit request does anyway)."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="prom-", dir=WORK))
    try:
        out = subprocess.run(
            [sys.executable, "-c", _NEG_MICRO, corpus, CHROME_ACCEPT],
            env=env, capture_output=True, text=True, check=True, timeout=600,
        ).stdout  # fmt: skip
    finally:
        shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    r = json.loads(out)
    r["extra_us"] = r["negotiate"] - r["locate"]
    return r


# -- floors (in-process, no HTTP) --------------------------------------------------------


def _floor_worker(args: tuple) -> tuple[int, float]:
    path, fmt, mode, duration, warmup, start_at, offset, wid = args
    os.environ["VIPS_CONCURRENCY"] = "1"
    from imgproxy import transform
    from imgproxy.transform import geometry
    from imgproxy.transform.geometry import Box
    from imgproxy.transform.ops import jpeg_shrink

    transform.configure(1)
    import pyvips

    with open(path, "rb") as fh:
        data = fh.read()
    hdr = pyvips.Image.new_from_buffer(data, "")
    from imgproxy.config import default_encode_options

    opts = default_encode_options()

    def one(i: int) -> None:
        size = SIZES[i % len(SIZES)]
        if wid in FLOOR_BOX:
            b = FLOOR_BOX[wid](size)
            box = Box(width=b["w"], height=b["h"], fit=b["fit"])
        else:
            box = Box(target=size)
        if mode == "render":
            plan = transform.Plan("jpeg", fmt, opts, 1 << 40, None, "auto", box=box)
            transform.render(data, plan)
        else:  # the decode our transform chooses: the DCT shrink that covers the resize
            rw, rh = geometry.fit(box, hdr.width, hdr.height).resize
            shrink = jpeg_shrink(hdr.width, hdr.height, rw, rh)
            pyvips.Image.new_from_buffer(data, "", shrink=shrink).copy_memory()

    while time.time() < start_at:
        time.sleep(0.001)
    i = offset
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        one(i)
        i += 1
    n = 0
    t0 = time.perf_counter()
    end = t0 + duration
    while time.perf_counter() < end:
        one(i)
        i += 1
        n += 1
    return n, time.perf_counter() - t0


def floors(
    pool: mp.pool.Pool, corpus: str, wid: str, duration: float, warmup: float, procs: int
) -> dict:
    _, src, fmt, _ = WORKLOADS[wid]
    out = {}
    for mode in ("decode", "render"):
        quiesce()
        start_at = time.time() + 0.3
        args = [
            (os.path.join(corpus, src), fmt, mode, duration, warmup, start_at, k * 7, wid)
            for k in range(procs)
        ]
        res = pool.map(_floor_worker, args)
        out[mode] = sum(n / t for n, t in res)
        out[mode + "_ms"] = sum(t / max(1, n) * 1000 for n, t in res) / len(res)
    return out


# -- report ------------------------------------------------------------------------------


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=False)) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per workload")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument(
        "--only", help="comma list of W1,W2,W2c,W2s,W3,W3j,W4,W5,W7,cache,neg (default: all)"
    )
    ap.add_argument(
        "--neg-pairs", type=int, default=3, help="ABBA blocks of the negotiation overhead run"
    )
    ap.add_argument("--quick", action="store_true", help="3 s per workload, 1 s warm-up")
    ap.add_argument("--smoke", action="store_true", help="1 s, W1 + W5 only: CI liveness check")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for our server")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--only-cache", help="comma list of cache rows (W6-miss,W6-mem,...)")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--floor-procs", type=int, default=2)
    ap.add_argument(
        "--slices", type=int, default=3, help="alternating HTTP/floor windows per workload"
    )
    ap.add_argument("--corpus", default=os.path.join(WORK, "corpus"))
    ap.add_argument("--json", help="also write the results as JSON here")
    a = ap.parse_args()
    if a.quick:
        a.duration, a.warmup = 3.0, 1.0
    if a.smoke:
        a.duration, a.warmup, a.only, a.no_nginx, a.slices = 1.0, 0.0, "W1,W5", True, 1
    if not shutil.which("wrk"):
        print("bench: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 2
    os.makedirs(WORK, exist_ok=True)
    ensure_corpus(a.corpus)
    env_extra = dict(e.partition("=")[::2] for e in a.env)
    only = a.only.split(",") if a.only else [*WORKLOADS, "cache", "neg"]
    results: dict = {"settings": vars(a), "rows": {}, "cache": {}, "neg": {}}
    rows, cache = results["rows"], results["cache"]

    pool = None
    if not a.no_floor and any(w in WORKLOADS and WORKLOADS[w][2] for w in only):
        pool = mp.get_context("spawn").Pool(a.floor_procs)
    try:
        for wid, (template, _, fmt, desc) in WORKLOADS.items():
            if wid not in only:
                continue
            dur = a.duration * (SLOW.get(wid, 1) if not a.smoke else 1)
            port = free_port()
            env = {"IMAGE_PROXY_ENABLE_CACHE": "false", **env_extra}
            with Server(a.corpus, env, os.path.join(WORK, f"server-{wid}.log"), port) as srv:
                # HTTP windows and floor windows alternate, so the VM's drift (it changes speed
                # by 20-50 % over minutes) hits both sides of `ours / floor` alike.
                parts = []
                for k in range(a.slices):
                    m = measure(port, srv.pgid, template, dur / a.slices, a.warmup if k == 0 else 0)
                    f = None
                    if pool is not None and fmt:
                        fd = min(dur / a.slices, 4.0)
                        f = floors(pool, a.corpus, wid, fd, 0.5, a.floor_procs)
                    parts.append((m, f))
                r = combine(parts)
                if wid == "W4" and not a.smoke:
                    time.sleep(3)  # abandoned encodes finish
                    r["idle"] = idle_single(port, template, 5)
            r["desc"] = desc
            rows[wid] = r
            print(f"{wid}: {r['rps']:.1f} req/s  {r['check']}", file=sys.stderr, flush=True)

        if "cache" in only:
            port = free_port()
            with Server(a.corpus, env_extra, os.path.join(WORK, "server-W1.log"), port) as srv:
                cache["W1"] = measure(port, srv.pgid, WORKLOADS["W1"][0], a.duration, a.warmup)
            for cid, (template, env, _desc) in CACHE_WORKLOADS.items():
                if a.only_cache and cid not in a.only_cache.split(","):
                    continue
                port = free_port()
                env = {**env, **env_extra}
                redis = None
                if cid == "W6-redis":
                    if not shutil.which("redis-server"):
                        continue
                    redis = RedisServer(free_port())
                    env["IMAGE_PROXY_REDIS_URL"] = f"redis://127.0.0.1:{redis.port}/0"
                if "IMAGE_PROXY_ENABLE_DISK_CACHE" in env:
                    env["IMAGE_PROXY_CACHE_DISK_PATH"] = tempfile.mkdtemp(prefix="disk-", dir=WORK)
                with Server(a.corpus, env, os.path.join(WORK, f"server-{cid}.log"), port) as srv:
                    cache[cid] = measure(port, srv.pgid, template, a.duration, a.warmup)
                if "IMAGE_PROXY_CACHE_DISK_PATH" in env:
                    shutil.rmtree(env["IMAGE_PROXY_CACHE_DISK_PATH"], ignore_errors=True)
                if redis is not None:
                    redis.stop()
            for cid, (template, env, hdrs, _desc) in NEGOTIATED_WORKLOADS.items():
                port = free_port()
                log = os.path.join(WORK, f"server-{cid}.log")
                with Server(a.corpus, {**env, **env_extra}, log, port) as srv:
                    cache[cid] = measure(port, srv.pgid, template, a.duration, a.warmup, hdrs)
            if not a.no_nginx and shutil.which("nginx"):
                port = free_port()
                ng = Nginx(a.corpus, port)
                try:
                    cache["nginx-W1"] = measure(port, ng.pgid, WORKLOADS["W1"][0], a.duration, 1)
                finally:
                    ng.stop()
        if "neg" in only:
            window = max(1.0, a.duration / 2)
            results["neg"] = negotiation_overhead(a.corpus, env_extra, window, a.neg_pairs)
            results["neg"]["micro"] = negotiation_micro(a.corpus)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    report(results)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    bad = [k for k, r in {**rows, **cache}.items() if r["errors"] or r["non2xx"]]
    if results["neg"] and (results["neg"]["errors"] or not results["neg"]["same_entry"]):
        bad.append("neg")
    if bad:
        print(f"errors or non-2xx in: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def report(results: dict) -> None:
    rows, cache = results["rows"], results["cache"]
    s = results["settings"]
    print(
        f"\nours: 8 connections, 2 wrk threads, {s['warmup']:g} s warm-up + {s['duration']:g} s "
        f"(W4 x3), sizes 380..419; result cache off for W1-W7; extra env {s['env'] or '-'}"
    )
    if rows:
        head = ["wl", "req/s", "p50 ms", "p99 ms", "B/resp", "srv CPU", "RSS MB/wkr",
                "floor dec", "floor render", "ours/render", "ours/dec", "rnd/req", "fgn CPU", "check"]  # fmt: skip
        widths = [4, 7, 7, 7, 7, 7, 10, 9, 12, 11, 8, 7, 7, 22]
        print(fmt_row(head, widths))
        print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
        for wid, r in rows.items():
            f = r.get("floor", {})
            cells = [
                wid,
                f"{r['rps']:.1f}",
                f"{r['p50']:.0f}",
                f"{r['p99']:.0f}",
                f"{r['bytes']:.0f}",
                f"{r.get('cpu', 0):.2f}",
                f"{r.get('rss_mb', 0):.0f}",
                f"{f['decode']:.1f}" if f else "-",
                f"{f['render']:.1f}" if f else "-",
                f"{r['ratio_render']:.2f}" if f else "-",
                f"{r['ratio_decode']:.2f}" if f else "-",
                f"{r['renders_per_req']:.2f}" if "renders_per_req" in r and f else "-",
                f"{r.get('foreign', 0):.2f}",
                r["check"],
            ]
            print(fmt_row(cells, widths))
        if "W4" in rows and "idle" in rows["W4"]:
            i = rows["W4"]["idle"]
            print(
                f"W4 idle single request (1 connection, n={i['n']}): median {i['median_ms']:.0f} ms"
                f" (min {i['min_ms']:.0f}, max {i['max_ms']:.0f})"
            )
        print("floor = img/s in-process, 2 procs x 1 libvips thread: decode-only at our DCT shrink,"
              " and transform.render; HTTP and floor windows alternate (--slices), ratios are"
              " paired per slice; p99 = worst slice; rnd/req = renders per request from /metrics"
              " (< 1: identical concurrent misses were coalesced by single-flight, so req/s"
              " overstates the render rate)")  # fmt: skip
    if cache:
        base = cache.get("W1", {}).get("rps")
        ng = cache.get("nginx-W1", {}).get("rps")
        print(
            "\ncache section: W6 = one URL repeated; W6-miss has the cache off (identical"
            " concurrent misses still share one render: single-flight)"
        )
        print(
            "| cache wl | req/s | p50 ms | p99 ms | B/resp | srv CPU | fgn |"
            " ÷ W1 ours | ÷ nginx W1 |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for cid, r in cache.items():
            print(
                f"| {cid} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['bytes']:.0f} "
                f"| {r.get('cpu', 0):.2f} | {r.get('foreign', 0):.2f} | {r['rps'] / base:.2f} | "
                f"{(r['rps'] / ng) if ng else float('nan'):.2f} |"
                if base
                else f"| {cid} | {r['rps']:.0f} |"
            )

    neg = results.get("neg")
    if neg:
        print(
            f"\nnegotiation overhead on a cache hit: one server, one cache entry, Chrome's Accept;"
            f" {neg['pairs']} ABBA blocks of {neg['window_s']:g} s windows"
        )
        print("| request | req/s | p50 ms | srv CPU µs/req | windows req/s |")
        print("|---|---:|---:|---:|---|")
        for k in ("neg", "explicit"):
            r = neg[k]
            print(
                f"| {k}: `{neg['urls'][k]}` | {r['rps']:.0f} | {r['p50']:.2f} | {r['cpu_us']:.0f} "
                f"| {' '.join(map(str, r['windows']))} |"
            )
        print(
            f"neg/explicit: req/s {neg['rps_ratio']:.3f} (overhead {100 * (1 - neg['rps_ratio']):+.1f} %),"
            f" CPU per request {neg['cpu_ratio']:.3f} ({100 * (neg['cpu_ratio'] - 1):+.1f} %);"
            f" same cache entry: {neg['same_entry']} ({neg['check']})"
        )
        print(
            f"paired per ABBA block, median: req/s {neg['rps_paired_median']:.3f}"
            f" {neg['rps_paired']}, CPU per request {neg['cpu_us_paired_median']:.3f}"
            f" {neg['cpu_us_paired']}"
        )
        m = neg["micro"]
        print(
            f"in-process: negotiate() {m['negotiate']:.1f} µs - locate() {m['locate']:.1f} µs ="
            f" {m['extra_us']:.1f} µs of negotiation per request ="
            f" {100 * m['extra_us'] / neg['explicit']['cpu_us']:.1f} % of the explicit request's"
            " server CPU"
        )


if __name__ == "__main__":
    sys.exit(main())
