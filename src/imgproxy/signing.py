"""Signed URLs: HMAC-SHA256 over the path and the transform parameters. Standard library only,
so a web app can `from imgproxy.signing import sign_url` without pulling in the server.

The signed string (SPEC "Signed URLs and a bounded size set"):

    /photos/caf%C3%A9.jpg?format=webp&size=400
    └ the path as the client sent it: still percent-encoded, IMAGE_PROXY_STRIP_PATH removed
                          └ "?" + the transform parameters present (background, bw, dpr,
                            fit, format, gravity, h, q, resize_algorithm, size, w; whatever
                            their value, so bw=0 too),
                            sorted, as name=value with the value exactly as sent, joined by "&"

Nothing else is signed: `?v=3` or `utm_*` can be added without breaking the signature (the
server ignores them too), and the parameters may come in any order.

Choices the contract leaves open, decided here:

* A parameter *name* is recognised the way the query parser reads it (`%73ize` and `size` are
  one name, `+` is a space), and signed by that decoded name: otherwise `%73ize=9999` could be
  appended to a URL signed without `size` and reach the parser unsigned. The *value* is the
  raw text between `=` and the next `&`; a name without `=` is signed as `name=`.
* A repeated transform parameter is signed in every occurrence, the pairs sorted by name and
  then by raw value, so the signed string does not depend on the order of the query at all
  (the server then refuses the repetition itself with 400).
* The strip prefix is compared segment by segment after decoding each segment and removed
  from the raw path, once per URL (`strip_prefix`, by `params.urls`): the signature and the
  path parser see the same stripped path. A URL signed without the prefix is therefore
  valid with it too: `/photos/a.jpg?size=400&sig=…` and `/static/image/photos/a.jpg?size=400&sig=…`
  carry the same `sig` when IMAGE_PROXY_STRIP_PATH is `static/image/`.
* `sig` = URL-safe base64 of the 32-byte digest without padding: exactly 43 characters of
  `A-Z a-z 0-9 - _`. Anything else (padding, `+` or `/`, another length, percent-escapes) is
  malformed. The expected text is compared with `hmac.compare_digest` against every key, so
  only the one canonical spelling of a digest is accepted and the time taken does not depend
  on how much of a forged `sig` is right.
"""

from __future__ import annotations

import base64
import hmac
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

SIGNED_PARAMS = frozenset(
    (
        "background",
        "bw",
        "dpr",
        "fit",
        "format",
        "gravity",
        "h",
        "q",
        "resize_algorithm",
        "size",
        "w",
    )
)
SIG_PARAM = "sig"
SIG_LENGTH = 43  # base64 of 32 bytes, without the one "=" of padding
_SIG_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# What a browser leaves alone in a path or query: RFC 3986 reserved + unreserved, and "%"
# (existing escapes are kept as they are: the server signs what the client sends).
_URL_SAFE = "/:@!$&'()*+,;=-._~%?"


def _scan(raw_query: str) -> tuple[list[tuple[str, str]], list[str]]:
    """One pass over the raw query: the (decoded name, raw value) pairs to sign, in order,
    and every raw `sig` value. The name is decoded only when it needs it (`%`, `+`)."""
    signed: list[tuple[str, str]] = []
    sigs: list[str] = []
    for field in raw_query.split("&"):
        name, _, value = field.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        if name in SIGNED_PARAMS:
            signed.append((name, value))
        elif name == SIG_PARAM:
            sigs.append(value)
    return signed, sigs


def strip_prefix(raw_path: str, strip_path: str) -> str:
    """`raw_path` without the IMAGE_PROXY_STRIP_PATH prefix (normalised: `static/image`),
    when it starts with it (`/` when nothing follows it); segments are compared decoded.
    What both the signature and the path parser (`params.parse_path`) are given."""
    if not strip_path:
        return raw_path
    prefix = strip_path.split("/")
    segments = raw_path[1:].split("/") if raw_path.startswith("/") else raw_path.split("/")
    head = segments[: len(prefix)]
    if len(segments) >= len(prefix) and [unquote(s, errors="replace") for s in head] == prefix:
        return "/" + "/".join(segments[len(prefix) :])
    return raw_path


def signed_string(raw_path: str, raw_query: str) -> str:
    """The text that is signed: path (as sent, prefix already stripped) + sorted transform
    parameters. See the module docstring for the exact rules."""
    return _message(raw_path, _scan(raw_query)[0])


def _message(raw_path: str, signed: list[tuple[str, str]]) -> str:
    if not signed:
        return raw_path
    signed.sort()
    return raw_path + "?" + "&".join(map("=".join, signed))


def sign(key: str, path_and_query: str) -> str:
    """`sig` for `path_and_query` (a path, optionally `?query`; prefix already stripped):
    URL-safe base64 without padding of HMAC-SHA256(key, signed string)."""
    path, _, query = path_and_query.partition("?")
    return _sig(key, _encode(signed_string(path, query))).decode("ascii")


def _encode(message: str) -> bytes:
    return message.encode("utf-8", "surrogateescape")


def _sig(key: str, message: bytes) -> bytes:
    digest = hmac.digest(key.encode("utf-8"), message, "sha256")
    return base64.urlsafe_b64encode(digest)[:SIG_LENGTH]  # drop the one "="


def refusal(keys: Iterable[str], raw_path: str, raw_query: str) -> str | None:
    """None when the request carries a valid `sig` for one of `keys`, else the one-line
    reason for the 403. `raw_path` as sent, the prefix already stripped (`strip_prefix`). Every key is tried (key rotation); comparisons are constant-time.
    (The verdict of a URL is memoised with its spec: `urls.Urls`.)"""
    signed, sigs = _scan(raw_query)
    if not sigs:
        return "signature missing"
    if len(sigs) > 1:
        return "signature given more than once"
    if not _SIG_RE.fullmatch(sigs[0]):
        return "signature malformed"
    given = sigs[0].encode("ascii")
    message = _encode(_message(raw_path, signed))
    ok = False
    for key in keys:  # no early exit: every key costs the same
        ok |= hmac.compare_digest(_sig(key, message), given)
    return None if ok else "signature invalid"


def sign_url(url: str, key: str, strip_path: str = "") -> str:
    """Append `sig` to a URL for the image server; for web apps and `imgproxy sign`.

        >>> sign_url("/photos/a.jpg?size=400&format=webp", key)
        '/photos/a.jpg?size=400&format=webp&sig=…'

    `url` is a path with an optional query, or a full `https://host/path?query` URL (scheme,
    host and fragment are kept and not signed). Characters a browser would percent-encode
    (spaces, non-ASCII such as `café.jpg`) are encoded first, and the URL is returned exactly
    as signed, so it must be emitted as returned; existing `%XX` escapes are kept. An existing
    `sig` is replaced (re-signing with a new key). `strip_path` is IMAGE_PROXY_STRIP_PATH,
    only needed when `url` carries that prefix; a URL signed without the prefix is valid with
    it too.
    """
    parts = urlsplit(url)
    path = quote(parts.path or "/", safe=_URL_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    fields = [f for f in parts.query.split("&") if f and _name(f) != SIG_PARAM]
    query = quote("&".join(fields), safe=_URL_SAFE)
    norm = _normalise_prefix(strip_path)
    sig = sign(key, strip_prefix(path, norm) + "?" + query)
    query = f"{query}&{SIG_PARAM}={sig}" if query else f"{SIG_PARAM}={sig}"
    return urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))


def _name(field: str) -> str:
    return unquote_plus(field.partition("=")[0], errors="replace")


def _normalise_prefix(strip_path: str) -> str:
    """`/static/image/` -> `static/image`, as config parses IMAGE_PROXY_STRIP_PATH."""
    return "/".join(s for s in strip_path.split("/") if s)
