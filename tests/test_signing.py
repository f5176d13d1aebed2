"""Signed URLs (SPEC "Signed URLs and a bounded size set"): the signed string, `sig` checks,
key rotation and the 403s, end to end against the real server; `imgproxy sign`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import pyvips

from conftest import Resp, Server, make_settings, subprocess_server
from imgproxy import signing
from imgproxy.config import ConfigError

K1 = "first-key-0123456789-abcdefghijklmnop"  # >= 32 characters
K2 = "second-key-0123456789-abcdefghijklmnop"
K3 = "wrong-key-0123456789-abcdefghijklmnopq"
KEYS = f"{K1},{K2}"


def verify(keys: list[str], raw_path: str, raw_query: str, strip_path: str = "") -> bool:
    """True when the request (raw path as sent, raw query string) is validly signed."""
    return signing.refusal(keys, signing.strip_prefix(raw_path, strip_path), raw_query) is None


def reference_sig(key: str, message: str) -> str:
    """The contract, written out independently of the module under test."""
    digest = hmac.new(key.encode(), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def signed(target: str, key: str = K1, message: str | None = None) -> str:
    """`target` with `sig` of `message` (by default: `target` as the contract signs it)."""
    path, _, query = target.partition("?")
    sig = reference_sig(key, message if message is not None else signing.signed_string(path, query))
    return f"{target}{'&' if query else '?'}sig={sig}"


def assert_refused(r: Resp) -> None:
    assert r.status == 403, (r.status, r.text)
    assert r.headers["content-type"].startswith("text/plain")
    assert "cache-control" not in r.headers
    assert "\n" not in r.text.strip()
    assert r.text.strip()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The corpus plus a file whose name needs percent-encoding."""
    root = tmp_path_factory.mktemp("signing") / "images"
    shutil.copytree(corpus, root)
    shutil.copy(corpus / "landscape.jpg", root / "café.jpg")
    return root


@pytest.fixture
def signed_server(serve: Callable[..., Server], root: Path) -> Server:
    return serve(root, IMAGE_PROXY_SIGNATURE_KEYS=KEYS)


# -- the signed string -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/a.jpg", "", "/a.jpg"),
        ("/a.jpg", "v=3&utm_source=x", "/a.jpg"),
        ("/a.jpg", "size=400", "/a.jpg?size=400"),
        ("/a.jpg", "size=400&format=webp", "/a.jpg?format=webp&size=400"),
        ("/a.jpg", "format=webp&size=400", "/a.jpg?format=webp&size=400"),
        (
            "/a.jpg",
            "size=1&resize_algorithm=auto&format=png&dpr=2&bw=1",
            "/a.jpg?bw=1&dpr=2&format=png&resize_algorithm=auto&size=1",
        ),
        ("/a.jpg", "bw=0", "/a.jpg?bw=0"),  # any value: bw=0 is signed too
        ("/a.jpg", "size=400&v=3&sig=x", "/a.jpg?size=400"),
        ("/a.jpg", "format=WEBP&dpr=2.0", "/a.jpg?dpr=2.0&format=WEBP"),  # values as sent
        ("/a.jpg", "format=we%62p", "/a.jpg?format=we%62p"),  # ... not decoded
        ("/a.jpg", "%73ize=400", "/a.jpg?size=400"),  # names as the parser reads them
        ("/a.jpg", "size=2&size=1", "/a.jpg?size=1&size=2"),  # repeats: every one, sorted
        ("/a.jpg", "size", "/a.jpg?size="),
        ("/caf%C3%A9.jpg", "size=9", "/caf%C3%A9.jpg?size=9"),  # the path as sent
    ],
)
def test_signed_string(path: str, query: str, expected: str) -> None:
    assert signing.signed_string(path, query) == expected


def test_sign_matches_the_contract() -> None:
    sig = signing.sign(K1, "/photos/a.jpg?size=400&format=webp&v=3")
    assert sig == reference_sig(K1, "/photos/a.jpg?format=webp&size=400")
    assert len(sig) == 43


def test_sign_url() -> None:
    url = signing.sign_url("/photos/a.jpg?size=400&format=webp", K1)
    sig = reference_sig(K1, "/photos/a.jpg?format=webp&size=400")
    assert url == f"/photos/a.jpg?size=400&format=webp&sig={sig}"
    assert signing.sign_url("/a.jpg", K1) == f"/a.jpg?sig={reference_sig(K1, '/a.jpg')}"
    # re-signing replaces the sig; non-ASCII is encoded as a browser would send it
    assert signing.sign_url(url, K2).endswith(
        reference_sig(K2, signing.signed_string("/photos/a.jpg", "size=400&format=webp"))
    )
    assert signing.sign_url("/café.jpg?size=9", K1).startswith("/caf%C3%A9.jpg?size=9&sig=")
    full = signing.sign_url("https://img.example.com/a.jpg?size=9#x", K1)
    assert (
        full == f"https://img.example.com/a.jpg?size=9&sig={reference_sig(K1, '/a.jpg?size=9')}#x"
    )
    # the strip prefix is not signed
    prefixed = signing.sign_url("/static/image/a.jpg?size=9", K1, "static/image/")
    assert prefixed == f"/static/image/a.jpg?size=9&sig={reference_sig(K1, '/a.jpg?size=9')}"


@pytest.mark.parametrize(
    ("raw", "strip", "expected"),
    [
        ("/static/image/a.jpg", "static/image", "/a.jpg"),
        ("/static/image/x/a.jpg", "static/image", "/x/a.jpg"),
        ("/st%61tic/image/a.jpg", "static/image", "/a.jpg"),  # as the path parser compares
        ("/a.jpg", "static/image", "/a.jpg"),  # no prefix: nothing removed
        ("/static/imagex/a.jpg", "static/image", "/static/imagex/a.jpg"),
        ("/static/image/a.jpg", "", "/static/image/a.jpg"),
        ("/static/image", "static/image", "/"),  # nothing under the prefix: the parser's 404
        ("/static/image/", "static/image", "/"),
        ("static/image/a.jpg", "static/image", "/a.jpg"),
    ],
)
def test_strip_prefix(raw: str, strip: str, expected: str) -> None:
    assert signing.strip_prefix(raw, strip) == expected


# -- the server: one table, every refusal a 403 without Cache-Control ----------------------


def _alphabet_swapped() -> str:
    """A correct signature spelt in the standard base64 alphabet (`+`, `/` for `-`, `_`)."""
    for size in range(10, 500):
        target = f"/landscape.jpg?size={size}"
        sig = signing.sign(K1, target)
        if "-" in sig or "_" in sig:
            return f"{target}&sig={sig.replace('-', '+').replace('_', '/')}"
    raise AssertionError("no signature with - or _")


T = "/landscape.jpg?size=100&format=webp"
SIG = signing.sign(K1, T)
CASES: list[tuple[str, str, int]] = [
    ("right key", signed(T, K1), 200),
    ("second key", signed(T, K2), 200),
    ("wrong key", signed(T, K3), 403),
    ("missing sig", T, 403),
    ("empty sig", f"{T}&sig=", 403),
    ("repeated sig", f"{T}&sig={SIG}&sig={SIG}", 403),
    ("repeated sig, one wrong", f"{T}&sig={SIG}&sig={signing.sign(K3, T)}", 403),
    ("padded sig", f"{T}&sig={SIG}=", 403),
    ("percent-encoded padding", f"{T}&sig={SIG}%3D", 403),
    ("standard alphabet", _alphabet_swapped(), 403),
    ("42 chars", f"{T}&sig={SIG[:42]}", 403),
    ("44 chars", f"{T}&sig={SIG}A", 403),
    ("tampered path", f"/portrait.jpg?size=100&format=webp&sig={SIG}", 403),
    ("tampered size", f"/landscape.jpg?size=101&format=webp&sig={SIG}", 403),
    ("tampered format case", f"/landscape.jpg?size=100&format=WEBP&sig={SIG}", 403),
    ("added transform param", f"{T}&dpr=2&sig={SIG}", 403),
    ("added bw=0", f"{T}&bw=0&sig={SIG}", 403),
    ("added encoded name", f"{T}&%64pr=2&sig={SIG}", 403),
    ("removed param", f"/landscape.jpg?size=100&sig={SIG}", 403),
    ("reordered params", f"/landscape.jpg?format=webp&size=100&sig={SIG}", 200),
    ("sig first", f"/landscape.jpg?sig={SIG}&format=webp&size=100", 200),
    ("unsigned extra params", f"{T}&v=3&utm_source=news&sig={SIG}", 200),
    ("signed with the sig in the string", signed(T, K1, T + "&sig="), 403),
]


@pytest.mark.parametrize(("target", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_signature_table(signed_server: Server, target: str, status: int) -> None:
    r = signed_server.raw(target)
    if status == 403:
        assert_refused(r)
    else:
        assert r.status == 200, r.text
        im = pyvips.Image.new_from_buffer(r.body, "")
        assert (im.width, r.headers["content-type"]) == (100, "image/webp")


def test_percent_encoded_path_is_signed_as_sent(signed_server: Server, root: Path) -> None:
    r = signed_server.raw(signed("/caf%C3%A9.jpg"))
    assert r.status == 200
    assert r.body == (root / "café.jpg").read_bytes()
    r = signed_server.raw(signed("/caf%C3%A9.jpg?size=50"))
    assert (r.status, r.image().width) == (200, 50)
    # signed in another spelling than the one sent: refused
    assert_refused(signed_server.raw(signed("/caf%c3%a9.jpg", message="/caf%C3%A9.jpg")))
    assert_refused(signed_server.raw(signed("/caf%C3%A9.jpg", message="/café.jpg")))


def test_strip_path_prefix_is_not_signed(serve: Callable[..., Server], root: Path) -> None:
    s = serve(root, IMAGE_PROXY_SIGNATURE_KEYS=KEYS, IMAGE_PROXY_STRIP_PATH="static/image/")
    sig = reference_sig(K1, "/landscape.jpg?size=100")
    r = s.raw(f"/static/image/landscape.jpg?size=100&sig={sig}")
    assert (r.status, r.image().width) == (200, 100)
    r = s.raw(f"/landscape.jpg?size=100&sig={sig}")  # the prefix is optional, as without signing
    assert (r.status, r.image().width) == (200, 100)
    with_prefix = reference_sig(K1, "/static/image/landscape.jpg?size=100")
    assert_refused(s.raw(f"/static/image/landscape.jpg?size=100&sig={with_prefix}"))
    # sign_url with the prefix gives the same URL the server accepts
    url = signing.sign_url("/static/image/landscape.jpg?size=100", K2, "static/image/")
    assert s.raw(url).status == 200


def test_passthrough_needs_a_signature(signed_server: Server, root: Path) -> None:
    assert_refused(signed_server.raw("/landscape.jpg"))
    assert_refused(signed_server.raw("/landscape.jpg?v=3"))
    head = signed_server.raw("/landscape.jpg", method="HEAD")
    assert (head.status, head.body, "cache-control" in head.headers) == (403, b"", False)
    r = signed_server.raw(signed("/landscape.jpg"))
    assert r.status == 200
    assert r.body == (root / "landscape.jpg").read_bytes()
    assert r.headers["cache-control"]  # a success keeps its Cache-Control


def test_health_and_metrics_are_exempt(signed_server: Server) -> None:
    assert signed_server.raw("/health").status == 200
    r = signed_server.raw("/metrics")
    assert r.status == 200
    assert "image_requests_total" in r.text


@pytest.mark.parametrize(
    ("target", "signed_status"),
    [
        ("/missing.jpg", 404),
        ("/landscape.jpg?size=abc", 400),
        ("/landscape.jpg?format=gif", 400),
        ("/landscape.jpg?size=1&size=2", 400),
        ("/notes.txt", 415),
        ("/text.jpg", 415),
        ("/%2e%2e/%2e%2e/etc/passwd.jpg", 404),
        ("/photos/../landscape.jpg", 404),
    ],
)
def test_unsigned_requests_learn_nothing(
    signed_server: Server, target: str, signed_status: int
) -> None:
    """Unsigned: every one the same 403 (not 404 vs 400 vs 415); signed: the real answer."""
    r = signed_server.raw(target)
    assert_refused(r)
    assert r.text == signed_server.raw("/landscape.jpg").text
    assert signed_server.raw(signed(target)).status == signed_status


def test_refusals_are_counted(signed_server: Server) -> None:
    signed_server.raw("/landscape.jpg")
    assert signed_server.metric("image_requests_total", status="forbidden") == 1


def test_signing_off_by_default(server: Server) -> None:
    assert server.raw("/landscape.jpg?size=100").status == 200


# -- keys at start and the CLI -------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_PROXY_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra)
    return env


def test_short_key_is_refused_at_start_without_printing_it(corpus: Path) -> None:
    short = "short-secret-value-1234"  # 23 characters
    with pytest.raises(ConfigError) as info:
        make_settings(corpus, IMAGE_PROXY_SIGNATURE_KEYS=f"{K1},{short}")
    assert "IMAGE_PROXY_SIGNATURE_KEYS" in str(info.value)
    assert short not in str(info.value) and K1 not in str(info.value)
    env = _env(
        IMAGE_PROXY_ROOT_PATH=str(corpus),
        IMAGE_PROXY_SIGNATURE_KEYS=f"{K1},{short}",
        IMAGE_PROXY_BIND_ADDRESS="127.0.0.1:1",
    )
    run = subprocess.run(
        [sys.executable, "-m", "imgproxy"], env=env, capture_output=True, text=True, timeout=60
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1
    assert "IMAGE_PROXY_SIGNATURE_KEYS" in out and "#2" in out
    assert short not in out and K1 not in out


def imgproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "imgproxy"  # the console script
    return [str(script)] if script.exists() else [sys.executable, "-m", "imgproxy"]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*imgproxy_command(), *args], env=_env(**env), capture_output=True, text=True, timeout=60
    )


def test_cli_output_is_accepted_by_a_running_server(root: Path) -> None:
    env = {"IMAGE_PROXY_SIGNATURE_KEYS": KEYS, "IMAGE_PROXY_STRIP_PATH": "static/image/"}
    targets = [
        "/landscape.jpg?size=100&format=webp",
        "/static/image/landscape.jpg?format=webp&size=100&v=3",
        "/caf%C3%A9.jpg?size=100&format=webp",
        "/café.jpg?size=100&format=webp",
    ]
    urls = []
    for target in targets:
        run = cli("sign", target, **env)
        assert run.returncode == 0, run.stderr
        url = run.stdout.strip()
        assert url.startswith(target.partition("?")[0].replace("é", "%C3%A9") + "?")
        assert K1 not in run.stdout + run.stderr and K2 not in run.stdout + run.stderr
        path, _, query = url.partition("?")
        assert verify([K1], path, query, "static/image")  # the first key signs
        assert not verify([K2], path, query, "static/image")
        urls.append(url)
    server_env = {"IMAGE_PROXY_ROOT_PATH": str(root), "IMAGE_PROXY_WORKERS": "1", **env}
    with subprocess_server(server_env) as (s, _):
        for url in urls:
            r = s.raw(url)
            assert r.status == 200, (url, r.text)
            assert (r.image().width, r.headers["content-type"]) == (100, "image/webp")
        assert s.raw(targets[0]).status == 403


def test_cli_without_keys_fails_clearly() -> None:
    run = cli("sign", "/a.jpg?size=100")
    assert run.returncode == 1
    assert run.stdout == ""
    assert "IMAGE_PROXY_SIGNATURE_KEYS" in run.stderr
    short = "not-long-enough"
    run = cli("sign", "/a.jpg", IMAGE_PROXY_SIGNATURE_KEYS=short)
    assert run.returncode == 1
    assert "IMAGE_PROXY_SIGNATURE_KEYS" in run.stderr and short not in run.stderr


def test_help_mentions_sign() -> None:
    run = cli("--help")
    assert run.returncode == 0
    assert "imgproxy sign URL" in run.stdout


def test_long_urls_are_checked_like_short_ones() -> None:
    for extra in ("", "&v=" + "x" * 2000):
        url = signing.sign_url(f"/a.jpg?size=9{extra}", K2)
        path, _, query = url.partition("?")
        for _ in range(2):
            assert verify([K1, K2], path, query)
            assert not verify([K1], path, query)
            assert signing.refusal([K1, K2], path, query.replace("size=9", "size=8")) == (
                "signature invalid"
            )


def test_hmac_matches_the_standard_library_for_any_key_length() -> None:
    for key in ("k" * 32, "k" * 64, "k" * 65, "é" * 40, "k" * 200):
        assert signing.sign(key, "/a.jpg?size=1") == reference_sig(key, "/a.jpg?size=1")
