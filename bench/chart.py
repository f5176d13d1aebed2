"""Draw a benchmark report as a PNG: req/s and p99 per workload, ours beside the peers and
the in-process floors (raw pyvips, no HTTP).

    .venv/bin/pip install -e '.[bench]'                  # matplotlib (or: make bench-chart)
    .venv/bin/python bench/chart.py                      # bench/RESULTS-peers.md -> .png
    .venv/bin/python bench/chart.py REPORT.md -o out.png
    .venv/bin/python bench/chart.py /path/to/results-dir  # the shared harness's output dir
                                                          # (results.jsonl + raw*.json)

The markdown report is the one `../shared/bench/report.py` writes (tables "Detail" and
"Raw limit"); a results directory is read directly (median over rounds). Bars: servers;
horizontal ticks over the req/s bars: the raw pyvips floors for the same transform (libvips
thumbnail, and the fast max-shrink-on-load). req/s is on a log scale: passthrough is ~100×
a 12 MP render.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_REPORT = os.path.join(HERE, "RESULTS-peers.md")
WORKLOADS = ("W1", "W2", "W3", "W4", "W5")
LABELS = {
    "W1": "W1 passthrough\n1200 px",
    "W2": "W2 12 MP→400\nJPEG",
    "W3": "W3 12 MP→400\nWebP",
    "W4": "W4 12 MP→400\nAVIF",
    "W5": "W5 1200→400\nWebP",
    "W6": "W6 one URL\n(cache path)",
}
OURS = "ours"
COLOURS = {
    "nginx": "#9e9e9e",
    "sanic-floor": "#bab0ac",
    "thumbor": "#4e79a7",
    "thumbor-fork": "#a0cbe8",
    "ipx": "#f28e2b",
    OURS: "#e15759",
}
FLOOR_STYLES = {"thumbnail": ("k", "-"), "fast": ("k", ":")}


@dataclass
class Results:
    rps: dict[tuple[str, str], float] = field(default_factory=dict)  # (server, wl) -> req/s
    p99: dict[tuple[str, str], float] = field(default_factory=dict)  # (server, wl) -> ms
    floors: dict[tuple[str, str], float] = field(default_factory=dict)  # (mode, wl) -> img/s
    servers: list[str] = field(default_factory=list)
    title: str = ""


def _num(cell: str) -> float | None:
    cell = cell.strip().rstrip("!").replace(",", "")
    try:
        return float(cell)
    except ValueError:
        return None


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in `text` as (header cells, rows of cells)."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            tables.append((block[0], [r for r in block[2:] if len(r) == len(block[0])]))
        block = []
    return tables


def parse_report(text: str) -> Results:
    res = Results()
    for line in text.splitlines():
        if line.startswith("Run: "):
            res.title = line.removeprefix("Run: ").split(" · ")[0]
            break
    for header, rows in _tables(text):
        if header[:3] == ["wl", "server", "req/s"]:
            col = {name: i for i, name in enumerate(header)}
            for r in rows:
                wl, server = r[0], r[1]
                rps, p99 = _num(r[col["req/s"]]), _num(r[col["p99 ms"]])
                if rps is None:
                    continue
                if server not in res.servers:
                    res.servers.append(server)
                res.rps[server, wl] = rps
                if p99 is not None:
                    res.p99[server, wl] = p99
        elif header[:1] == ["workload"] and "mode" in header:
            col = {name: i for i, name in enumerate(header)}
            ips = next(i for name, i in col.items() if name.startswith("img/s"))
            for r in rows:
                value = _num(r[ips])
                if value is not None:
                    res.floors[r[col["mode"]], r[0].removesuffix("-fast")] = value
    if not res.rps:
        raise ValueError("no 'Detail (server × workload)' table (| wl | server | req/s | ...)")
    return res


def load_results_dir(path: str) -> Results:
    """The shared harness's output directory: results.jsonl (one row per server, workload
    and round) and raw*.json (the in-process floors)."""
    res = Results(title=os.path.basename(os.path.normpath(path)))
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    with open(os.path.join(path, "results.jsonl")) as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                if r["server"] not in res.servers:
                    res.servers.append(r["server"])
                if "rps" in r:
                    rows.setdefault((r["server"], r["workload"]), []).append(r)
    for key, rs in rows.items():
        res.rps[key] = statistics.median(r["rps"] for r in rs)
        res.p99[key] = statistics.median(r["p99_ms"] for r in rs)
    floors: dict[tuple[str, str], list[float]] = {}
    for fn in sorted(glob.glob(os.path.join(path, "raw*.json"))):
        with open(fn) as fh:
            raw = json.load(fh)
        for name, r in raw.get("results", {}).items():
            if name.startswith("W"):
                mode = "fast" if name.endswith("-fast") else "thumbnail"
                floors.setdefault((mode, name.removesuffix("-fast")), []).append(r["images_per_s"])
    res.floors = {k: statistics.median(v) for k, v in floors.items()}
    return res


def _short(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def draw(res: Results, out: str, workloads: tuple[str, ...] = WORKLOADS) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write a file
    import matplotlib.pyplot as plt

    servers = [s for s in res.servers if any((s, w) in res.rps for w in workloads)]
    wls = [w for w in workloads if any((s, w) in res.rps for s in servers)]
    fig, (ax_rps, ax_p99) = plt.subplots(2, 1, figsize=(11, 8.5), sharex=True)
    width = 0.8 / max(1, len(servers))
    for i, server in enumerate(servers):
        xs = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(wls))]
        colour = COLOURS.get(server, f"C{i}")
        edge = "black" if server == OURS else "none"
        for ax, data in ((ax_rps, res.rps), (ax_p99, res.p99)):
            pts = [
                (x, data[server, w]) for x, w in zip(xs, wls, strict=True) if (server, w) in data
            ]
            if not pts:
                continue
            bars = ax.bar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                width * 0.92,
                label=server,
                color=colour,
                edgecolor=edge,
                linewidth=1.2,
                zorder=2,
            )
            ax.bar_label(bars, [_short(p[1]) for p in pts], fontsize=7, padding=1)
    for mode, (colour, style) in FLOOR_STYLES.items():
        label = (
            "raw pyvips floor (libvips thumbnail)"
            if mode == "thumbnail"
            else "raw pyvips floor (max shrink-on-load)"
        )
        for j, w in enumerate(wls):
            if (mode, w) in res.floors:
                ax_rps.hlines(
                    res.floors[mode, w],
                    j - 0.45,
                    j + 0.45,
                    colors=colour,
                    linestyles=style,
                    linewidth=1.5,
                    label=label,
                    zorder=3,
                )
                label = "_nolegend_"
    ax_rps.set_yscale("log")
    ax_rps.set_ylabel("req/s (log scale, higher is better)")
    ax_rps.set_title(
        f"imgproxy beside peers and the in-process floor{' · ' + res.title if res.title else ''}"
    )
    ax_rps.legend(fontsize=8, ncols=3, loc="upper right")
    ax_p99.set_yscale("log")
    ax_p99.set_ylabel("p99 latency, ms (log scale, lower is better)")
    ticks = [LABELS.get(w, w) for w in wls]
    if "W1" in wls and any((s, "W1") in res.rps for s in ("thumbor", "ipx")):
        ticks[wls.index("W1")] += "\n(thumbor, ipx: no passthrough,\ndecode + re-encode)"
    ax_p99.set_xticks(range(len(wls)), ticks)
    for ax in (ax_rps, ax_p99):
        ax.grid(axis="y", which="major", alpha=0.3)
    fig.text(
        0.01,
        0.005,
        "2 shared vCPUs, wrk on the same cores, 8 connections; compare within one run. "
        "Method and caveats: bench/RESULTS-peers.md.",
        fontsize=7,
        color="dimgray",
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("source", nargs="?", default=DEFAULT_REPORT, help="report .md or results dir")
    ap.add_argument("-o", "--out", help="PNG path (default: next to the source, .png)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list (default W1-W5)")
    a = ap.parse_args(argv)
    if os.path.isdir(a.source):
        res = load_results_dir(a.source)
        out = a.out or os.path.join(a.source, "results.png")
    else:
        with open(a.source) as fh:
            res = parse_report(fh.read())
        out = a.out or os.path.splitext(a.source)[0] + ".png"
    draw(res, out, tuple(w.strip() for w in a.workloads.split(",") if w.strip()))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
