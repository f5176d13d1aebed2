"""metrics.adder / metrics.observer: the cheap writes a cache hit uses must leave exactly
what prometheus_client's own `inc()` / `observe()` would, in the multiprocess files that
`/metrics` on any worker reads (and behave the same without them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client import multiprocess
    from imgproxy.metrics import adder, observer

    buckets = (0.001, 0.01, 0.1, 1.0)
    out, regs = {}, []
    for way in ("fast", "own"):
        reg = CollectorRegistry()
        regs.append(reg)
        c = Counter(f"{way}_hits", "h", ["k"], registry=reg).labels("x")
        h = Histogram(f"{way}_secs", "s", ["k"], buckets=buckets, registry=reg).labels("x")
        inc, obs = (adder(c), observer(h)) if way == "fast" else (c.inc, h.observe)
        # with the files, the cheap writes are their own; without, prometheus_client's
        assert (inc == c.inc) is (way == "own" or len(sys.argv) == 1), way
        for amount in (1, 1, 2.5, 1000):
            inc(amount)
        for value in (0.0005, 0.001, 0.0011, 0.05, 0.5, 1.0, 3.0, 99.0):
            obs(value)
        inc()  # the default amount is 1
    if len(sys.argv) > 1:  # read back as a scrape on another worker would
        regs = [CollectorRegistry()]
        multiprocess.MultiProcessCollector(regs[0])
    text = "".join(generate_latest(reg).decode() for reg in regs)
    for line in text.splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            way, _, rest = name.partition("_")
            out.setdefault(way, {})[rest] = float(value)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("multiprocess", [True, False])
def test_cheap_writes_equal_prometheus_own(tmp_path: Path, multiprocess: bool) -> None:
    import json
    import os

    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    args = [sys.executable, "-c", SCRIPT]
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
        args.append("scrape")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # with the files: both written to the mmap files and read back by the collector
    assert out["fast"] and out["fast"] == out["own"]
    assert out["fast"]['hits_total{k="x"}'] == 1005.5
    assert out["fast"]['secs_bucket{k="x",le="0.001"}'] == 2  # an edge counts in its bucket
    assert out["fast"]['secs_bucket{k="x",le="0.01"}'] == 3
    assert out["fast"]['secs_bucket{k="x",le="+Inf"}'] == 8
    assert out["fast"]['secs_count{k="x"}'] == 8
    assert out["fast"]['secs_sum{k="x"}'] == pytest.approx(103.5526)
