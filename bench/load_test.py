"""Overload test (not run in CI): does the service shed load cleanly and stay alive?

Starts `python -m imgproxy` (2 workers, IMAGE_PROXY_TRANSFORM_QUEUE=4,
IMAGE_PROXY_TRANSFORM_THREADS=1) on a corpus with one large JPEG, fires N concurrent slow
transforms at once (AVIF, lanczos3, a distinct `size` per request so that single-flight cannot
merge them), probes `/health` every 100 ms from another thread, polls every worker's RSS, and
reports:

    requests, 200s, 503s (and whether every 503 carried Retry-After), other statuses / errors,
    peak RSS per process, /health latency p50/p99/max during the load, whether every worker
    survived (same pids, all alive, /health still 200 afterwards).

    .venv/bin/python bench/load_test.py                  # 200 requests, bounded to 60 s
    .venv/bin/python bench/load_test.py --requests 500 --queue 16 --json /tmp/load.json
    .venv/bin/python bench/load_test.py --retry         # clients retry 503s: sustained load

In --retry mode a request still running at the deadline counts as status -2 (a backlog, not a
failure of the service); in one-shot mode every request must finish before the deadline.

Exit status 1 when a check fails (a 503 without Retry-After, a status other than 200/503, a
dead or restarted worker, /health failing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pyvips
from _util import free_port


def make_corpus(root: Path, width: int, height: int) -> Path:
    """One large photo-like JPEG (gradients + noise: the encoders do real work)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"large-{width}x{height}.jpg"
    if not path.exists():
        x = pyvips.Image.xyz(width, height)
        grad = (x[0] * (255 / width) + x[1] * (128 / height)).cast("uchar")
        base = (grad + pyvips.Image.gaussnoise(width, height, sigma=12, seed=1)).cast("uchar")
        img = base.bandjoin([(255 - base).cast("uchar"), (base // 2 + 60).cast("uchar")])
        img.copy(interpretation="srgb").jpegsave(str(path), Q=85)
    return path


def descendants(pid: int) -> list[int]:
    """All descendants of pid, by PPid from /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out.append(child)
                todo.append(child)
    return out


def status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def listening_pids(port: int, pids: list[int]) -> set[int]:
    """Worker processes: the ones holding a socket bound to the service port."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        found.add(pid)
                        break
    return found


class Poller(threading.Thread):
    """Every `interval`: GET /health (latency, status) and VmRSS of every process."""

    def __init__(self, base_url: str, pids: list[int], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.pids = pids
        self.interval = interval
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.health_failures: list[str] = []
        self.peak_rss: dict[int, int] = {p: 0 for p in pids}

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = client.get("/health")
                    if r.status_code != 200:
                        self.health_failures.append(f"status {r.status_code}")
                except httpx.HTTPError as exc:
                    self.health_failures.append(type(exc).__name__)
                self.latencies.append(time.perf_counter() - t0)
                for pid in self.pids:
                    rss = status_kb(pid, "VmRSS")
                    if rss is not None:
                        self.peak_rss[pid] = max(self.peak_rss[pid], rss)
                self.stop.wait(max(0.0, self.interval - (time.perf_counter() - t0)))


async def fire(
    base_url: str, path: str, n: int, deadline: float, retry: bool = False
) -> list[tuple[int, bool]]:
    """n concurrent GETs, each with a distinct `size`; (status, has Retry-After) or (-1, ...).

    With `retry`, a 503 is retried after its Retry-After (a well-behaved client) until the
    deadline; every answer counts, so the load lasts as long as the backlog."""
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    results: list[tuple[int, bool]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=deadline, limits=limits) as client:

        async def one(i: int) -> tuple[int, bool]:
            url = f"{path}?size={1500 + i}&format=avif&resize_algorithm=lanczos3&v={i}"
            while True:
                try:
                    r = await client.get(url)
                except httpx.HTTPError as exc:
                    print(f"  request {i}: {type(exc).__name__}", file=sys.stderr)
                    results.append((-1, False))
                    return -1, False
                results.append((r.status_code, "retry-after" in r.headers))
                if not (retry and r.status_code == 503 and "retry-after" in r.headers):
                    return r.status_code, "retry-after" in r.headers
                await asyncio.sleep(float(r.headers["retry-after"]))

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        if retry:
            return results + [(-2, False)] * len(pending)  # -2: unfinished at the deadline
        return [t.result() if t in done else (-2, False) for t in tasks]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queue", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image", default="6000x4000", help="WIDTHxHEIGHT of the large JPEG")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds for the whole burst")
    ap.add_argument("--dir", default=os.environ.get("IMGPROXY_BENCH_DIR", tempfile.gettempdir()))
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument(
        "--retry",
        action="store_true",
        help="retry each 503 after its Retry-After until the deadline (sustained load)",
    )
    args = ap.parse_args()

    width, height = (int(v) for v in args.image.lower().split("x"))
    root = Path(args.dir) / "imgproxy-load" / "images"
    image = make_corpus(root, width, height)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_PROXY_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "IMAGE_PROXY_ROOT_PATH": str(root),
            "IMAGE_PROXY_BIND_ADDRESS": f"127.0.0.1:{port}",
            "IMAGE_PROXY_WORKERS": str(args.workers),
            "IMAGE_PROXY_TRANSFORM_QUEUE": str(args.queue),
            "IMAGE_PROXY_TRANSFORM_THREADS": str(args.threads),
            "IMAGE_PROXY_LOG_LEVEL": "WARN",
        }
    )
    base_url = f"http://127.0.0.1:{port}"
    log = open(Path(args.dir) / "imgproxy-load" / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgproxy"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    report: dict[str, object] = {}
    ok = True
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                print(f"server exited with {proc.returncode}; see {log.name}", file=sys.stderr)
                return 1
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() - started > 60:
                print("server did not become healthy", file=sys.stderr)
                return 1
            time.sleep(0.1)
        time.sleep(0.5)  # every worker up
        procs = descendants(proc.pid)
        workers = sorted(listening_pids(port, procs))
        if len(workers) < args.workers:  # fall back: every child is a candidate
            workers = procs
        poller = Poller(base_url, [proc.pid, *procs])
        poller.start()
        time.sleep(0.5)  # a few idle probes as a baseline
        idle = list(poller.latencies)
        t0 = time.monotonic()
        results = asyncio.run(
            fire(base_url, "/" + image.name, args.requests, args.deadline, args.retry)
        )
        elapsed = time.monotonic() - t0
        busy = poller.latencies[len(idle) :]
        poller.stop.set()
        poller.join(5)
        after_pids = descendants(proc.pid)
        alive = all(status_kb(p, "VmRSS") is not None for p in workers)
        health_after = httpx.get(base_url + "/health", timeout=5).status_code
        statuses = Counter(s for s, _ in results)
        no_retry_after = sum(1 for s, ra in results if s == 503 and not ra)
        report = {
            "mode": "retry 503s after Retry-After" if args.retry else "one shot",
            "clients": args.requests,
            "requests": len(results),
            "elapsed_s": round(elapsed, 2),
            "status_200": statuses.get(200, 0),
            "status_503": statuses.get(503, 0),
            "503_without_retry_after": no_retry_after,
            "other_statuses": {str(k): v for k, v in statuses.items() if k not in (200, 503)},
            "workers": workers,
            "peak_rss_mb": {
                str(p): round(kb / 1024, 1)
                for p, kb in poller.peak_rss.items()
                if p in workers or p == proc.pid
            },
            "peak_rss_mb_all_processes": {
                str(p): round(kb / 1024, 1) for p, kb in poller.peak_rss.items()
            },
            "health_probes_during_load": len(busy),
            "health_failures": poller.health_failures,
            "health_ms_idle_p50": round(1000 * statistics.median(idle), 1) if idle else None,
            "health_ms_p50": round(1000 * percentile(busy, 0.50), 1),
            "health_ms_p99": round(1000 * percentile(busy, 0.99), 1),
            "health_ms_max": round(1000 * max(busy), 1) if busy else None,
            "workers_survived": alive and sorted(after_pids) == sorted(procs),
            "health_after": health_after,
        }
        ok = (
            no_retry_after == 0
            and not [k for k in statuses if k not in (200, 503) and not (args.retry and k == -2)]
            and bool(report["workers_survived"])
            and health_after == 200
            and not poller.health_failures
        )
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

    width_key = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width_key}}  {value}")
    print("RESULT:", "ok" if ok else "FAILED")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
