#!/usr/bin/env python3
"""Codec micro-benchmark: each render step, Pillow (thumbor's engine) against libvips (ours).

    .venv/bin/python bench/codecs.py                 # 7 interleaved rounds (~40 s)
    .venv/bin/python bench/codecs.py --rounds 3 --batch 0.05    # quicker, noisier
    .venv/bin/python bench/codecs.py --only dec2,jpeg --json /tmp/codecs.json

Needs Pillow (`.venv/bin/pip install pillow`); simplejpeg rows appear when it is installed.
Not part of the test suite and not a project dependency for Pillow.

Steps (the pieces of a W2/W3/W5 render; same photo, same output settings on both sides):

    dec2     JPEG decode at 1/2 scale, photo-1200.jpg (1200x810) -> 600x405
    dec8     JPEG decode at 1/8 scale, photo-4000x3000.jpg (12 MP) -> 500x375
    lanczos  Lanczos3 600x405 -> 400x270 (RGB, in memory)
    webp     WebP encode 400x270, q80, method/effort 4
    jpeg     JPEG encode 400x270, q75, 4:2:0
    fixed    JPEG encode of a 16x16 image: the per-call cost of a save, whatever its size

Method: one process, one thread of work (`VIPS_CONCURRENCY=1`, libvips operation cache off;
Pillow and simplejpeg are single-threaded). Every contender of a step runs in each round, in a
shuffled order, as a batch of calls lasting ~`--batch` seconds; a batch reports the median
per-call time, the table the median over rounds (the machine is shared and drifts: interleaving
puts every contender under the same drift). Times are the process's CPU time per call (all
threads, so libvips' worker thread counts), which a preempting neighbour does not inflate;
`--clock wall` reports elapsed time instead.

Output checks per row: decode rows give the PSNR of the decoded pixels against libvips'
decode, encode rows the output bytes and the PSNR of the decoded output against the *source*
pixels (what a viewer sees), Lanczos the PSNR against libvips' resize.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("VIPS_CONCURRENCY", "1")
os.environ.setdefault("VIPS_WARNING", "0")

import numpy as np
import pyvips

pyvips.cache_set_max(0)

try:
    from PIL import Image, features
except ImportError:  # pragma: no cover - the baseline is required
    sys.exit("bench/codecs.py needs Pillow: .venv/bin/pip install pillow simplejpeg")
try:
    import simplejpeg
except ImportError:
    simplejpeg = None

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import WORK, ensure_corpus  # noqa: E402

KEEP_NONE = pyvips.enums.ForeignKeep.NONE


@dataclass
class Contender:
    name: str
    fn: Callable[[], Any]
    side: str = "alt"  # "pillow" | "vips" | "ours" (what transform.py uses now) | "alt"
    check: str = ""  # filled after the first call
    samples: list[float] = field(default_factory=list)


@dataclass
class Step:
    key: str
    title: str
    contenders: list[Contender]


# -- helpers -----------------------------------------------------------------------------


def vips_to_array(image: pyvips.Image) -> np.ndarray:
    mem = image.write_to_memory()
    return np.frombuffer(mem, dtype=np.uint8).reshape(image.height, image.width, image.bands)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("nan")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def pil_from_vips(image: pyvips.Image) -> Image.Image:
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.bands]
    return Image.frombuffer(
        mode, (image.width, image.height), image.write_to_memory(), "raw", mode, 0, 1
    )


def decoded(data: bytes) -> np.ndarray:
    return vips_to_array(pyvips.Image.new_from_buffer(data, ""))


def fmt_db(v: float) -> str:
    return "identical" if math.isinf(v) else f"{v:.1f} dB"


# -- steps -------------------------------------------------------------------------------


def build_steps(corpus: str, only: set[str] | None) -> list[Step]:
    with open(os.path.join(corpus, "photo-1200.jpg"), "rb") as fh:
        src1200 = fh.read()
    with open(os.path.join(corpus, "photo-4000x3000.jpg"), "rb") as fh:
        src12mp = fh.read()
    steps: list[Step] = []

    def want(key: str) -> bool:
        return only is None or key in only

    # 600x405 (1/2 decode) and 400x270 (Lanczos3 of it): the inputs of resize and encode
    half = pyvips.Image.new_from_buffer(src1200, "", shrink=2).copy_memory()
    small = half.resize(400 / half.width, vscale=270 / half.height, kernel="lanczos3")
    small = small.copy_memory()
    small_arr = np.ascontiguousarray(vips_to_array(small))
    small_pil = Image.fromarray(small_arr, "RGB")
    half_arr = np.ascontiguousarray(vips_to_array(half))
    half_pil = Image.fromarray(half_arr, "RGB")
    tiny = small.crop(0, 0, 16, 16).copy_memory()
    tiny_pil = Image.fromarray(np.ascontiguousarray(vips_to_array(tiny)), "RGB")

    for key, data, factor in (("dec2", src1200, 2), ("dec8", src12mp, 8)):
        if not want(key):
            continue
        hdr = pyvips.Image.new_from_buffer(data, "")
        w, h = math.ceil(hdr.width / factor), math.ceil(hdr.height / factor)

        def pil_dec(data: bytes = data, w: int = w, h: int = h) -> np.ndarray:
            im = Image.open(io.BytesIO(data))
            im.draft("RGB", (w, h))
            im.load()
            return np.asarray(im)

        def vips_dec(data: bytes = data, f: int = factor) -> pyvips.Image:
            return pyvips.Image.new_from_buffer(
                data, "", shrink=f, access="sequential", fail_on="truncated"
            ).copy_memory()

        def vips_dec_hdr(data: bytes = data, f: int = factor) -> pyvips.Image:
            header = pyvips.Image.new_from_buffer(data, "")
            header.get_typeof("orientation")
            return vips_dec(data, f)

        def vips_dec_random(data: bytes = data, f: int = factor) -> pyvips.Image:
            return pyvips.Image.jpegload_buffer(data, shrink=f).copy_memory()

        def pil_dec_vips(data: bytes = data, w: int = w, h: int = h) -> pyvips.Image:
            im = Image.open(io.BytesIO(data))
            im.draft("RGB", (w, h))
            return pyvips.Image.new_from_memory(im.tobytes(), im.width, im.height, 3, "uchar")

        cs = [
            Contender("Pillow (draft + load)", pil_dec, "pillow"),
            Contender("Pillow -> pyvips.Image.new_from_memory", pil_dec_vips),
            Contender("libvips (new_from_buffer shrink, sequential)", vips_dec, "vips"),
            Contender("libvips, + header read first (our step)", vips_dec_hdr),
            Contender("libvips jpegload_buffer, random access", vips_dec_random),
        ]
        if simplejpeg is not None:

            def sj_dec(data: bytes = data, w: int = w, h: int = h, fast: bool = False) -> Any:
                return simplejpeg.decode_jpeg(
                    data, min_width=w, min_height=h, fastdct=fast, fastupsample=fast
                )

            def sj_dec_vips(data: bytes = data, w: int = w, h: int = h) -> pyvips.Image:
                arr = simplejpeg.decode_jpeg(data, min_width=w, min_height=h)
                return pyvips.Image.new_from_memory(
                    arr.data, arr.shape[1], arr.shape[0], 3, "uchar"
                )

            cs += [
                Contender("simplejpeg (libjpeg-turbo 3.1, islow + fancy)", sj_dec),
                Contender(
                    "simplejpeg -> pyvips.Image.new_from_memory (ours now)", sj_dec_vips, "ours"
                ),
                Contender(
                    "simplejpeg fastdct + fastupsample",
                    lambda d=data, w=w, h=h: sj_dec(d, w, h, True),
                ),
            ]
        ref = vips_to_array(vips_dec())
        for c in cs:
            out = c.fn()
            arr = vips_to_array(out) if isinstance(out, pyvips.Image) else np.asarray(out)
            c.check = f"{arr.shape[1]}x{arr.shape[0]}, {fmt_db(psnr(arr, ref))} vs libvips"
        title = f"JPEG decode at 1/{factor} ({hdr.width}x{hdr.height} -> {w}x{h})"
        steps.append(Step(key, title, cs))

    if want("lanczos"):

        def pil_resize() -> Image.Image:
            return half_pil.resize((400, 270), Image.Resampling.LANCZOS)

        def vips_resize() -> pyvips.Image:
            return half.resize(400 / 600, vscale=270 / 405, kernel="lanczos3").copy_memory()

        cs = [
            Contender("Pillow resize LANCZOS", pil_resize, "pillow"),
            Contender("libvips resize lanczos3", vips_resize, "vips"),
        ]
        ref = vips_to_array(vips_resize())
        for c in cs:
            out = c.fn()
            arr = vips_to_array(out) if isinstance(out, pyvips.Image) else np.asarray(out)
            c.check = f"{arr.shape[1]}x{arr.shape[0]}, {fmt_db(psnr(arr, ref))} vs libvips"
        steps.append(Step("lanczos", "Lanczos3 600x405 -> 400x270", cs))

    def encode_checks(cs: list[Contender], source: np.ndarray) -> None:
        for c in cs:
            out = c.fn()
            c.check = f"{len(out)} B, {fmt_db(psnr(decoded(out), source))} vs source"

    if want("webp"):

        def pil_webp(im: Image.Image = small_pil, **kw: Any) -> bytes:
            buf = io.BytesIO()
            im.save(buf, "WEBP", quality=80, method=4, **kw)
            return buf.getvalue()

        def vips_webp(**kw: Any) -> bytes:
            data: bytes = small.webpsave_buffer(Q=80, effort=4, keep=KEEP_NONE, **kw)
            return data

        cs = [
            Contender("Pillow save WEBP quality=80 method=4", pil_webp, "pillow"),
            Contender("libvips webpsave Q=80 effort=4 keep=none", vips_webp, "vips"),
            Contender(
                "libvips webpsave, keep default (metadata)",
                lambda: small.webpsave_buffer(Q=80, effort=4),
            ),
            Contender(
                "Pillow from a pyvips image (write_to_memory + frombuffer) (ours now)",
                lambda: pil_webp(im=pil_from_vips(small)),
                "ours",
            ),
        ]
        encode_checks(cs, small_arr)
        steps.append(Step("webp", "WebP encode 400x270 q80 method/effort 4", cs))

    if want("jpeg"):

        def pil_jpeg(im: Image.Image = small_pil, **kw: Any) -> bytes:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=75, **kw)
            return buf.getvalue()

        def vips_jpeg(im: pyvips.Image = small, **kw: Any) -> bytes:
            data: bytes = im.jpegsave_buffer(Q=75, keep=KEEP_NONE, **kw)
            return data

        cs = [
            Contender("Pillow save JPEG quality=75", pil_jpeg, "pillow"),
            Contender("libvips jpegsave Q=75 keep=none", vips_jpeg, "vips"),
            Contender("Pillow, optimize=True", lambda: pil_jpeg(optimize=True)),
            Contender(
                "Pillow, optimize + progressive (thumbor's)",
                lambda: pil_jpeg(optimize=True, progressive=True),
            ),
            Contender(
                "libvips, optimize_coding=True (ours)", lambda: vips_jpeg(optimize_coding=True)
            ),
            Contender(
                "libvips, optimize_coding + interlace",
                lambda: vips_jpeg(optimize_coding=True, interlace=True),
            ),
        ]
        cs.append(
            Contender(
                "Pillow optimize, from a pyvips image (ours now)",
                lambda: pil_jpeg(pil_from_vips(small), optimize=True),
                "ours",
            )
        )
        if simplejpeg is not None:
            cs.append(
                Contender(
                    "simplejpeg encode_jpeg q75 4:2:0",
                    lambda: simplejpeg.encode_jpeg(small_arr, 75, colorsubsampling="420"),
                )
            )
        encode_checks(cs, small_arr)
        steps.append(Step("jpeg", "JPEG encode 400x270 q75 4:2:0", cs))

    if want("fixed"):
        cs = [
            Contender("Pillow save JPEG 16x16", lambda: pil_jpeg(tiny_pil), "pillow"),
            Contender("libvips jpegsave 16x16", lambda: vips_jpeg(tiny), "vips"),
            Contender("libvips webpsave 16x16", lambda: tiny.webpsave_buffer(Q=80, keep=KEEP_NONE)),
            Contender(
                "libvips copy_memory 16x16 (pipeline only)", lambda: tiny.copy().copy_memory()
            ),
        ]
        if simplejpeg is not None:
            tiny_arr = np.ascontiguousarray(vips_to_array(tiny))
            cs.append(
                Contender(
                    "simplejpeg encode 16x16",
                    lambda: simplejpeg.encode_jpeg(tiny_arr, 75, colorsubsampling="420"),
                )
            )
        for c in cs:
            c.fn()
        steps.append(Step("fixed", "per-call fixed cost (16x16 JPEG encode)", cs))
    steps += render_steps(src1200, src12mp, only)
    steps += box_and_format_steps(src12mp, only)
    return steps


def render_steps(src1200: bytes, src12mp: bytes, only: set[str] | None) -> list[Step]:
    """Whole renders in-process: thumbor's Pillow engine path (draft, LANCZOS, save with
    thumbor's options) against our `transform.render` with IMAGE_PROXY_FAST_CODECS off
    (libvips for every codec: the "libvips" column) and on."""
    try:
        from imgproxy import transform
        from imgproxy.config import default_encode_options
    except ImportError:  # run outside the project's venv
        return []
    transform.configure(1)
    on = default_encode_options()
    if not hasattr(on, "fast_codecs"):
        return []
    off = dataclasses.replace(on, fast_codecs=False)
    on = dataclasses.replace(on, fast_codecs=True)
    steps = []
    for key, data, fmt in (
        ("W2", src12mp, "jpeg"),
        ("W3", src12mp, "webp"),
        ("W5", src1200, "webp"),
    ):
        if only is not None and key not in only:
            continue
        hdr = pyvips.Image.new_from_buffer(data, "")
        scale = 400 / max(hdr.width, hdr.height)
        size = (round(hdr.width * scale), round(hdr.height * scale))

        def thumbor(data: bytes = data, fmt: str = fmt, size: tuple[int, int] = size) -> bytes:
            im = Image.open(io.BytesIO(data))
            im.draft(None, size)
            im = im.resize(size, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            if fmt == "jpeg":
                im.save(buf, "JPEG", quality=75, optimize=True, progressive=True)
            else:
                im.save(buf, "WEBP", quality=80)
            return buf.getvalue()

        def ours(data: bytes = data, fmt: str = fmt, o: Any = on) -> bytes:
            return transform.render(data, transform.Plan("jpeg", fmt, o, 1 << 40, 400)).data

        cs = [
            Contender("thumbor's Pillow path (draft, LANCZOS, save)", thumbor, "pillow"),
            Contender(
                "transform.render, IMAGE_PROXY_FAST_CODECS=false", lambda r=ours: r(o=off), "vips"
            ),
            Contender("transform.render, fast codecs (default)", ours, "ours"),
        ]
        for c in cs:
            out = c.fn()
            img = pyvips.Image.new_from_buffer(out, "")
            c.check = f"{img.width}x{img.height}, {len(out)} B"
        what = f"{hdr.width}x{hdr.height} JPEG -> 400 px {fmt}"
        steps.append(Step(key, f"render {key}: {what}", cs))
    return steps


def box_and_format_steps(src12mp: bytes, only: set[str] | None) -> list[Step]:
    """Issue 20, whole `transform.render`s of W2's 12 MP source: a `cover` box beside
    `size` (does cover keep the shrink-on-load?), and JPEG XL beside WebP and AVIF at 400 px
    (CPU per render and bytes)."""
    try:
        from imgproxy import transform
        from imgproxy.config import default_encode_options
        from imgproxy.transform.geometry import Box
    except ImportError:  # run outside the project's venv, or before boxes existed
        return []
    transform.configure(1)
    o = default_encode_options()

    def render(fmt: str, box: Box) -> Callable[[], bytes]:
        plan = transform.Plan("jpeg", fmt, o, 1 << 40, None, "auto", box=box)
        return lambda: transform.render(src12mp, plan).data

    def described(out: bytes) -> str:
        if out[:2] == b"\xff\x0a" or out[4:8] == b"JXL ":
            return f"JPEG XL, {len(out)} B"
        img = pyvips.Image.new_from_buffer(out, "")
        return f"{img.width}x{img.height}, {len(out)} B"

    groups = {
        "W2box": (
            "render W2 source (12 MP JPEG) -> JPEG q75: size against boxes",
            [
                ("size=400 (400x300)", "jpeg", Box(target=400), "ours"),
                (
                    "w=400&h=225&fit=cover (16:9 card)",
                    "jpeg",
                    Box(width=400, height=225, fit="cover"),
                    "alt",
                ),
                (
                    "w=400&h=400&fit=cover (square)",
                    "jpeg",
                    Box(width=400, height=400, fit="cover"),
                    "alt",
                ),
                (
                    "w=400&h=400&fit=contain",
                    "jpeg",
                    Box(width=400, height=400, fit="contain"),
                    "alt",
                ),
                ("w=400&h=225&fit=fill", "jpeg", Box(width=400, height=225, fit="fill"), "alt"),
                (
                    "w=400&h=400&fit=cover&gravity=smart",
                    "jpeg",
                    Box(width=400, height=400, fit="cover", gravity="smart"),
                    "alt",
                ),
            ],
        ),
        "W2fmt": (
            "render W2 source (12 MP JPEG) -> 400 px in each lossy format (default settings)",
            [
                ("JPEG q75", "jpeg", Box(target=400), "ours"),
                ("WebP q80 effort 4", "webp", Box(target=400), "alt"),
                ("AVIF q85 speed 6", "avif", Box(target=400), "alt"),
                ("JPEG XL q77 effort 4", "jxl", Box(target=400), "alt"),
            ],
        ),
    }
    steps = []
    for key, (what, rows) in groups.items():
        if only is not None and key not in only:
            continue
        cs = [Contender(name, render(fmt, box), side) for name, fmt, box, side in rows]
        for c in cs:
            c.check = described(c.fn())
        steps.append(Step(key, what, cs))
    return steps


# -- timing ------------------------------------------------------------------------------


def run_batch(fn: Callable[[], Any], budget: float, clock: Callable[[], int]) -> float:
    """Median per-call time (s) over a batch of calls lasting about `budget` seconds."""
    times: list[int] = []
    end = time.perf_counter() + budget
    while True:
        t0 = clock()
        fn()
        times.append(clock() - t0)
        if time.perf_counter() >= end and len(times) >= 3:
            break
    return statistics.median(times) / 1e9


def measure(steps: list[Step], rounds: int, budget: float, clock_name: str, seed: int) -> None:
    clock = time.process_time_ns if clock_name == "cpu" else time.perf_counter_ns
    rng = random.Random(seed)
    for c in (c for s in steps for c in s.contenders):  # warm up every code path once
        run_batch(c.fn, 0.02, clock)
    for r in range(rounds):
        for step in steps:
            order = list(step.contenders)
            rng.shuffle(order)
            for c in order:
                c.samples.append(run_batch(c.fn, budget, clock))
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)


# -- report ------------------------------------------------------------------------------


def ms(v: float) -> str:
    return f"{v * 1e3:.2f} ms" if v >= 1e-3 else f"{v * 1e6:.0f} µs"


def spread(c: Contender) -> str:
    lo, hi = min(c.samples), max(c.samples)
    return f"{ms(lo)}–{ms(hi)}"


def versions() -> dict[str, str]:
    v = {
        "libvips (pyvips-binary)": ".".join(str(pyvips.version(i)) for i in range(3)),
        "Pillow": Image.__version__,
        "Pillow libjpeg-turbo": str(features.version("libjpeg_turbo")),
        "Pillow libwebp": str(features.version("webp")),
    }
    if simplejpeg is not None:
        v["simplejpeg"] = simplejpeg.__version__
    return v


def report(steps: list[Step], args: argparse.Namespace) -> str:
    med = {(s.key, c.name): statistics.median(c.samples) for s in steps for c in s.contenders}
    own = [s for s in steps if not any(c.side == "pillow" for c in s.contenders)]
    steps = [s for s in steps if s not in own]
    lines = [
        f"codecs.py: {args.rounds} rounds x {args.batch:g} s batches, {args.clock} time per call, "
        f"VIPS_CONCURRENCY={os.environ['VIPS_CONCURRENCY']}, cache off",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        "| step | Pillow | libvips | libvips ÷ Pillow | ours now | ours ÷ Pillow |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if not steps:
        lines = lines[:2]
    for s in steps:
        p = next(c for c in s.contenders if c.side == "pillow")
        v = next(c for c in s.contenders if c.side == "vips")
        o = next((c for c in s.contenders if c.side == "ours"), v)
        mp, mv, mo = med[s.key, p.name], med[s.key, v.name], med[s.key, o.name]
        lines.append(
            f"| {s.title} | {ms(mp)} | {ms(mv)} | {mv / mp:.2f}× | {ms(mo)} | {mo / mp:.2f}× |"
        )
    if steps:
        lines += ["", "All contenders (median over rounds; min–max of the round medians):", ""]
        lines += ["| step | contender | time | ÷ Pillow | rounds min–max | output |"]
        lines += ["|---|---|---:|---:|---|---|"]
    for s in steps:
        p = next(c for c in s.contenders if c.side == "pillow")
        for c in s.contenders:
            m = med[s.key, c.name]
            ratio = m / med[s.key, p.name]
            lines.append(
                f"| {s.key} | {c.name} | {ms(m)} | {ratio:.2f}× | {spread(c)} | {c.check} |"
            )
    keys = {s.key for s in steps}
    if {"dec2", "lanczos", "webp"} <= keys:

        def pick(key: str, side: str) -> float:
            s = next(s for s in steps if s.key == key)
            return med[key, next(c for c in s.contenders if c.side == side).name]

        parts = ("dec2", "lanczos", "webp")
        pil = sum(pick(k, "pillow") for k in parts)
        vip = sum(pick(k, "vips") for k in parts)
        best = sum(min(pick(k, "pillow"), pick(k, "vips")) for k in parts)
        lines += [
            "",
            f"W5 codec path (dec2 + lanczos + webp): Pillow {ms(pil)}, libvips {ms(vip)}, "
            f"faster of each {ms(best)} (Pillow ÷ that = {pil / best:.2f}×)",
        ]
    for s in own:  # our renders only (W2box, W2fmt): each against the group's first row
        first = s.contenders[0]
        lines += ["", s.title + ":", ""]
        lines += ["| contender | CPU per render | ÷ first row | renders/s per core | output |"]
        lines += ["|---|---:|---:|---:|---|"]
        for c in s.contenders:
            m = med[s.key, c.name]
            lines.append(
                f"| {c.name} | {ms(m)} | {m / med[s.key, first.name]:.2f}× | {1 / m:.1f} "
                f"| {c.check} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=float, default=0.12, help="seconds per contender per round")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument(
        "--only",
        help="comma list of steps: dec2,dec8,lanczos,webp,jpeg,fixed,W2,W3,W5,W2box,W2fmt",
    )
    ap.add_argument("--corpus", default=os.path.join(WORK, "corpus"))
    ap.add_argument("--json", help="write raw samples here")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    ensure_corpus(args.corpus)
    only = set(args.only.split(",")) if args.only else None
    steps = build_steps(args.corpus, only)
    measure(steps, args.rounds, args.batch, args.clock, args.seed)
    print(report(steps, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "versions": versions(),
                    "args": vars(args),
                    "steps": [
                        {
                            "key": s.key,
                            "title": s.title,
                            "contenders": [
                                {
                                    "name": c.name,
                                    "side": c.side,
                                    "check": c.check,
                                    "samples": c.samples,
                                }
                                for c in s.contenders
                            ],
                        }
                        for s in steps
                    ],
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
