"""The exception tree. Each class knows its HTTP status and its public one-line reason.

    ImgProxyError                 500  (never raised directly)
    ├── BadRequest                400  a query value is invalid
    ├── Forbidden                 403  signing on and `sig` missing, malformed, repeated or wrong
    ├── NotFound                  404  missing file, or a path that tries to leave the root
    ├── UnsupportedMediaType      415  extension or bytes are not a supported image type
    ├── UnprocessableImage        422  corrupt/truncated image, or over the pixel limit
    ├── RenderFailed              500  the server's own libvips failure (an encoder missing or
    │                                  refusing, WebP's 16383 px limit, out of memory); logged once
    ├── Overloaded                503  transform queue full (carries Retry-After)
    └── UpstreamError             502  fallback origin failed, sent too much or not an image
        └── UpstreamTimeout       504  fallback origin too slow

`params`, `sources`, `transform` and `service` raise these; exactly one handler in `app`
turns them into `text/plain` responses.
"""

from __future__ import annotations


class ImgProxyError(Exception):
    status: int = 500
    reason: str = "internal error"

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason or type(self).reason
        super().__init__(self.reason)


class BadRequest(ImgProxyError):
    status = 400
    reason = "bad request"


class Forbidden(ImgProxyError):
    status = 403
    reason = "forbidden"


class NotFound(ImgProxyError):
    status = 404
    reason = "not found"


class UnsupportedMediaType(ImgProxyError):
    status = 415
    reason = "unsupported media type"


class UnprocessableImage(ImgProxyError):
    status = 422
    reason = "image cannot be processed"


class RenderFailed(ImgProxyError):
    """libvips failed after the input had decoded: never the client's fault. The cause
    (chained with `raise ... from`) is logged once, where the render ran; the client only
    gets the short public reason."""

    status = 500
    reason = "image could not be rendered"


class Overloaded(ImgProxyError):
    status = 503
    reason = "server busy, retry later"

    def __init__(self, reason: str | None = None, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class UpstreamError(ImgProxyError):
    status = 502
    reason = "fallback origin error"


class UpstreamTimeout(UpstreamError):
    status = 504
    reason = "fallback origin timed out"


# Label values for image_requests_total{status=...}; bounded and stable for dashboards.
STATUS_LABELS = {
    200: "ok",
    304: "not_modified",
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    415: "unsupported_media_type",
    422: "unprocessable",
    502: "bad_gateway",
    503: "overloaded",
    504: "gateway_timeout",
}


def status_label(status: int) -> str:
    return STATUS_LABELS.get(status, "error")
