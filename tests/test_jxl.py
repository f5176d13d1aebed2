"""JPEG XL: `format=jxl`, `image/jxl` negotiation, the encoder settings, lossless JPEG
recompression (rebuilt bit for bit by djxl), the metric label, and the cache key's codec
versions (issue 18 item 3). Outputs are decoded by djxl (Debian libjxl-tools)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import pytest
import pyvips

from conftest import MAGIC, Server, djxl, need_djxl
from imgproxy import fastcodecs, sniff, transform
from imgproxy.config import ConfigError, Settings

CHROMIUM_156_ACCEPT = "image/jxl,image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
NEGOTIATE = {"IMAGE_PROXY_PREFERRED_FORMATS": "jxl,avif,webp"}


@pytest.fixture(autouse=True)
def _djxl() -> None:
    need_djxl()


def is_recompressed(body: bytes) -> bool:
    """A JPEG XL container with JPEG reconstruction data (`jbrd` box)."""
    return body[4:8] == b"JXL " and b"jbrd" in body[:4096]


def test_format_jxl(server: Server, corpus: Path) -> None:
    r = server.get("/landscape.jpg?size=300&format=jxl")
    assert r.status == 200 and r.headers["content-type"] == "image/jxl"
    assert MAGIC["jxl"](r.body) and sniff.is_jxl(r.body)
    image = r.image()
    assert (image.width, image.height) == (300, 225)
    assert not is_recompressed(r.body)


def test_jxl_keeps_alpha(server: Server) -> None:
    image = server.get("/alpha.png?format=jxl").image()
    assert (image.width, image.height, image.bands) == (300, 200, 4)


def test_jxl_bw_is_grey(server: Server) -> None:
    image = server.get("/landscape.jpg?size=100&format=jxl&bw=1").image()
    assert image.bands == 1 or image[0].equal(image[1]).min() == 255


def test_a_jpeg_asked_for_as_jxl_is_recompressed_losslessly(server: Server, corpus: Path) -> None:
    original = (corpus / "landscape.jpg").read_bytes()
    r = server.get("/landscape.jpg?format=jxl")
    assert r.status == 200 and r.headers["content-type"] == "image/jxl"
    assert is_recompressed(r.body)
    assert len(r.body) < len(original)
    assert djxl(r.body, ".jpg") == original  # rebuilt bit for bit


@pytest.mark.parametrize(
    "query",
    [
        "format=jxl&q=77",  # q is a transform parameter
        "format=jxl&size=5000",  # so is size, even when it changes nothing
        "format=jxl&bw=1",
        "format=jxl&dpr=2",
        "format=jxl&w=10000",
        "format=jxl&resize_algorithm=lanczos3",
    ],
)
def test_any_other_transform_parameter_means_a_lossy_encode(server: Server, query: str) -> None:
    r = server.get(f"/landscape.jpg?{query}")
    assert r.status == 200 and MAGIC["jxl"](r.body) and not is_recompressed(r.body)


def test_recompression_can_be_turned_off(serve: Callable[..., Server]) -> None:
    r = serve(IMAGE_PROXY_JXL_RECOMPRESS_JPEG="false").get("/landscape.jpg?format=jxl")
    assert r.status == 200 and MAGIC["jxl"](r.body) and not is_recompressed(r.body)
    assert (r.image().width, r.image().height) == (1200, 900)


def test_other_sources_are_never_recompressed(server: Server) -> None:
    r = server.get("/photo.webp?format=jxl")
    assert r.status == 200 and not is_recompressed(r.body)


def test_chromium_156_accept_negotiates_jxl(serve: Callable[..., Server], corpus: Path) -> None:
    s = serve(**NEGOTIATE)
    headers = {"Accept": CHROMIUM_156_ACCEPT}
    jpeg = s.get("/landscape.jpg", headers=headers)  # no parameter: recompressed
    assert jpeg.headers["content-type"] == "image/jxl" and is_recompressed(jpeg.body)
    assert djxl(jpeg.body, ".jpg") == (corpus / "landscape.jpg").read_bytes()
    assert jpeg.headers["vary"] == "Accept, Sec-CH-DPR"
    alpha = s.get("/alpha.png?size=100", headers=headers)  # alpha is fine in JPEG XL
    assert alpha.headers["content-type"] == "image/jxl" and alpha.image().bands == 4
    sized = s.get("/landscape.jpg?size=100", headers=headers)
    assert sized.headers["content-type"] == "image/jxl" and not is_recompressed(sized.body)
    assert s.metric("image_requests_total", format="jxl", status="ok") == 3


def test_jxl_label_when_asked(server: Server) -> None:
    server.get("/landscape.jpg?size=50&format=JXL")
    assert server.metric("image_requests_total", format="jxl", status="ok") == 1
    assert server.metric("image_transforms_total", format="jxl") == 1


def test_jxl_not_allowed(serve: Callable[..., Server]) -> None:
    s = serve(IMAGE_PROXY_ALLOWED_OUTPUT_FORMATS="webp,jpeg", **NEGOTIATE)
    assert s.get("/landscape.jpg?format=jxl").status == 415
    r = s.get("/landscape.jpg?size=100", headers={"Accept": CHROMIUM_156_ACCEPT})
    assert r.headers["content-type"] == "image/webp"  # never one outside the list


def test_jxl_is_not_picked_unless_preferred(serve: Callable[..., Server]) -> None:
    s = serve(IMAGE_PROXY_PREFERRED_FORMATS="avif,webp")
    r = s.get("/landscape.jpg?size=100", headers={"Accept": CHROMIUM_156_ACCEPT})
    assert r.headers["content-type"] == "image/avif"


def test_jxl_quality_and_effort_settings(serve: Callable[..., Server]) -> None:
    low = serve(IMAGE_PROXY_JXL_QUALITY="30").get("/landscape.jpg?size=300&format=jxl")
    high = serve(IMAGE_PROXY_JXL_QUALITY="95").get("/landscape.jpg?size=300&format=jxl")
    assert len(low.body) < len(high.body) * 0.7
    assert low.headers["etag"] != high.headers["etag"]  # encoder settings are in the key
    e1 = serve(IMAGE_PROXY_JXL_EFFORT="1").get("/landscape.jpg?size=300&format=jxl")
    assert e1.headers["etag"] != serve().get("/landscape.jpg?size=300&format=jxl").headers["etag"]


def test_jxl_conditional_304(server: Server) -> None:
    r = server.get("/landscape.jpg?size=100&format=jxl")
    again = server.get(
        "/landscape.jpg?size=100&format=jxl", headers={"If-None-Match": r.headers["etag"]}
    )
    assert again.status == 304


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("IMAGE_PROXY_JXL_EFFORT", "0"),
        ("IMAGE_PROXY_JXL_EFFORT", "10"),
        ("IMAGE_PROXY_JXL_QUALITY", "0"),
        ("IMAGE_PROXY_JXL_QUALITY", "101"),
        ("IMAGE_PROXY_JXL_RECOMPRESS_JPEG", "maybe"),
        ("IMAGE_PROXY_PREFERRED_FORMATS", "jxl,heic"),
    ],
)
def test_bad_jxl_settings_stop_the_start(tmp_path: Path, var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var):
        Settings.from_env({"IMAGE_PROXY_ROOT_PATH": str(tmp_path), var: value})


def test_jxl_defaults(tmp_path: Path) -> None:
    s = Settings.from_env({"IMAGE_PROXY_ROOT_PATH": str(tmp_path)})
    assert (s.encode.jxl_quality, s.encode.jxl_effort, s.encode.jxl_recompress_jpeg) == (
        77,
        4,
        True,
    )
    assert "jxl" in s.images.allowed_output_formats
    s2 = Settings.from_env({"IMAGE_PROXY_ROOT_PATH": str(tmp_path), **NEGOTIATE})
    assert s2.images.preferred_formats == ("jxl", "avif", "webp")


def test_jxl_sources_are_not_served(server: Server, corpus: Path) -> None:
    body = server.get("/landscape.jpg?size=50&format=jxl").body
    (corpus / "was-jxl.png").write_bytes(body)
    try:
        assert server.get("/was-jxl.png").status == 415  # not a source type we decode
    finally:
        (corpus / "was-jxl.png").unlink()


def test_encoder_runs_on_one_thread() -> None:
    """num_threads=1 (the plugin's default -1 takes every core): the render pool owns them."""
    image = pyvips.Image.black(64, 64).new_from_image([10, 20, 30]).cast("uchar")
    pixels = fastcodecs.Pixels(image.write_to_memory(), 64, 64, 3)
    assert MAGIC["jxl"](fastcodecs.encode_jxl(pixels, 77, 4) or b"")
    assert fastcodecs.recompress_jpeg(b"\xff\xd8\xffnot a jpeg", 10, 10, 4) is None


# -- issue 18 item 3: the key covers every codec library's version ---------------------------


@pytest.mark.parametrize(
    ("name", "dist"),
    [
        ("pillow", "pillow"),
        ("simplejpeg", "simplejpeg"),
        ("pillow-jxl-plugin", "pillow-jxl-plugin"),
        ("pyvips-binary", "pyvips-binary"),
    ],
)
def test_codec_versions_are_computed(name: str, dist: str) -> None:
    versions = transform.codec_versions()
    assert versions[name] == importlib.metadata.version(dist)
    assert f"{name} {versions[name]}" in transform.VERSION


def test_codec_versions_name_libvips_and_pillows_codecs() -> None:
    from PIL import features

    versions = transform.codec_versions()
    assert versions["libvips"] == ".".join(str(pyvips.version(i)) for i in range(3))
    assert versions["pillow-libjpeg-turbo"] == features.version("libjpeg_turbo")
    assert versions["pillow-libwebp"] == features.version("webp")
    # our own steps' version, bumped by hand when they change the bytes: in the key too
    assert versions["imgproxy-pipeline"] == str(transform.vips.PIPELINE)


def test_a_codec_upgrade_changes_every_key(tmp_path: Path) -> None:
    """The salt is a function of the versions: what an upgrade changes, the key follows."""
    from imgproxy.params import output_salt

    s = Settings.from_env({"IMAGE_PROXY_ROOT_PATH": str(tmp_path)})
    now = transform.codec_versions()
    base = output_salt(now, s.encode)
    for name in now:
        assert output_salt({**now, name: now[name] + ".post1"}, s.encode) != base, name


def test_a_jpeg_libjxl_cannot_transcode_is_encoded_instead(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    """CMYK: when libjxl declines to transcode a JPEG, it is decoded (sRGB) and encoded."""
    from conftest import photo

    photo(64, 48).icc_transform("cmyk").jpegsave(str(tmp_path / "cmyk.jpg"))
    assert pyvips.Image.new_from_file(str(tmp_path / "cmyk.jpg")).bands == 4
    r = serve(tmp_path).get("/cmyk.jpg?format=jxl")
    assert r.status == 200 and r.headers["content-type"] == "image/jxl"
    image = r.image()
    assert (image.width, image.height) == (64, 48)
