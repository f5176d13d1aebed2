"""Decompression bombs, truncated and corrupt files of every supported format.

Bombs are refused from the header (422) quickly and with bounded memory; damaged files give
422 on transform (415 when the magic bytes are gone); a burst of bad requests leaves the
server healthy.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pyvips

from conftest import (
    Server,
    app_server,
    make_settings,
    png_bomb,
    process_tree,
    subprocess_server,
)

KEEP_NONE = pyvips.enums.ForeignKeep.NONE
MiB = 1024 * 1024


def det_photo(width: int, height: int, bands: int = 3, seed: int = 7) -> pyvips.Image:
    """Like conftest.photo, but deterministic (seeded noise): damage lands on the same bytes
    every run, so the outcome of a bit flip does not change between runs."""
    x = pyvips.Image.xyz(width, height)
    grad = (x[0] * (255 / width) + x[1] * (128 / height)).cast("uchar")
    noise = pyvips.Image.gaussnoise(width, height, mean=0, sigma=12, seed=seed)
    base = (grad + noise).cast("uchar")
    img = base.bandjoin([(255 - base).cast("uchar"), (base // 2 + 60).cast("uchar")])
    img = img.copy(interpretation="srgb")
    if bands == 4:
        img = img.bandjoin((x[0] * (255 / width)).cast("uchar"))
    return img


# -- crafting bombs: a small valid file whose header claims huge dimensions ------------------


def jpeg_bomb(width: int = 65535, height: int = 65535) -> bytes:
    data = bytearray(det_photo(64, 48).jpegsave_buffer(keep=KEEP_NONE))
    i = data.find(b"\xff\xc0")  # baseline SOF0: FF C0, length(2), precision(1), h(2), w(2)
    assert i > 0
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_vp8_bomb() -> bytes:
    """Lossy VP8: 14-bit dimensions, so 16383 x 16383 (268 MP) is the biggest claim."""
    data = bytearray(det_photo(64, 48).webpsave_buffer(keep=KEEP_NONE))
    assert data[12:16] == b"VP8 "
    data[26:30] = struct.pack("<HH", 16383, 16383)
    return bytes(data)


def webp_vp8l_bomb() -> bytes:
    data = bytearray(det_photo(64, 48).webpsave_buffer(lossless=True, keep=KEEP_NONE))
    assert data[12:16] == b"VP8L"
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~0x0FFFFFFF) | 16383 | (16383 << 14)  # width-1, height-1: 14 bits each
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


def webp_vp8x_bomb() -> bytes:
    """An extended-format header (24-bit canvas: up to 16777216 x 16777216) around a small
    VP8 frame."""
    frame = bytes(det_photo(64, 48).webpsave_buffer(keep=KEEP_NONE))[12:]
    side = (1 << 24) - 1  # stored minus one: 16777216
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += side.to_bytes(3, "little") + side.to_bytes(3, "little")
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def avif_bomb(width: int = 65535, height: int = 65535) -> bytes:
    data = bytearray(
        det_photo(64, 48).heifsave_buffer(compression="av1", effort=0, Q=40, keep=KEEP_NONE)
    )
    i = data.find(b"ispe")  # box type, version/flags(4), width(4), height(4)
    assert i > 0
    data[i + 8 : i + 16] = struct.pack(">II", width, height)
    return bytes(data)


def bilevel_png(path: Path, side: int = 30000) -> None:
    """A *valid* 1-bit side x side PNG: every row decodes, and it is ~110 KB on disk."""
    pyvips.Image.black(side, side).pngsave(str(path), bitdepth=1)


BOMBS = {
    "png-header-30000.png": "header only: IHDR claims 30000x30000",
    "png-1bit-30000.png": "valid 1-bit 30000x30000 (900 MP)",
    "jpeg-65535.jpg": "JPEG SOF0 patched to 65535x65535",
    "webp-vp8-16383.webp": "lossy VP8 frame header patched to 16383x16383",
    "webp-vp8l-16384.webp": "lossless VP8L header patched to 16384x16384",
    "webp-vp8x-16m.webp": "VP8X canvas 16777216x16777216",
    "avif-65535.avif": "AVIF ispe patched to 65535x65535",
}


@pytest.fixture(scope="module")
def bomb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bombs") / "root"
    root.mkdir()
    (root / "png-header-30000.png").write_bytes(png_bomb(30000, 30000))
    bilevel_png(root / "png-1bit-30000.png")
    (root / "jpeg-65535.jpg").write_bytes(jpeg_bomb())
    (root / "webp-vp8-16383.webp").write_bytes(webp_vp8_bomb())
    (root / "webp-vp8l-16384.webp").write_bytes(webp_vp8l_bomb())
    (root / "webp-vp8x-16m.webp").write_bytes(webp_vp8x_bomb())
    (root / "avif-65535.avif").write_bytes(avif_bomb())
    det_photo(200, 150).jpegsave(str(root / "good.jpg"), Q=85)
    det_photo(101, 50).jpegsave(str(root / "tiny.jpg"), Q=85)
    det_photo(200, 150).heifsave(str(root / "good.avif"), compression="av1", effort=0, Q=40)
    return root


@pytest.fixture(scope="module")
def bombs(bomb_root: Path) -> Iterator[Server]:
    with app_server(make_settings(bomb_root)) as s:
        yield s


def test_bilevel_png_is_small_and_valid(bomb_root: Path) -> None:
    path = bomb_root / "png-1bit-30000.png"
    assert path.stat().st_size < 1 * MiB
    header = pyvips.Image.new_from_file(str(path))
    assert (header.width, header.height) == (30000, 30000)


@pytest.mark.parametrize("name", list(BOMBS), ids=list(BOMBS))
@pytest.mark.parametrize(
    "query", ["?size=100", "?format=png", "?size=10&resize_algorithm=lanczos3"]
)
def test_bomb_refused_from_header(bombs: Server, name: str, query: str) -> None:
    started = time.monotonic()
    r = bombs.get(f"/{name}{query}")
    elapsed = time.monotonic() - started
    assert r.status == 422, (BOMBS[name], r.status, r.text)
    assert r.headers["content-type"].startswith("text/plain")
    assert "cache-control" not in r.headers
    assert elapsed < 5  # generous: the refusal reads a header, it decodes nothing


@pytest.mark.parametrize("name", list(BOMBS), ids=list(BOMBS))
def test_bomb_passthrough_is_never_decoded(bombs: Server, bomb_root: Path, name: str) -> None:
    r = bombs.get(f"/{name}")
    assert r.status == 200
    assert r.body == (bomb_root / name).read_bytes()


def test_pixel_limit_is_configurable(bomb_root: Path) -> None:
    with app_server(make_settings(bomb_root, IMAGE_PROXY_MAX_SOURCE_PIXELS="10000")) as s:
        assert s.get("/tiny.jpg?size=50").status == 200  # 101 x 50 = 5050 pixels
        r = s.get("/good.jpg?size=50")  # 200 x 150 = 30000 pixels
        assert r.status == 422 and "pixel limit" in r.text
        assert s.get("/good.avif?format=png").status == 422  # AVIF: libvips' header
        assert s.get("/good.jpg").status == 200  # passthrough never decodes
    with app_server(make_settings(bomb_root, IMAGE_PROXY_MAX_SOURCE_PIXELS="30000")) as s:
        assert s.get("/good.jpg?size=50").status == 200  # the limit is inclusive


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_bombs_use_bounded_memory(bomb_root: Path) -> None:
    """In a real `python -m imgproxy` (1 worker): every bomb, several times, and the peak RSS
    (VmHWM) of every process of the server stays far below what decoding would take
    (30000 x 30000 x 3 bytes = 2.7 GB)."""
    env = {"IMAGE_PROXY_ROOT_PATH": str(bomb_root), "IMAGE_PROXY_WORKERS": "1"}
    with subprocess_server(env) as (server, proc):
        assert server.get("/good.jpg?size=50").status == 200  # warm up: libvips loaded
        before = {p: _status_kb(p, "VmHWM") for p in process_tree(proc.pid)}
        for _ in range(3):
            for name in BOMBS:
                for query in ("?size=100", "?format=avif"):
                    assert server.get(f"/{name}{query}").status == 422, name
        after = {p: _status_kb(p, "VmHWM") for p in process_tree(proc.pid)}
    assert len(after) >= 2  # the main process and its worker
    for pid, peak_kb in after.items():
        assert peak_kb < 300 * 1024, (pid, peak_kb)
        assert peak_kb - before.get(pid, 0) < 100 * 1024, (pid, before.get(pid), peak_kb)


# -- truncated and corrupt files of every format ----------------------------------------------


def _encode(fmt: str) -> bytes:
    img = det_photo(320, 240)
    if fmt == "jpeg":
        return bytes(img.jpegsave_buffer(Q=85, keep=KEEP_NONE))
    if fmt == "png":
        return bytes(img.pngsave_buffer(keep=KEEP_NONE))
    if fmt == "webp":
        return bytes(img.webpsave_buffer(Q=80, keep=KEEP_NONE))
    if fmt == "webp-lossless":
        return bytes(img.webpsave_buffer(lossless=True, keep=KEEP_NONE))
    if fmt == "webp-alpha":
        return bytes(det_photo(320, 240, bands=4).webpsave_buffer(Q=80, keep=KEEP_NONE))
    assert fmt == "avif"
    return bytes(img.heifsave_buffer(compression="av1", effort=0, Q=50, keep=KEEP_NONE))


def _flip(data: bytes, at: int, n: int = 16) -> bytes:
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + n]) + data[at + n :]


def _garbage(data: bytes, at: int, n: int = 1024) -> bytes:
    noise = bytes((i * 131 + 17) % 256 for i in range(n))
    return data[:at] + noise + data[at + n :]


FORMATS = {
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
    "webp-lossless": "webp",
    "webp-alpha": "webp",
    "avif": "avif",
}
# name -> (damage, expected transform statuses)
DAMAGE = {
    "trunc50": (lambda d: d[: len(d) // 2], (422,)),
    "trunc90": (lambda d: d[: len(d) * 9 // 10], (422,)),
    "magic-only": (lambda d: d[:32], (422,)),
    "flip-middle": (lambda d: _flip(d, len(d) // 2), (422,)),
    "garbage-middle": (lambda d: _garbage(d, len(d) // 2), (422,)),
    "flip-header": (lambda d: _flip(d, 16, 24), (422,)),
    "zero-header": (lambda d: bytes(64) + d[64:], (415,)),
    "zero-magic": (lambda d: bytes(12) + d[12:], (415,)),
}
# Entropy-coded data has no checksum: libjpeg conceals damage in a JPEG scan and libwebp in a
# VP8L stream (libvips reports no error even with fail_on=warning), so a flip there may decode
# into wrong pixels. Never a 500; a 200 must be a valid image.
CONCEALED = {
    ("jpeg", "flip-middle"),
    ("jpeg", "garbage-middle"),
    ("webp-lossless", "flip-middle"),
    ("webp-lossless", "garbage-middle"),
    ("jpeg", "trunc90"),
    ("jpeg", "flip-header"),  # bytes 16..40 are quantisation-table values: still a JPEG
}


@pytest.fixture(scope="module")
def damaged_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("damaged") / "root"
    root.mkdir()
    for fmt, ext in FORMATS.items():
        good = _encode(fmt)
        (root / f"{fmt}-good.{ext}").write_bytes(good)
        for name, (damage, _) in DAMAGE.items():
            (root / f"{fmt}-{name}.{ext}").write_bytes(damage(good))
    return root


@pytest.fixture(scope="module")
def damaged(damaged_root: Path) -> Iterator[Server]:
    with app_server(make_settings(damaged_root)) as s:
        yield s


CASES = [
    pytest.param(f"{fmt}-{name}.{ext}", fmt, name, id=f"{fmt}-{name}")
    for fmt, ext in FORMATS.items()
    for name in DAMAGE
]


@pytest.mark.parametrize(("file", "fmt", "damage"), CASES)
def test_damaged_file_on_transform(damaged: Server, file: str, fmt: str, damage: str) -> None:
    expected = DAMAGE[damage][1]
    if (fmt, damage) in CONCEALED:
        expected = (200, 422)
    for query in ("?size=100", "?format=png", "?size=300&resize_algorithm=lanczos3"):
        r = damaged.get(f"/{file}{query}")
        assert r.status in expected, (query, r.status, r.text)
        if r.status == 200:
            assert r.image().width > 0
        else:
            assert r.headers["content-type"].startswith("text/plain")
            assert "cache-control" not in r.headers


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_undamaged_controls(damaged: Server, fmt: str) -> None:
    r = damaged.get(f"/{fmt}-good.{FORMATS[fmt]}?size=100&format=png")
    assert r.status == 200
    assert (r.image().width, r.image().height) == (100, 75)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_damaged_passthrough(damaged: Server, damaged_root: Path, fmt: str) -> None:
    """Passthrough never decodes: a truncated file with intact magic bytes is served as is,
    one without them is 415."""
    ext = FORMATS[fmt]
    r = damaged.get(f"/{fmt}-trunc50.{ext}")
    assert r.status == 200 and r.body == (damaged_root / f"{fmt}-trunc50.{ext}").read_bytes()
    assert damaged.get(f"/{fmt}-zero-header.{ext}").status == 415


def test_burst_of_bad_requests_leaves_server_healthy(damaged: Server, bomb_root: Path) -> None:
    bad = [
        f"/{fmt}-{name}.{ext}?size=64"
        for fmt, ext in FORMATS.items()
        for name in ("trunc50", "zero-magic", "zero-header", "magic-only")
    ]
    bad = (bad * 3)[:50]
    assert len(bad) == 50

    def one(path: str) -> int:
        s = Server(damaged.port)
        try:
            return s.get(path).status
        finally:
            s.client.close()

    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(one, bad))
    assert set(statuses) <= {415, 422}, statuses
    assert damaged.get("/health").status == 200
    r = damaged.get("/jpeg-good.jpg?size=64&format=webp")
    assert r.status == 200 and r.image().width == 64


def test_burst_of_bombs_in_parallel(bombs: Server) -> None:
    paths = [f"/{name}?size=100" for name in BOMBS] * 4

    def one(path: str) -> int:
        s = Server(bombs.port)
        try:
            return s.get(path).status
        finally:
            s.client.close()

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, paths))
    assert statuses == [422] * len(paths)
    assert bombs.get("/health").status == 200
    assert bombs.get("/good.jpg?size=64").status == 200
