"""A loopback HTTP server that serves a folder of images, so img2dataset downloads the demo world's crawl as
it would the web. It binds 127.0.0.1 only."""

from __future__ import annotations

import errno
import functools
import http.server
import logging
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


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
    """``with ImageServer(folder) as server: server.base_url`` (port 0 picks a free port).

    ``fallback``: when ``port`` is taken, serve on a free port instead of raising, with a warning. The
    port is part of every crawl URL, hence of every sample's uid and of the order training reads samples in: a
    run that must repeat another bit for bit asks for the same port.
    """

    def __init__(self, folder: str | Path, port: int = 0, fallback: bool = False) -> None:
        handler = functools.partial(_Handler, directory=str(folder))
        try:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as error:
            if not (fallback and port and error.errno == errno.EADDRINUSE):
                raise
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            logger.warning(
                "port %d is taken: serving on %d instead (the crawl's URLs, hence its uids, differ from a run "
                "on %d)", port, self.port, port,
            )  # fmt: skip
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
