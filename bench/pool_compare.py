"""Render pool designs side by side on the shared harness's load runner (issue 17.1).

Starts our server once per variant and round (its own session, result cache off), runs the
shared harness's `run.py` for the chosen workloads, stops it; rounds interleave the variants
(A B C A B C), so the VM's drift hits every design alike. Prints one table of medians
(req/s, p99, server CPU, CPU of the busiest process) and writes the raw rows as JSON lines.

    .venv/bin/python bench/pool_compare.py --rounds 2 \\
        --variant 'threads2=IMAGE_PROXY_RENDER_POOL=threads IMAGE_PROXY_TRANSFORM_THREADS=2' \\
        --variant 'process=IMAGE_PROXY_RENDER_POOL=processes'

Needs the shared harness (`/work/shared/bench`, `HARNESS`) and its corpus (`/tmp/bench/corpus`,
built by its `make_corpus.py`). `--cmd` runs another checkout (e.g. main's venv).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS = Path(os.environ.get("HARNESS", "/work/shared/bench"))
ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {
    "W1": "/photo-1200.jpg",
    "W2": "/photo-4000x3000.jpg?size={size}&format=jpeg",
    "W3": "/photo-4000x3000.jpg?size={size}&format=webp",
    "W4": "/photo-4000x3000.jpg?size={size}&format=avif",
    "W5": "/photo-1200.jpg?size={size}&format=webp",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def group_ticks(pgid: int) -> dict[int, tuple[str, int]]:
    """pid -> (name, utime+stime ticks) of every process in the group."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name, _, rest = stat.rpartition(")")
        fields = rest.split()
        if int(fields[2]) != pgid:
            continue
        label = name.partition("(")[2]
        if b"spawn_main" in b" ".join(cmd) or b"multiprocessing" in b" ".join(cmd):
            label = "child"
        out[int(entry)] = (label, int(fields[11]) + int(fields[12]))
    return out


def run_variant(name: str, env: dict[str, str], cmd: str, wls: list[str], a, out: str, rnd: int):
    port = free_port()
    full = dict(
        os.environ, IMAGE_PROXY_ROOT_PATH=a.corpus, IMAGE_PROXY_BIND_ADDRESS=f"127.0.0.1:{port}"
    )
    full.update(env)
    log = open(os.path.join(a.outdir, f"{name}-r{rnd}.log"), "w")  # noqa: SIM115
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {cmd}"],
        env=full,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=a.cwd,
    )
    if a.autogroup_nice is not None:  # the server's session is its own autogroup
        with contextlib.suppress(OSError):
            Path(f"/proc/{proc.pid}/autogroup").write_text(str(a.autogroup_nice))
    try:
        if not wait_port(port, 60):
            print(f"{name}: no listener; see {log.name}", flush=True)
            return
        time.sleep(1.0)
        before = group_ticks(proc.pid)
        t0 = time.monotonic()
        args = [
            sys.executable,
            str(HARNESS / "run.py"),
            name,
            f"http://127.0.0.1:{port}",
            *[f"{w}={TEMPLATES[w]}" for w in wls],
            "--duration",
            str(a.duration),
            "--warmup",
            str(a.warmup),
            "--duration-for",
            f"W4={a.duration * 3}",
            "--out",
            out,
            "--round",
            str(rnd),
            "--retries",
            str(a.retries),
            "--quiet-wait",
            str(a.quiet_wait),
            "--no-header",
        ]
        subprocess.run(args, cwd=HARNESS, check=False)
        after = group_ticks(proc.pid)
        secs = time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        per = sorted(
            ((after[p][1] - before.get(p, (0, 0))[1]) / hz / secs, after[p][0], p) for p in after
        )[::-1]
        shares = " ".join(f"{lab}:{c:.2f}" for c, lab, _ in per if c > 0.01)
        print(f"  {name} r{rnd} CPU per process over the whole run (cores): {shares}", flush=True)
        with open(os.path.join(a.outdir, "procs.jsonl"), "a") as fh:
            fh.write(json.dumps({"variant": name, "round": rnd, "procs": per}) + "\n")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def table(out: str, names: list[str], wls: list[str]) -> str:
    with open(out) as fh:
        rows = [json.loads(line) for line in fh]
    lines = [
        "| variant | " + " | ".join(f"{w} req/s · p99 ms · srv CPU" for w in wls) + " |",
        "|---|" + "---:|" * len(wls),
    ]
    for n in names:
        cells = []
        for w in wls:
            rs = [r for r in rows if r["server"] == n and r["workload"] == w and "rps" in r]
            if not rs:
                cells.append("–")
                continue
            rps = statistics.median(r["rps"] for r in rs)
            p99 = statistics.median(r["p99_ms"] for r in rs)
            cpu = statistics.median(r["cpu"]["server_cores"] for r in rs)
            dirty = "!" if any(r.get("contaminated") for r in rs) else ""
            errs = sum(r["errors"] + r["non2xx"] for r in rs)
            cells.append(
                f"{rps:.1f} · {p99:.0f} · {cpu:.2f}{dirty}" + (f" ({errs} err)" if errs else "")
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variant", action="append", required=True, help="NAME=ENV=V ENV2=V2 ...")
    ap.add_argument("--cmd", default=f"{ROOT}/.venv/bin/python -m imgproxy")
    ap.add_argument("--variant-cmd", action="append", default=[], help="NAME=CMD (else --cmd)")
    ap.add_argument("--cwd", default=str(ROOT))
    ap.add_argument("--workloads", default="W2,W3,W5")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--retries", type=int, default=0)
    ap.add_argument("--quiet-wait", type=float, default=10)
    ap.add_argument("--corpus", default=os.environ.get("CORPUS", "/tmp/bench/corpus"))
    ap.add_argument("--outdir", default=None)
    ap.add_argument(
        "--autogroup-nice",
        type=int,
        default=None,
        help="on a shared machine: nice value for the server's and this run's autogroups "
        "(Linux sched_autogroup puts each session in its own group; plain nice has no "
        "effect across sessions), e.g. -15 to measure closer to a quiet machine",
    )
    a = ap.parse_args()
    a.outdir = a.outdir or tempfile.mkdtemp(prefix="pool-compare-")
    if a.autogroup_nice is not None:  # wrk runs in this session's group
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(a.autogroup_nice))
    os.makedirs(a.outdir, exist_ok=True)
    out = os.path.join(a.outdir, "results.jsonl")
    wls = a.workloads.split(",")
    variants = []
    cmds = dict(v.split("=", 1) for v in a.variant_cmd)
    for v in a.variant:
        name, _, rest = v.partition("=")
        env = dict(kv.split("=", 1) for kv in rest.split())
        variants.append((name, env, cmds.get(name, a.cmd)))
    env_base = {"IMAGE_PROXY_ENABLE_CACHE": "false"}
    # this checkout's code as it was at the start: edits made during a long run change nothing
    snapshot = os.path.join(a.outdir, "src")
    shutil.copytree(ROOT / "src", snapshot, dirs_exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still stops the server
    for rnd in range(1, a.rounds + 1):
        for name, env, cmd in variants:
            extra = {"PYTHONPATH": snapshot} if cmd == a.cmd else {}
            run_variant(name, {**env_base, **extra, **env}, cmd, wls, a, out, rnd)
    print(f"\nresults: {out}\n")
    print(table(out, [n for n, _, _ in variants], wls))


if __name__ == "__main__":
    main()
