"""main(): read settings -> prepare the process -> serve. Also the shiv entry point.

Nothing here builds the app at import time: Sanic spawns its workers, and each worker
rebuilds the app from the pickled `AppLoader` factory (`partial(create_app, settings)`).
"""

from __future__ import annotations

import logging
import os
import sys
from functools import partial
from typing import Any

from . import __version__, logs
from .config import VARS, ConfigError, Settings, vars_by_group
from .signing import sign_url

USAGE = """\
usage: imgproxy [--help | --version | --check-config]
       imgproxy sign URL

Serves and transforms the images under IMAGE_PROXY_ROOT_PATH over HTTP.
`imgproxy sign '/photos/a.jpg?size=400&format=webp'` prints that path and query with a `sig`
appended, signed with the first key of IMAGE_PROXY_SIGNATURE_KEYS (IMAGE_PROXY_STRIP_PATH is
honoured); web apps can call imgproxy.signing.sign_url(url, key) instead.
Configuration comes from the environment only:
"""


def help_text() -> str:
    lines = [USAGE]
    for group, group_vars in vars_by_group():
        lines.append(f"\n{group}:")
        lines += [f"  {v.env:<38} {v.shown_default:<40} {v.help}" for v in group_vars]
    return "\n".join(lines) + "\n"


def serve(settings: Settings) -> int:
    """Run the server until it stops; the exit status: 1 when it stopped on a crash loop."""
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    from .app import create_app
    from .workers import crash_looped

    # The app's own main-process listeners make the metrics directory, the instance's
    # render queue and cache home, and start the worker watchdog: the Sanic CLI gets them too.
    loader = AppLoader(factory=partial(create_app, settings))
    app = loader.load()
    host, port = settings.server.bind
    app.prepare(host=host, port=port, workers=settings.server.workers)
    Sanic.serve(primary=app, app_loader=loader)
    return 1 if crash_looped(app) else 0


def sign_command(url: str) -> int:
    """`imgproxy sign URL`: only the two variables it needs are read (a web host running it has
    no image root); the key is never printed, not even when it is refused."""
    values: dict[str, Any] = {}
    for var in VARS:
        if var.env in ("IMAGE_PROXY_SIGNATURE_KEYS", "IMAGE_PROXY_STRIP_PATH"):
            text = os.environ.get(var.env, var.default)
            try:
                values[var.env] = var.parse(text)
            except ValueError as exc:
                shown = "<secret>" if var.secret else repr(text)
                print(f"imgproxy sign: {var.env}={shown}: {exc}", file=sys.stderr)
                return 1
    keys: tuple[str, ...] = values["IMAGE_PROXY_SIGNATURE_KEYS"]
    if not keys:
        print(
            "imgproxy sign: IMAGE_PROXY_SIGNATURE_KEYS is not set: no key to sign with",
            file=sys.stderr,
        )
        return 1
    print(sign_url(url, keys[0], str(values["IMAGE_PROXY_STRIP_PATH"])))
    return 0


def python_mismatch() -> str | None:
    """The .pyz holds compiled extensions for one CPython minor (recorded by build/shiv.sh in
    `imgproxy._build`, absent outside a .pyz): say so plainly instead of an ImportError later."""
    try:
        from ._build import PYTHON  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    want = ".".join(map(str, PYTHON))
    if sys.implementation.name == "cpython" and sys.version_info[:2] == tuple(PYTHON):
        return None
    have = f"{sys.implementation.name} {sys.version.split()[0]} ({sys.executable})"
    return (
        f"imgproxy: this .pyz was built for CPython {want} and contains compiled modules for it "
        f"only, but runs on {have}.\nimgproxy: run it as `python{want} {sys.argv[0]}` "
        f"or rebuild it with build/shiv.sh."
    )


def main(argv: list[str] | None = None) -> int:
    if problem := python_mismatch():  # before anything imports sanic or pyvips
        print(problem, file=sys.stderr)
        return 1
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"]):
        print(f"imgproxy {__version__}")
        return 0
    if args in (["--help"], ["-h"]):
        print(help_text(), end="")
        return 0
    if len(args) == 2 and args[0] == "sign":
        return sign_command(args[1])
    if args not in ([], ["--check-config"]):
        print(USAGE, file=sys.stderr, end="")
        return 2
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        if os.environ.get("IMAGE_PROXY_LOG_FORMAT", "").strip().lower() == "json":
            logs.configure("INFO", "json")  # even this line is the JSON that was asked for
            logging.getLogger("imgproxy").error("%s", exc)
        else:
            print(f"imgproxy: {exc}", file=sys.stderr)
        return 1
    if args == ["--check-config"]:
        print("imgproxy: configuration OK")
        return 0
    if settings.server.log_level != "DEBUG" or settings.observability.log_format == "json":
        # libvips' stderr noise on bad input (it writes to fd 2 itself: never JSON)
        os.environ.setdefault("VIPS_WARNING", "0")
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
