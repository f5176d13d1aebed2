"""Helpers shared by the bench scripts (run as `python bench/x.py`, so `bench/` is on sys.path).

They cannot import `tests/conftest.py` (it imports the app and sets Sanic's test mode), so
the one copy outside the tests lives here."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
