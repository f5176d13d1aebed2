"""DESIGN.md's import rules, pinned: each third-party library has one owner module, and
leaf modules never import each other sideways."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "imgproxy"

OWNERS = {
    "pyvips": {"transform"},
    "httpx": {"sources"},
    "aiofiles": {"sources"},
    "diskcache": {"cache"},
    "redis": {"cache"},
    "prometheus_client": {"metrics"},
    # workers: the main process's watchdog drives Sanic's worker manager; app stays thin.
    "sanic": {"app", "__main__", "workers"},
}
# DESIGN.md: __main__ -> app -> service -> {leaves} -> config -> errors. Leaves never import
# each other sideways: they return facts and `service` combines them.
LEAVES = {
    "params",
    "sources",
    "sniff",
    "transform",
    "cache",
    "flight",
    "metrics",
}
# httpdates is pure text <-> value code used by sources (origin dates), service (conditional
# requests) and app (Last-Modified): a base module like errors, not a leaf.
BASE = {"config", "errors", "httpdates"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "httpdates": set(),
    "config": {"errors"},
    **{leaf: set(BASE) for leaf in LEAVES},
    "service": LEAVES | BASE,
    "app": {"__init__", "service"} | LEAVES | BASE,
    # _build: written by build/shiv.sh
    "__main__": {"__init__", "_build", "app", "config", "metrics", "workers"},
    # beside app, under __main__: runs in the main process only (replaces dead workers)
    "workers": {"metrics"},
    "__init__": set(),
    "_build": set(),
}


def imports(module: str) -> tuple[set[str], set[str]]:
    tree = ast.parse((SRC / f"{module}.py").read_text())
    third, local = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            third |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module:
                    local.add(node.module.split(".")[0])
                else:
                    local |= {a.name if a.name != "__version__" else "__init__" for a in node.names}
            elif node.module:
                third.add(node.module.split(".")[0])
    return third, local


def test_every_module_is_known() -> None:
    assert {p.stem for p in SRC.glob("*.py")} <= set(ALLOWED)


def test_third_party_libraries_have_one_owner() -> None:
    for module in ALLOWED:
        if not (SRC / f"{module}.py").exists():
            continue
        third, _ = imports(module)
        for lib, owners in OWNERS.items():
            if lib in third:
                assert module in owners, f"{module} imports {lib}"


def test_direction_of_imports() -> None:
    for module, allowed in ALLOWED.items():
        if not (SRC / f"{module}.py").exists():
            continue
        _, local = imports(module)
        local.discard("__version__")
        assert local <= allowed, f"{module} imports {local - allowed}"
