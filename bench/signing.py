#!/usr/bin/env python3
"""What signing costs on the cheapest request there is: a memory-tier cache hit.

    .venv/bin/python bench/signing.py                  # 16 slices x 3 s per server (~2.5 min)
    .venv/bin/python bench/signing.py --slices 4 --duration 2

Two servers run side by side on 127.0.0.1, same corpus, same settings (1 worker, cache on),
one with IMAGE_PROXY_SIGNATURE_KEYS (two keys: every key is tried, so this is the rotation
case) and one without. Both answer the same URL (`/photo-1200.jpg?size=400&format=webp`, the
signed one with `&sig=…`), so after the first request every response is a memory-tier HIT.
wrk (8 connections, 1 thread) measures them in interleaved windows, ABBA order, so that the
VM's drift hits both alike; the ratio is taken per slice (paired) and its median reported.
Server CPU per request (utime+stime of the server's process group over the window ÷
requests) is reported too: it is the cost itself, less sensitive to the neighbours than req/s.

Because req/s on a shared 2-vCPU VM swings by tens of percent between windows, two in-process
measurements follow that do not depend on the neighbours as much (CPU time, not wall time):
the image handler itself on a memory hit, plain app vs signed app in alternating rounds
(median of the paired differences); and, piece by piece, `signing.refusal` alone (timeit on
CPU time, best of 7): µs per call for one and two keys, computed (a URL seen for the first
time: a URL seen before takes its verdict from `urls.Urls`' memo), plus the cost of parsing
the longer query; each as a share of the unsigned server's CPU per request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from bench import Server, free_port, group_ticks, quiesce, wrk  # noqa: E402

from imgproxy import signing  # noqa: E402

KEYS = ("bench-first-key-0123456789abcdefghijkl", "bench-second-key-0123456789abcdefghijk")
PATH = "/photo-1200.jpg?size=400&format=webp"


def make_corpus(root: str) -> None:
    import pyvips

    x = pyvips.Image.xyz(1200, 800)
    grad = (x[0] * (255 / 1200) + x[1] * (128 / 800)).cast("uchar")
    img = (grad + pyvips.Image.gaussnoise(1200, 800, sigma=12)).cast("uchar")
    img = img.bandjoin([(255 - img).cast("uchar"), (img // 2 + 60).cast("uchar")])
    img.copy(interpretation="srgb").jpegsave(os.path.join(root, "photo-1200.jpg"), Q=85)


def window(server: Server, paths: str, duration: float) -> dict[str, float]:
    tck = os.sysconf("SC_CLK_TCK")
    t0 = group_ticks(server.pgid)
    r = wrk(server.port, paths, duration, conc=8, threads=1)
    cpu = (group_ticks(server.pgid) - t0) / tck
    if r["errors"] or r["non2xx"]:
        raise RuntimeError(f"errors in the window: {r}")
    return {"rps": r["rps"], "cpu_us": cpu / max(1, r["requests"]) * 1e6, "p50": r["lat_p50_us"]}


def verify_cost() -> dict[str, float]:
    path, _, query = signing.sign_url(PATH, KEYS[0]).partition("?")
    second = signing.sign_url(PATH, KEYS[1]).partition("?")[2]
    out = {}
    n = 20000
    for name, keys, q in (("1 key", KEYS[:1], query), ("2 keys", KEYS, second)):
        for memo, fn in (("computed", signing.refusal),):
            assert fn(keys, path, q) is None
            times = timeit.repeat(
                lambda: fn(keys, path, q),  # noqa: B023
                number=n,
                repeat=7,
                timer=time.process_time,  # CPU time: the machine is shared
            )
            out[f"{name}, {memo}"] = min(times) / n * 1e6
    return out


def extra_parsing() -> dict[str, float]:
    """What else a signed request costs besides verify: its longer query is parsed twice more
    (params.parse_query, and Sanic's request.args for the metric label): µs signed - plain."""
    from urllib.parse import parse_qs

    from imgproxy.params import parse_query

    plain = PATH.partition("?")[2]
    signed = signing.sign_url(PATH, KEYS[0]).partition("?")[2]
    out = {}
    for name, fn in (
        ("params.parse_query", parse_query),
        ("request.args (parse_qs)", lambda q: parse_qs(q, keep_blank_values=True)),
    ):
        n = 20000
        cost = {}
        for which, q in (("plain", plain), ("signed", signed)):
            times = timeit.repeat(lambda: fn(q), number=n, repeat=7, timer=time.process_time)  # noqa: B023
            cost[which] = min(times) / n * 1e6
        out[name] = cost["signed"] - cost["plain"]
    return out


def handler_ab(corpus: str, rounds: int = 40, n: int = 1000) -> tuple[list[float], float]:
    """The image handler alone, in-process, on a memory-tier hit: plain app vs signed app,
    `n` calls each per round in alternating order, CPU time. Returns µs per call (signed -
    plain) for every round (all the handler-side work signing adds, nothing of HTTP) and the
    median µs of a plain call."""
    import asyncio

    from sanic import Sanic
    from sanic.request import Request

    from imgproxy.app import create_app, image, start_worker, stop_worker
    from imgproxy.config import Settings

    Sanic.test_mode = True
    base = {"IMAGE_PROXY_ROOT_PATH": corpus, "IMAGE_PROXY_ENABLE_CACHE": "true"}
    apps = {
        "plain": create_app(Settings.from_env(base)),
        "signed": create_app(
            Settings.from_env({**base, "IMAGE_PROXY_SIGNATURE_KEYS": ",".join(KEYS)})
        ),
    }
    targets = {"plain": PATH.encode(), "signed": signing.sign_url(PATH, KEYS[1]).encode()}
    name = PATH.partition("?")[0].lstrip("/")

    async def calls(which: str, count: int) -> float:
        app, target = apps[which], targets[which]
        t0 = time.process_time()
        for _ in range(count):
            req = Request(target, {}, "1.1", "GET", None, app)  # type: ignore[arg-type]
            response = await image(req, name)
            assert response.status == 200
        return (time.process_time() - t0) / count * 1e6

    async def run() -> tuple[list[float], float]:
        for app in apps.values():
            await start_worker(app)
        try:
            for which in apps:
                await calls(which, 200)  # render once, then warm
            deltas, plain = [], []
            for i in range(rounds):
                order = ("plain", "signed") if i % 2 == 0 else ("signed", "plain")
                us = {w: await calls(w, n) for w in order}
                deltas.append(us["signed"] - us["plain"])
                plain.append(us["plain"])
            return deltas, statistics.median(plain)
        finally:
            for app in apps.values():
                await stop_worker(app)

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per window")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="imgproxy-bench-signing-")
    corpus = os.path.join(work, "images")
    os.makedirs(corpus)
    make_corpus(corpus)
    env = {"IMAGE_PROXY_WORKERS": "1", "IMAGE_PROXY_ENABLE_CACHE": "true"}
    signed_env = {**env, "IMAGE_PROXY_SIGNATURE_KEYS": ",".join(KEYS)}
    signed_path = signing.sign_url(PATH, KEYS[1])  # the second key: both HMACs are computed
    files = {}
    for name, target in (("plain", PATH), ("signed", signed_path)):
        files[name] = os.path.join(work, f"{name}.txt")
        with open(files[name], "w") as fh:
            fh.write(target + "\n")

    rows: dict[str, list[dict[str, float]]] = {"plain": [], "signed": []}
    with (
        Server(corpus, env, os.path.join(work, "plain.log"), free_port()) as plain,
        Server(corpus, signed_env, os.path.join(work, "signed.log"), free_port()) as signed,
    ):
        servers = {"plain": plain, "signed": signed}
        for name, s in servers.items():  # fill the cache, warm up
            wrk(s.port, files[name], 1, conc=8, threads=1)
        for i in range(a.slices):
            order = ("plain", "signed") if i % 2 == 0 else ("signed", "plain")
            quiesce(max_wait=20)
            for name in order:
                rows[name].append(window(servers[name], files[name], a.duration))
            print(
                f"slice {i + 1}/{a.slices}: plain {rows['plain'][-1]['rps']:.0f} req/s, "
                f"signed {rows['signed'][-1]['rps']:.0f} req/s",
                file=sys.stderr,
            )
            time.sleep(0.2)

    handler, handler_plain = handler_ab(corpus)
    ratios = [s["rps"] / p["rps"] for p, s in zip(rows["plain"], rows["signed"], strict=True)]
    cpu = {name: statistics.median(r["cpu_us"] for r in rs) for name, rs in rows.items()}
    rps = {name: statistics.median(r["rps"] for r in rs) for name, rs in rows.items()}
    p50 = {name: statistics.median(r["p50"] for r in rs) / 1000 for name, rs in rows.items()}
    cost = verify_cost()
    extra = extra_parsing()
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    cpu_ratios = [
        s["cpu_us"] / p["cpu_us"] for p, s in zip(rows["plain"], rows["signed"], strict=True)
    ]
    print(f"\ncache-hit request, {a.slices} interleaved slices x {a.duration:.0f} s, 1 worker each")
    print("| server | req/s (median) | p50 ms | server CPU µs/req |")
    print("|---|---|---|---|")
    for name in ("plain", "signed"):
        print(f"| {name} | {rps[name]:.0f} | {p50[name]:.2f} | {cpu[name]:.0f} |")
    print(
        f"\nsigned / plain req/s: median {statistics.median(ratios):.3f} "
        f"(IQR {q1:.3f} … {q3:.3f}, slices {min(ratios):.3f} … {max(ratios):.3f}); "
        f"server CPU per request, signed / plain: median {statistics.median(cpu_ratios):.3f}"
    )
    for name, us in cost.items():
        print(
            f"signing.refusal, {name}: {us:.2f} µs per call "
            f"= {us / cpu['plain'] * 100:.2f} % of a plain cache hit's server CPU"
        )
    for name, us in extra.items():
        print(f"longer query in {name}: +{us:.2f} µs = {us / cpu['plain'] * 100:.2f} %")
    hit = cost["2 keys, memo hit"] + sum(extra.values())
    print(
        f"bottom-up, a signed cache hit (memo hit + longer query): +{hit:.2f} µs "
        f"= {hit / cpu['plain'] * 100:.2f} % of a plain cache hit's server CPU"
    )
    delta = statistics.median(handler)
    hq1, _, hq3 = statistics.quantiles(handler, n=4)
    print(
        f"image handler in-process ({handler_plain:.0f} µs plain), signed - plain: median "
        f"{delta:+.2f} µs per request (IQR {hq1:+.2f} … {hq3:+.2f}) "
        f"= {delta / cpu['plain'] * 100:+.2f} % of a plain cache hit's server CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
