"""DESIGN.md's import rules, pinned as written there: each third-party library has one
owner module, and imports go one way, down DESIGN's "Direction of imports". Where the code
still differs, DEVIATIONS names each edge and why; an edge the code no longer has must leave
it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "imgproxy"

# DESIGN.md "Direction of imports", as written there (read as layers: a module imports only
# from the layers after its own; a name repeated from the set before it, `{app, workers} ->
# app`, says which of them goes on):
DIRECTION = (
    "__main__ → {app, workers} → app → {service, responses} → service → {produce, params, sources,"
    " sniff, negotiate} → produce → {cache, flight, pool, transform} → {config, metrics, logs,"
    " httpdates, fastcodecs, signing} → errors"
)
# DESIGN.md: "Each third-party library has one owner"
OWNERS = {
    "pyvips": {"transform"},
    "PIL": {"fastcodecs"},
    "simplejpeg": {"fastcodecs"},
    "numpy": {"fastcodecs"},
    "httpx": {"sources"},
    "aiofiles": {"sources"},
    "diskcache": {"cache"},
    "redis": {"cache"},
    "prometheus_client": {"metrics"},
    "sanic": {"app", "workers", "__main__"},
    # DESIGN names none: the cache package, whose LRU is the one byte-bounded LRU (issue 19)
    "cachetools": {"cache"},
}
# Where the code still differs from DESIGN, one edge (importer, imported) at a time, with why.
DEVIATIONS: dict[tuple[str, str], str] = {
    ("app", "workers"): "SPEC 'Ways to run': `sanic imgproxy.app:create_app --factory` gets the "
    "watchdog too, so create_app registers it",
    ("responses", "service"): "the Reply it turns into an HTTP response is service's type",
    ("responses", "sanic"): "DESIGN's layout has responses build Sanic's HTTPResponse",
    ("produce", "params"): "the output salt and `Output`, the resolved spec a Job carries",
    ("produce", "sources"): "a located source becomes a Job; the conditional request's head read",
    ("pool", "transform"): "the render job (pool/job.py) runs transform.render in the render "
    "process; pool and transform are one layer",
    ("pool", "sniff"): "the render job checks the source's type and size before it decodes",
    ("pool", "sources"): "the render job reads the source (capped) inside the render process",
    ("pool", "params"): "a Job carries the resolved `Output`",
    ("__main__", "_build"): "written into the .pyz by build/shiv.sh",
    ("sources", "cachetools"): "the origin and realpath memos; importing cache here would load "
    "redis and diskcache into every render process",
    ("transform", "cachetools"): "the render processes' decoded memo; cache is one layer with it",
}


def layers() -> list[set[str]]:
    out: list[set[str]] = []
    for part in DIRECTION.split("→"):
        names = {n.strip() for n in part.strip().strip("{}").split(",")}
        if len(names) == 1 and out and names <= out[-1]:
            continue  # `{app, workers} → app`: the one that goes on
        out.append(names)
    return out


LAYERS = layers()
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
STDLIB = sys.stdlib_module_names | {"__future__"}


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
                    local |= {a.name for a in node.names} - {"__version__"}  # the package's own
    return third, local


def test_direction_is_design_s() -> None:
    assert LAYERS[0] == {"__main__"} and LAYERS[-1] == {"errors"}
    assert [sorted(layer) for layer in LAYERS[2:4]] == [
        ["responses", "service"],
        ["negotiate", "params", "produce", "sniff", "sources"],
    ]


def test_every_module_is_in_design() -> None:
    found = {p.stem for p in SRC.glob("*.py")} | {
        p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    assert found - {"__init__"} == set(RANK)


def test_third_party_libraries_have_one_owner() -> None:
    users: dict[str, set[str]] = {}
    for module in RANK:
        for lib in imports(module)[0] - STDLIB:
            users.setdefault(lib, set()).add(module)
    for lib, modules in users.items():
        extra = {m for m in modules - OWNERS.get(lib, set()) if (m, lib) not in DEVIATIONS}
        if lib in OWNERS:
            assert not extra, f"{lib} is {OWNERS[lib]}'s, yet imported by {extra}"
        else:  # a library DESIGN does not name: one module owns it
            assert len(extra) <= 1, f"{lib} is imported by {extra}"


def test_direction_of_imports() -> None:
    for module, rank in RANK.items():
        _, local = imports(module)
        wrong = {
            dep
            for dep in local - {module}
            if RANK.get(dep, -1) <= rank and (module, dep) not in DEVIATIONS
        }
        assert not wrong, f"{module} imports {wrong} (DESIGN: only layers below it)"


def test_deviations_are_still_needed() -> None:
    """An edge removed from the code leaves the list too."""
    for module, dep in DEVIATIONS:
        third, local = imports(module)
        assert dep in third | local, f"{module} no longer imports {dep}: drop the deviation"


def test_no_import_cycles() -> None:
    """Module-level imports of the project (packages as one node) form no cycle."""
    graph = {m: imports(m)[1] - {m} for m in RANK}
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


def test_no_module_over_330_lines() -> None:
    """Issue 19: a module reads in one sitting; the settings table is the exception."""
    long = {
        str(path.relative_to(SRC)): n
        for path in SRC.rglob("*.py")
        if path.name != "config.py" and (n := len(path.read_text().splitlines())) > 330
    }
    assert not long, long
