"""negotiate: Accept parsing and the choice of an output format, table-driven.

The browser strings are the real ones (STACK-NOTES §10.2 for Chromium 156; the others are
what each browser sends for an `<img>`)."""

from __future__ import annotations

import pytest

from imgproxy import negotiate

CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
CHROMIUM_156 = "image/jxl,image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX = "image/avif,image/webp,image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
FIREFOX_OLD = "image/webp,*/*"
SAFARI = (
    "image/webp,image/avif,image/jxl,image/heic,image/heic-sequence,video/*;q=0.8,"
    "image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
)
EDGE_LEGACY = "image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
CHROME_NAVIGATION = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/jxl,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)

# (id, Accept, the formats it names explicitly with q > 0)
CASES: list[tuple[str, str, set[str]]] = [
    ("chrome", CHROME, {"avif", "webp"}),
    ("chromium-156-jxl-first", CHROMIUM_156, {"jxl", "avif", "webp"}),
    ("chrome-navigation", CHROME_NAVIGATION, {"jxl", "avif", "webp"}),
    ("firefox", FIREFOX, {"avif", "webp", "png"}),
    ("firefox-old", FIREFOX_OLD, {"webp"}),
    ("safari", SAFARI, {"jxl", "webp", "avif", "png"}),
    ("edge-legacy", EDGE_LEGACY, {"png"}),
    ("curl-default", "*/*", set()),
    ("image-wildcard-only", "image/*", set()),
    ("wildcards-only", "image/*;q=0.9, */*;q=0.8", set()),
    ("empty", "", set()),
    ("blank", "   \t ", set()),
    ("q0-refuses", "image/avif;q=0,image/webp", {"webp"}),
    ("q0.000-refuses", "image/avif;q=0.000, image/webp;q=0.0", set()),
    ("q-tiny-is-yes", "image/avif;q=0.001", {"avif"}),
    ("q1.000", "image/webp;q=1.000", {"webp"}),
    ("refusal-wins-over-accept", "image/avif, image/webp, image/avif;q=0", {"webp"}),
    ("refusal-first", "image/avif;q=0, image/avif", set()),
    ("case-insensitive", "IMAGE/AVIF, Image/WebP;Q=0.5", {"avif", "webp"}),
    ("whitespace", "  image/avif ;  q=0.5 ,\timage/webp\t", {"avif", "webp"}),
    ("spaces-around-equals", "image/avif; q = 0", set()),
    ("media-parameters", "image/webp;v=2;q=0.9;ext=1", {"webp"}),
    ("empty-parameter", "image/webp;", {"webp"}),
    ("quoted-comma", 'image/png;x="a,image/avif",image/webp', {"png", "webp"}),
    ("quoted-q0-not-a-weight", 'image/avif;note="q=0"', {"avif"}),
    ("escaped-quote", r'image/png;x="a\",image/avif", image/jpeg', {"png", "jpeg"}),
    ("image-jpg-is-jpeg", "image/jpg", {"jpeg"}),
    ("image-jpeg", "image/jpeg;q=0.4", {"jpeg"}),
    ("not-pjpeg", "image/pjpeg, image/x-png", set()),
    ("other-types-only", "text/html, application/xml;q=0.9, video/*", set()),
    ("subtype-prefix-is-not-a-match", "image/avifx, image/webp2, image/png-ish", set()),
    ("junk", "garbage;;;,,,//,image/,/webp,image//avif,=,;q=1", set()),
    ("junk-beside-a-good-one", "§§§, image/webp, \x00\x01", {"webp"}),
    ("q-above-one", "image/avif;q=2, image/webp;q=1.5", set()),
    ("q-four-decimals", "image/avif;q=0.5555", set()),
    ("q-not-a-number", "image/avif;q=abc, image/webp;q=, image/png;q=-1", set()),
    ("q-quoted", 'image/avif;q="1"', set()),
    ("parameter-without-value", "image/avif;foo, image/webp", {"webp"}),
    ("space-inside-range", "image / avif, image/ webp", set()),
    ("leading-comma-list", ",, image/avif ,,", {"avif"}),
    ("accept-ext-after-weight", "image/avif;q=0.5;level", {"avif"}),
    ("unterminated-quote", 'image/webp, image/png;x="oops, image/avif', {"webp"}),
]


@pytest.mark.parametrize(("accept", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_accepted(accept: str, expected: set[str]) -> None:
    assert negotiate.accepted(accept) == frozenset(expected)


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)


def test_huge_header_never_fails_and_is_cut_on_an_element_boundary() -> None:
    filler = ",".join(f"application/x-{i}" for i in range(2000))  # ~40 KB
    assert negotiate.accepted(filler + ",image/avif") == frozenset()  # beyond the cap
    assert negotiate.accepted("image/webp," + filler) == {"webp"}
    # an element that straddles the cap is dropped whole: "image/avif;q=0" must never be
    # read as "image/avif"
    pad = "x/y," * ((negotiate.MAX_ACCEPT - 8) // 4)
    header = pad + "image/avif;q=0,image/webp"
    assert len(pad) < negotiate.MAX_ACCEPT < len(pad) + len("image/avif;q=0")
    assert negotiate.accepted(header) == frozenset()
    assert negotiate.accepted("image/webp," * 10_000) == {"webp"}
    assert negotiate.accepted("," * 100_000) == frozenset()
    assert negotiate.accepted('"' * 100_000) == frozenset()


@pytest.mark.parametrize(
    "accept",
    [
        "\x00",
        "\udcff",
        "image/avif\udcff",
        "💥/💥",
        ";" * 50,
        "=" * 50,
        "image/avif;q=0." + "0" * 99,
    ],
)
def test_garbage_never_raises(accept: str) -> None:
    assert negotiate.accepted(accept) == frozenset()


# (id, Accept, preferred, allowed, has_alpha, chosen)
ALL = frozenset({"avif", "jpeg", "png", "webp"})
CHOICES: list[tuple[str, str | None, tuple[str, ...], frozenset[str], bool, str | None]] = [
    ("chrome-avif-first", CHROME, ("avif", "webp"), ALL, False, "avif"),
    ("chrome-webp-only", CHROME, ("webp",), ALL, False, "webp"),
    ("operator-order-wins", SAFARI, ("avif", "webp"), ALL, False, "avif"),
    ("operator-order-wins-2", SAFARI, ("webp", "avif"), ALL, False, "webp"),
    ("firefox-old-webp", FIREFOX_OLD, ("avif", "webp"), ALL, False, "webp"),
    ("curl-keeps-source", "*/*", ("avif", "webp"), ALL, False, None),
    ("no-header-keeps-source", None, ("avif", "webp"), ALL, False, None),
    ("negotiation-off", CHROME, (), ALL, False, None),
    ("not-allowed-skipped", CHROME, ("avif", "webp"), frozenset({"webp", "jpeg"}), False, "webp"),
    ("nothing-allowed", CHROME, ("avif", "webp"), frozenset({"png"}), False, None),
    ("alpha-never-jpeg", "image/jpeg", ("jpeg",), ALL, True, None),
    ("alpha-skips-jpeg", "image/jpeg,image/png", ("jpeg", "png"), ALL, True, "png"),
    ("opaque-may-be-jpeg", "image/jpeg,image/png", ("jpeg", "png"), ALL, False, "jpeg"),
    ("alpha-avif-fine", CHROME, ("avif",), ALL, True, "avif"),
    ("refused-avif", "image/avif;q=0,image/webp", ("avif", "webp"), ALL, False, "webp"),
    ("edge-png", EDGE_LEGACY, ("avif", "webp", "png"), ALL, False, "png"),
]


@pytest.mark.parametrize(
    ("accept", "preferred", "allowed", "alpha", "chosen"),
    [c[1:] for c in CHOICES],
    ids=[c[0] for c in CHOICES],
)
def test_choose(
    accept: str | None,
    preferred: tuple[str, ...],
    allowed: frozenset[str],
    alpha: bool,
    chosen: str | None,
) -> None:
    candidates = negotiate.acceptable(accept, preferred, allowed)
    assert negotiate.pick(candidates, alpha) == chosen


def test_acceptable_tells_when_no_probe_is_needed() -> None:
    assert negotiate.acceptable("*/*", ("avif", "webp"), ALL) == ()
    assert negotiate.acceptable(FIREFOX, ("png", "avif", "jpeg"), ALL) == ("png", "avif")
