"""Keep-alive connections spread over the workers (workers.Spread).

The workers accept on one socket, so a burst of new connections can land all on one worker
(one core then serves them for as long as they live). A worker over its fair share answers
a request with `Connection: close` now and then, and the client's next connection goes to
whichever worker accepts first."""

from __future__ import annotations

import http.client
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import photo, server_workers, subprocess_server
from imgproxy.workers import Spread


class Stream:
    """What `Spread.over` reads of Sanic's Http: its protocol's set of open connections."""

    def __init__(self, open_connections: int) -> None:
        self.protocol = SimpleNamespace(connections=set(range(open_connections)))


def looked_at(spread: Spread, stream: Stream) -> bool:
    """What the EVERY-th request decides (the ones before it never look)."""
    decided = [spread.over(stream) for _ in range(Spread.EVERY)]
    assert not any(decided[:-1])
    return decided[-1]


@pytest.mark.parametrize(
    ("counts", "over"),
    [
        ([8, 0], True),
        ([7, 1], True),
        ([5, 3], True),
        ([4, 4], False),
        ([4, 3], False),  # 4 = ceil(7 / 2)
        ([1, 0], False),  # one connection stays where it is
        ([0, 0], False),
        ([4, 2, 2], True),  # ceil(8 / 3) = 3
        ([3, 3, 2], False),
    ],
)
def test_over_its_fair_share(counts: list[int], over: bool) -> None:
    shared = [0, *counts[1:]]
    spread = Spread(shared, 0)
    assert looked_at(spread, Stream(counts[0])) is over
    assert shared == counts  # its own count published at the look


def test_counts_published() -> None:
    shared = [5, 9]  # a replacement worker starts afresh in its slot
    spread = Spread(shared, 0)
    assert shared == [0, 9]
    looked_at(spread, Stream(3))
    assert shared == [3, 9]
    spread.connections.discard(0)  # Sanic's set, kept: later publications follow it
    assert spread.publish() == 2 and shared == [2, 9]


def test_one_worker_spreads_nothing() -> None:
    assert Spread.for_worker(None) is None
    assert Spread.for_worker([0]) is None


def connection_owners(
    port: int, pids: dict[str, int], conns: list[http.client.HTTPConnection]
) -> dict[str, int]:
    """The server's ends of `conns` (established, to 127.0.0.1:`port`), counted per worker
    (from /proc)."""
    ours = {c.sock.getsockname()[1] for c in conns if c.sock is not None}
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if (
            state == "01"
            and int(local.split(":")[1], 16) == port
            and int(remote.split(":")[1], 16) in ours
        ):
            inodes.add(f"socket:[{inode}]")
    owners = {}
    for name, pid in pids.items():
        fds = Path(f"/proc/{pid}/fd")
        owned = 0
        for fd in fds.iterdir():
            try:
                owned += os.readlink(fd) in inodes
            except OSError:
                continue
        owners[name] = owned
    return owners


def ask(c: http.client.HTTPConnection) -> bool:
    """One request on `c`; True if the server closed it after the answer (then `c` is a
    new connection already: the worker that accepts first takes it)."""
    c.request("GET", "/small.png")
    r = c.getresponse()
    assert r.status == 200 and r.read()
    if r.getheader("connection") != "close":
        return False
    c.close()
    c.connect()
    return True


def test_connections_piled_on_one_worker_spread_out(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    photo(60, 40).pngsave(str(root / "small.png"))
    env = {"IMAGE_PROXY_ROOT_PATH": str(root), "IMAGE_PROXY_WORKERS": "2"}
    with subprocess_server(env) as (server, proc):
        server.client.close()  # its keep-alive connection would count on one side
        pids = server_workers(proc.pid)
        assert len(pids) == 2
        stopped = max(pids.values())
        os.kill(stopped, signal.SIGSTOP)  # every new connection goes to the other one
        try:
            conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                     for _ in range(8)]  # fmt: skip
            for c in conns:  # accepted and served by the running worker
                ask(c)
            time.sleep(0.2)
            assert sorted(connection_owners(server.port, pids, conns).values()) == [0, 8]
        finally:
            os.kill(stopped, signal.SIGCONT)
        closed, rounds = 0, 0
        while max(connection_owners(server.port, pids, conns).values()) > 5:
            rounds += 1  # each connection asks again; a closed one reconnects at once
            assert rounds <= 300, connection_owners(server.port, pids, conns)
            closed += sum(ask(c) for c in conns)
        assert closed >= 3  # at least 3 moved
        for _ in range(100):  # and it settles: (4, 4) stays, (5, 3) moves at most once more
            closed += sum(ask(c) for c in conns)
        owners = connection_owners(server.port, pids, conns)
        assert sorted(owners.values()) in ([4, 4], [3, 5]), owners
        for c in conns:
            c.close()
