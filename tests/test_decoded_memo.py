"""The decoded-source memo (transform/memo.py, IMAGE_PROXY_DECODED_CACHE_SIZE): a JPEG's
DCT-scaled pixels are kept for the next render of the same source at the same scale.

Whether a render decoded is observed by counting the decoder's calls (a spy around
`fastcodecs.decode_jpeg`) and the memo's own counters, never by timing. Every output made
with the memo is compared byte for byte with the same render without it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pyvips

from conftest import MAGIC, Server, decode, make_settings, photo, subprocess_server
from imgproxy import fastcodecs, params, pool, transform
from imgproxy.config import Settings
from imgproxy.fastcodecs import Pixels
from imgproxy.metrics import Metrics
from imgproxy.transform import Rendered

WIDTH, HEIGHT = 1600, 1200
# 1600x1200 at 1/4 (what sizes 301..400 decode at): 400 x 300 x 3 bytes
ENTRY = 400 * 300 * 3
LONG_AGO = 1_600_000_000  # an mtime well outside the settle time (pool.SETTLE_NS)


def jpeg(inverted: bool = False) -> bytes:
    image = photo(WIDTH, HEIGHT)
    if inverted:
        image = (255 - image).cast("uchar")
    return bytes(image.jpegsave_buffer(Q=85))


def place(path: Path, data: bytes, mtime: int = LONG_AGO) -> Path:
    """`data` at `path` as a new file (a new inode: written beside, renamed over), its
    mtime set in the past."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(mtime * 10**9, mtime * 10**9))
    os.replace(tmp, path)
    return path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def memo() -> Iterator[transform.DecodedMemo]:
    """This process's memo, 96 MiB, empty; off again afterwards."""
    transform.configure_memo(96 * 1024 * 1024)
    yield transform.decoded_memo
    transform.configure_memo(0)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The shrink of every call of the fast JPEG decoder."""
    calls: list[int] = []
    real = fastcodecs.decode_jpeg

    def spy(data: bytes, shrink: int) -> Pixels | None:
        calls.append(shrink)
        return real(data, shrink)

    monkeypatch.setattr(fastcodecs, "decode_jpeg", spy)
    return calls


def job(
    settings: Settings, query: str, path: Path | None = None, data: bytes | None = None
) -> pool.Job:
    """A render job as the service makes it: the URL's spec resolved for a JPEG source."""
    spec = params.parse("/a.jpg", query, {}, settings)
    output = params.resolve(spec, "jpeg", "jpeg", (WIDTH, HEIGHT), settings)
    size = len(data) if data is not None else path.stat().st_size if path else 0
    return pool.Job(str(path) if path else None, data, size, output)


def run(
    settings: Settings, query: str, path: Path | None = None, data: bytes | None = None
) -> Rendered:
    return pool.execute(job(settings, query, path, data), settings.limits, settings.encode)


def without_memo(settings: Settings, query: str, data: bytes) -> bytes:
    """The same render with the memo off."""
    current = transform.decoded_memo
    transform.configure_memo(0)
    try:
        return run(settings, query, data=data).data
    finally:
        transform.decoded_memo = current


QUERIES = ("size=400&format=jpeg", "size=320&format=webp", "size=350&format=png")


def test_renders_of_one_file_share_one_decode(
    tmp_path: Path, settings: Settings, memo: transform.DecodedMemo, decodes: list[int]
) -> None:
    data = jpeg()
    source = place(tmp_path / "a.jpg", data)
    expected = {q: without_memo(settings, q, data) for q in QUERIES}
    decodes.clear()
    for q in QUERIES:
        assert run(settings, q, source).data == expected[q], q
    assert decodes == [4]  # one decode at 1/4 for all three outputs
    assert (memo.misses, memo.hits, len(memo), memo.currsize) == (1, 2, 1, ENTRY)


def test_decoded_pixels_are_read_only() -> None:
    pixels = fastcodecs.decode_jpeg(jpeg(), 4)
    assert pixels is not None and pixels.nbytes == ENTRY
    with pytest.raises(ValueError, match="read-only"):
        pixels.data[0, 0, 0] = 1


def test_a_replaced_file_is_decoded_afresh(
    tmp_path: Path, settings: Settings, memo: transform.DecodedMemo, decodes: list[int]
) -> None:
    first, second = jpeg(), jpeg(inverted=True)
    q = QUERIES[0]
    source = place(tmp_path / "a.jpg", first)
    assert run(settings, q, source).data == without_memo(settings, q, first)
    # renamed over (new inode, another mtime): the new file's pixels
    place(source, second, LONG_AGO + 1)
    assert run(settings, q, source).data == without_memo(settings, q, second)
    # rewritten in place (same inode), with a new mtime: the old file's pixels again
    inode = source.stat().st_ino
    source.write_bytes(first)
    os.utime(source, ns=((LONG_AGO + 2) * 10**9,) * 2)
    assert source.stat().st_ino == inode
    assert run(settings, q, source).data == without_memo(settings, q, first)
    assert memo.hits == 0 and len(memo) == 3


def test_a_file_changed_just_now_is_not_memoised(
    tmp_path: Path, settings: Settings, memo: transform.DecodedMemo
) -> None:
    """Within the settle time a same-size rewrite might keep the mtime (coarse timestamps):
    such a file is decoded every time until it has settled."""
    source = tmp_path / "a.jpg"
    source.write_bytes(jpeg())
    assert pool.file_identity(str(source)) is None
    assert run(settings, QUERIES[0], source).width == 400
    assert len(memo) == 0 and memo.hits == memo.misses == 0
    os.utime(source, ns=(LONG_AGO * 10**9,) * 2)
    st = source.stat()
    assert pool.file_identity(str(source)) == (
        str(source),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )


def test_fetched_bytes_are_identified_by_their_digest(
    settings: Settings, memo: transform.DecodedMemo, decodes: list[int]
) -> None:
    first, second = jpeg(), jpeg(inverted=True)
    expected = {d: without_memo(settings, QUERIES[1], d) for d in (first, second)}
    decodes.clear()
    assert run(settings, QUERIES[1], data=first).data == expected[first]
    assert run(settings, QUERIES[1], data=bytes(first)).data == expected[first]  # a new fetch
    assert run(settings, QUERIES[1], data=second).data == expected[second]
    assert decodes == [4, 4] and memo.hits == 1


def test_full_decodes_are_not_kept(
    tmp_path: Path, settings: Settings, memo: transform.DecodedMemo, decodes: list[int]
) -> None:
    source = place(tmp_path / "a.jpg", jpeg())
    for _ in range(2):
        assert run(settings, "size=1600&format=jpeg", source).width == WIDTH
    assert decodes == [1, 1] and len(memo) == 0


def test_an_entry_over_a_quarter_of_the_memo_is_not_kept(
    tmp_path: Path, settings: Settings, decodes: list[int]
) -> None:
    source = place(tmp_path / "a.jpg", jpeg())
    transform.configure_memo(4 * ENTRY - 4)
    try:
        for _ in range(2):
            run(settings, QUERIES[0], source)
        assert decodes == [4, 4]
        assert (len(transform.decoded_memo), transform.decoded_memo.refused) == (0, 2)
        transform.configure_memo(4 * ENTRY)  # exactly a quarter: kept
        for _ in range(2):
            run(settings, QUERIES[0], source)
        assert decodes == [4, 4, 4] and transform.decoded_memo.hits == 1
    finally:
        transform.configure_memo(0)


def test_the_least_recently_used_entry_goes_first(
    tmp_path: Path, settings: Settings, decodes: list[int]
) -> None:
    data = jpeg()
    sources = [place(tmp_path / f"{name}.jpg", data) for name in "abcde"]
    transform.configure_memo(4 * ENTRY)  # room for four
    try:
        for source in sources[:4]:
            run(settings, QUERIES[0], source)
        run(settings, QUERIES[0], sources[0])  # a hit: now the most recently used
        run(settings, QUERIES[0], sources[4])  # evicts b, the least recently used
        assert len(transform.decoded_memo) == 4 and transform.decoded_memo.currsize == 4 * ENTRY
        assert len(decodes) == 5
        run(settings, QUERIES[0], sources[0])  # still there
        assert len(decodes) == 5
        run(settings, QUERIES[0], sources[1])  # gone: decoded again
        assert len(decodes) == 6
    finally:
        transform.configure_memo(0)


def test_zero_turns_the_memo_off(tmp_path: Path, decodes: list[int]) -> None:
    settings = make_settings(tmp_path, IMAGE_PROXY_DECODED_CACHE_SIZE="0")
    threads = pool.ThreadPool(settings.limits, settings.encode, Metrics())
    transform.configure_memo(pool.decoded_share(threads, settings))
    threads.close()
    source = place(tmp_path / "a.jpg", jpeg())
    for _ in range(2):
        run(settings, QUERIES[0], source)
    assert decodes == [4, 4] and not transform.decoded_memo and len(transform.decoded_memo) == 0


def test_the_instance_budget_is_split_between_the_processes_that_render(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path,
        IMAGE_PROXY_DECODED_CACHE_SIZE="6000000",
        IMAGE_PROXY_TRANSFORM_THREADS="3",
        IMAGE_PROXY_WORKERS="2",
    )
    assert settings.cache.decoded_size == 6_000_000
    assert make_settings(tmp_path).cache.decoded_size == 96 * 1024 * 1024
    try:
        pool.renderer(settings)  # what a render process does at its start
        assert (
            transform.decoded_memo.capacity == 2_000_000
            and transform.decoded_memo.max_entry == 500_000
        )
    finally:
        transform.configure_memo(0)
    threads = pool.ThreadPool(settings.limits, settings.encode, Metrics())
    permits = pool.PermitPool("/nonexistent", settings.limits, settings.encode, Metrics())
    processes = pool.ProcessPool("/nonexistent", Metrics())
    try:
        assert pool.decoded_share(threads, settings) == 6_000_000  # the only process
        assert pool.decoded_share(permits, settings) == 3_000_000  # each worker's threads
        assert pool.decoded_share(processes, settings) == 0  # the worker never renders
    finally:
        for p in (threads, permits, processes):
            p.close()


def mean(image: pyvips.Image) -> float:
    return float(image.avg())


def test_two_sizes_of_one_source_through_the_server(
    tmp_path: Path, serve: Callable[..., Server], memo: transform.DecodedMemo
) -> None:
    """In one process (no main process: the worker's threads render, with all the memo)."""
    place(tmp_path / "a.jpg", jpeg())
    server = serve(tmp_path)
    first = server.get("/a.jpg?size=400&format=webp")
    second = server.get("/a.jpg?size=320&format=jpeg")
    assert first.status == second.status == 200
    assert MAGIC["webp"](first.body) and MAGIC["jpeg"](second.body)
    a, b = first.image(), second.image()
    assert (a.width, a.height, b.width, b.height) == (400, 300, 320, 240)
    assert transform.decoded_memo.hits == 1 and len(transform.decoded_memo) == 1
    assert abs(mean(a) - mean(b)) < 2
    # the file replaced: the new pixels (the inverted image is far from the first)
    place(tmp_path / "a.jpg", jpeg(inverted=True), LONG_AGO + 1)
    third = server.get("/a.jpg?size=320&format=jpeg").image()
    assert (third.width, third.height) == (320, 240)
    assert abs(mean(third) - (255 - mean(b))) < 3


@pytest.mark.slow
def test_render_processes_serve_two_sizes_and_a_replaced_file(tmp_path: Path) -> None:
    """The real server with one render process: its memo serves the second size, and a
    file replaced on disk is never answered with the old pixels."""
    root = tmp_path / "images"
    root.mkdir()
    place(root / "a.jpg", jpeg())
    env = {
        "IMAGE_PROXY_ROOT_PATH": str(root),
        "IMAGE_PROXY_WORKERS": "1",
        "IMAGE_PROXY_TRANSFORM_THREADS": "1",
    }
    with subprocess_server(env) as (server, _):
        sizes = {}
        for query in ("size=400&format=webp", "size=320&format=jpeg", "size=360&format=png"):
            r = server.get(f"/a.jpg?{query}")
            assert r.status == 200, r.text
            image = decode(r.body)
            sizes[query[-4:]] = (image.width, image.height, mean(image))
        assert [s[:2] for s in sizes.values()] == [(400, 300), (320, 240), (360, 270)]
        place(root / "a.jpg", jpeg(inverted=True), LONG_AGO + 1)
        image = decode(server.get("/a.jpg?size=320&format=jpeg").body)
        assert abs(mean(image) - (255 - sizes["jpeg"][2])) < 3
