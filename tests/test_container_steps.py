"""The Dockerfile's runtime steps, outside Docker, on a built .pyz.

    bash build/shiv.sh && IMGPROXY_PYZ=imgproxy.pyz .venv/bin/pytest -m slow tests/test_container_steps.py

Skipped unless IMGPROXY_PYZ names a .pyz (building one takes ~10-40 s; .ci/run passes it).
Like the image: copy the pyz to app/imgproxy.pyz, pre-extract it into SHIV_ROOT with compiled
.pyc (`SHIV_COMPILE_PYC=1 SHIV_INTERPRETER=1 imgproxy.pyz -c "import imgproxy"`), make the
extraction read-only, then run it as an unprivileged user (uid 65534 through setpriv when the
tests run as root) with only /tmp writable, and talk to it over HTTP.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import MAGIC, subprocess_server
from imgproxy.signing import refusal

pytestmark = pytest.mark.slow

IMAGES = Path(__file__).resolve().parent.parent / "data" / "images"
NOBODY = 65534


def interpreter() -> str:
    """The bare system python3 when it is the same CPython minor as this one (like the image's
    interpreter it has no imgproxy dependencies installed), else this interpreter."""
    system = "/usr/bin/python3"
    if os.path.exists(system):
        probe = subprocess.run(
            [system, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if probe.stdout.strip() == str(sys.version_info[:2]):
            return system
    return sys.executable


@pytest.fixture(scope="module")
def pyz() -> Path:
    value = os.environ.get("IMGPROXY_PYZ")
    if not value:
        pytest.skip("IMGPROXY_PYZ not set (build one with build/shiv.sh)")
    path = Path(value).resolve()
    assert path.is_file(), f"IMGPROXY_PYZ={value} does not exist"
    return path


@pytest.fixture(scope="module")
def image(pyz: Path) -> Iterator[Path]:
    """A directory laid out like the runtime image: app/imgproxy.pyz plus shiv/ (SHIV_ROOT)."""
    top = Path(tempfile.mkdtemp(prefix="imgproxy-image-"))
    top.chmod(0o755)  # traversable by the unprivileged user
    (top / "app").mkdir(mode=0o755)
    shutil.copy(pyz, top / "app" / "imgproxy.pyz")  # the file name is part of the extract path
    (top / "tmp").mkdir()
    (top / "tmp").chmod(0o1777)  # the only writable place (a tmpfs in the container)
    try:
        yield top
    finally:
        for p in top.rglob("*"):  # undo the read-only bits so the tree can be removed
            if p.is_dir() and not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
        shutil.rmtree(top, ignore_errors=True)


def run_as_unprivileged() -> list[str]:
    if os.geteuid() == 0 and shutil.which("setpriv"):
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return []


def test_pre_extract_then_serve_read_only(image: Path) -> None:
    py = interpreter()
    pyz = image / "app" / "imgproxy.pyz"
    shiv_root = image / "shiv"
    base_env = {"PATH": "/usr/bin:/bin", "HOME": str(image / "tmp"), "SHIV_ROOT": str(shiv_root)}

    # RUN SHIV_COMPILE_PYC=1 SHIV_INTERPRETER=1 /app/imgproxy.pyz -c "import imgproxy"
    subprocess.run(
        [py, str(pyz), "-c", "import imgproxy"],
        env={**base_env, "SHIV_INTERPRETER": "1", "SHIV_COMPILE_PYC": "1"},
        check=True,
        timeout=300,
    )
    extracted = [p for p in shiv_root.iterdir() if p.is_dir()]
    assert len(extracted) == 1 and extracted[0].name.startswith("imgproxy.pyz_")
    site_packages = extracted[0] / "site-packages"
    assert (site_packages / "imgproxy" / "_build.py").is_file()
    assert list((site_packages / "sanic").glob("__pycache__/*.pyc")), "pyc not pre-compiled"

    # read-only root fs, as far as we can without a container: nothing under SHIV_ROOT or app/
    # is writable (root ignores mode bits, hence the unprivileged user below)
    for p in [image / "app", shiv_root, *shiv_root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~0o222)
    before = sorted(str(p) for p in shiv_root.rglob("*"))

    prefix = run_as_unprivileged()
    env = {
        **base_env,
        "TMPDIR": str(image / "tmp"),
        "PROMETHEUS_MULTIPROC_DIR": str(image / "tmp" / "imgproxy-metrics"),
        "IMAGE_PROXY_ROOT_PATH": str(IMAGES),
        "IMAGE_PROXY_WORKERS": "2",
        "PYTHONUNBUFFERED": "1",
        "MALLOC_ARENA_MAX": "2",
    }
    with subprocess_server(env, cmd=[*prefix, py, str(pyz)], timeout=90) as (server, proc):
        if prefix:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1:] == [str(NOBODY)] * 4
        r = server.get("/health")
        assert r.status == 200 and r.text.strip() == "ok"
        r = server.get("/coffee.jpg?size=64&format=webp")
        assert r.status == 200 and MAGIC["webp"](r.body)
        r = server.get("/metrics")
        assert r.status == 200 and b"image_requests_total" in r.body

    assert sorted(str(p) for p in shiv_root.rglob("*")) == before, "SHIV_ROOT was written to"


def test_not_extracted_and_read_only_fails_loudly(image: Path, pyz: Path) -> None:
    """Without the pre-extraction step a read-only SHIV_ROOT cannot work: it must fail, fast."""
    if not run_as_unprivileged() and os.geteuid() == 0:
        pytest.skip("root ignores permissions and setpriv is missing")
    empty = image / "empty-root"
    empty.mkdir(mode=0o555)
    r = subprocess.run(
        [*run_as_unprivileged(), interpreter(), str(pyz), "--version"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(image / "tmp"), "SHIV_ROOT": str(empty)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "PermissionError" in r.stderr or "Permission denied" in r.stderr


def test_pyz_signs_urls(pyz: Path, tmp_path: Path) -> None:
    """`python imgproxy.pyz sign URL` prints the signed path+query with the first key."""
    first, second = "pyz-first-key-0123456789abcdefghijkl", "pyz-second-key-0123456789abcdefghij"
    r = subprocess.run(
        [interpreter(), str(pyz), "sign", "/coffee.jpg?size=64&format=webp"],
        env={
            "PATH": "/usr/bin:/bin",
            "SHIV_ROOT": str(tmp_path),
            "IMAGE_PROXY_SIGNATURE_KEYS": f"{first},{second}",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    path, _, query = r.stdout.strip().partition("?")
    assert path == "/coffee.jpg" and query.startswith("size=64&format=webp&sig=")
    assert refusal([first], path, query) is None and refusal([second], path, query)
    assert first not in r.stdout + r.stderr
