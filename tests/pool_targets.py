"""Render functions for tests/test_pool.py's render processes (spawned children import this
module by name, so it stays light: no pytest, no conftest)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgproxy.errors import UnprocessableImage


def scripted(_settings: object) -> Callable[[Any], Any]:
    """A job is a tuple: ("gate", path, tag) waits until `path` exists, then answers
    (tag, pid, n) with n this process's job count; ("raise", reason) raises a 422;
    ("hang", path) writes its pid to `path` and never returns."""
    count = itertools.count(1)

    def run(job: tuple[Any, ...]) -> Any:
        kind = job[0]
        if kind == "gate":
            while not Path(job[1]).exists():
                time.sleep(0.005)
            return job[2], os.getpid(), next(count)
        if kind == "raise":
            raise UnprocessableImage(job[1])
        if kind == "hang":
            Path(job[1]).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        raise ValueError(f"unknown job {job!r}")

    return run
