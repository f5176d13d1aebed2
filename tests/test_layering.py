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
    # workers: the main process's watchdog drives Sanic's worker manager; responses builds
    # Sanic's HTTPResponse from a Reply; app stays thin.
    "sanic": {"app", "responses", "__main__", "workers"},
    # faster builds of the same codecs, for one decision inside transform's load/encode steps
    "simplejpeg": {"fastcodecs"},
    "PIL": {"fastcodecs"},
    "numpy": {"fastcodecs"},
}
# DESIGN.md "Direction of imports":
#   __main__ -> {app, workers} -> app -> {service, responses} -> service -> {produce, params,
#   sources, sniff, negotiate} -> produce -> {cache, flight, pool, transform} -> {config,
#   metrics, logs, httpdates, fastcodecs, signing} -> errors
# Leaves never import each other sideways: they return facts and `service`/`produce` combine
# them.
BASE = {"config", "errors", "httpdates", "metrics", "logs", "signing"}
LEAVES = {"negotiate", "params", "sources", "sniff", "cache", "flight", "transform"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "geometry": set(),
    "httpdates": set(),
    "config": {"errors"},
    **{base: {"config", "errors", "httpdates"} for base in ("metrics", "logs", "signing")},
    **{leaf: {"config", "errors", "httpdates"} for leaf in LEAVES},
    # geometry: pure box arithmetic shared by params (the key) and transform (the render)
    "params": {"config", "errors", "httpdates", "geometry"},
    # fastcodecs is transform's private helper (bytes and buffers in and out, no pyvips)
    "transform": {"config", "errors", "fastcodecs", "geometry"},
    "fastcodecs": set(),
    # the render pool: execute() is the render job (read from sources, sniff, Plan,
    # transform.render); it may run in a render process, so it needs them directly
    "pool": {"renderers", "dispatcher", "sniff", "transform", "params", "sources"} | BASE,
    # the pool's process machinery (dispatcher, render processes, the worker's client): it
    # moves pickled jobs and replies and knows no image code
    "renderers": {"errors"},
    "dispatcher": {"renderers"},
    "produce": {"cache", "flight", "pool", "transform", "sniff", "params", "sources"} | BASE,
    # cache: MemoryTier, the passthrough file memo
    # urls: the parsed URL, which carries what serving it taught (service.Known)
    "service": {"urls", "produce", "params", "sources", "sniff", "negotiate", "cache"} | BASE,
    "responses": {"service"} | BASE,
    # what follows from the URL alone (signing.check -> params.parse), memoised per URL
    "urls": {"params"} | BASE,
    # start_worker builds every per-worker resource: the cache chain, the pool, the producer,
    # the origin's client (and configures libvips once per worker). app wires the main
    # process's watchdog (workers) as its own listener: the Sanic CLI builds the app from
    # create_app alone, and must get the same server (SPEC "Ways to run")
    "app": {"__init__", "urls", "service", "responses", "produce", "pool", "cache", "sources"}
    | {"transform", "workers"}
    | BASE,
    # _build: written by build/shiv.sh
    "__main__": {"__init__", "_build", "app", "config", "logs", "metrics", "signing", "workers"},
    # beside app, under __main__: runs in the main process only (replaces dead workers)
    "workers": {"metrics"},
    "__init__": set(),
    "_build": set(),
}


def files(module: str) -> list[Path]:
    """A module's source files: `name.py`, or every file of the package `name/`."""
    package = SRC / module
    if package.is_dir():
        return sorted(package.glob("*.py"))
    single = SRC / f"{module}.py"
    return [single] if single.exists() else []


def imports(module: str) -> tuple[set[str], set[str]]:
    """(third-party top-level names, project modules) imported by a module or package.
    Inside a package, `from .x import` is the package's own business; `from ..x` leaves it."""
    inside = 2 if (SRC / module).is_dir() else 1  # the relative level that reaches the project
    third, local = set(), set()
    for path in files(module):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                third |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    if node.module:
                        third.add(node.module.split(".")[0])
                elif node.level < inside:
                    continue
                elif node.module:
                    local.add(node.module.split(".")[0])
                else:
                    local |= {a.name if a.name != "__version__" else "__init__" for a in node.names}
    return third, local


def test_every_module_is_known() -> None:
    found = {p.stem for p in SRC.glob("*.py")} | {
        p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    assert found <= set(ALLOWED)


def test_third_party_libraries_have_one_owner() -> None:
    for module in ALLOWED:
        third, _ = imports(module)
        for lib, owners in OWNERS.items():
            if lib in third:
                assert module in owners, f"{module} imports {lib}"


def test_direction_of_imports() -> None:
    for module, allowed in ALLOWED.items():
        _, local = imports(module)
        local.discard("__version__")
        assert local <= allowed, f"{module} imports {local - allowed}"


def test_no_import_cycles() -> None:
    """Module-level imports of the project (packages as one node) form no cycle."""
    graph = {m: imports(m)[1] - {"__version__", m} for m in ALLOWED}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, set())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
