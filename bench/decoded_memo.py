#!/usr/bin/env python3
"""The decoded-source memo in one process: renders of one 12 MP JPEG at rotating sizes
(380..419 px, all decoded at 1/8), with the memo off and on, interleaved (off on off on ...).

    .venv/bin/python bench/decoded_memo.py                         # jpeg webp jxl, 3 rounds
    .venv/bin/python bench/decoded_memo.py --formats jpeg --rounds 5 --source /path/to.jpg

Prints the process's CPU time per render (what a render process spends; a preempting
neighbour does not inflate it), the wall time, and the mean of each phase as the render
reports it (decode / resize / encode). The memo is warmed by the first render of each
batch; every later render of the batch is a hit. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

from imgproxy import transform
from imgproxy.config import default_encode_options
from imgproxy.transform.work import Plan

SOURCE = "/tmp/bench/corpus/photo-4000x3000.jpg"


def batch(data: bytes, fmt: str, memo: bool, n: int) -> tuple[float, float, dict[str, float]]:
    transform.configure_memo(96 * 1024 * 1024 if memo else 0)
    encode = default_encode_options()
    source_id = ("bench", len(data))

    def plan(size: int) -> Plan:
        return Plan(
            source_type="jpeg",
            format=fmt,
            encode=encode,
            max_pixels=100_000_000,
            target=size,
            source_id=source_id,
        )

    transform.render(data, plan(379))  # warm: libraries loaded, the memo filled
    steps: dict[str, float] = {}
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        for k, v in transform.render(data, plan(380 + i % 40)).steps.items():
            steps[k] = steps.get(k, 0.0) + v
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / n * 1000, wall / n * 1000, {k: v / n * 1000 for k, v in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=SOURCE)
    ap.add_argument("--formats", default="jpeg,webp,jxl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--renders", type=int, default=40, help="renders per batch")
    args = ap.parse_args()
    with open(args.source, "rb") as f:
        data = f.read()
    transform.configure(1)
    print(f"{args.source}: {len(data) / 1e6:.1f} MB; ms per render, median of {args.rounds}")
    print("format  memo   cpu    wall   decode  resize  encode")
    for fmt in args.formats.split(","):
        runs: dict[bool, list[tuple[float, float, dict[str, float]]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for memo in (False, True):
                runs[memo].append(batch(data, fmt, memo, args.renders))
        for memo in (False, True):
            cpu = statistics.median(r[0] for r in runs[memo])
            wall = statistics.median(r[1] for r in runs[memo])
            phase = {k: statistics.median(r[2][k] for r in runs[memo]) for k in runs[memo][0][2]}
            print(
                f"{fmt:<7} {'on' if memo else 'off':<5} {cpu:6.1f} {wall:6.1f} "
                f"{phase['decode']:7.2f} {phase['resize']:7.2f} {phase['encode']:7.2f}"
            )
    transform.configure_memo(0)


if __name__ == "__main__":
    main()
