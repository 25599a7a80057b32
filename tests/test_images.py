"""One image size limit, checked from the header before decoding, in every stage that decodes."""

from __future__ import annotations

import io
import re
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from glip.preprocess import bgr_from_rgb
from pipeline import decontam, images, label
from student.data import GroundedImage, read_image, record_image


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels and that holds no pixel data at all."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# 30000x30000 is over twice PIL's limit (PIL raises itself); 10000x10000 is between PIL's warning and its
# error: PIL alone would decode it (300 MB).
BOMBS = {"30000x30000": header_only_png(30_000, 30_000), "10000x10000": header_only_png(10_000, 10_000)}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, at open: nothing decoded
@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_header_over_the_limit_is_refused_before_decoding(name: str) -> None:
    decoded = images.decode_rgb(BOMBS[name])
    # Decoding would have failed as undecodable (the file holds no pixel data) after allocating the image.
    assert decoded.image is None and decoded.reason == "image_too_large"
    assert name in decoded.detail or "exceeds limit" in decoded.detail
    assert label.decode_image(BOMBS[name])[0] is None
    assert images.decode_bgr(BOMBS[name])[:2] == (None, "image_too_large")
    assert decontam.fingerprint(BOMBS[name]) is None
    with pytest.raises(images.ImageTooLarge, match="image too large"):
        with images.open_image(BOMBS[name]):
            pass


def test_the_limit_is_a_setting_and_good_images_decode() -> None:
    data = _png(40, 30)
    assert images.decode_rgb(data).image.size == (40, 30)
    assert images.decode_rgb(data, max_pixels=1199).reason == "image_too_large"
    assert images.size_problem(40, 30, 1199) == "image too large: 40x30 pixels"
    assert images.size_problem(40, 30, 1200) is None
    broken = images.decode_rgb(data[: len(data) // 2])
    assert broken.image is None and broken.reason == "undecodable_image"
    assert images.decode_rgb(b"<html></html>").reason == "undecodable_image"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_training_reads_refuse_a_bomb_naming_the_file_or_the_shard(tmp_path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(BOMBS["10000x10000"])
    with pytest.raises(images.ImageTooLarge, match=f"{path}: ImageTooLarge: image too large: 10000x10000"):
        read_image(str(path))
    (tmp_path / "page.jpg").write_bytes(b"<html>not an image</html>")
    with pytest.raises(ValueError, match="page.jpg: UnidentifiedImageError"):
        read_image(str(tmp_path / "page.jpg"))
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for name, data in (("a.png", _png(8, 6)), ("b.png", BOMBS["30000x30000"])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as archive:
        ranges = {m.name: (m.offset_data, m.size) for m in archive.getmembers()}
    record = GroundedImage(str(shard), 8, 6, np.zeros((0, 4), np.float32), image_range=ranges["a.png"])
    assert record_image(record).size == (8, 6)
    bomb = GroundedImage(
        str(shard), 30_000, 30_000, np.zeros((0, 4), np.float32), image_range=ranges["b.png"]
    )
    with pytest.raises(images.ImageTooLarge, match=re.escape(f"{shard} at {ranges['b.png']}")):
        record_image(bomb)


def _encoded(mode: str, size: tuple[int, int], form: str = "JPEG", **options) -> bytes:
    """Noise over a smooth gradient (edges and flat parts for the chroma upsampling), as ``mode``, saved."""
    width, height = size
    rng = np.random.default_rng(width * 7 + height)
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    pixels = np.clip(ramp + rng.normal(0, 40, ramp.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, form, **options)
    return buffer.getvalue()


# (bytes, whether libjpeg-turbo decodes it straight to BGR): every kind the fast path takes, and some it leaves
# to PIL (CMYK, PNG, palette GIF).
KINDS = {
    "jpeg 4:4:4": (_encoded("RGB", (291, 198), subsampling=0), True),
    "jpeg 4:2:2": (_encoded("RGB", (291, 198), subsampling=1), True),
    "jpeg 4:2:0 odd size": (_encoded("RGB", (333, 517), subsampling=2), True),
    "jpeg 1x1": (_encoded("RGB", (1, 1)), True),
    "jpeg 7x5 quality 30": (_encoded("RGB", (7, 5), quality=30), True),
    "jpeg progressive": (_encoded("RGB", (160, 96), progressive=True), True),
    "jpeg restart markers": (_encoded("RGB", (160, 96), restart_marker_blocks=2), True),
    "jpeg grey": (_encoded("L", (120, 90)), True),
    "jpeg cmyk": (_encoded("CMYK", (120, 90)), False),
    "png rgba": (_encoded("RGBA", (40, 30), "PNG"), False),
    "gif palette": (_encoded("P", (40, 30), "GIF"), False),
}


@pytest.fixture
def turbo_calls(monkeypatch) -> list[bool]:
    """Each call of the libjpeg-turbo path: True when it decoded, False when libjpeg warned."""
    calls, turbo_bgr = [], images._turbo_bgr

    def spied(data: bytes) -> np.ndarray:
        try:
            array = turbo_bgr(data)
        except ValueError:
            calls.append(False)
            raise
        calls.append(True)
        return array

    monkeypatch.setattr(images, "_turbo_bgr", spied)
    return calls


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_decode_bgr_is_pils_decode_and_conversion_byte_for_byte(kind: str, turbo_calls) -> None:
    data, turbo = KINDS[kind]
    expected = bgr_from_rgb(np.asarray(images.decode_rgb(data).image))
    decoded = images.decode_bgr(data)
    assert decoded.reason is None and decoded.array.dtype == np.uint8
    assert decoded.array.flags.c_contiguous and decoded.array.flags.writeable
    np.testing.assert_array_equal(decoded.array, expected)
    assert turbo_calls == ([True] if turbo else [])


def test_a_jpeg_libjpeg_warns_about_is_left_to_pil(turbo_calls) -> None:
    data = bytearray(_encoded("RGB", (80, 60), quality=90))
    middle = len(data) // 2
    data[middle : middle + 2] = b"\xff\xd3"  # a stray restart marker: "premature end of data segment"
    corrupt = bytes(data)
    decoded = images.decode_bgr(corrupt)
    np.testing.assert_array_equal(decoded.array, bgr_from_rgb(np.asarray(images.decode_rgb(corrupt).image)))
    truncated = _encoded("RGB", (80, 60))[:-200]
    refused = images.decode_bgr(truncated)
    assert refused.reason == "undecodable_image" and refused[1:] == images.decode_rgb(truncated)[1:]
    assert turbo_calls == [False, False]  # both tried, both decided by PIL (one decodes, one does not)
    assert images.decode_bgr(b"<html></html>").reason == "undecodable_image"
