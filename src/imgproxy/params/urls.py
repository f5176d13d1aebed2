"""What follows from the URL alone, computed once per URL: the signature verdict, the spec
(or its error) and the `format` label of image_requests_total.

    Urls.parse(path, query, sec_ch_dpr, accept) -> Parsed   (an LRU of PARSED_MAX URLs)

The memo key is everything the answer depends on: the raw path and query, and the two
headers that can change it (`Sec-CH-DPR`; `Accept` when negotiation is on).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import parse_qsl

from .. import params, signing
from ..config import Settings
from ..errors import Forbidden, ImgProxyError
from ..params import TransformSpec

PARSED_MAX = 4096  # URLs whose parsed form is remembered (LRU)
_LABEL = re.compile(r"[a-z0-9]{1,10}")  # what a format or file extension can look like


@dataclass(slots=True, eq=False)
class Parsed:
    """What follows from the URL (and the two headers that matter) alone."""

    spec: TransformSpec | None
    error: ImgProxyError | None  # raised afresh (a copy) on every use
    label: str  # `format` of image_requests_total unless negotiation picks one
    known: object = None  # what serving it taught (service.Known), kept with the URL

    def get(self) -> TransformSpec:
        if self.error is not None:
            raise type(self.error)(self.error.reason)
        assert self.spec is not None
        return self.spec


class Urls:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._parsed: OrderedDict[tuple[str, str, str | None, str | None], Parsed] = OrderedDict()

    def parse(self, path: str, query: str, dpr: str | None, accept: str | None) -> Parsed:
        """Signature verdict, spec (or its error) and metric label of one URL, computed once."""
        memo_key = (path, query, dpr, accept)
        found = self._parsed.get(memo_key)
        if found is not None:
            self._parsed.move_to_end(memo_key)
            return found
        parsed = self._parse(path, query, dpr)
        self._parsed[memo_key] = parsed
        if len(self._parsed) > PARSED_MAX:
            self._parsed.popitem(last=False)
        return parsed

    def _parse(self, path: str, query: str, dpr: str | None) -> Parsed:
        s = self.settings
        # the prefix is stripped once, here: the signature and the parser see one path
        stripped = signing.strip_prefix(path, s.images.strip_path)
        asked = next((v for k, v in parse_qsl(query, errors="replace") if k == "format"), None)
        label = format_label(path, asked)
        try:
            if s.security.signature_keys:
                # first, on the raw path and query: an unsigned request learns nothing
                reason = signing.refusal(s.security.signature_keys, stripped, query)
                if reason is not None:
                    raise Forbidden(reason)
            spec = params.parse(stripped, query, {"sec-ch-dpr": dpr} if dpr else {}, s)
        except ImgProxyError as exc:
            return Parsed(None, exc, label)
        return Parsed(spec, None, label)


def format_label(path: str, asked: str | None) -> str:
    """`format` of image_requests_total, exactly as the original: the `format` parameter
    lowercased (`jpg` stays `jpg`) or the negotiated format, else the file's extension
    lowercased (`photo.JPG` -> `jpg`, `notes.txt` -> `txt`), `unknown` without one. A value
    that cannot be a format name (over 10 characters, or not [a-z0-9]) becomes `other`: a
    client cannot mint arbitrarily long label values."""
    if asked:
        value = asked.lower()
    else:
        name = path.rpartition("/")[2]
        if "." not in name:
            return "unknown"
        value = name.rpartition(".")[2].lower()
    return value if _LABEL.fullmatch(value) else "other"
