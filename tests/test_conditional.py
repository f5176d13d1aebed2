"""Conditional requests come after validation; large passthrough files are opened before the
response starts; the render reads no more than the byte limit."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Server
from imgproxy.errors import UnprocessableImage
from imgproxy.sources import OpenFile, read_capped

FAR_FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"

# (url, status without conditional headers): a 304 only where the answer would be a 200
CASES = [
    ("/text.jpg", 415),
    ("/text.jpg?size=50", 415),
    ("/empty.jpg?size=50", 415),
    ("/bomb.png?size=10", 422),
    ("/gif-named.png", 200),
    ("/landscape.jpg?size=50", 200),
    ("/landscape.jpg", 200),
]


@pytest.mark.parametrize(("url", "status"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(
    "conditional",
    [{"If-None-Match": "*"}, {"If-Modified-Since": FAR_FUTURE}],
    ids=["if-none-match-star", "if-modified-since-future"],
)
def test_304_only_where_the_answer_would_be_200(
    server: Server, url: str, status: int, conditional: dict[str, str]
) -> None:
    plain = server.get(url)
    if url != "/gif-named.png":  # its status belongs to the GIF contract, tested elsewhere
        assert plain.status == status
    r = server.get(url, headers=conditional)
    if plain.status == 200:
        assert r.status == 304 and r.body == b""
        assert r.headers["etag"] == plain.headers["etag"]
    else:
        assert r.status == plain.status, r.text
        assert r.headers["content-type"].startswith("text/plain")
        assert "cache-control" not in r.headers


def test_pixel_limit_before_304_with_a_low_limit(
    serve: Callable[..., Server], corpus: Path
) -> None:
    s = serve(IMAGE_PROXY_MAX_SOURCE_PIXELS="10000")
    assert s.get("/landscape.jpg?size=50", headers={"If-None-Match": "*"}).status == 422
    assert s.get("/landscape.jpg", headers={"If-None-Match": "*"}).status == 304  # passthrough


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    """A 33 MiB file that sniffs as JPEG: over the 32 MiB streaming threshold."""
    root = tmp_path / "big"
    root.mkdir()
    path = root / "big.jpg"
    with path.open("wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"\x00" * 60)
        chunk = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(33):
            f.write(chunk)
    return path


class AccessLines(logging.Handler):
    """The access lines written while it listens on `imgproxy.access`."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> list[str]:
        logging.getLogger("imgproxy.access").addHandler(self)
        return self.lines

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("imgproxy.access").removeHandler(self)


def test_large_passthrough_is_streamed_whole(serve: Callable[..., Server], big_file: Path) -> None:
    s = serve(big_file.parent, IMAGE_PROXY_ACCESS_LOG="true")
    r = s.get("/big.jpg")
    assert r.status == 200 and r.headers["content-type"] == "image/jpeg"
    assert int(r.headers["content-length"]) == big_file.stat().st_size == len(r.body)
    assert r.body == big_file.read_bytes()
    # its headers leave before the body: the id and the timing are in them all the same
    assert len(r.headers["x-request-id"]) == 32 and "total;dur=" in r.headers["server-timing"]
    with AccessLines() as lines:
        mine = s.get("/big.jpg", headers={"X-Request-ID": "trace-big"})
    assert mine.headers["x-request-id"] == "trace-big"
    # one access line, written when the headers left (the body may outlive its client)
    mine_lines = [line for line in lines if "trace-big" in line]
    assert len(mine_lines) == 1 and "GET /big.jpg 200" in mine_lines[0], lines
    head = s.request("HEAD", "/big.jpg")
    assert head.status == 200 and int(head.headers["content-length"]) == len(r.body)
    assert s.get("/big.jpg", headers={"If-None-Match": r.headers["etag"]}).status == 304


def test_a_client_gone_mid_body_still_gets_its_access_line(
    serve: Callable[..., Server], big_file: Path
) -> None:
    """A streamed body whose client hangs up after the headers: the request is still
    logged (once, when its headers left), and the server goes on serving."""
    s = serve(big_file.parent, IMAGE_PROXY_ACCESS_LOG="true")
    with AccessLines() as lines:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"GET /big.jpg HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone-1\r\n\r\n")
            got = b""
            while b"\r\n\r\n" not in got:
                got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200") and b"x-request-id: gone-1" in got.lower()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any("gone-1" in line for line in lines):
            time.sleep(0.05)
        assert s.get("/health").status == 200
    gone = [line for line in lines if "gone-1" in line]
    assert len(gone) == 1 and "GET /big.jpg 200" in gone[0], lines


def test_open_file_length_is_the_open_files(big_file: Path) -> None:
    """Opened first: a file replaced afterwards still gives the opened file's bytes/length."""
    opened = OpenFile(str(big_file))
    try:
        size = opened.size
        big_file.unlink()
        big_file.write_bytes(b"\xff\xd8\xff short")

        async def collect() -> bytes:
            return b"".join([c async for c in opened.chunks()])

        body = asyncio.run(collect())
        assert len(body) == size > 33 * 1024 * 1024
    finally:
        opened.close()


def test_render_read_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "grown.jpg"
    path.write_bytes(b"\xff\xd8\xff" + b"\x00" * 2000)
    assert len(read_capped(str(path), 5000)) == 2003
    with pytest.raises(UnprocessableImage):
        read_capped(str(path), 1000)  # grew past the size checked at stat time


def test_render_read_notices_a_file_growing_while_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The buffer is sized from fstat: a file longer than fstat said (it grew meanwhile)
    is read on to its end, still capped, never cut at the stat's size."""
    path = tmp_path / "growing.jpg"
    path.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)
    real_fstat = os.fstat

    def stale_fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        return os.stat_result((*st[:6], 100, *st[7:]))  # st_size as it was, earlier

    monkeypatch.setattr(os, "fstat", stale_fstat)
    assert read_capped(str(path), 5000) == path.read_bytes()
    with pytest.raises(UnprocessableImage):
        read_capped(str(path), 1000)


def read_chars() -> int:
    """Bytes this process has passed to read()/pread() so far (/proc/self/io `rchar`): the
    in-process server's file reads included."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("mib", [4, 16], ids=["read-in-a-thread", "under-the-stream-limit"])
def test_head_and_304_passthrough_read_only_the_first_bytes(
    serve: Callable[..., Server], tmp_path: Path, mib: int
) -> None:
    """HEAD and a conditional passthrough that ends in 304 sniff the first bytes and take
    the length from stat: they never read (or hold) the whole file."""
    root = tmp_path / "head"
    root.mkdir()
    size = mib << 20
    (root / "big.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * (size - 4))
    s = serve(root)
    before = read_chars()
    head = s.request("HEAD", "/big.jpg")
    after_head = read_chars()
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(size)
    assert head.headers["content-type"] == "image/jpeg"
    assert after_head - before < 1 << 20, "HEAD read the whole file"
    not_modified = s.get("/big.jpg", headers={"If-None-Match": head.headers["etag"]})
    assert not_modified.status == 304 and not_modified.body == b""
    assert read_chars() - after_head < 1 << 20, "a 304 read the whole file"
    full = s.get("/big.jpg")
    assert full.status == 200 and len(full.body) == size  # a GET still sends it all
    text = root / "text.jpg"
    text.write_bytes(b"not an image" * 200_000)
    assert s.request("HEAD", "/text.jpg").status == 415  # sniffed from the first bytes
    assert s.get("/text.jpg", headers={"If-None-Match": "*"}).status == 415
