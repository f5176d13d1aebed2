"""`.env.template` is generated from `VARS` (build/gen_env_template.py): it must not drift, and
every value it shows must be a valid configuration."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from imgproxy.config import VARS, Settings

ROOT = Path(__file__).resolve().parent.parent


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_env_template", ROOT / "build" / "gen_env_template.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entries(text: str) -> dict[str, str]:
    """The `# VAR=value` lines, with compose's quote handling."""
    found = {}
    for m in re.finditer(r"^# (IMAGE_PROXY_[A-Z_]+)=(.*)$", text, re.MULTILINE):
        value = m.group(2)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        found[m.group(1)] = value
    return found


def test_template_is_up_to_date() -> None:
    assert (ROOT / ".env.template").read_text() == generator().render(), (
        "run: .venv/bin/python build/gen_env_template.py"
    )


def test_every_variable_once_and_nothing_active() -> None:
    text = (ROOT / ".env.template").read_text()
    assert list(entries(text)) == [v.env for v in VARS]
    active = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert active == [], "an untouched .env must not override the image's settings"


def test_uncommenting_every_line_is_a_valid_config(tmp_path: Path) -> None:
    env = entries((ROOT / ".env.template").read_text())
    env["IMAGE_PROXY_ROOT_PATH"] = str(tmp_path)  # /app/data exists in the container only
    settings = Settings.from_env(env)
    assert settings.server.workers >= 1 and settings.limits.transform_threads >= 1  # empty = CPUs
    assert settings.images.cache_control == "public, max-age=31536000, no-transform"
    assert settings.cache.disk_path == "/var/cache/imgproxy"
