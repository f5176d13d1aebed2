"""bench/chart.py: the peers report's numbers become a PNG of req/s and p99 per workload."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyvips

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import chart  # noqa: E402


def test_the_peers_report_parses() -> None:
    res = chart.parse_report((ROOT / "bench" / "RESULTS-peers.md").read_text())
    # the current run: thumbor (both setups), ipx and the Sanic floor beside ours
    assert {"thumbor", "ipx", "ours"} <= set(res.servers)
    for wl in chart.WORKLOADS:
        assert ("ours", wl) in res.rps and ("ours", wl) in res.p99, wl
    for wl in ("W2", "W3", "W4", "W5"):
        assert ("thumbnail", wl) in res.floors and ("fast", wl) in res.floors, wl
        assert ("thumbor", wl) in res.rps, wl


def test_chart_from_a_report_and_from_a_results_dir(tmp_path: Path) -> None:
    report = """Run: 2026-01-01 · machine: x

| wl | server | req/s | range | p50 ms | p99 ms | errors |
|---|---|---:|---|---:|---:|---:|
| W1 | ours | 7193 |  | 1.0 | 3.9 | 0 |
| W2 | ours | 56.5! |  | 137 | 276 | 0 |
| W2 | thumbor | 57.3 |  | 131 | 168 | 0 |

| workload | source | format | mode | img/s (2 cores) | range |
|---|---|---|---|---:|---|
| W2 | 4000x3000 | jpeg | thumbnail | 52.1 |  |
| W2-fast | 4000x3000 | jpeg | fast | 63.0 |  |
"""
    res = chart.parse_report(report)
    assert res.rps == {("ours", "W1"): 7193, ("ours", "W2"): 56.5, ("thumbor", "W2"): 57.3}
    assert res.p99["ours", "W2"] == 276
    assert res.floors == {("thumbnail", "W2"): 52.1, ("fast", "W2"): 63.0}
    assert res.title == "2026-01-01"
    md = tmp_path / "REPORT.md"
    md.write_text(report)
    assert chart.main([str(md)]) == 0
    png = pyvips.Image.new_from_file(str(tmp_path / "REPORT.png"))
    assert png.width > 800 and png.height > 600

    # the shared harness's results directory: median over rounds
    out = tmp_path / "run"
    out.mkdir()
    rows = [
        {"server": "ours", "workload": "W2", "rps": r, "p99_ms": p}
        for r, p in ((50, 200), (60, 300), (70, 250))
    ]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "raw.json").write_text(
        json.dumps({"results": {"W2": {"images_per_s": 52.1}, "W2-fast": {"images_per_s": 63.0}}})
    )
    res = chart.load_results_dir(str(out))
    assert (res.rps, res.p99) == ({("ours", "W2"): 60}, {("ours", "W2"): 250})
    assert res.floors == {("thumbnail", "W2"): 52.1, ("fast", "W2"): 63.0}
    assert chart.main([str(out), "-o", str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_committed_chart_is_linked_from_the_readme() -> None:
    assert (ROOT / "bench" / "RESULTS-peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench/RESULTS-peers.png" in (ROOT / "README.md").read_text()
