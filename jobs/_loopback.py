"""A loopback HTTP server that serves a folder of images, so img2dataset downloads the demo world's crawl as
it would the web. It binds 127.0.0.1 only."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``/img/<name>`` from the folder; everything else is 404 (as a dead link on the web)."""

    def translate_path(self, path: str) -> str:
        name = path.split("?", 1)[0].removeprefix("/img/")
        if "/" in name or name in {"", ".", ".."}:
            return str(Path(self.directory) / "\0missing")
        return str(Path(self.directory) / name)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        return


class ImageServer:
    """``with ImageServer(folder) as server: server.base_url`` (port 0 picks a free port)."""

    def __init__(self, folder: str | Path, port: int = 0) -> None:
        handler = functools.partial(_Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def point_at(self, folder: str | Path) -> None:
        """Serve another folder (the world is generated after the port is known)."""
        self.httpd.RequestHandlerClass = functools.partial(_Handler, directory=str(folder))

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
