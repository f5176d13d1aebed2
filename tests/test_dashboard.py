"""deploy/grafana/imgproxy.json (and deploy/prometheus/alerts.yml): every metric and label
their queries use exists in a real scrape.

A dashboard over metrics that were renamed (or never existed) shows "No data" and nobody
notices until an incident. So: start the real server (`python -m imgproxy`, multiprocess
metrics, as deployed), send the traffic each panel is about (passthrough, transform, cache
hit, 404, a fallback origin on 127.0.0.1, a broken disk cache directory), scrape `/metrics`
and check every name the PromQL uses.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server, photo, subprocess_server
from test_alerts import rule_exprs

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "imgproxy.json"

# PromQL words that are not metric names (functions, aggregations, keywords)
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "histogram_quantile", "clamp_min", "clamp_max", "abs", "time", "vector", "scalar",
    "label_replace", "label_join", "sort", "sort_desc", "round", "absent", "changes", "resets",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time",
}  # fmt: skip
# labels Prometheus attaches at scrape time: never in our exposition
TARGET_LABELS = {"job", "instance"}
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names used by a PromQL expression (strings, matchers, ranges and grouping
    labels removed); any other identifier must be a PromQL word, else it is returned too
    (so a typo like `image_reqests_total` or `imgproxy_requests_total` is caught)."""
    e = _strip_strings(expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", " ", e)
    return {t for t in NAME.findall(e) if t not in PROMQL_WORDS}


def selector_labels(expr: str) -> dict[str, set[str]]:
    """metric name -> label names used in its `{...}` matchers."""
    out: dict[str, set[str]] = {}
    e = _strip_strings(expr)
    for name, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", e):
        out.setdefault(name, set()).update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))
    return out


def grouping_labels(expr: str) -> set[str]:
    e = _strip_strings(expr)
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", e):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    return labels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel (rows included)."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels: list[dict[str, object]]) -> None:
        for p in panels:
            for t in p.get("targets", []):  # type: ignore[attr-defined]
                out.append((str(p["title"]), t["expr"]))
            walk(p.get("panels", []))  # type: ignore[arg-type]

    walk(dash["panels"])
    return out


def scrape_labels(text: str) -> dict[str, set[str]]:
    """sample name -> label names seen on it, from a Prometheus text exposition."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s", line)
        assert m, line
        out.setdefault(m.group(1), set()).update(re.findall(r"(\w+)=\"", m.group(2) or ""))
    return out


# -- the parser itself -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (status) (rate(image_requests_total{job=~"$job"}[5m]))', {"image_requests_total"}),
        (
            'histogram_quantile(0.99, sum by (le, kind) (rate(x_bucket{kind="a b"}[$__rate_interval])))',
            {"x_bucket"},
        ),
        ("sum(rate(a_total[5m])) / sum(rate(b_total[5m])) > 0.05", {"a_total", "b_total"}),
        ('rate(a_total{s=~"by|on"}[1m]) offset 5m', {"a_total"}),
        ("sum without (instance) (imge_requests_total)", {"imge_requests_total"}),
        ("a:b:ratio_rate5m > 1e-3", {"a:b:ratio_rate5m"}),
    ],
    ids=["grouped", "histogram", "ratio", "string-with-keywords", "typo-kept", "recording-rule"],
)
def test_metric_names_parser(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for p in dash["panels"]:
        x, w = p["gridPos"]["x"], p["gridPos"]["w"]
        assert x >= 0 and x + w <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"], (p["title"], t["expr"])
    used = set().union(*(metric_names(e) for _, e in dashboard_queries()))
    # every panel the issue asks for is there
    wanted = {
        "image_requests_total",  # request rate by status
        "image_request_duration_seconds_bucket",  # p50/p95/p99 by kind
        "image_cache_lookups_total",  # hit ratio per tier
        "image_transforms_total",  # renders per second by format
        "image_pipeline_step_duration_seconds_bucket",  # step durations
        "image_transform_queue_depth",
        "image_overload_rejections_total",  # 503s
        "image_fallback_fetches_total",
        "image_response_bytes_total",
        "image_cache_errors_total",
        "image_worker_restarts_total",
    }
    assert wanted <= used, wanted - used


# -- against a real scrape --------------------------------------------------------------


@contextlib.contextmanager
def origin(files: dict[str, bytes]) -> Iterator[str]:
    """A tiny fallback origin on 127.0.0.1: the listed paths, 404 for anything else."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/base/"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.slow
def test_every_dashboard_metric_is_in_a_real_scrape(corpus: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("a disk cache directory that is a file: the tier fails, counted")
    remote = bytes(photo(200, 150).jpegsave_buffer(Q=80))
    with origin({"/base/remote.jpg": remote}) as base:
        env = {
            "IMAGE_PROXY_ROOT_PATH": str(corpus),
            "IMAGE_PROXY_WORKERS": "1",
            "IMAGE_PROXY_ENABLE_CACHE": "true",
            "IMAGE_PROXY_ENABLE_DISK_CACHE": "true",
            "IMAGE_PROXY_CACHE_DISK_PATH": str(not_a_dir),
            "IMAGE_PROXY_FALLBACK_IMAGE_URL": base,
        }
        with subprocess_server(env) as (server, _):
            assert server.get("/landscape.jpg").status == 200  # passthrough
            first = server.get("/landscape.jpg?size=120&format=webp")
            again = server.get("/landscape.jpg?size=120&format=webp")
            assert (first.status, first.headers["x-cache"]) == (200, "MISS")
            assert (again.status, again.headers["x-cache"]) == (200, "HIT")
            assert server.get("/small.jpg?size=40&format=avif").status == 200
            assert server.get("/nowhere.jpg").status == 404  # fallback: not_found
            assert server.get("/remote.jpg?size=50").status == 200  # fallback: ok
            assert server.get("/landscape.jpg?size=0").status == 400
            scrape = server.get("/metrics").text
    rules = rule_exprs()  # alerts.yml too; its recording rules are not scraped, they are made
    seen = scrape_labels(scrape)
    seen.update({name: grouping_labels(expr) for name, expr in rules.items()})
    problems = []
    for title, expr in dashboard_queries() + list(rules.items()):
        for name in sorted(metric_names(expr)):
            if name not in seen:
                problems.append(f"{title}: {name} not in the scrape")
                continue
        for name, labels in selector_labels(expr).items():
            missing = labels - TARGET_LABELS - seen.get(name, set())
            if missing:
                problems.append(f"{title}: {name} has no label {sorted(missing)}")
        on_metrics = set().union(*(seen.get(n, set()) for n in metric_names(expr)))
        missing = grouping_labels(expr) - TARGET_LABELS - on_metrics
        if missing:
            problems.append(f"{title}: grouping by {sorted(missing)}, not a label of its metrics")
    assert not problems, "\n".join(problems)


def test_error_series_exist_at_zero_before_the_first_error(server: Server) -> None:
    """An alert on `increase(image_cache_errors_total[10m]) > 0` misses the first error of a
    series that is born at 1: every tier and fallback outcome starts at 0."""
    seen = {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in server.get("/metrics").text.splitlines()
        if line and not line.startswith("#")
    }
    for tier in ("memory", "disk", "redis"):
        assert seen[f'image_cache_errors_total{{tier="{tier}"}}'] == 0
    for outcome in ("ok", "not_found", "error", "timeout", "not_image"):
        assert seen[f'image_fallback_fetches_total{{outcome="{outcome}"}}'] == 0
