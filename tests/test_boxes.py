"""SPEC "Exact boxes, per-request quality and JPEG XL": `w`, `h`, `fit`, `gravity`,
`background`, `q`, their 400 rules, never-upscale extended, identical outputs sharing one
cache entry, IMAGE_PROXY_ALLOWED_QUALITIES, and the bounded `Sec-CH-DPR`.

One row per parameter value and per rule: unit rows on `params.parse`/`geometry.fit`, and
the same rules over real HTTP, decoded with pyvips (djxl for JPEG XL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pyvips

from conftest import Server, app_server, make_settings, photo
from imgproxy.config import Settings
from imgproxy.errors import BadRequest
from imgproxy.params import parse, resolve
from imgproxy.signing import sign_url
from imgproxy.transform import geometry
from imgproxy.transform.geometry import Box, Geometry


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"IMAGE_PROXY_ROOT_PATH": str(tmp_path)})


def p(settings: Settings, query: str, **headers: str):  # type: ignore[no-untyped-def]
    return parse("/a.jpg", query, {k.replace("_", "-"): v for k, v in headers.items()}, settings)


# -- parameter values: accepted ------------------------------------------------------------

ACCEPTED = [
    # query, attribute, value
    ("w=1", "width", 1),
    ("w=16384", "width", 16384),
    ("h=1", "height", 1),
    ("h=16384", "height", 16384),
    ("w=0400", "width", 400),
    ("w=400&dpr=2", "width", 800),  # dpr multiplies both
    ("h=300&dpr=2", "height", 600),
    ("w=101&h=51&dpr=2.5", "width", 253),  # 252.5 -> 253, half away from zero
    ("w=101&h=51&dpr=2.5", "height", 128),  # 127.5 -> 128
    ("w=10&fit=inside", "fit", "inside"),
    ("w=10&h=10&fit=cover", "fit", "cover"),
    ("w=10&h=10&fit=contain", "fit", "contain"),
    ("w=10&h=10&fit=fill", "fit", "fill"),
    ("w=10&h=10&fit=COVER", "fit", "cover"),  # keywords are case-insensitive
    ("w=10", "fit", "inside"),  # the default
    ("w=10&h=10&fit=cover", "gravity", "center"),  # the default
    *[("w=10&h=10&fit=cover&gravity=" + g, "gravity", g) for g in geometry.GRAVITIES],
    *[("w=10&h=10&fit=contain&gravity=" + g, "gravity", g) for g in geometry.GRAVITIES],
    ("w=10&h=10&fit=cover&gravity=North-East", "gravity", "north-east"),
    ("w=10&h=10&fit=cover&gravity=SMART", "gravity", "smart"),
    ("w=10&h=10&fit=contain&background=ff0000", "background", (255, 0, 0, 255)),
    ("w=10&h=10&fit=contain&background=00FF0080", "background", (0, 255, 0, 128)),
    ("w=10&h=10&fit=contain&background=AbCdEf", "background", (171, 205, 239, 255)),
    ("q=1", "quality", 1),
    ("q=100", "quality", 100),
    ("q=077", "quality", 77),
    ("format=jxl", "format", "jxl"),
    ("format=JXL", "format", "jxl"),
]


@pytest.mark.parametrize(
    ("query", "attr", "value"), ACCEPTED, ids=[f"{q}:{a}" for q, a, _ in ACCEPTED]
)
def test_accepted(settings: Settings, query: str, attr: str, value: object) -> None:
    spec = p(settings, query)
    assert spec.transform and getattr(spec, attr) == value


# -- parameter values and combinations: 400 ------------------------------------------------

REFUSED = [
    "w=0",
    "w=16385",
    "w=-1",
    "w=1.5",
    "w=abc",
    "w=",
    "h=0",
    "h=16385",
    "h=",
    "w=1&w=2",
    "size=100&w=100",  # size and w/h together
    "size=100&h=100",
    "size=100&w=100&h=100",
    "fit=cover",  # fit without w/h
    "fit=inside",
    "w=10&h=10&fit=crop",
    "w=10&h=10&fit=",
    "w=10&h=10&fit=scale-down",
    "gravity=center",  # gravity without cover/contain
    "w=10&h=10&gravity=north",  # fit inside (the default)
    "w=10&h=10&fit=inside&gravity=north",
    "w=10&h=10&fit=fill&gravity=north",
    "size=10&gravity=north",
    "w=10&h=10&fit=cover&gravity=northeast",
    "w=10&h=10&fit=cover&gravity=top",
    "w=10&h=10&fit=cover&gravity=",
    "background=ffffff",  # background without contain
    "w=10&h=10&fit=cover&background=ffffff",
    "w=10&h=10&background=ffffff",
    "w=10&h=10&fit=contain&background=",
    "w=10&h=10&fit=contain&background=fff",
    "w=10&h=10&fit=contain&background=%23ffffff",  # no "#"
    "w=10&h=10&fit=contain&background=fffffff",
    "w=10&h=10&fit=contain&background=ggffff",
    "w=10&h=10&fit=contain&background=red",
    "q=0",
    "q=101",
    "q=",
    "q=50.5",
    "q=abc",
    "q=-5",
    "format=",
    "format=jxl2",
]


@pytest.mark.parametrize("query", REFUSED)
def test_refused(settings: Settings, query: str) -> None:
    with pytest.raises(BadRequest):
        p(settings, query)


def test_every_new_parameter_makes_a_transform(settings: Settings) -> None:
    for query in ("w=10", "h=10", "q=50", "format=jxl"):
        assert p(settings, query).transform, query


# -- never upscale, extended (geometry.fit on an upright source) ------------------------------

GEOMETRY = [
    # (source w, h), box, canvas, resized, mode
    ((1200, 800), Box(target=400), (400, 267), (400, 267), ""),
    ((1200, 800), Box(width=600), (600, 400), (600, 400), ""),
    ((1200, 800), Box(height=400), (600, 400), (600, 400), ""),
    (
        (1200, 800),
        Box(width=600, fit="cover"),
        (600, 400),
        (600, 400),
        "",
    ),  # w alone: fit no matter
    ((1200, 800), Box(width=5000), (1200, 800), (1200, 800), ""),
    ((1200, 800), Box(height=5000), (1200, 800), (1200, 800), ""),
    ((1200, 800), Box(width=400, height=400), (400, 267), (400, 267), ""),  # = size=400
    ((1200, 800), Box(width=5000, height=5000), (1200, 800), (1200, 800), ""),  # like size=5000
    ((1200, 800), Box(width=600, height=100), (150, 100), (150, 100), ""),  # the height binds
    ((1200, 800), Box(width=400, height=400, fit="cover"), (400, 400), (600, 400), "crop"),
    ((1200, 800), Box(width=400, height=400, fit="contain"), (400, 400), (400, 267), "pad"),
    ((1200, 800), Box(width=400, height=400, fit="fill"), (400, 400), (400, 400), ""),
    (
        (1200, 800),
        Box(width=600, height=400, fit="cover"),
        (600, 400),
        (600, 400),
        "",
    ),  # same aspect
    ((1200, 800), Box(width=600, height=400, fit="contain"), (600, 400), (600, 400), ""),
    # the box larger than the source: scaled down by one factor to fit inside it, aspect kept
    ((800, 800), Box(width=1600, height=900, fit="cover"), (800, 450), (800, 800), "crop"),
    ((800, 800), Box(width=1600, height=900, fit="contain"), (800, 450), (450, 450), "pad"),
    ((800, 800), Box(width=1600, height=900, fit="fill"), (800, 450), (800, 450), ""),
    ((1200, 800), Box(width=2400, height=2400, fit="cover"), (800, 800), (1200, 800), "crop"),
    ((1200, 800), Box(width=900, height=2000, fit="cover"), (360, 800), (1200, 800), "crop"),
    ((1200, 800), Box(width=1300, height=100, fit="fill"), (1200, 92), (1200, 92), ""),  # 92.3
    ((1200, 800), Box(width=1200, height=800, fit="cover"), (1200, 800), (1200, 800), ""),
    ((101, 50), Box(width=50, height=50, fit="cover"), (50, 50), (101, 50), "crop"),
    ((1, 1), Box(width=100, height=50, fit="cover"), (1, 1), (1, 1), ""),  # at least 1 px
    ((3, 2), Box(target=1), (1, 1), (1, 1), ""),
]


@pytest.mark.parametrize(("source", "box", "canvas", "resized", "mode"), GEOMETRY)
def test_geometry(
    source: tuple[int, int], box: Box, canvas: tuple[int, int], resized: tuple[int, int], mode: str
) -> None:
    g = geometry.fit(box, *source)
    assert (g.canvas, g.resize, g.mode) == (canvas, resized, mode)
    assert g.canvas[0] <= source[0] and g.canvas[1] <= source[1]  # never upscale


@pytest.mark.parametrize(
    ("gravity", "offset"),
    [
        ("center", (100, 0)),
        ("north", (100, 0)),
        ("south", (100, 0)),
        ("west", (0, 0)),
        ("east", (200, 0)),
        ("north-west", (0, 0)),
        ("north-east", (200, 0)),
        ("south-west", (0, 0)),
        ("south-east", (200, 0)),
    ],
)
def test_cover_offsets(gravity: str, offset: tuple[int, int]) -> None:
    g = geometry.fit(Box(width=400, height=400, fit="cover", gravity=gravity), 1200, 800)
    assert g == Geometry((600, 400), (400, 400), "crop", offset)


@pytest.mark.parametrize(
    ("gravity", "offset"),
    [
        ("center", (0, 66)),
        ("north", (0, 0)),
        ("south", (0, 133)),
        ("west", (0, 66)),
        ("south-east", (0, 133)),
        ("smart", (0, 66)),  # content-aware padding means nothing: centred
    ],
)
def test_contain_offsets(gravity: str, offset: tuple[int, int]) -> None:
    g = geometry.fit(Box(width=400, height=400, fit="contain", gravity=gravity), 1200, 800)
    assert g == Geometry((400, 267), (400, 400), "pad", offset)


@pytest.mark.parametrize(
    ("gravity", "interesting"), [("smart", "attention"), ("entropy", "entropy")]
)
def test_content_aware_crops_use_libvips_smartcrop(gravity: str, interesting: str) -> None:
    g = geometry.fit(Box(width=400, height=400, fit="cover", gravity=gravity), 1200, 800)
    assert (g.mode, g.interesting) == ("crop", interesting)


# -- q bounds: IMAGE_PROXY_ALLOWED_QUALITIES --------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "q", "snapped"),
    [
        ("50,75,90", "60", 50),
        ("50,75,90", "63", 75),
        ("50,75,90", "62", 50),  # 12 vs 13
        ("50,70", "60", 70),  # a tie goes to the higher one
        ("50,75,90", "1", 50),
        ("50,75,90", "100", 90),
        ("50,75,90", "75", 75),
        ("90,50", "80", 90),  # any order
        ("", "63", 63),  # unset: any
    ],
)
def test_allowed_qualities(tmp_path: Path, allowed: str, q: str, snapped: int) -> None:
    s = make_settings(tmp_path, IMAGE_PROXY_ALLOWED_QUALITIES=allowed)
    assert p(s, f"q={q}").quality == snapped


@pytest.mark.parametrize("bad", ["0", "101", "a", "50,x"])
def test_allowed_qualities_bad_values_stop_the_start(tmp_path: Path, bad: str) -> None:
    from imgproxy.config import ConfigError

    with pytest.raises(ConfigError, match="IMAGE_PROXY_ALLOWED_QUALITIES"):
        make_settings(tmp_path, IMAGE_PROXY_ALLOWED_QUALITIES=bad)


# -- Sec-CH-DPR bounded (issue 18 item 1) -----------------------------------------------------

HEADER_DPR = [
    # header, IMAGE_PROXY_MAX_DPR, target of size=100
    ("1", "3", 100),
    ("1.0", "3", 100),
    ("1.1", "3", 150),  # rounded up to a multiple of 0.5
    ("1.5", "3", 150),
    ("1.75", "3", 200),
    ("2", "3", 200),
    ("2.01", "3", 250),
    ("2.6", "3", 300),
    ("3", "3", 300),
    ("3.5", "3", 300),  # capped
    ("7.99", "3", 300),
    ("10", "3", 300),
    ("4.2", "5", 450),
    ("10", "10", 1000),
    ("0.5", "3", 100),  # outside 1.0..10.0: ignored
    ("11", "3", 100),
    ("abc", "3", 100),
    ("", "3", 100),
]


@pytest.mark.parametrize(("header", "cap", "target"), HEADER_DPR)
def test_header_dpr_is_bounded(tmp_path: Path, header: str, cap: str, target: int) -> None:
    s = make_settings(tmp_path, IMAGE_PROXY_MAX_DPR=cap)
    assert p(s, "size=100", sec_ch_dpr=header).target == target


@pytest.mark.parametrize(
    ("query", "target"), [("dpr=3.7", 370), ("dpr=7.99", 799), ("dpr=10", 1000)]
)
def test_query_dpr_keeps_its_exact_value(settings: Settings, query: str, target: int) -> None:
    spec = p(settings, f"size=100&{query}", sec_ch_dpr="2")
    assert spec.target == target


def test_header_dpr_multiplies_boxes_too(settings: Settings) -> None:
    spec = p(settings, "w=100&h=50&fit=cover", sec_ch_dpr="1.2")
    assert (spec.width, spec.height) == (150, 75)


@pytest.mark.parametrize("bad", ["0.9", "11", "abc", ""])
def test_max_dpr_bad_values_stop_the_start(tmp_path: Path, bad: str) -> None:
    from imgproxy.config import ConfigError

    with pytest.raises(ConfigError, match="IMAGE_PROXY_MAX_DPR"):
        make_settings(tmp_path, IMAGE_PROXY_MAX_DPR=bad)


def test_a_signed_url_renders_at_most_five_header_variants(serve: Callable[..., Server]) -> None:
    """Issue 18 item 1: `Sec-CH-DPR` is not signed; 1.0 ... 10.0 in tenths used to make 91
    sizes (renders and cache entries) of one signed URL. Now 1, 1.5, 2, 2.5, 3."""
    key = "k" * 40
    s = serve(IMAGE_PROXY_SIGNATURE_KEYS=key, IMAGE_PROXY_ENABLE_CACHE="true")
    url = sign_url("/landscape.jpg?size=100&format=webp", key)
    widths = set()
    for tenths in range(10, 101):
        r = s.get(url, headers={"Sec-CH-DPR": f"{tenths / 10:.1f}"})
        assert r.status == 200
        widths.add(r.image().width)
    assert widths == {100, 150, 200, 250, 300}
    assert s.metric("image_transforms_total") == 5


# -- over HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def boxes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("boxes")
    photo(1200, 800).jpegsave(str(root / "land.jpg"), Q=90)
    photo(800, 800).jpegsave(str(root / "square.jpg"), Q=90)
    photo(300, 200, bands=4).pngsave(str(root / "alpha.png"))
    # left half red, right half blue (for west/east), top green / bottom black rows
    red = pyvips.Image.black(600, 600).new_from_image([255, 0, 0])
    blue = pyvips.Image.black(600, 600).new_from_image([0, 0, 255])
    red.join(blue, "horizontal").copy(interpretation="srgb").pngsave(str(root / "halves.png"))
    top = pyvips.Image.black(600, 600).new_from_image([0, 255, 0])
    bottom = pyvips.Image.black(600, 600).new_from_image([0, 0, 0])
    top.join(bottom, "vertical").copy(interpretation="srgb").pngsave(str(root / "rows.png"))
    # flat grey with one busy, saturated patch at the right edge: what smartcrop looks for
    flat = pyvips.Image.black(1200, 400).new_from_image([128, 128, 128]).copy(interpretation="srgb")
    patch = photo(200, 400)
    flat.insert(patch, 1000, 0).cast("uchar").copy(interpretation="srgb").pngsave(
        str(root / "busy-right.png")
    )
    return root


@pytest.fixture
def bserve(boxes: Path) -> Iterator[Callable[..., Server]]:
    import contextlib

    stack = contextlib.ExitStack()

    def start(**env: str) -> Server:
        return stack.enter_context(app_server(make_settings(boxes, **env)))

    with stack:
        yield start


HTTP_SIZES = [
    ("land.jpg", "w=600", (600, 400)),
    ("land.jpg", "h=400", (600, 400)),
    ("land.jpg", "w=600&fit=cover", (600, 400)),
    ("land.jpg", "w=5000", (1200, 800)),
    ("land.jpg", "w=400&h=400", (400, 267)),
    ("land.jpg", "w=5000&h=5000", (1200, 800)),
    ("land.jpg", "w=400&h=400&fit=inside", (400, 267)),
    ("land.jpg", "w=400&h=400&fit=cover", (400, 400)),
    ("land.jpg", "w=400&h=400&fit=contain", (400, 400)),
    ("land.jpg", "w=400&h=400&fit=fill", (400, 400)),
    ("land.jpg", "w=400&h=225&fit=cover&format=webp", (400, 225)),
    ("land.jpg", "w=200&h=100&fit=cover&dpr=2", (400, 200)),
    ("land.jpg", "w=400&h=400&fit=cover&gravity=smart", (400, 400)),
    ("land.jpg", "w=400&h=400&fit=cover&gravity=entropy", (400, 400)),
    ("land.jpg", "w=400&h=400&fit=cover&gravity=south-west&format=avif", (400, 400)),
    ("land.jpg", "w=400&h=400&fit=contain&gravity=north&format=png", (400, 400)),
    ("land.jpg", "w=400&h=400&fit=cover&format=jxl", (400, 400)),
    ("square.jpg", "w=1600&h=900&fit=cover", (800, 450)),
    ("square.jpg", "w=1600&h=900&fit=contain", (800, 450)),
    ("square.jpg", "w=1600&h=900&fit=fill", (800, 450)),
    ("alpha.png", "w=100&h=100&fit=cover", (100, 100)),
    ("alpha.png", "w=100&h=100&fit=contain&format=webp", (100, 100)),
]


@pytest.mark.parametrize(("name", "query", "size"), HTTP_SIZES)
def test_decoded_size(
    bserve: Callable[..., Server], name: str, query: str, size: tuple[int, int]
) -> None:
    r = bserve().get(f"/{name}?{query}")
    assert r.status == 200, r.text
    image = r.image()
    assert (image.width, image.height) == size


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("size=100&w=100", 400),
        ("fit=cover", 400),
        ("w=10&h=10&gravity=north", 400),
        ("w=10&h=10&fit=cover&background=ffffff", 400),
        ("w=", 400),
        ("q=", 400),
        ("fit=", 400),
        ("q=101", 400),
        ("w=16385", 400),
    ],
)
def test_http_400(bserve: Callable[..., Server], query: str, status: int) -> None:
    r = bserve().get(f"/land.jpg?{query}")
    assert r.status == status and r.headers["content-type"].startswith("text/plain")
    assert "cache-control" not in r.headers


def _mean(image: pyvips.Image, left: int, top: int, w: int, h: int) -> list[float]:
    region = image.crop(left, top, w, h)
    return [region[i].avg() for i in range(3)]


@pytest.mark.parametrize(
    ("name", "gravity", "colour"),
    [
        ("halves.png", "west", (255, 0, 0)),
        ("halves.png", "east", (0, 0, 255)),
        ("halves.png", "north-west", (255, 0, 0)),
        ("halves.png", "south-east", (0, 0, 255)),
        ("rows.png", "north", (0, 255, 0)),
        ("rows.png", "south", (0, 0, 0)),
        ("rows.png", "north-east", (0, 255, 0)),
        ("rows.png", "south-west", (0, 0, 0)),
    ],
)
def test_cover_crops_by_gravity(
    bserve: Callable[..., Server], name: str, gravity: str, colour: tuple[int, int, int]
) -> None:
    r = bserve().get(f"/{name}?w=300&h=300&fit=cover&gravity={gravity}")
    image = r.image()
    assert (image.width, image.height) == (300, 300)
    assert _mean(image, 0, 0, 300, 300) == pytest.approx(list(colour), abs=2)


def test_cover_centre_takes_the_middle(bserve: Callable[..., Server]) -> None:
    image = bserve().get("/halves.png?w=300&h=300&fit=cover").image()
    assert _mean(image, 0, 0, 140, 300) == pytest.approx([255, 0, 0], abs=2)
    assert _mean(image, 160, 0, 140, 300) == pytest.approx([0, 0, 255], abs=2)


@pytest.mark.parametrize("gravity", ["smart", "entropy"])
def test_content_aware_crop_finds_the_busy_part(
    bserve: Callable[..., Server], gravity: str
) -> None:
    s = bserve()
    found = s.get(f"/busy-right.png?w=400&h=400&fit=cover&gravity={gravity}").image()
    centre = s.get("/busy-right.png?w=400&h=400&fit=cover").image()
    assert found.deviate() > 20 > centre.deviate()  # the patch, not flat grey


@pytest.mark.parametrize(
    ("query", "corner"),
    [
        ("format=png", [0, 0, 0, 0]),  # default: transparent where the format has alpha
        ("format=webp", [0, 0, 0, 0]),
        ("format=jpeg", [255, 255, 255]),  # else white
        ("format=png&background=ff0000", [255, 0, 0]),
        ("format=png&background=00ff0080", [0, 255, 0, 128]),
        ("format=jpeg&background=0000ff", [0, 0, 255]),
    ],
)
def test_contain_pads_with_the_background(
    bserve: Callable[..., Server], query: str, corner: list[int]
) -> None:
    image = bserve().get(f"/land.jpg?w=400&h=400&fit=contain&{query}").image()
    assert (image.width, image.height) == (400, 400)
    got = image.crop(0, 0, 8, 8)
    assert [got[i].avg() for i in range(len(corner))] == pytest.approx(corner, abs=3)
    assert image.bands == len(corner)


def test_contain_places_the_image_by_gravity(bserve: Callable[..., Server]) -> None:
    s = bserve()
    north = s.get("/land.jpg?w=400&h=400&fit=contain&gravity=north&format=png").image()
    south = s.get("/land.jpg?w=400&h=400&fit=contain&gravity=south&format=png").image()
    assert north.crop(0, 0, 400, 10)[3].avg() == 255 and north.crop(0, 390, 400, 10)[3].avg() == 0
    assert south.crop(0, 0, 400, 10)[3].avg() == 0 and south.crop(0, 390, 400, 10)[3].avg() == 255


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif", "jxl"])
def test_q_sets_the_lossy_encoders_quality(bserve: Callable[..., Server], fmt: str) -> None:
    s = bserve()
    low = s.get(f"/land.jpg?size=300&format={fmt}&q=10")
    high = s.get(f"/land.jpg?size=300&format={fmt}&q=95")
    assert low.status == high.status == 200
    assert len(low.body) < len(high.body) * 0.7, (len(low.body), len(high.body))


@pytest.mark.parametrize(
    ("fmt", "env"), [("png", {}), ("webp", {"IMAGE_PROXY_WEBP_LOSSLESS": "true"})]
)
def test_q_is_ignored_by_lossless_encoders(
    bserve: Callable[..., Server], fmt: str, env: dict[str, str]
) -> None:
    s = bserve(**env)
    low, high = (s.get(f"/alpha.png?size=150&format={fmt}&q={q}") for q in (10, 95))
    assert low.body == high.body and low.headers["etag"] == high.headers["etag"]


def test_q_equal_to_the_setting_is_the_same_output(bserve: Callable[..., Server]) -> None:
    s = bserve(IMAGE_PROXY_ENABLE_CACHE="true")
    a = s.get("/land.jpg?size=300&format=webp&q=80")
    b = s.get("/land.jpg?size=300&format=webp")
    assert a.headers["etag"] == b.headers["etag"] and b.headers["x-cache"] == "HIT"


def test_allowed_qualities_snap_over_http(bserve: Callable[..., Server]) -> None:
    s = bserve(IMAGE_PROXY_ALLOWED_QUALITIES="40,80", IMAGE_PROXY_ENABLE_CACHE="true")
    etags = {
        s.get(f"/land.jpg?size=300&format=jpeg&q={q}").headers["etag"] for q in (1, 59, 60, 100)
    }
    assert len(etags) == 2  # 1, 59 -> 40; 60 (a tie), 100 -> 80
    assert s.metric("image_transforms_total") == 2


# -- one render per distinct output (issue 17 item 3) ----------------------------------------

SAME_OUTPUT = [
    ("square.jpg", ["size=800", "size=801", "size=5000", "w=5000", "w=800&h=800"]),
    ("square.jpg", ["size=400", "w=400&h=400", "w=400", "h=400", "w=400&fit=cover"]),
    ("square.jpg", ["w=400&h=400&fit=cover", "w=400&h=400&fit=fill", "w=400&h=400&fit=contain"]),
    ("land.jpg", ["w=400&h=400", "size=400", "w=400&h=400&fit=inside", "w=400&h=9999"]),
    ("land.jpg", ["w=600&h=400&fit=cover", "w=600&h=400&fit=contain", "w=600&h=400&fit=fill"]),
    ("land.jpg", ["format=webp", "format=webp&q=80", "format=webp&dpr=2", "format=webp&size=1200"]),
    ("land.jpg", ["size=300&resize_algorithm=auto", "size=300&resize_algorithm=thumbnail"]),
    # a landscape cropped to a square: north and south cut nothing off the height
    ("land.jpg", ["w=400&h=400&fit=cover", "w=400&h=400&fit=cover&gravity=north"]),
]


@pytest.mark.parametrize(
    ("name", "queries"), SAME_OUTPUT, ids=[" ".join(q) for _, q in SAME_OUTPUT]
)
def test_identical_outputs_share_one_entry_and_one_render(
    bserve: Callable[..., Server], name: str, queries: list[str]
) -> None:
    s = bserve(IMAGE_PROXY_ENABLE_CACHE="true")
    replies = [s.get(f"/{name}?{q}") for q in queries]
    assert {r.status for r in replies} == {200}
    assert len({r.headers["etag"] for r in replies}) == 1
    assert len({r.body for r in replies}) == 1
    assert s.metric("image_transforms_total") == 1
    assert [r.headers["x-cache"] for r in replies] == ["MISS"] + ["HIT"] * (len(replies) - 1)


def test_different_outputs_keep_different_entries(bserve: Callable[..., Server]) -> None:
    s = bserve(IMAGE_PROXY_ENABLE_CACHE="true")
    queries = [
        "w=400&h=400&fit=cover",
        "w=400&h=400&fit=cover&gravity=west",
        "w=400&h=400&fit=cover&gravity=east",
        "w=400&h=400&fit=cover&gravity=smart",
        "w=400&h=400&fit=contain",
        "w=400&h=400&fit=contain&background=ff0000",
        "w=400&h=400&fit=fill",
        "w=400&h=400",
        "w=400&h=400&q=50",
    ]
    etags = {s.get(f"/land.jpg?{q}").headers["etag"] for q in queries}
    assert len(etags) == len(queries)


def test_resolve_is_pure_and_drops_what_cannot_matter(settings: Settings) -> None:
    def key(query: str, size: tuple[int, int] | None = (800, 800)) -> str:
        out = resolve(p(settings, query), "jpeg", "jpeg", size, settings)
        return out.cache_key("id", "salt")

    assert key("size=800") == key("size=801") == key("size=5000") == key("format=jpeg")
    assert key("w=400&fit=cover") == key("w=400") == key("size=400")
    assert key("size=400") != key("size=401")
    assert key("size=400", None) != key("size=401", None)  # unknown size: the request itself
    assert key("size=400", (800, 800)) != key("size=400", (800, 600))


# -- signing covers every new parameter ------------------------------------------------------


@pytest.mark.parametrize(
    ("signed", "tampered"),
    [
        ("w=100", "w=101"),
        ("h=100", "h=101"),
        ("w=100&h=100&fit=cover", "w=100&h=100&fit=fill"),
        ("w=100&h=100&fit=cover&gravity=north", "w=100&h=100&fit=cover&gravity=south"),
        ("w=100&h=100&fit=contain&background=ff0000", "w=100&h=100&fit=contain&background=00ff00"),
        ("q=50", "q=51"),
        ("format=jxl", "format=webp"),
    ],
)
def test_new_parameters_are_signed(
    bserve: Callable[..., Server], signed: str, tampered: str
) -> None:
    key = "k" * 40
    s = bserve(IMAGE_PROXY_SIGNATURE_KEYS=key)
    url = sign_url(f"/land.jpg?{signed}", key)
    assert s.get(url).status == 200
    sig = url.rpartition("sig=")[2]
    assert s.get(f"/land.jpg?{tampered}&sig={sig}").status == 403
    # added to a URL signed without it: refused too
    assert s.get(f"/land.jpg?{signed}&q=10&sig={sig}").status == 403


def test_signed_string_holds_every_new_parameter() -> None:
    from imgproxy.signing import signed_string

    query = "w=1&h=2&fit=cover&gravity=north&background=ffffff&q=5&v=3&utm_x=y"
    assert signed_string("/a.jpg", query) == (
        "/a.jpg?background=ffffff&fit=cover&gravity=north&h=2&q=5&w=1"
    )


def test_imgproxy_sign_signs_the_new_parameters(tmp_path: Path) -> None:
    import subprocess
    import sys

    from imgproxy.signing import sign_url

    key = "s" * 40
    url = "/a.jpg?w=400&h=225&fit=cover&gravity=smart&q=70&format=jxl"
    out = subprocess.run(
        [sys.executable, "-m", "imgproxy", "sign", url],
        env={"IMAGE_PROXY_SIGNATURE_KEYS": key, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == sign_url(url, key)
