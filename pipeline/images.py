"""Image decoding under one size limit, shared by every stage that decodes an image.

A web image's header can claim any size: a 30000x30000 PNG is ~100 KB on the wire and 2.7 GB once decoded.
Every decoder in the engine (ingest's checks, the label stage, decontamination, the QC report, the student's
training and evaluation reads) opens images through ``open_image``, which reads the width and height from the
header and refuses more than ``max_pixels`` (``MAX_IMAGE_PIXELS`` unless told otherwise) BEFORE any pixel is
decoded. PIL's own guard is not enough: below twice ``Image.MAX_IMAGE_PIXELS`` it only warns and decodes.

EXIF orientation is not applied anywhere: boxes are in the stored pixels' coordinates, in every stage alike.

The label stage takes its images as BGR arrays (``decode_bgr``). A baseline or progressive JPEG of YCbCr or grey
pixels with 4:4:4, 4:2:2 or 4:2:0 chroma, nearly every web photo, decodes there with simplejpeg (libjpeg-turbo,
writing BGR directly): the same pixels as PIL's decode and conversion, byte for byte (its decoder is
libjpeg-turbo too, with the same integer IDCT and smooth chroma upsampling; ``tests/test_images.py`` checks each
of those kinds), in 0.35 against 0.70 ms a world crawl image (16 KiB) and 3.8 against 6.9 ms a noisy 1333x800 one
(155 KiB) on this project's 2-core Xeon (``python bench/decode.py``); it releases the GIL (two threads decoded
1.9x one). Anything else (PNG, WebP, CMYK, other chroma layouts, and any JPEG whose decoding
libjpeg warns about: corrupt or truncated data) goes through PIL, which decides as before.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from glip.preprocess import bgr_from_pil

try:
    import simplejpeg
except ImportError:  # a machine without it (bench/label_gpu.py's device) decodes with PIL: the same pixels
    simplejpeg = None

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


class DecodedBGR(NamedTuple):
    """``Decoded`` with ``array``: the ``H x W x 3`` uint8 BGR array (C-contiguous, writable), or None."""

    array: np.ndarray | None
    reason: str | None
    detail: str | None


def decode_bgr(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedBGR:
    """``decode_rgb`` as the BGR array the teacher takes (``glip.preprocess.to_bgr_uint8``'s layout): the same
    bytes as converting ``decode_rgb``'s image, the same refusals; a JPEG of the kinds the module docstring
    names decodes straight to BGR. Never raises for bad bytes."""
    try:
        with open_image(data, max_pixels) as image:
            if _turbo_decodes(image):
                try:
                    return DecodedBGR(_turbo_bgr(data), None, None)
                except ValueError:
                    pass  # libjpeg warned (corrupt or truncated data): PIL decides, as for any other image
            image.load()
            return DecodedBGR(bgr_from_pil(image), None, None)
    except ImageTooLarge as error:
        return DecodedBGR(None, "image_too_large", f"{type(error).__name__}: {error}")
    except (UnidentifiedImageError, *DECODE_ERRORS) as error:
        return DecodedBGR(None, "undecodable_image", f"{type(error).__name__}: {error}")


def _turbo_decodes(image: Image.Image) -> bool:
    """Whether simplejpeg decodes this opened image to PIL's pixels: a JPEG (not MPO, whose other frames PIL
    would know of) of grey or YCbCr pixels with 4:4:4, 4:2:2 or 4:2:0 chroma (PIL's ``get_sampling`` 0, 1, 2;
    -1 for any other layout)."""
    if simplejpeg is None or image.format != "JPEG":
        return False
    return image.mode == "L" or (image.mode == "RGB" and JpegImagePlugin.get_sampling(image) in (0, 1, 2))


def _turbo_bgr(data: bytes) -> np.ndarray:
    """libjpeg-turbo's decode as BGR with PIL's settings (integer IDCT, smooth upsampling); ``strict``: a
    warning (corrupt data, a premature end) raises ValueError rather than filling in grey."""
    return simplejpeg.decode_jpeg(data, colorspace="BGR", fastdct=False, fastupsample=False, strict=True)


def read_rgb(source: bytes | str | Path, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "") -> Image.Image:
    """``decode_rgb`` for readers that cannot skip an image: raises ``ImageTooLarge`` or ``ValueError``
    naming ``name`` (default the path) when it does not decode."""
    decoded = decode_rgb(source, max_pixels)
    if decoded.image is None:
        where = name or (str(source) if isinstance(source, str | Path) else "image bytes")
        kind = ImageTooLarge if decoded.reason == "image_too_large" else ValueError
        raise kind(f"{where}: {decoded.detail}")
    return decoded.image
