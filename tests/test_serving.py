"""The request path end to end: real HTTP to the real app, responses decoded with pyvips."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path

import pytest
import pyvips

from conftest import MAGIC, Server, metric_total, photo

CACHE_CONTROL = "public, max-age=31536000, no-transform"


def dims(body: bytes) -> tuple[int, int]:
    im = pyvips.Image.new_from_buffer(body, "")
    return im.width, im.height


# -- passthrough -------------------------------------------------------------------------


def test_passthrough_returns_the_exact_bytes(server: Server, corpus: Path) -> None:
    r = server.get("/landscape.jpg")
    assert r.status == 200
    assert r.body == (corpus / "landscape.jpg").read_bytes()
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["content-length"] == str(len(r.body))
    assert r.headers["vary"] == "Sec-CH-DPR"
    assert r.headers["cache-control"] == CACHE_CONTROL
    assert r.headers["etag"].startswith('"')
    assert "last-modified" in r.headers
    assert "x-cache" not in r.headers


@pytest.mark.parametrize(
    ("name", "ctype"),
    [
        ("alpha.png", "image/png"),
        ("photo.webp", "image/webp"),
        ("photo.avif", "image/avif"),
        ("photos/sample.jpg", "image/jpeg"),
    ],
)
def test_passthrough_content_type_is_sniffed(
    server: Server, corpus: Path, name: str, ctype: str
) -> None:
    r = server.get(f"/{name}")
    assert r.status == 200
    assert r.headers["content-type"] == ctype
    assert r.body == (corpus / name).read_bytes()


def test_passthrough_ignores_unknown_params_and_dpr_header(server: Server, corpus: Path) -> None:
    original = (corpus / "landscape.jpg").read_bytes()
    assert server.get("/landscape.jpg?v=3&utm_source=x").body == original
    assert server.get("/landscape.jpg", headers={"Sec-CH-DPR": "2"}).body == original


def test_passthrough_of_a_png_named_jpg_uses_the_real_type(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    root = tmp_path / "r"
    root.mkdir()
    photo(20, 10).pngsave(str(root / "liar.jpg"))
    r = serve(root).get("/liar.jpg")
    assert r.status == 200 and r.headers["content-type"] == "image/png"


def test_head_has_headers_and_no_body(server: Server, corpus: Path) -> None:
    r = server.request("HEAD", "/landscape.jpg")
    assert r.status == 200 and r.body == b""
    assert r.headers["content-length"] == str((corpus / "landscape.jpg").stat().st_size)
    assert r.headers["content-type"] == "image/jpeg"
    t = server.request("HEAD", "/landscape.jpg?size=100&format=png")
    full = server.get("/landscape.jpg?size=100&format=png")
    assert t.status == 200 and t.body == b""
    assert t.headers["content-length"] == str(len(full.body))
    assert t.headers["content-type"] == "image/png"


def test_cache_control_can_be_disabled(serve: Callable[..., Server]) -> None:
    s = serve(IMAGE_PROXY_CACHE_CONTROL_HEADER="")
    assert "cache-control" not in s.get("/landscape.jpg").headers
    assert "cache-control" not in s.get("/landscape.jpg?size=10").headers
    custom = serve(IMAGE_PROXY_CACHE_CONTROL_HEADER="public, max-age=60")
    assert custom.get("/landscape.jpg").headers["cache-control"] == "public, max-age=60"


# -- transforms --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "size", "fmt"),
    [
        ("size=400", (400, 300), "jpeg"),
        ("size=400&format=webp", (400, 300), "webp"),
        ("size=400&format=avif", (400, 300), "avif"),
        ("size=400&format=png", (400, 300), "png"),
        ("size=400&format=jpg", (400, 300), "jpeg"),
        ("size=400&format=JPEG", (400, 300), "jpeg"),
        ("format=webp", (1200, 900), "webp"),
        ("size=5000", (1200, 900), "jpeg"),  # never upscale
        ("size=1200", (1200, 900), "jpeg"),
        ("size=101&dpr=2.5", (253, 190), "jpeg"),
        ("size=400&dpr=2", (800, 600), "jpeg"),
        ("dpr=2", (1200, 900), "jpeg"),  # dpr without size: same dimensions
        ("size=1", (1, 1), "jpeg"),
        ("size=400&resize_algorithm=lanczos3", (400, 300), "jpeg"),
        ("size=400&resize_algorithm=thumbnail", (400, 300), "jpeg"),
        ("size=400&resize_algorithm=bicubic", (400, 300), "jpeg"),
        ("size=1100&resize_algorithm=auto", (1100, 825), "jpeg"),
        ("resize_algorithm=lanczos3", (1200, 900), "jpeg"),
    ],
)
def test_landscape_transforms(server: Server, query: str, size: tuple[int, int], fmt: str) -> None:
    r = server.get(f"/landscape.jpg?{query}")
    assert r.status == 200, r.text
    assert MAGIC[fmt](r.body), r.body[:16]
    assert r.headers["content-type"] == f"image/{fmt}"
    assert r.headers["content-length"] == str(len(r.body))
    assert r.headers["vary"] == "Sec-CH-DPR"
    assert r.headers["cache-control"] == CACHE_CONTROL
    assert dims(r.body) == size


@pytest.mark.parametrize("algorithm", ["thumbnail", "lanczos3", "bicubic", "auto"])
def test_portrait_and_algorithms_agree(server: Server, algorithm: str) -> None:
    r = server.get(f"/portrait.jpg?size=300&resize_algorithm={algorithm}&format=png")
    assert dims(r.body) == (200, 300)


def test_sec_ch_dpr_header(server: Server) -> None:
    assert dims(server.get("/landscape.jpg?size=200", headers={"Sec-CH-DPR": "2"}).body) == (
        400,
        300,
    )
    r = server.get("/landscape.jpg?size=200&dpr=3", headers={"Sec-CH-DPR": "2"})
    assert dims(r.body) == (600, 450)
    assert dims(server.get("/landscape.jpg?size=200", headers={"Sec-CH-DPR": "junk"}).body) == (
        200,
        150,
    )


def test_tiny_images(server: Server) -> None:
    for name in ("one.png", "one.jpg"):
        for q in ("size=1", "size=400", "format=webp&size=10", "format=avif"):
            r = server.get(f"/{name}?{q}")
            assert r.status == 200, (name, q, r.text)
            assert dims(r.body) == (1, 1)


def test_short_edge_never_below_one_pixel(server: Server) -> None:
    r = server.get("/small.jpg?size=1&format=png")  # 101x50 -> 1x1 (0.495 -> at least 1)
    assert dims(r.body) == (1, 1)
    r = server.get("/small.jpg?size=3&format=png")  # 50*3/101 = 1.49 -> 1
    assert dims(r.body) == (3, 1)


def test_6000x4000_to_400(server: Server) -> None:
    r = server.get("/huge.jpg?size=400&format=webp")
    assert r.status == 200 and dims(r.body) == (400, 267)


def test_exif_rotation_is_applied_and_stripped(server: Server) -> None:
    r = server.get("/rotated.jpg?size=400")
    im = pyvips.Image.new_from_buffer(r.body, "")
    assert (im.width, im.height) == (300, 400)  # stored landscape, displayed portrait
    assert not im.get_typeof("exif-data")
    assert not im.get_typeof("orientation") or im.get("orientation") == 1
    r = server.get("/rotated.jpg?format=png")
    assert dims(r.body) == (900, 1200)
    r = server.get("/rotated.jpg?size=400&resize_algorithm=lanczos3")
    assert dims(r.body) == (300, 400)


def test_metadata_is_stripped(serve: Callable[..., Server], tmp_path: Path) -> None:
    root = tmp_path / "meta"
    root.mkdir()
    im = photo(300, 200).copy()
    im.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Artist", "Somebody")
    im.jpegsave(str(root / "m.jpg"))
    assert pyvips.Image.new_from_file(str(root / "m.jpg")).get_typeof("exif-data")
    server = serve(root)
    for fmt in ("jpeg", "webp", "png", "avif"):
        out = pyvips.Image.new_from_buffer(server.get(f"/m.jpg?size=100&format={fmt}").body, "")
        assert not out.get_typeof("exif-data"), fmt
        assert not out.get_typeof("xmp-data"), fmt


def test_alpha_flattened_onto_white_for_jpeg(server: Server) -> None:
    r = server.get("/alpha.png?format=jpeg")
    im = pyvips.Image.new_from_buffer(r.body, "")
    assert im.bands == 3 and (im.width, im.height) == (300, 200)
    # the left edge is fully transparent in the source: it must come out white, not black
    left = im.crop(0, 0, 2, 200).avg()
    assert left > 240


@pytest.mark.parametrize("fmt", ["png", "webp", "avif"])
def test_alpha_kept_for_png_webp_avif(server: Server, fmt: str) -> None:
    r = server.get(f"/alpha.png?size=150&format={fmt}")
    im = pyvips.Image.new_from_buffer(r.body, "")
    assert im.hasalpha() and (im.width, im.height) == (150, 100)


def test_webp_and_avif_sources(server: Server) -> None:
    assert dims(server.get("/photo.webp?size=200&format=jpeg").body) == (200, 150)
    assert dims(server.get("/photo.avif?size=160&format=png").body) == (160, 120)
    assert MAGIC["webp"](server.get("/photo.webp?size=200").body)  # keeps its own format
    assert MAGIC["avif"](server.get("/photo.avif?size=100").body)


def test_animation_gives_first_frame(serve: Callable[..., Server], tmp_path: Path) -> None:
    root = tmp_path / "anim"
    root.mkdir()
    frames = [photo(60, 40) for _ in range(3)]
    strip = pyvips.Image.arrayjoin(frames, across=1).copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", 40)
    strip.webpsave(str(root / "anim.webp"))
    assert pyvips.Image.new_from_file(str(root / "anim.webp")).get("n-pages") == 3
    server = serve(root)
    for fmt in ("png", "jpeg", "webp"):
        out = pyvips.Image.new_from_buffer(server.get(f"/anim.webp?format={fmt}").body, "")
        assert (out.width, out.height) == (60, 40), fmt
        assert not out.get_typeof("n-pages") or out.get("n-pages") == 1


def test_srgb_output_from_grey_and_cmyk(serve: Callable[..., Server], tmp_path: Path) -> None:
    root = tmp_path / "colour"
    root.mkdir()
    photo(80, 60)[0].copy(interpretation="b-w").jpegsave(str(root / "grey.jpg"))
    photo(80, 60).colourspace("cmyk").jpegsave(str(root / "cmyk.jpg"))
    server = serve(root)
    for name in ("grey.jpg", "cmyk.jpg"):
        out = pyvips.Image.new_from_buffer(server.get(f"/{name}?size=40&format=png").body, "")
        assert out.interpretation == "srgb" and out.bands == 3, name


# -- conditional requests ----------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "?size=100&format=webp"])
def test_etag_and_if_none_match(server: Server, query: str) -> None:
    first = server.get(f"/landscape.jpg{query}")
    etag = first.headers["etag"]
    again = server.get(f"/landscape.jpg{query}", headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    assert again.headers["etag"] == etag
    assert again.headers["vary"] == "Sec-CH-DPR"
    assert server.get(f"/landscape.jpg{query}", headers={"If-None-Match": '"other"'}).status == 200
    assert (
        server.get(f"/landscape.jpg{query}", headers={"If-None-Match": f'"x", W/{etag}'}).status
        == 304
    )


def test_etag_differs_per_transform_and_dpr(server: Server) -> None:
    a = server.get("/landscape.jpg?size=100").headers["etag"]
    b = server.get("/landscape.jpg?size=100", headers={"Sec-CH-DPR": "2"}).headers["etag"]
    c = server.get("/landscape.jpg").headers["etag"]
    assert len({a, b, c}) == 3


def test_if_modified_since(server: Server, corpus: Path) -> None:
    mtime = (corpus / "landscape.jpg").stat().st_mtime
    later = formatdate(mtime + 10, usegmt=True)
    earlier = formatdate(mtime - 3600, usegmt=True)
    assert server.get("/landscape.jpg", headers={"If-Modified-Since": later}).status == 304
    assert server.get("/landscape.jpg", headers={"If-Modified-Since": earlier}).status == 200
    assert server.get("/landscape.jpg", headers={"If-Modified-Since": "garbage"}).status == 200


# -- routes ------------------------------------------------------------------------------


def test_health_and_metrics(server: Server) -> None:
    r = server.get("/health")
    assert r.status == 200 and r.text == "ok"
    server.get("/landscape.jpg?size=50")
    m = server.get("/metrics")
    assert m.status == 200 and m.headers["content-type"].startswith("text/plain")
    assert 'image_requests_total{format="jpg",status="ok"}' in m.text  # the extension, as asked
    assert 'image_pipeline_step_duration_seconds_bucket{le="+Inf",step="decode"}' in m.text


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("/landscape.jpg?size=50", "jpg"),
        ("/landscape.jpg?format=JPG", "jpg"),
        ("/landscape.jpg?format=jpeg", "jpeg"),
        ("/landscape.jpg?format=WebP", "webp"),
        ("/alpha.png", "png"),
        ("/missing.JPG", "jpg"),
        ("/noextension", "unknown"),
        ("/notes.txt", "txt"),
        ("/photo.GIF", "gif"),
        ("/landscape.jpg?format=bogus", "bogus"),
        ("/landscape.jpg?format=" + "x" * 11, "other"),
        ("/a.ph%20p", "other"),
    ],
    ids=lambda v: v,
)
def test_requests_metric_format_label_is_the_originals(
    server: Server, url: str, label: str
) -> None:
    before = metric_total(server.get("/metrics").text, "image_requests_total", format=label)
    server.get(url)
    after = metric_total(server.get("/metrics").text, "image_requests_total", format=label)
    assert after == before + 1


def test_health_and_metrics_win_over_files(serve: Callable[..., Server], tmp_path: Path) -> None:
    root = tmp_path / "shadow"
    root.mkdir()
    (root / "health").write_text("nope")
    (root / "metrics").write_text("nope")
    s = serve(root)
    assert s.get("/health").text == "ok"
    assert "image_requests_total" in s.get("/metrics").text or s.get("/metrics").status == 200


def test_strip_path(serve: Callable[..., Server], corpus: Path) -> None:
    s = serve(IMAGE_PROXY_STRIP_PATH="static/image/")
    original = (corpus / "photos" / "sample.jpg").read_bytes()
    assert s.get("/static/image/photos/sample.jpg").body == original
    assert dims(s.get("/static/image/photos/sample.jpg?size=64").body) == (64, 48)
    assert s.get("/photos/sample.jpg").status == 200  # without the prefix: served as is
    assert s.raw("/static/image/../../etc/passwd.jpg").status == 404


def test_server_survives_a_burst_of_bad_requests(server: Server) -> None:
    bad = [
        "/truncated.jpg?size=100",
        "/text.jpg?size=100",
        "/bomb.png?size=10",
        "/gif-named.png?size=10",
        "/nope.jpg",
        "/landscape.jpg?size=abc",
        "/../x.jpg",
        "/empty.jpg?size=10",
        "/empty.jpg",
    ]
    statuses = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for path, r in zip(bad * 4, pool.map(lambda p: server.raw(p), bad * 4), strict=True):
            statuses[path] = r.status
            assert r.status < 500, (path, r.status, r.body)
    assert server.get("/health").status == 200
    assert dims(server.get("/landscape.jpg?size=40").body) == (40, 30)


def test_passthrough_memo_sees_a_rewritten_file(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    root = tmp_path / "rw"
    root.mkdir()
    photo(30, 20).pngsave(str(root / "x.png"))
    s = serve(root)
    first = s.get("/x.png")
    assert first.body == (root / "x.png").read_bytes()
    photo(60, 40).jpegsave(str(root / "x.png"))  # same name, now a JPEG of another size
    second = s.get("/x.png")
    assert second.body == (root / "x.png").read_bytes()
    assert second.headers["content-type"] == "image/jpeg"
    assert second.headers["etag"] != first.headers["etag"]
    (root / "x.png").unlink()
    assert s.get("/x.png").status == 404
