"""Where source bytes come from: the local root, then (optionally) the fallback origin.

    local.LocalSource   root confinement after resolving symlinks; stat gives the identity
    origin.HttpSource   the fallback origin (owns httpx): bounded, re-checked, revalidated

Sources return facts (`Located`: a `LocalFile` or a `Fetched` body); `service` chains them
(local, then the origin when the file is missing) and decides what the facts mean for the
response and the metrics.
"""

from .local import LocalFile, LocalSource, OpenFile, read_capped, read_file
from .origin import Fetched, HttpSource

Located = LocalFile | Fetched

__all__ = [
    "Fetched",
    "HttpSource",
    "LocalFile",
    "LocalSource",
    "Located",
    "OpenFile",
    "read_capped",
    "read_file",
]
