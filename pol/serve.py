"""Publish a bundle over HTTP: `pol serve BUNDLE --host 127.0.0.1 --port P`, for tests and small deployments.

The server is aiohttp's (`aiohttp.web`, its `FileResponse` answers range requests, HEAD, ETag and If-Match with
correct lengths). It serves the bundle's own files and nothing else, by an exact list fixed when it starts:

    directory bundle  ->  URL/manifest.json, URL/checkpoints/step-NNNNNNNNN.safetensors (the file table's names)
    archive bundle    ->  URL/NAME.tar (the archive, at its own name)

A request for any other path (`..`, `%2e%2e`, an absolute path, a file the manifest does not list) is a 404 without
touching the disk, and a listed file that became a link or a non-regular file since the start is a 403. The bundle is
validated (quick check: manifest, records, commitment, file table) before anything is served.

`serve_in_thread` runs a server on a background thread (tests, benchmarks) and records each request it answered
(`Served`), so a test can count the bytes a verifier fetched.

Raises (at start) the errors of `pol.bundle.open_bundle`, and RemoteError when aiohttp is not installed.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import MANIFEST_NAME, open_bundle
from .errors import RemoteError

__all__ = ["Served", "Server", "bundle_routes", "make_app", "serve_forever", "serve_in_thread"]


@dataclass(frozen=True, slots=True)
class Served:
    """One answered request: method, path as asked, status, and the body length announced (0 when none)."""

    method: str
    path: str
    status: int
    length: int
    range: str | None


def _web() -> Any:
    try:
        from aiohttp import web
    except ImportError:
        raise RemoteError("pol serve needs aiohttp: pip install 'pol[remote]'") from None
    return web


def bundle_routes(bundle: str | Path) -> tuple[dict[str, Path], str]:
    """The URL paths a bundle is served at (path -> file) and the URL path a verifier opens ("/" or "/NAME.tar").
    Validates the bundle first (quick check). Raises BundleError."""
    bundle = Path(bundle)
    with open_bundle(bundle, full=False) as b:
        names = [MANIFEST_NAME, *sorted(b.manifest.files)]
    if bundle.is_dir():
        return {f"/{name}": bundle / name for name in names}, "/"
    return {f"/{bundle.name}": bundle}, f"/{bundle.name}"


def make_app(bundle: str | Path, log: list[Served] | None = None) -> Any:
    """An aiohttp application serving exactly the bundle's files. `log`, when given, receives each answer."""
    return _app(bundle_routes(bundle)[0], log)


def _app(routes: dict[str, Path], log: list[Served] | None) -> Any:
    web = _web()
    real = {url: os.path.realpath(path) for url, path in routes.items()}  # where each file really was at the start

    async def handle(request: Any) -> Any:
        path = routes.get(request.path)  # the decoded path, matched exactly: nothing is joined or resolved
        if path is None:
            raise web.HTTPNotFound()
        try:
            st = path.lstat()
        except OSError:
            raise web.HTTPNotFound() from None
        if not stat.S_ISREG(st.st_mode) or os.path.realpath(path) != real[request.path]:
            # a file, or a directory above it (checkpoints/), that became a link since the start
            raise web.HTTPForbidden(text="not a regular file of the bundle")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)  # GET routes answer HEAD too
    if log is not None:

        async def record(request: Any, response: Any) -> None:
            log.append(Served(request.method, request.path, response.status, response.content_length or 0,
                              request.headers.get("Range")))

        app.on_response_prepare.append(record)
    return app


class Server:
    """A server running on a background thread: `url` to open, `requests` answered so far, `stop()`."""

    def __init__(self, app: Any, host: str, port: int, path: str = "/") -> None:
        web = _web()
        self.requests: list[Served] = []
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, host, port)
        self._loop.run_until_complete(site.start())
        bound = self._runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}{path}"
        self._thread = threading.Thread(target=self._loop.run_forever, name="pol-serve", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@contextmanager
def serve_in_thread(bundle: str | Path | Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[Server]:
    """Serve a bundle (or any aiohttp application: tests' hostile servers) on a background thread while the
    `with` block runs; yields the running Server (`url`, `requests`). Port 0 picks a free port."""
    if isinstance(bundle, str | Path):
        log: list[Served] = []
        routes, path = bundle_routes(bundle)
        server = Server(_app(routes, log), host, port, path)
        server.requests = log
    else:
        server = Server(bundle, host, port)
    try:
        yield server
    finally:
        server.stop()


def serve_forever(bundle: str | Path, host: str, port: int, on_start: Any = None) -> None:
    """Serve a bundle until interrupted (`pol serve`). `on_start(url)` is called once the socket listens."""
    with serve_in_thread(bundle, host, port) as server:
        if on_start is not None:
            on_start(server.url)
        threading.Event().wait()
