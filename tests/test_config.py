"""Settings.from_env: defaults, ranges, booleans, and one message listing every bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgproxy.__main__ import help_text, main
from imgproxy.config import VARS, ConfigError, Settings, format_named


def env(root: Path, **kw: str) -> dict[str, str]:
    return {"IMAGE_PROXY_ROOT_PATH": str(root), **kw}


def test_defaults_match_the_seed(tmp_path: Path) -> None:
    s = Settings.from_env(env(tmp_path))
    assert s.server.bind == ("0.0.0.0", 8000)
    assert (s.encode.avif_speed, s.encode.avif_quality, s.encode.jpeg_quality) == (6, 85, 75)
    assert (s.encode.webp_quality, s.encode.webp_effort, s.encode.png_compression) == (80, 4, 6)
    assert s.images.resize_algorithm == "auto"
    assert s.cache.enabled is False and s.cache.disk_enabled is False
    assert s.cache.memory_size == 104857600 and s.cache.max_item_size == 1048576
    assert s.cache.disk_size == 536870912 and s.cache.disk_path == "./cache"
    assert s.images.cache_control == "public, max-age=31536000, no-transform"
    assert s.fallback.url == "" and s.fallback.max_size == 5242880
    assert s.images.strip_path == ""
    assert s.server.log_level == "INFO"
    assert s.server.workers >= 1 and s.limits.transform_threads >= 1
    assert s.limits.max_source_pixels == 8192 * 8192


@pytest.mark.parametrize("raw", ["true", "TRUE", "1", "yes", "On", " on "])
def test_booleans_true(tmp_path: Path, raw: str) -> None:
    assert Settings.from_env(env(tmp_path, IMAGE_PROXY_ENABLE_CACHE=raw)).cache.enabled is True


@pytest.mark.parametrize("raw", ["false", "False", "0", "no", "OFF"])
def test_booleans_false(tmp_path: Path, raw: str) -> None:
    assert Settings.from_env(env(tmp_path, IMAGE_PROXY_ENABLE_CACHE=raw)).cache.enabled is False


def test_every_bad_variable_is_listed_at_once(tmp_path: Path) -> None:
    bad = env(
        tmp_path,
        IMAGE_PROXY_JPEG_QUALITY="abc",
        IMAGE_PROXY_AVIF_SPEED="11",
        IMAGE_PROXY_WEBP_EFFORT="-1",
        IMAGE_PROXY_ENABLE_CACHE="maybe",
        IMAGE_PROXY_BIND_ADDRESS="nowhere",
        IMAGE_PROXY_RESIZE_ALGORITHM="cubic",
        IMAGE_PROXY_FALLBACK_IMAGE_URL="ftp://x/",
    )
    with pytest.raises(ConfigError) as info:
        Settings.from_env(bad)
    message = str(info.value)
    for name in (
        "IMAGE_PROXY_JPEG_QUALITY='abc'",
        "IMAGE_PROXY_AVIF_SPEED='11'",
        "IMAGE_PROXY_WEBP_EFFORT='-1'",
        "IMAGE_PROXY_ENABLE_CACHE='maybe'",
        "IMAGE_PROXY_BIND_ADDRESS='nowhere'",
        "IMAGE_PROXY_RESIZE_ALGORITHM='cubic'",
        "IMAGE_PROXY_FALLBACK_IMAGE_URL='ftp://x/'",
    ):
        assert name in message
    assert "allowed 1..10" in message
    assert len(info.value.problems) == 7


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IMAGE_PROXY_ROOT_PATH"):
        Settings.from_env({"IMAGE_PROXY_ROOT_PATH": str(tmp_path / "nope")})


def test_ranges_edges(tmp_path: Path) -> None:
    s = Settings.from_env(
        env(tmp_path, IMAGE_PROXY_AVIF_SPEED="10", IMAGE_PROXY_PNG_COMPRESSION_LEVEL="0")
    )
    assert s.encode.avif_speed == 10 and s.encode.avif_effort == 0
    assert Settings.from_env(env(tmp_path, IMAGE_PROXY_AVIF_SPEED="1")).encode.avif_effort == 8
    assert Settings.from_env(env(tmp_path)).encode.avif_effort == 3  # AV1 speed 6
    with pytest.raises(ConfigError):
        Settings.from_env(env(tmp_path, IMAGE_PROXY_PNG_COMPRESSION_LEVEL="10"))
    with pytest.raises(ConfigError):
        Settings.from_env(env(tmp_path, IMAGE_PROXY_JPEG_QUALITY="1.5"))


def test_bind_address_forms(tmp_path: Path) -> None:
    assert Settings.from_env(env(tmp_path, IMAGE_PROXY_BIND_ADDRESS="[::]:9000")).server.bind == (
        "::",
        9000,
    )
    assert Settings.from_env(env(tmp_path, IMAGE_PROXY_BIND_ADDRESS="127.0.0.1:1")).server.bind == (
        "127.0.0.1",
        1,
    )
    with pytest.raises(ConfigError):
        Settings.from_env(env(tmp_path, IMAGE_PROXY_BIND_ADDRESS="127.0.0.1:70000"))


def test_log_level_and_rust_log(tmp_path: Path) -> None:
    assert Settings.from_env(env(tmp_path, RUST_LOG="debug")).server.log_level == "DEBUG"
    assert (
        Settings.from_env(env(tmp_path, RUST_LOG="image_proxy=warn")).server.log_level == "WARNING"
    )
    both = env(tmp_path, RUST_LOG="debug", IMAGE_PROXY_LOG_LEVEL="ERROR")
    assert Settings.from_env(both).server.log_level == "ERROR"
    with pytest.raises(ConfigError, match=r"IMAGE_PROXY_LOG_LEVEL"):
        Settings.from_env(env(tmp_path, IMAGE_PROXY_LOG_LEVEL="loud"))


def test_empty_cache_control_means_no_header(tmp_path: Path) -> None:
    assert (
        Settings.from_env(env(tmp_path, IMAGE_PROXY_CACHE_CONTROL_HEADER="")).images.cache_control
        == ""
    )


def test_fallback_url_gets_trailing_slash(tmp_path: Path) -> None:
    s = Settings.from_env(env(tmp_path, IMAGE_PROXY_FALLBACK_IMAGE_URL="https://ex.com/images"))
    assert s.fallback.url == "https://ex.com/images/"


def test_strip_path_normalised(tmp_path: Path) -> None:
    s = Settings.from_env(env(tmp_path, IMAGE_PROXY_STRIP_PATH="/static/image/"))
    assert s.images.strip_path == "static/image"


def test_help_lists_every_variable() -> None:
    text = help_text()
    for var in VARS:
        assert var.env in text


def test_cli_check_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGE_PROXY_ROOT_PATH", str(tmp_path))
    assert main(["--check-config"]) == 0
    monkeypatch.setenv("IMAGE_PROXY_JPEG_QUALITY", "high")
    monkeypatch.setenv("IMAGE_PROXY_WORKERS", "0")
    assert main(["--check-config"]) == 1
    err = capsys.readouterr().err
    assert "IMAGE_PROXY_JPEG_QUALITY='high'" in err and "IMAGE_PROXY_WORKERS='0'" in err
    assert main(["--bogus"]) == 2


def test_readme_documents_every_variable() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for var in VARS:
        assert f"| `{var.env}` | `{var.shown_default}` |" in readme, var.env


@pytest.mark.parametrize(
    ("name", "served", "expected"),
    [
        ("jpg", False, "jpeg"),
        ("JPG", True, "jpeg"),  # any case
        ("Jpeg", False, "jpeg"),
        ("webp", True, "webp"),
        ("jxl", False, "jxl"),  # an output format ...
        ("jxl", True, None),  # ... but no file is served as JPEG XL
        ("gif", False, None),  # read (sniffed), never named
        ("", True, None),
        ("jpg ", False, None),
    ],
    ids=lambda v: repr(v),
)
def test_format_named(name: str, served: bool, expected: str | None) -> None:
    """One table and one function name formats for `format=`, the allowed-formats setting
    and file extensions."""
    assert format_named(name, served=served) == expected
