"""`Accept` -> output format: the original's later `IMAGE_PROXY_PREFERRED_FORMATS`, done by
the RFC (9110 §12.5.1) instead of a substring search.

    accepted(accept)                       formats the header names explicitly with q > 0
    acceptable(accept, preferred, allowed) preferred formats the client takes and we may send
    pick(candidates, has_alpha)            the first one that suits the source, or None

Rules (SPEC "Format negotiation"):

* only an explicit `image/<format>` range counts; `image/*` and `*/*` name nothing (a browser
  that sends them still cannot show every format);
* `q=0` (`q=0.000`) is a refusal, and a refusal wins over any other mention of the same
  format in the header (`image/avif, image/avif;q=0` refuses AVIF): when a client
  contradicts itself, the original format is the one answer that cannot break its page;
* type, subtype and parameter names are case-insensitive; whitespace around `,` `;` `=` is
  ignored; other parameters (`image/webp;v=2`) are allowed; quoted strings may hold `,` `;`;
* `image/jpg` (not a registered type, but sent in the wild) is JPEG, as `jpg` is everywhere
  else in this service; `image/pjpeg`, `image/x-png` and friends are not;
* an element that does not parse (no `/`, a bad token, a q outside 0..1 or with more than
  three decimals, a parameter without `=` or with an unterminated quote) is ignored, never
  an error: a malformed element can only make us send the source's own format, which every
  client can show;
* only the first `MAX_ACCEPT` characters are read, cut back to the last complete element, so
  a truncated `image/avif;q=0` can never turn into an `image/avif`.

Pure and stdlib only: `service` feeds it the header, the settings and the source's alpha.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

MAX_ACCEPT = 4096  # characters read; real image Accept headers are under 200
MEMO_CHARS = 512  # headers up to this long are memoised (256 of them: <= 128 KiB)
SUBTYPES = {
    "avif": "avif",
    "jxl": "jxl",  # Chromium 156 sends image/jxl first
    "webp": "webp",
    "png": "png",
    "jpeg": "jpeg",
    "jpg": "jpeg",
}

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
_OWS = " \t"


def _split(text: str, sep: str) -> list[str]:
    """`text` split on `sep` outside quoted strings (backslash escapes inside them)."""
    if '"' not in text:
        return text.split(sep)
    parts: list[str] = []
    start, quoted, escaped = 0, False, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _element(element: str) -> tuple[str, float] | None:
    """(format, q) of one list element that names `image/<format>`; None for anything else
    (wildcards, other types, unknown subtypes, garbage)."""
    media, *params = _split(element, ";")
    kind, slash, subtype = media.strip(_OWS).partition("/")
    if not slash or not _TOKEN.fullmatch(kind) or not _TOKEN.fullmatch(subtype):
        return None
    if kind.lower() != "image":
        return None
    fmt = SUBTYPES.get(subtype.lower())
    if fmt is None:
        return None
    q = 1.0
    for param in params:
        if not param.strip(_OWS):
            continue  # `image/webp;` : an empty parameter is allowed
        name, eq, value = param.partition("=")
        name, value = name.strip(_OWS), value.strip(_OWS)
        if not eq or not _TOKEN.fullmatch(name):
            return None
        if not (_TOKEN.fullmatch(value) or _QUOTED.fullmatch(value)):
            return None
        if name.lower() == "q":
            if not _QVALUE.fullmatch(value):
                return None
            q = float(value)
            break  # what follows the weight are accept-extensions: not ours to read
    return fmt, q


def accepted(accept: str) -> frozenset[str]:
    """The formats `accept` names explicitly as `image/<format>` with q > 0 and never refuses.

    Memoised for ordinary lengths: browsers send a handful of distinct strings, so a request
    costs a dict lookup; an odd long header is parsed each time and never held.
    """
    if len(accept) <= MEMO_CHARS:
        return _accepted(accept)
    if len(accept) > MAX_ACCEPT:
        accept = accept[: accept.rfind(",", 0, MAX_ACCEPT + 1) + 1]
    return _parse(accept)


@functools.lru_cache(maxsize=256)
def _accepted(accept: str) -> frozenset[str]:
    return _parse(accept)


def _parse(accept: str) -> frozenset[str]:
    named: set[str] = set()
    refused: set[str] = set()
    for element in _split(accept, ","):
        found = _element(element)
        if found is not None:
            (named if found[1] > 0 else refused).add(found[0])
    return frozenset(named - refused)


def acceptable(
    accept: str | None, preferred: tuple[str, ...], allowed: frozenset[str]
) -> tuple[str, ...]:
    """The preferred formats (in the operator's order) that the client accepts and the
    operator allows; `()` means negotiation cannot change the output, whatever the source.
    On the request path: memoised like `accepted` (well under a microsecond on a hit)."""
    if not accept:
        return ()
    if len(accept) <= MEMO_CHARS:
        return _acceptable(accept, preferred, allowed)
    return _candidates(accepted(accept), preferred, allowed)


@functools.lru_cache(maxsize=256)
def _acceptable(
    accept: str, preferred: tuple[str, ...], allowed: frozenset[str]
) -> tuple[str, ...]:
    return _candidates(_accepted(accept), preferred, allowed)


def _candidates(
    names: frozenset[str], preferred: tuple[str, ...], allowed: frozenset[str]
) -> tuple[str, ...]:
    return tuple(f for f in preferred if f in names and f in allowed)


def pick(candidates: Iterable[str], has_alpha: bool) -> str | None:
    """The first candidate that suits the source (alpha never goes to JPEG); None = keep the
    source's own format."""
    for fmt in candidates:
        if not (has_alpha and fmt == "jpeg"):
            return fmt
    return None
