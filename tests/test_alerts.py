"""deploy/prometheus/alerts.yml: valid rules (`promtool check rules`) whose alerts fire when
they should and stay silent when they should not (`promtool test rules alerts_test.yml`).

`make test` installs promtool (Debian package `prometheus`, via build/system-deps.sh). Without
it these tests are skipped on a developer's machine, but fail in CI (`CI` set).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def rule_exprs() -> dict[str, str]:
    """alert or record name -> its PromQL, read from alerts.yml (plain or `|` block scalars;
    no YAML library needed for our own file)."""
    out: dict[str, str] = {}
    name = None
    lines = (RULES / "alerts.yml").read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"\s*- (?:alert|record): (\S+)", line):
            name = m.group(1)
        elif (m := re.match(r"(\s*)expr: ?(.*)", line)) and name:
            indent, text = len(m.group(1)), m.group(2).strip()
            if text in ("|", ">", "|-", ">-"):
                block = []
                while i + 1 < len(lines) and (
                    not lines[i + 1].strip()
                    or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
                ):
                    i += 1
                    block.append(lines[i].strip())
                text = " ".join(b for b in block if b)
            out[name] = text
        i += 1
    return out


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if IN_CI:
            pytest.fail("promtool is missing in CI: build/system-deps.sh should have installed it")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; `make test` does)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=RULES, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_are_valid() -> None:
    r = run("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_alerts_fire_when_they_should() -> None:
    r = run("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_the_issue_asks_for_is_defined_and_unit_tested() -> None:
    exprs = rule_exprs()
    wanted = {
        "ImgproxyHighErrorRatio": "image_requests_total",
        "ImgproxyOverloaded": "image_overload_rejections_total",
        "ImgproxySlowP99": "job_kind:image_request_duration_seconds:p99_rate5m",
        "ImgproxyCacheErrors": "image_cache_errors_total",
        "ImgproxyFallbackFailures": "image_fallback_fetches_total",
        "ImgproxyWorkerRestarts": "image_worker_restarts_total",
    }
    tests = (RULES / "alerts_test.yml").read_text()
    for alert, metric in wanted.items():
        assert alert in exprs, alert
        # the alert's expression with the recording rules it uses spelled out
        expanded = exprs[alert] + "".join(e for n, e in exprs.items() if n in exprs[alert])
        assert metric in expanded, alert
        # each alert has a case where it fires (exp_alerts with labels), not only silent ones
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels", tests), alert
