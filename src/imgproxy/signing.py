"""Signed URLs: HMAC-SHA256 over the path and the transform parameters. Standard library only,
so a web app can `from imgproxy.signing import sign_url` without pulling in the server.

The signed string (SPEC "Signed URLs and a bounded size set"):

    /photos/caf%C3%A9.jpg?format=webp&size=400
    └ the path as the client sent it: still percent-encoded, IMAGE_PROXY_STRIP_PATH removed
                          └ "?" + the transform parameters present (bw, dpr, format,
                            resize_algorithm, size; whatever their value, so bw=0 too),
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
* The strip prefix is compared segment by segment after decoding each segment, as the path
  parser does, and removed from the raw path. A URL signed without the prefix is therefore
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
from collections.abc import Iterable, Iterator
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

SIGNED_PARAMS = frozenset(("bw", "dpr", "format", "resize_algorithm", "size"))
SIG_PARAM = "sig"
SIG_LENGTH = 43  # base64 of 32 bytes, without the one "=" of padding
_SIG_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# What a browser leaves alone in a path or query: RFC 3986 reserved + unreserved, and "%"
# (existing escapes are kept as they are: the server signs what the client sends).
_URL_SAFE = "/:@!$&'()*+,;=-._~%?"


def _pairs(raw_query: str) -> Iterator[tuple[str, str]]:
    """(decoded name, raw value) of every non-empty `&`-separated field, in order."""
    for field in raw_query.split("&"):
        if field:
            name, _, value = field.partition("=")
            yield unquote_plus(name, errors="replace"), value


def strip_prefix(raw_path: str, strip_path: str) -> str:
    """`raw_path` without the IMAGE_PROXY_STRIP_PATH prefix (normalised: `static/image`),
    when it starts with it; segments are compared decoded, as `params.parse_path` does."""
    if not strip_path:
        return raw_path
    prefix = strip_path.split("/")
    segments = raw_path[1:].split("/") if raw_path.startswith("/") else raw_path.split("/")
    head = segments[: len(prefix)]
    if len(segments) > len(prefix) and [unquote(s, errors="replace") for s in head] == prefix:
        return "/" + "/".join(segments[len(prefix) :])
    return raw_path


def signed_string(raw_path: str, raw_query: str) -> str:
    """The text that is signed: path (as sent, prefix already stripped) + sorted transform
    parameters. See the module docstring for the exact rules."""
    return _joined(raw_path, list(_pairs(raw_query)))


def _joined(raw_path: str, pairs: list[tuple[str, str]]) -> str:
    signed = sorted((n, v) for n, v in pairs if n in SIGNED_PARAMS)
    if not signed:
        return raw_path
    return raw_path + "?" + "&".join(f"{n}={v}" for n, v in signed)


def sign(key: str, path_and_query: str) -> str:
    """`sig` for `path_and_query` (a path, optionally `?query`; prefix already stripped):
    URL-safe base64 without padding of HMAC-SHA256(key, signed string)."""
    path, _, query = path_and_query.partition("?")
    return _sig(key, signed_string(path, query))


def _sig(key: str, message: str) -> str:
    digest = hmac.digest(key.encode("utf-8"), message.encode("utf-8", "surrogateescape"), "sha256")
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def refusal(keys: Iterable[str], raw_path: str, raw_query: str, strip_path: str = "") -> str | None:
    """None when the request carries a valid `sig` for one of `keys`, else the one-line
    reason for the 403. Every key is tried (key rotation); comparisons are constant-time."""
    pairs = list(_pairs(raw_query))
    sigs = [value for name, value in pairs if name == SIG_PARAM]
    if not sigs:
        return "signature missing"
    if len(sigs) > 1:
        return "signature given more than once"
    given = sigs[0]
    if not _SIG_RE.fullmatch(given):
        return "signature malformed"
    message = _joined(strip_prefix(raw_path, strip_path), pairs)
    ok = False
    for key in keys:  # no early exit: every key costs the same
        ok |= hmac.compare_digest(_sig(key, message).encode(), given.encode())
    return None if ok else "signature invalid"


def verify(keys: Iterable[str], raw_path: str, raw_query: str, strip_path: str = "") -> bool:
    """True when the request (raw path as sent, raw query string) is validly signed."""
    return refusal(keys, raw_path, raw_query, strip_path) is None


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
    sig = _sig(key, signed_string(strip_prefix(path, norm), query))
    query = f"{query}&{SIG_PARAM}={sig}" if query else f"{SIG_PARAM}={sig}"
    return urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))


def _name(field: str) -> str:
    return unquote_plus(field.partition("=")[0], errors="replace")


def _normalise_prefix(strip_path: str) -> str:
    """`/static/image/` -> `static/image`, as config parses IMAGE_PROXY_STRIP_PATH."""
    return "/".join(s for s in strip_path.split("/") if s)
