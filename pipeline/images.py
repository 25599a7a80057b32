"""Image decoding under one size limit, shared by every stage that decodes an image.

A web image's header can claim any size: a 30000x30000 PNG is ~100 KB on the wire and 2.7 GB once decoded.
Every decoder in the engine (ingest's checks, the label stage, decontamination, the QC report, the student's
training and evaluation reads) opens images through ``open_image``, which reads the width and height from the
header and refuses more than ``max_pixels`` (``MAX_IMAGE_PIXELS`` unless told otherwise) BEFORE any pixel is
decoded. PIL's own guard is not enough: below twice ``Image.MAX_IMAGE_PIXELS`` it only warns and decodes.

EXIF orientation is not applied anywhere: boxes are in the stored pixels' coordinates, in every stage alike.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NamedTuple

from PIL import Image, UnidentifiedImageError

# PIL's own warning threshold (a 0.25 GB RGB image); ingest's ``max_image_pixels`` defaults to it.
MAX_IMAGE_PIXELS = 89_478_485

# What PIL raises on malformed files (truncated data, bad headers, broken chunks).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError, struct.error)


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than the limit (nothing was decoded)."""


def size_problem(width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why a ``width`` x ``height`` image is refused (``"image too large: WxH pixels"``), or None."""
    if width * height > max_pixels:
        return f"image too large: {width}x{height} pixels"
    return None


@contextmanager
def open_image(
    source: bytes | str | Path | IO[bytes], max_pixels: int = MAX_IMAGE_PIXELS
) -> Iterator[Image.Image]:
    """``Image.open`` of bytes, a path or a file object, its size checked from the header (not yet decoded).

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels (PIL's DecompressionBombError becomes this too).
        PIL.UnidentifiedImageError, OSError ...: not an image (``DECODE_ERRORS``).
    """
    handle = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        image = Image.open(handle)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"image too large: {error}") from None
    with image:
        problem = size_problem(*image.size, max_pixels)
        if problem is not None:
            raise ImageTooLarge(f"{problem} (limit {max_pixels})")
        yield image


class Decoded(NamedTuple):
    """``image`` (RGB, fully decoded) or, when it is None, ``reason`` (``image_too_large`` or
    ``undecodable_image``) and ``detail`` (the error's type and message)."""

    image: Image.Image | None
    reason: str | None
    detail: str | None


def decode_rgb(source: bytes | str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Decoded:
    """Decode an image completely to RGB, or say why not; never raises for bad bytes."""
    try:
        with open_image(source, max_pixels) as image:
            image.load()
            return Decoded(image.convert("RGB"), None, None)
    except ImageTooLarge as error:
        return Decoded(None, "image_too_large", f"{type(error).__name__}: {error}")
    except (UnidentifiedImageError, *DECODE_ERRORS) as error:
        return Decoded(None, "undecodable_image", f"{type(error).__name__}: {error}")


def read_rgb(source: bytes | str | Path, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "") -> Image.Image:
    """``decode_rgb`` for readers that cannot skip an image: raises ``ImageTooLarge`` or ``ValueError``
    naming ``name`` (default the path) when it does not decode."""
    decoded = decode_rgb(source, max_pixels)
    if decoded.image is None:
        where = name or (str(source) if isinstance(source, str | Path) else "image bytes")
        kind = ImageTooLarge if decoded.reason == "image_too_large" else ValueError
        raise kind(f"{where}: {decoded.detail}")
    return decoded.image
