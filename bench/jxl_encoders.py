#!/usr/bin/env python3
"""JPEG XL encoders on PyPI, side by side: which one imgproxy uses (bench/README.md "JPEG XL").

    .venv/bin/pip install pillow-jxl-plugin pylibjxl imagecodecs   # the candidates
    .venv/bin/python bench/jxl_encoders.py [--rounds 7] [--json out.json]

pyvips-binary has no `jxlsave`, so the encoder comes from PyPI. Each installed candidate
encodes the same pixels with the same libjxl settings (quality 77 = butteraugli distance
2.17 through libjxl's own mapping, effort 4, one thread):

    enc400    the 12 MP harness photo thumbnailed to 400 px (W7's output)
    enc1200   photo-1200.jpg decoded (1200x810)
    jpeg1200  lossless JPEG -> JXL recompression of photo-1200.jpg (301 KB)
    jpeg12mp  the same for photo-4000x3000.jpg (2.9 MB)

Method as bench/codecs.py: one process, CPU time per call, each round runs every contender
in a shuffled order for ~`--batch` seconds and keeps the median call, the table the median
over rounds. Bytes are the output size; `psnr` decodes the output with the same package and
compares it with the encoder's input (same settings should mean same bytes when two packages
carry the same libjxl); `exact` says the recompressed JPEG rebuilds bit for bit.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("VIPS_CONCURRENCY", "1")
import numpy as np
import pyvips

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import WORK, ensure_corpus  # noqa: E402

QUALITY, EFFORT = 77, 4


def distance(quality: float) -> float:
    """libjxl's JxlEncoderDistanceFromQuality."""
    if quality >= 100:
        return 0.0
    if quality >= 30:
        return 0.1 + (100 - quality) * 0.09
    return 53 / 3000 * quality * quality - 23 / 20 * quality + 25


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255 * 255 / mse)


def contenders(pixels: dict[str, np.ndarray], jpegs: dict[str, bytes]) -> dict[str, Any]:
    """name -> {encode: fn(array), decode: fn(bytes) -> array, jpeg: fn(bytes), unjpeg: fn}"""
    out: dict[str, Any] = {}
    try:
        import pillow_jxl
        from PIL import Image

        def pj_encode(a: np.ndarray) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(a).save(
                buf, "JXL", quality=QUALITY, effort=EFFORT, num_threads=1, decoding_speed=0
            )
            return buf.getvalue()

        def pj_decode(b: bytes) -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

        def pj_jpeg(b: bytes) -> bytes:
            h, w = jpeg_size(b)
            enc = pillow_jxl.Encoder(
                mode="RGB", lossless=True, quality=100, effort=EFFORT, num_threads=1
            )
            return enc(b, w, h, jpeg_encode=True)

        def pj_unjpeg(b: bytes) -> bytes:
            jpeg, _info, data, *_ = pillow_jxl.Decoder(num_threads=1)(b)
            return data if jpeg else b""

        out["pillow-jxl-plugin"] = dict(
            encode=pj_encode, decode=pj_decode, jpeg=pj_jpeg, unjpeg=pj_unjpeg
        )
    except ImportError:
        pass
    try:
        import pylibjxl

        def pl_encode(a: np.ndarray) -> bytes:
            return pylibjxl.encode(a, effort=EFFORT, distance=distance(QUALITY))

        out["pylibjxl"] = dict(
            encode=pl_encode,
            decode=lambda b: pylibjxl.decode(b)[..., :3],
            jpeg=lambda b: pylibjxl.jpeg_to_jxl(b, effort=EFFORT),
            unjpeg=pylibjxl.jxl_to_jpeg,
        )
    except ImportError:
        pass
    try:
        import imagecodecs

        out["imagecodecs"] = dict(
            encode=lambda a: imagecodecs.jpegxl_encode(
                a, effort=EFFORT, distance=distance(QUALITY), numthreads=1
            ),
            decode=lambda b: imagecodecs.jpegxl_decode(b, numthreads=1)[..., :3],
            jpeg=lambda b: imagecodecs.jpegxl_encode_jpeg(b, numthreads=1),
            unjpeg=lambda b: imagecodecs.jpegxl_decode_jpeg(b, numthreads=1),
        )
    except ImportError:
        pass
    return out


def jpeg_size(b: bytes) -> tuple[int, int]:
    image = pyvips.Image.new_from_buffer(b, "")
    return image.height, image.width


def wheel_size(dist: str) -> str:
    """Installed size of a distribution's files (the .pyz grows by about its wheel)."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return "-"
    total = sum(f.locate().stat().st_size for f in files if f.locate().exists())
    return f"{total / 1e6:.1f} MB installed"


def cpu_per_call(fn: Callable[[], Any], batch: float) -> float:
    t_end = time.perf_counter() + batch
    samples = []
    while time.perf_counter() < t_end or len(samples) < 3:
        c0 = time.process_time()
        fn()
        samples.append(time.process_time() - c0)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(WORK, "corpus"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=float, default=0.3)
    ap.add_argument("--json")
    a = ap.parse_args()
    pyvips.cache_set_max(0)
    ensure_corpus(a.corpus)
    with open(os.path.join(a.corpus, "photo-4000x3000.jpg"), "rb") as f:
        big = f.read()
    with open(os.path.join(a.corpus, "photo-1200.jpg"), "rb") as f:
        small = f.read()

    def array(image: pyvips.Image) -> np.ndarray:
        return np.ndarray(
            (image.height, image.width, image.bands), np.uint8, image.write_to_memory()
        )

    pixels = {
        "enc400": array(pyvips.Image.thumbnail_buffer(big, 400)),
        "enc1200": array(pyvips.Image.new_from_buffer(small, "")),
    }
    jpegs = {"jpeg1200": small, "jpeg12mp": big}
    found = contenders(pixels, jpegs)
    if not found:
        sys.exit("no candidate installed: pip install pillow-jxl-plugin pylibjxl imagecodecs")
    cases: list[tuple[str, str, Callable[[], Any]]] = []
    for name, c in found.items():
        for step, px in pixels.items():
            cases.append((name, step, lambda c=c, px=px: c["encode"](px)))
        for step, jp in jpegs.items():
            cases.append((name, step, lambda c=c, jp=jp: c["jpeg"](jp)))
    times: dict[tuple[str, str], list[float]] = {(n, s): [] for n, s, _ in cases}
    for _ in range(a.rounds):
        random.shuffle(cases)
        for name, step, fn in cases:
            times[(name, step)].append(cpu_per_call(fn, a.batch))
    rows = []
    for name, c in found.items():
        row: dict[str, Any] = {"package": name, "version": importlib.metadata.version(name)}
        row["installed"] = wheel_size(name)
        for step, px in pixels.items():
            out = c["encode"](px)
            row[step] = {
                "ms": statistics.median(times[(name, step)]) * 1000,
                "bytes": len(out),
                "psnr": round(psnr(c["decode"](out), px), 2),
            }
        for step, jp in jpegs.items():
            out = c["jpeg"](jp)
            row[step] = {
                "ms": statistics.median(times[(name, step)]) * 1000,
                "bytes": len(out),
                "saved": f"{(1 - len(out) / len(jp)) * 100:.1f} %",
                "exact": c["unjpeg"](out) == jp,
            }
        rows.append(row)
    print(
        "| package | enc400 ms · bytes · PSNR | enc1200 ms · bytes · PSNR "
        "| JPEG→JXL 1200 ms · saved · exact | JPEG→JXL 12 MP ms · saved · exact | installed |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        cells = [f"{r['package']} {r['version']}"]
        for step in pixels:
            s = r[step]
            cells.append(f"{s['ms']:.1f} · {s['bytes']:,} · {s['psnr']}")
        for step in jpegs:
            s = r[step]
            cells.append(f"{s['ms']:.1f} · {s['saved']} · {'yes' if s['exact'] else 'NO'}")
        cells.append(r["installed"])
        print("| " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
