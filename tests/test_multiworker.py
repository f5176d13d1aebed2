"""`python -m imgproxy` with 2 Sanic workers as a subprocess: the real deployment shape.

Metrics must be the sum over workers whichever one answers the scrape, the disk cache is
shared by the workers and survives a restart, and the service keeps serving."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest
import pyvips

from conftest import Server, metric_total, photo, raw_request, subprocess_server

pytestmark = pytest.mark.slow


def scrape(server: Server) -> str:
    return raw_request(server.port, "/metrics").text


def total(samples: str, name: str, **labels: str) -> float:
    return metric_total(samples, name, **labels)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    photo(800, 600).jpegsave(str(root / "a.jpg"))
    photo(300, 400).pngsave(str(root / "b.png"))
    return root


def base_env(root: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "IMAGE_PROXY_ROOT_PATH": str(root),
        "IMAGE_PROXY_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        **extra,
    }


def test_two_workers_serve_and_sum_metrics(images: Path, tmp_path: Path) -> None:
    with subprocess_server(base_env(images, tmp_path)) as (server, proc):
        n_ok, n_bad = 30, 7
        for i in range(n_ok):  # a new connection per request: the kernel spreads them
            r = raw_request(server.port, f"/a.jpg?size={100 + i}&format=webp")
            assert r.status == 200
            assert pyvips.Image.new_from_buffer(r.body, "").width == 100 + i
        for _ in range(n_bad):
            assert raw_request(server.port, "/missing.jpg").status == 404
        assert raw_request(server.port, "/a.jpg").body == (images / "a.jpg").read_bytes()
        for _ in range(6):  # every scrape, whichever worker answers, sees the whole service
            samples = scrape(server)
            assert total(samples, "image_requests_total") == n_ok + n_bad + 1
            assert total(samples, "image_requests_total", status="ok", format="webp") == n_ok
            assert total(samples, "image_requests_total", status="not_found") == n_bad
            assert total(samples, "image_transforms_total") == n_ok
            assert (
                total(samples, "image_pipeline_step_duration_seconds_count", step="encode") == n_ok
            )
            assert total(samples, "image_requests_in_flight") in (0, 1)
        files = (tmp_path / "prom").glob("counter_*.db")
        pids = {int(p.stem.rsplit("_", 1)[1]) for p in files} - {proc.pid}  # main: restarts
        assert len(pids) == 2, f"both workers should have served requests: {pids}"


def test_shared_disk_cache_and_restart(images: Path, tmp_path: Path) -> None:
    env = base_env(
        images,
        tmp_path,
        IMAGE_PROXY_ENABLE_CACHE="true",
        IMAGE_PROXY_ENABLE_DISK_CACHE="true",
        IMAGE_PROXY_CACHE_DISK_PATH=str(tmp_path / "cache"),
        IMAGE_PROXY_CACHE_MEMORY_SIZE="0",  # only the shared tier: hits prove sharing
    )
    url = "/a.jpg?size=120&format=avif"
    with subprocess_server(env) as (server, _):
        first = raw_request(server.port, url)
        assert first.status == 200 and first.headers["x-cache"] == "MISS"
        for _ in range(100):
            if raw_request(server.port, url).headers["x-cache"] == "HIT":
                break
            time.sleep(0.05)
        hits = [raw_request(server.port, url) for _ in range(10)]
        assert all(h.headers["x-cache"] == "HIT" and h.body == first.body for h in hits)
        samples = scrape(server)
        assert total(samples, "image_transforms_total") == 1  # both workers read one render
        assert total(samples, "image_cache_lookups_total", tier="disk", result="hit") >= 10
    with subprocess_server(env) as (server, _):  # restart: the disk tier survives
        again = raw_request(server.port, url)
        assert again.headers["x-cache"] == "HIT" and again.body == first.body
        assert total(scrape(server), "image_transforms_total") == 0


def test_concurrent_identical_misses_render_once_per_worker(images: Path, tmp_path: Path) -> None:
    env = base_env(images, tmp_path, IMAGE_PROXY_ENABLE_CACHE="true")
    url = "/a.jpg?size=700&format=avif&resize_algorithm=lanczos3"
    with subprocess_server(env) as (server, _):
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(lambda _: raw_request(server.port, url), range(20)))
        assert {r.status for r in responses} == {200}
        assert len({r.body for r in responses}) == 1
        assert 1 <= total(scrape(server), "image_transforms_total") <= 2  # at most one per worker


def test_bad_config_stops_the_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {
        "PATH": "/usr/bin:/bin",
        "IMAGE_PROXY_ROOT_PATH": str(tmp_path / "missing"),
        "IMAGE_PROXY_JPEG_QUALITY": "x",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "imgproxy"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "IMAGE_PROXY_ROOT_PATH" in proc.stderr and "IMAGE_PROXY_JPEG_QUALITY='x'" in proc.stderr
    assert "Traceback" not in proc.stderr
