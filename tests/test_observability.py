"""SPEC "Observability": Server-Timing, X-Request-ID, the access log and JSON logs.

Headers are checked on a real in-process server; log lines on a real `python -m imgproxy`
(its stdout and stderr, merged), parsed line by line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Resp, Server, subprocess_server
from imgproxy import logs

STEPS = ("decode", "resize", "encode")
TRANSFORM = "/landscape.jpg?size=120&format=webp"


def parse_server_timing(header: str) -> dict[str, dict[str, str]]:
    """RFC-ish Server-Timing parser: `name;dur=1.2;desc="x", other` -> {name: {param: value}}."""
    out: dict[str, dict[str, str]] = {}
    for entry in header.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        assert re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name), entry
        values = {}
        for param in params:
            key, _, value = param.partition("=")
            values[key.strip()] = value.strip().strip('"')
        out[name] = values
    return out


def timing(r: Resp) -> dict[str, dict[str, str]]:
    assert "server-timing" in r.headers, r.headers
    return parse_server_timing(r.headers["server-timing"])


def dur(entries: dict[str, dict[str, str]], name: str) -> float:
    value = float(entries[name]["dur"])
    assert value >= 0
    return value


# -- Server-Timing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("total;dur=1.5", {"total": {"dur": "1.5"}}),
        (
            "cache;desc=memory, total;dur=0.2",
            {"cache": {"desc": "memory"}, "total": {"dur": "0.2"}},
        ),
        ('cache;desc="disk" , total;dur=3', {"cache": {"desc": "disk"}, "total": {"dur": "3"}}),
    ],
    ids=["total", "cache-and-total", "quoted-desc"],
)
def test_server_timing_parser(header: str, parsed: dict[str, dict[str, str]]) -> None:
    assert parse_server_timing(header) == parsed


def test_server_timing_without_cache(server: Server) -> None:
    passthrough = timing(server.get("/landscape.jpg"))
    assert set(passthrough) == {"total"}
    dur(passthrough, "total")

    rendered = timing(server.get(TRANSFORM))
    assert set(rendered) == {"total", *STEPS}
    steps = sum(dur(rendered, s) for s in STEPS)
    assert steps <= dur(rendered, "total") + 0.05  # the render happened inside the request

    r = server.get("/missing.jpg")
    assert r.status == 404
    assert set(timing(r)) == {"total"}  # errors of the image route carry it too
    assert set(timing(server.get("/landscape.jpg?size=0"))) == {"total"}

    for path in ("/health", "/metrics"):
        assert "server-timing" not in server.get(path).headers


def test_server_timing_names_the_cache_tier(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(IMAGE_PROXY_ENABLE_CACHE="true")
    first = timing(server.get(TRANSFORM))
    assert first["cache"] == {"desc": "miss"}
    assert set(first) == {"cache", "total", *STEPS}
    again = timing(server.get(TRANSFORM))
    assert again["cache"] == {"desc": "memory"}
    assert set(again) == {"cache", "total"}  # no render ran for this one
    # not served from the cache: "miss", on passthrough and errors too
    assert timing(server.get("/landscape.jpg"))["cache"] == {"desc": "miss"}
    assert timing(server.get("/missing.jpg"))["cache"] == {"desc": "miss"}
    etag = server.get(TRANSFORM).headers["etag"]
    r = server.get(TRANSFORM, headers={"If-None-Match": etag})
    assert r.status == 304
    assert set(timing(r)) >= {"cache", "total"}

    disk = serve(
        IMAGE_PROXY_ENABLE_CACHE="true",
        IMAGE_PROXY_ENABLE_DISK_CACHE="true",
        IMAGE_PROXY_CACHE_DISK_PATH=str(tmp_path / "disk"),
        IMAGE_PROXY_CACHE_MEMORY_SIZE="0",  # every hit comes from the disk tier
    )
    assert timing(disk.get(TRANSFORM))["cache"] == {"desc": "miss"}
    assert timing(disk.get(TRANSFORM))["cache"] == {"desc": "disk"}


def test_server_timing_can_be_turned_off(serve: Callable[..., Server]) -> None:
    server = serve(IMAGE_PROXY_SERVER_TIMING="false", IMAGE_PROXY_ENABLE_CACHE="true")
    for path in ("/landscape.jpg", TRANSFORM, TRANSFORM, "/missing.jpg"):
        r = server.get(path)
        assert "server-timing" not in r.headers, path
        assert "x-request-id" in r.headers


# -- X-Request-ID -------------------------------------------------------------------------

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"abc-123", True),
        (b"req 42 from edge", True),  # space is printable ASCII (0x20)
        (b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", True),
        (b"x" * 128, True),
        (b"x" * 129, False),
        (b"", False),
        (b"caf\xc3\xa9", False),  # UTF-8: not ASCII
        (b"caf\xe9", False),  # Latin-1: not ASCII
        (b"a\x7fb", False),  # DEL
        (b"a\x01b", False),  # control byte
        (b"a\tb", False),  # TAB is legal in a header value, not in our ids
    ],
    ids=[
        "plain",
        "space",
        "punctuation",
        "128-chars",
        "129-chars",
        "empty",
        "utf8",
        "latin1",
        "del",
        "control",
        "tab",
    ],
)
def test_request_id_kept_or_replaced(server: Server, sent: bytes, kept: bool) -> None:
    r = server.raw(b"/landscape.jpg", headers={"X-Request-ID": sent.decode("latin-1")})
    assert r.status == 200
    got = r.headers["x-request-id"]
    if kept:
        assert got == sent.decode()
    else:
        assert GENERATED.fullmatch(got), got


def test_request_id_on_every_response(server: Server) -> None:
    def check(r: Resp, status: int) -> str:
        assert r.status == status
        return r.headers["x-request-id"]

    ids = [
        check(server.get("/landscape.jpg"), 200),
        check(server.get(TRANSFORM), 200),
        check(server.get("/missing.jpg"), 404),
        check(server.get("/landscape.jpg?size=-1"), 400),
        check(server.get("/notes.txt"), 415),
        check(server.get("/health"), 200),
        check(server.get("/metrics"), 200),
        check(server.request("POST", "/landscape.jpg"), 405),
        check(server.request("HEAD", "/landscape.jpg"), 200),
        check(server.raw(b"/a\tb.jpg"), 400),  # a bad request line (ImgRequest placeholder)
    ]
    etag = server.get("/landscape.jpg").headers["etag"]
    ids.append(check(server.get("/landscape.jpg", headers={"If-None-Match": etag}), 304))
    assert all(GENERATED.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)  # unique
    mine = server.get("/missing.jpg", headers={"X-Request-ID": "trace-7"})
    assert mine.headers["x-request-id"] == "trace-7"


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [("a", True), (" ~", True), ("x" * 128, True), ("x" * 129, False), (None, False), ("é", False)],
)
def test_request_id_function(incoming: str | None, kept: bool) -> None:
    got = logs.request_id(incoming)
    assert (got == incoming) is kept
    if not kept:
        assert GENERATED.fullmatch(got)
        as_uuid = uuid.UUID(hex=got)
        assert (as_uuid.version, as_uuid.variant, as_uuid.hex) == (4, uuid.RFC_4122, got)


def test_generated_request_ids_are_unique() -> None:
    assert len({logs.new_request_id() for _ in range(50_000)}) == 50_000


# -- logs ---------------------------------------------------------------------------------

ACCESS_FIELDS = {
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "cache",
    "format",
    "request_id",
}


def json_lines(out: str) -> list[dict[str, object]]:
    """Every line is one JSON object with ts, level, msg (the contract), or the test fails."""
    records = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n--- output ---\n{out}")
        assert isinstance(record, dict), line
        assert {"ts", "level", "msg"} <= set(record), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(record["ts"])), line
        records.append(record)
    return records


def run_server(
    env: dict[str, str], traffic: Callable[[Server, subprocess.Popen[bytes]], None]
) -> str:
    with subprocess_server(env) as (server, proc):
        traffic(server, proc)
    return "".join(server.output)  # stdout and stderr, drained until the server exited


@pytest.mark.slow
def test_json_logs_every_line_and_an_access_line_per_request(corpus: Path) -> None:
    env = {
        "IMAGE_PROXY_ROOT_PATH": str(corpus),
        "IMAGE_PROXY_WORKERS": "2",
        "IMAGE_PROXY_LOG_FORMAT": "json",
        "IMAGE_PROXY_ACCESS_LOG": "true",
        "IMAGE_PROXY_ENABLE_CACHE": "true",
    }
    sent: dict[str, tuple[str, int, int]] = {}  # request id -> (path, status, body bytes)
    workers: list[int] = []

    def traffic(server: Server, proc: subprocess.Popen[bytes]) -> None:
        for i, path in enumerate(
            ["/landscape.jpg", TRANSFORM, TRANSFORM, "/missing.jpg", "/landscape.jpg?size=x"]
        ):
            rid = f"t-{i}"
            r = server.get(path, headers={"X-Request-ID": rid})
            assert r.headers["x-request-id"] == rid
            sent[rid] = (path, r.status, len(r.body))
        bad = server.raw(b"/a\tb.jpg")  # a bad request line still logs well-formed JSON
        assert bad.status == 400
        sent[bad.headers["x-request-id"]] = ("*", 400, len(bad.body))
        # a worker dies (OOM killer, a crash): the rest goes on, every line still JSON
        workers[:] = worker_pids(proc.pid, server.port)
        assert len(workers) == 2, workers
        # both up (the fixture waited for one): a worker killed while starting is Sanic's
        # start-up failure, not a death the watchdog handles
        deadline = time.monotonic() + 30
        while not all(f"Worker ready [{pid}]" in "".join(server.output) for pid in workers):
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.1)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while server.metric("image_worker_restarts_total") < 1:  # the watchdog replaced it
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = server.get("/landscape.jpg?size=50", headers={"X-Request-ID": "after-kill"})
        assert r.status == 200
        sent["after-kill"] = ("/landscape.jpg?size=50", 200, len(r.body))

    records = json_lines(run_server(env, traffic))
    access = [r for r in records if r.get("logger") == "imgproxy.access"]
    by_id = {str(r["request_id"]): r for r in access if str(r["request_id"]) in sent}
    assert set(by_id) == set(sent)
    for rid, (path, status, nbytes) in sent.items():
        line = by_id[rid]
        assert set(line) >= ACCESS_FIELDS, line
        assert (line["method"], line["path"], line["status"], line["bytes"]) == (
            "NONE" if path == "*" else "GET",
            path,
            status,
            nbytes,
        )
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
        assert line["level"] == "INFO"
    assert [by_id[f"t-{i}"]["cache"] for i in range(4)] == ["miss", "miss", "memory", "miss"]
    assert [by_id[f"t-{i}"]["format"] for i in range(4)] == ["jpeg", "webp", "webp", None]
    # one access line per request, whatever the route (health checks of the fixture included)
    assert len([r for r in access if r["request_id"] in sent]) == len(sent)
    for pid in workers:  # the process killed was a worker
        assert f"Starting worker [{pid}]" in [r["msg"] for r in records]
    # the main process's watchdog said so, in one JSON line
    death = [r for r in records if f"(pid {workers[0]}) died" in str(r["msg"])]
    assert len(death) == 1 and death[0]["level"] == "WARNING", death
    loggers = {r.get("logger") for r in records}
    assert {"sanic.root", "sanic.server", "imgproxy.access"} <= loggers


def worker_pids(main: int, port: int) -> list[int]:
    """Sanic's workers: the children of `main` that hold the listening socket (its
    SyncManager and resource tracker are children too, without it)."""
    inode = None
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            cols = line.split()
            if cols[1].endswith(f":{port:04X}") and cols[3] == "0A":  # LISTEN
                inode = cols[9]
    assert inode is not None
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(main)], capture_output=True, text=True, check=True
    ).stdout.split()
    pids = []
    for pid in map(int, children):
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(_link(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in fds):
                pids.append(pid)
    return pids


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


@pytest.mark.slow
def test_text_access_log_and_default_off(corpus: Path) -> None:
    base = {"IMAGE_PROXY_ROOT_PATH": str(corpus), "IMAGE_PROXY_WORKERS": "1"}

    def traffic(server: Server, proc: subprocess.Popen[bytes]) -> None:
        server.get(TRANSFORM, headers={"X-Request-ID": "text-1"})
        server.get("/missing.jpg", headers={"X-Request-ID": "text-2"})

    out = run_server({**base, "IMAGE_PROXY_ACCESS_LOG": "true"}, traffic)
    lines = [line for line in out.splitlines() if "imgproxy.access" in line]
    pattern = (
        r".* \[\d+\] INFO imgproxy\.access: GET (\S+) (\d{3}) (\d+)B (\d+\.\d\d)ms "
        r"cache=(\S+) format=(\S+) id=(.+)"
    )
    parsed = {m.group(7): m.groups() for m in (re.fullmatch(pattern, line) for line in lines) if m}
    assert parsed["text-1"][:2] == (TRANSFORM, "200") and parsed["text-1"][4:6] == ("-", "webp")
    assert parsed["text-2"][:2] == ("/missing.jpg", "404") and parsed["text-2"][5] == "-"
    assert not any(line.startswith("{") for line in out.splitlines())

    off = run_server(base, traffic)  # IMAGE_PROXY_ACCESS_LOG defaults to false
    assert "imgproxy.access" not in off and "text-1" not in off


def test_json_formatter_keeps_a_traceback_in_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, "f", 1, "failed: %s", ("it",), sys.exc_info()
        )
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == "failed: it" and parsed["level"] == "ERROR"
    assert "Traceback" in parsed["exc"] and "boom" in parsed["exc"]


CRASH = textwrap.dedent(
    """
    import logging, multiprocessing, threading, warnings
    from imgproxy import logs

    def worker():
        logs.configure("INFO", "json", whole_process=True)
        print("a stray print")
        warnings.warn("careful")
        t = threading.Thread(target=lambda: 1 / 0)
        t.start()
        t.join()
        raise RuntimeError("the worker crashed")

    if __name__ == "__main__":
        logs.configure("INFO", "json", whole_process=True)
        multiprocessing.set_start_method("spawn")
        p = multiprocessing.Process(target=worker, name="Sanic-Server-0-0")
        p.start()
        p.join()
        logging.getLogger("imgproxy").warning("worker exited with %s", p.exitcode)
        raise SystemError("and then the main process")
    """
)


def test_json_mode_leaves_no_plain_line_when_a_worker_crashes(tmp_path: Path) -> None:
    """What multiprocessing prints when a spawned worker raises (the path a Sanic worker
    takes when it dies with an exception), stray prints, warnings, a thread's and the main
    process's uncaught exceptions: all JSON, tracebacks inside `exc`."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 1
    records = json_lines(r.stdout) + json_lines(r.stderr)
    msgs = [str(x["msg"]) for x in records]
    assert "a stray print" in msgs
    crash = next(x for x in records if "RuntimeError: the worker crashed" in str(x.get("exc", "")))
    assert str(crash["exc"]).startswith("Traceback (most recent call last):")
    assert any("ZeroDivisionError" in str(x.get("exc", "")) for x in records)
    assert any("careful" in m for m in msgs)
    assert "worker exited with 1" in msgs
    main = next(x for x in records if x["level"] == "CRITICAL")
    assert "SystemError: and then the main process" in str(main["exc"])


def test_a_config_error_is_json_when_json_is_asked_for(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_PROXY_")}
    env.update({"IMAGE_PROXY_LOG_FORMAT": "json", "IMAGE_PROXY_WORKERS": "many"})
    r = subprocess.run(
        [sys.executable, "-m", "imgproxy"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1
    (record,) = json_lines(r.stderr + r.stdout)
    assert record["level"] == "ERROR" and "IMAGE_PROXY_WORKERS" in str(record["msg"])
