"""A real HTTP server on 127.0.0.1 serving synthetic images and the hostile answers a web crawl meets.

Routes (``HostileServer.url(path)``):
  /img/<name>        a registered image (``add``), optionally behind ``/slow/`` (a delay first)
  /404, /500         those statuses
  /hang              answers nothing for ``hang_seconds`` (longer than the client timeout)
  /loop              a redirect to itself
  /redirect/<port>   a redirect to 127.0.0.1:<port>/img/good (an address the allow-list may refuse)
  /to-ftp            a redirect to ftp://
  /flaky/<name>      503 until ``heal()``, then the registered image
Every request path is logged in ``requests``.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def smooth_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct RGB picture (random low-frequency colour field plus a shape), ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(grid).copy()
    x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    pixels[y0 : y0 + size[1] // 3, x0 : x0 + size[0] // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def encode(image: Image.Image, image_format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def huge_png(side: int = 30000) -> bytes:
    """A valid 1-bit ``side`` x ``side`` PNG (all black): ~100 KB on the wire, 900 MP when decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    body = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def hostile_bodies() -> dict[str, bytes]:
    """Bodies served under /img/ that are not good images (name -> bytes); the names say what they are."""
    good = encode(smooth_image(10_001, (160, 120)), quality=90)
    return {
        "truncated.jpg": good[: len(good) // 2],
        "page.jpg": b"<!doctype html><html><body>Not Found</body></html>",
        "empty.jpg": b"",
        "one-pixel.png": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "huge.png": huge_png(),
    }


def odd_good_bodies() -> dict[str, bytes]:
    """Unusual but valid images (name -> bytes) that must land in a shard."""
    base = smooth_image(10_002, (80, 64))
    sixteen = (np.asarray(base.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    return {
        "cmyk.jpg": encode(base.convert("CMYK"), quality=90),
        "sixteen-bit.png": encode(Image.fromarray(sixteen), "PNG"),
        "alpha.png": encode(base.convert("RGBA"), "PNG"),
    }


class HostileServer:
    """Threaded HTTP server on 127.0.0.1:<free port>; use as a context manager."""

    def __init__(self, hang_seconds: float = 4.0, slow_seconds: float = 0.25) -> None:
        self.hang_seconds = hang_seconds
        self.slow_seconds = slow_seconds
        self.images: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.healed = False
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def add(self, name: str, data: bytes) -> str:
        """Register an image body; returns its /img/ URL."""
        self.images[name] = data
        return self.url(f"img/{name}")

    def heal(self) -> None:
        self.healed = True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                server._answer(self)

        return Handler

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        if path.startswith("/slow/"):
            time.sleep(self.slow_seconds)
            path = path[len("/slow") :]
        if path in ("/404", "/500"):
            return self._send(handler, int(path[1:]), b"error page", "text/html")
        if path == "/hang":
            self._stop.wait(self.hang_seconds)
            return self._send(handler, 200, b"late", "image/jpeg")
        if path == "/loop":
            return self._redirect(handler, self.url("loop"))
        if path.startswith("/redirect/"):
            return self._redirect(handler, f"http://127.0.0.1:{path.rsplit('/', 1)[1]}/img/good")
        if path == "/to-ftp":
            return self._redirect(handler, "ftp://127.0.0.1/secret.jpg")
        if path.startswith("/flaky/") and not self.healed:
            return self._send(handler, 503, b"try later", "text/plain")
        name = path.rsplit("/", 1)[-1]
        if path.startswith(("/img/", "/flaky/")) and name in self.images:
            return self._send(handler, 200, self.images[name], "image/jpeg")
        return self._send(handler, 404, b"no such image", "text/plain")

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): that is the point of /hang

    @staticmethod
    def _redirect(handler: BaseHTTPRequestHandler, location: str) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
