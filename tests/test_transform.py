"""The image pipeline: its shape, where a libvips failure lands (422 vs 500), GIF sources,
`bw=1`, `bicubic`, WebP lossless, and `sniff.probe`'s header-only facts.

HTTP tests talk to the real server; `sniff.probe` and the pipeline's shape are unit tables
over images made by pyvips.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pyvips

from conftest import MAGIC, Server, photo
from imgproxy import sniff, transform
from imgproxy.config import default_encode_options
from test_errors import check_error

KEEP_NONE = pyvips.enums.ForeignKeep.NONE


def decode(body: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(body, "")


def solid(rgb: list[int], width: int = 16, height: int = 12) -> pyvips.Image:
    image = pyvips.Image.black(width, height, bands=3) + rgb
    return image.cast("uchar").copy(interpretation="srgb")


def max_band_spread(image: pyvips.Image) -> float:
    """Largest |R-G| or |G-B| over all pixels (0 for a grey image)."""
    if image.bands in (1, 2):
        return 0.0
    rgb = image[0:3].cast("int")
    return float(max((rgb[0] - rgb[1]).abs().max(), (rgb[1] - rgb[2]).abs().max()))


# -- shape ---------------------------------------------------------------------------------


def test_render_is_a_visible_list_of_steps() -> None:
    names = [step.name for step in transform.STEPS]
    assert names == [
        "header",
        "load",
        "resize",
        "orient",
        "colour",
        "canvas",
        "bw",
        "flatten",
        "encode",
    ]
    assert {step.phase for step in transform.STEPS} == {"decode", "resize", "encode"}


def test_plan_is_frozen_and_steps_report_three_timings() -> None:
    transform.configure(1)
    data = bytes(photo(120, 90).jpegsave_buffer(Q=85))
    plan = transform.Plan("jpeg", "png", default_encode_options(), 1 << 30, target=40)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.target = 10  # type: ignore[misc]
    rendered = transform.render(data, plan)
    assert (rendered.width, rendered.height, rendered.format) == (40, 30, "png")
    assert set(rendered.steps) == {"decode", "resize", "encode"}
    assert all(seconds >= 0 for seconds in rendered.steps.values())


# -- bug: a server-side libvips failure is a 500, not a 422 ---------------------------------


@pytest.fixture
def errors_root(tmp_path: Path) -> Path:
    root = tmp_path / "errors"
    root.mkdir()
    # 2 Mpx, far under the pixel limit, but wider than WebP's 16383 px maximum
    solid([40, 90, 200], 20000, 100).pngsave(str(root / "wide.png"))
    photo(64, 48).jpegsave(str(root / "ok.jpg"))
    png = bytes(photo(300, 200).pngsave_buffer())
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    gif = bytes(photo(300, 200).gifsave_buffer())
    (root / "truncated-gif.png").write_bytes(gif[: len(gif) // 2])
    return root


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    handler = Records()
    logger = logging.getLogger("imgproxy")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def test_webp_over_16383_px_is_a_500_logged_once(
    serve: Callable[..., Server], errors_root: Path, log_records: list[logging.LogRecord]
) -> None:
    s = serve(errors_root)
    r = s.get("/wide.png?format=webp")
    check_error(r, 500)
    assert r.text == "image could not be rendered"  # short, no libvips internals
    errors = [rec for rec in log_records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1, [rec.getMessage() for rec in errors]
    assert errors[0].exc_info is not None  # the traceback, with the libvips cause chained
    assert "wide.png" in errors[0].getMessage() and "too large" in errors[0].getMessage()
    assert s.metric("image_requests_total", status="error") == 1
    # the same image in a format without that limit is fine
    assert dims(s.get("/wide.png?format=png").body) == (20000, 100)


def test_a_missing_encoder_is_a_500(serve: Callable[..., Server], errors_root: Path) -> None:
    s = serve(errors_root)
    pyvips.operation_block_set("VipsForeignSaveHeif", True)  # as if built without AVIF
    try:
        check_error(s.get("/ok.jpg?format=avif"), 500)
    finally:
        pyvips.operation_block_set("VipsForeignSaveHeif", False)
    assert MAGIC["avif"](s.get("/ok.jpg?format=avif").body)


@pytest.mark.parametrize(
    "target",
    [
        "/truncated.png?format=webp",
        "/truncated.png?size=50&resize_algorithm=thumbnail",  # libvips thumbnail, streamed
        "/truncated.png?size=50&resize_algorithm=bicubic",
        "/truncated-gif.png?size=50",
        "/truncated-gif.png?format=jpeg",
    ],
)
def test_decode_failures_stay_422(
    serve: Callable[..., Server],
    errors_root: Path,
    target: str,
    log_records: list[logging.LogRecord],
) -> None:
    check_error(serve(errors_root).get(target), 422)
    assert not [rec for rec in log_records if rec.levelno >= logging.ERROR]


# -- bug: a GIF under an allowed name is decoded by its bytes --------------------------------


def dims(body: bytes) -> tuple[int, int]:
    image = decode(body)
    return image.width, image.height


@pytest.fixture
def gif_root(tmp_path: Path) -> Path:
    root = tmp_path / "gif"
    root.mkdir()
    photo(40, 30).gifsave(str(root / "gif_disguised.png"))
    photo(40, 30).gifsave(str(root / "gif_disguised.jpg"))
    frames = [solid([255, 0, 0], 60, 40), solid([0, 0, 255], 60, 40)]
    strip = pyvips.Image.arrayjoin(frames, across=1).copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", 40)
    strip.gifsave(str(root / "anim.webp"))
    return root


def test_gif_passthrough_has_the_sniffed_type(server: Server, corpus: Path) -> None:
    r = server.get("/gif-named.png")
    assert r.status == 200
    assert r.headers["content-type"] == "image/gif"
    assert r.body == (corpus / "gif-named.png").read_bytes()


@pytest.mark.parametrize(
    ("target", "fmt", "size"),
    [
        ("/gif_disguised.png?size=20", "png", (20, 15)),  # no format: the name's format
        ("/gif_disguised.png?size=20&resize_algorithm=thumbnail", "png", (20, 15)),
        ("/gif_disguised.png?size=20&resize_algorithm=lanczos3", "png", (20, 15)),
        ("/gif_disguised.jpg?dpr=2", "jpeg", (40, 30)),
        ("/gif_disguised.png?format=webp", "webp", (40, 30)),
        ("/gif_disguised.png?format=avif&size=16", "avif", (16, 12)),
        ("/gif_disguised.png?bw=1", "png", (40, 30)),
        ("/anim.webp?format=png", "png", (60, 40)),  # the first frame only
        ("/anim.webp?size=30", "webp", (30, 20)),
    ],
)
def test_gif_sources_are_transformed(
    serve: Callable[..., Server], gif_root: Path, target: str, fmt: str, size: tuple[int, int]
) -> None:
    r = serve(gif_root).get(target)
    assert r.status == 200, (r.status, r.text)
    assert r.headers["content-type"] == f"image/{fmt}"
    assert MAGIC[fmt](r.body)
    assert dims(r.body) == size


def test_anim_gif_first_frame_pixels(serve: Callable[..., Server], gif_root: Path) -> None:
    out = decode(serve(gif_root).get("/anim.webp?format=png").body)
    assert out.getpoint(30, 20)[:3] == [255.0, 0.0, 0.0]  # the red frame, not the blue one


def test_only_our_loaders_and_gif_are_allowed(tmp_path: Path) -> None:
    transform.configure(1)
    gif = bytes(photo(8, 6).gifsave_buffer())
    assert decode(gif).width == 8
    tiff = bytes(photo(8, 6).tiffsave_buffer())
    with pytest.raises(pyvips.Error):
        decode(tiff).avg()


# -- bw=1 ----------------------------------------------------------------------------------


@pytest.fixture
def colour_root(tmp_path: Path) -> Path:
    root = tmp_path / "colour"
    root.mkdir()
    for name, rgb in (("red", [255, 0, 0]), ("green", [0, 255, 0]), ("blue", [0, 0, 255])):
        solid(rgb).pngsave(str(root / f"{name}.png"))
    photo(200, 150).jpegsave(str(root / "photo.jpg"), Q=90)
    photo(120, 80, bands=4).pngsave(str(root / "alpha.png"))
    photo(64, 48).pngsave(str(root / "opaque.png"))
    return root


@pytest.mark.parametrize(("fmt", "spread"), [("png", 0), ("jpeg", 0), ("webp", 2), ("avif", 3)])
def test_bw_output_is_grey(
    serve: Callable[..., Server], colour_root: Path, fmt: str, spread: int
) -> None:
    s = serve(colour_root)
    r = s.get(f"/photo.jpg?bw=1&format={fmt}&size=100")
    assert r.status == 200 and r.headers["content-type"] == f"image/{fmt}"
    out = decode(r.body)
    assert (out.width, out.height) == (100, 75)
    assert max_band_spread(out) <= spread  # R == G == B (lossy chroma may wobble by a step)
    colour = decode(s.get(f"/photo.jpg?format={fmt}&size=100").body)
    assert max_band_spread(colour) > 50  # the source is far from grey


def test_bw_weights_green_most(serve: Callable[..., Server], colour_root: Path) -> None:
    s = serve(colour_root)
    grey = {}
    for name in ("red", "green", "blue"):
        out = decode(s.get(f"/{name}.png?bw=1").body)
        assert out.bands == 1
        grey[name] = out.getpoint(5, 5)[0]
    # Rec. 709 luminance on linear light, sRGB-encoded: 127, 220, 76 (an average: 85 each)
    assert grey["green"] > grey["red"] > grey["blue"]
    assert grey == pytest.approx({"red": 127, "green": 220, "blue": 76}, abs=2)


def test_bw_keeps_alpha(serve: Callable[..., Server], colour_root: Path) -> None:
    s = serve(colour_root)
    source = pyvips.Image.new_from_file(str(colour_root / "alpha.png"))
    for fmt, spread in (("png", 0), ("webp", 2)):
        out = decode(s.get(f"/alpha.png?bw=1&format={fmt}").body)
        assert out.hasalpha(), fmt
        assert max_band_spread(out) <= spread
        assert (out[out.bands - 1] - source[3]).abs().max() <= 1, fmt
    flat = decode(s.get("/alpha.png?bw=1&format=jpeg").body)
    assert flat.bands == 1  # flattened onto white


def test_bw_other_values_are_ignored(serve: Callable[..., Server], colour_root: Path) -> None:
    s = serve(colour_root)
    original = (colour_root / "photo.jpg").read_bytes()
    assert s.get("/photo.jpg?bw=0").body == original  # not a transform parameter
    assert s.get("/photo.jpg?bw=true").body == original
    assert max_band_spread(decode(s.get("/photo.jpg?bw=0&format=png").body)) > 50


def test_bw_is_its_own_cache_entry(serve: Callable[..., Server], colour_root: Path) -> None:
    s = serve(colour_root, IMAGE_PROXY_ENABLE_CACHE="true")
    colour = s.get("/photo.jpg?size=100&format=png")
    grey = s.get("/photo.jpg?size=100&format=png&bw=1")
    assert grey.headers["x-cache"] == "MISS"
    assert max_band_spread(decode(colour.body)) > 50 and decode(grey.body).bands == 1
    assert s.get("/photo.jpg?size=100&format=png&bw=1").headers["x-cache"] == "HIT"


# -- bicubic -------------------------------------------------------------------------------


def test_bicubic_is_a_cubic_kernel(server: Server, corpus: Path) -> None:
    cubic = server.get("/landscape.jpg?size=300&format=png&resize_algorithm=bicubic")
    lanczos = server.get("/landscape.jpg?size=300&format=png&resize_algorithm=lanczos3")
    assert cubic.status == lanczos.status == 200
    assert dims(cubic.body) == dims(lanczos.body) == (300, 225)
    assert cubic.body != lanczos.body
    # exactly libvips' cubic kernel on the full decode
    source = pyvips.Image.new_from_file(str(corpus / "landscape.jpg"))
    expected = source.resize(300 / 1200, vscale=225 / 900, kernel="cubic")
    assert (decode(cubic.body) - expected).abs().max() == 0
    assert (decode(lanczos.body) - expected).abs().max() > 0


def test_bicubic_as_the_default(serve: Callable[..., Server]) -> None:
    s = serve(IMAGE_PROXY_RESIZE_ALGORITHM="bicubic")
    explicit = s.get("/landscape.jpg?size=300&format=png&resize_algorithm=bicubic").body
    assert s.get("/landscape.jpg?size=300&format=png").body == explicit


# -- IMAGE_PROXY_WEBP_LOSSLESS -------------------------------------------------------------


def test_webp_lossless_round_trips_pixels(serve: Callable[..., Server], colour_root: Path) -> None:
    source = pyvips.Image.new_from_file(str(colour_root / "opaque.png"))
    lossless = serve(colour_root, IMAGE_PROXY_WEBP_LOSSLESS="true").get("/opaque.png?format=webp")
    assert lossless.body[12:16] == b"VP8L"
    assert (decode(lossless.body) - source).abs().max() == 0
    lossy = serve(colour_root).get("/opaque.png?format=webp")
    assert lossy.body[12:16] != b"VP8L"
    assert (decode(lossy.body) - source).abs().max() > 0


# -- sniff.probe: type, size and alpha from the header bytes --------------------------------


def _gif_without_gce(data: bytes) -> bytes:
    """cgif always writes a Graphic Control Extension with the transparency flag; drop it
    (and the looping extension) to get an opaque GIF87a-style stream."""
    gce = data.index(b"\x21\xf9\x04")
    out = data[:gce] + data[gce + 8 :]
    netscape = out.find(b"\x21\xff\x0bNETSCAPE2.0")
    if netscape >= 0:
        out = out[:netscape] + out[netscape + 19 :]
    return out


def _probe_cases() -> list[tuple[str, bytes, tuple[str, int, int, bool]]]:
    rgb = photo(30, 20)
    rgba = photo(30, 20, bands=4)
    grey_alpha = rgba.colourspace("b-w")
    gif = bytes(rgb.gifsave_buffer())
    webp_lossless = bytes(rgb.webpsave_buffer(lossless=True))
    webp_vp8x = bytes(rgb.webpsave_buffer(keep=pyvips.enums.ForeignKeep.ALL))
    avif = bytes(rgb.heifsave_buffer(compression="av1", effort=0))
    avif_alpha = bytes(rgba.heifsave_buffer(compression="av1", effort=0))
    return [
        ("jpeg", bytes(rgb.jpegsave_buffer()), ("jpeg", 30, 20, False)),
        ("jpeg-progressive", bytes(rgb.jpegsave_buffer(interlace=True)), ("jpeg", 30, 20, False)),
        ("png-rgb", bytes(rgb.pngsave_buffer()), ("png", 30, 20, False)),
        ("png-rgba", bytes(rgba.pngsave_buffer()), ("png", 30, 20, True)),
        ("png-grey-alpha", bytes(grey_alpha.pngsave_buffer()), ("png", 30, 20, True)),
        ("png-grey", bytes(rgb.colourspace("b-w").pngsave_buffer()), ("png", 30, 20, False)),
        ("png-palette-trns", bytes(rgba.pngsave_buffer(palette=True)), ("png", 30, 20, True)),
        ("png-palette", bytes(rgb.pngsave_buffer(palette=True)), ("png", 30, 20, False)),
        ("webp-lossy", bytes(rgb.webpsave_buffer()), ("webp", 30, 20, False)),
        ("webp-lossy-alpha", bytes(rgba.webpsave_buffer()), ("webp", 30, 20, True)),
        ("webp-lossless", webp_lossless, ("webp", 30, 20, False)),
        ("webp-lossless-alpha", bytes(rgba.webpsave_buffer(lossless=True)), ("webp", 30, 20, True)),
        ("webp-vp8x", webp_vp8x, ("webp", 30, 20, False)),
        ("avif", avif, ("avif", 30, 20, False)),
        ("avif-alpha", avif_alpha, ("avif", 30, 20, True)),
        ("gif-transparency-flag", gif, ("gif", 30, 20, True)),
        ("gif-opaque", _gif_without_gce(gif), ("gif", 30, 20, False)),
    ]


PROBE_CASES = _probe_cases()


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in PROBE_CASES], ids=[c[0] for c in PROBE_CASES]
)
def test_probe(data: bytes, expected: tuple[str, int, int, bool]) -> None:
    assert sniff.probe(data[: sniff.PROBE_BYTES]) == sniff.Probe(*expected)
    # what libvips itself says (the test's images are made right; the probe reads them right)
    transform.configure(1)
    image = decode(data)
    assert (image.width, image.height) == expected[1:3]
    assert image.hasalpha() == expected[3]


def test_gif_without_gce_decodes_without_alpha() -> None:
    transform.configure(1)
    gif = _gif_without_gce(bytes(photo(30, 20).gifsave_buffer()))
    assert decode(gif).bands == 3  # libvips adds alpha only when the GIF may be transparent


@pytest.mark.parametrize(("name", "data", "expected"), PROBE_CASES, ids=[c[0] for c in PROBE_CASES])
def test_probe_on_a_short_head_is_conservative(
    name: str, data: bytes, expected: tuple[str, int, int, bool]
) -> None:
    found = sniff.probe(data[:24])
    assert found is not None and found.kind == expected[0]
    assert found.has_alpha or not expected[3]  # may say True when unsure, never a wrong False


def test_probe_reads_the_avif_alpha_urn_and_ispe() -> None:
    data = bytes(photo(70, 50, bands=4).heifsave_buffer(compression="av1", effort=0))
    head = data[: sniff.PROBE_BYTES]
    assert b"auxC" in head and b"urn:mpeg:mpegB:cicp:systems:auxiliary:alpha" in head
    at = head.index(b"ispe")
    assert struct.unpack(">II", head[at + 8 : at + 16]) == (70, 50)
    assert sniff.probe(head) == sniff.Probe("avif", 70, 50, True)


@pytest.mark.parametrize(
    "head", [b"", b"hello, world", b"\x00" * 64, b"II*\x00" + b"\x00" * 60, b"<svg></svg>"]
)
def test_probe_of_non_images_is_none(head: bytes) -> None:
    assert sniff.probe(head) is None


def test_source_format_of_a_gif_is_its_names() -> None:
    assert sniff.source_format("gif", "a/b/x.png") == "png"
    assert sniff.source_format("gif", "x.JPG") == "jpeg"
    assert sniff.source_format("webp", "x.png") == "webp"  # other types: the sniffed one
