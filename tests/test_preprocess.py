"""Image preprocessing: resize rule, BGR normalisation, padding and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glip.preprocess import (
    ImagePreprocessor,
    bgr_from_pil,
    bgr_from_rgb,
    boxes_to_original,
    pad_to_batch,
    to_bgr_uint8,
)

MEAN = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
STD = torch.tensor([57.375, 57.12, 58.395]).view(3, 1, 1)


def random_bgr(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def normalized(bgr: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(bgr).permute(2, 0, 1).float() - MEAN) / STD


@pytest.mark.golden
def test_case_image_matches_official_model_input(reference_case1):
    inputs = reference_case1["inputs"]
    batch = ImagePreprocessor().batch([inputs["image_bgr_uint8"].numpy()], resize=False)
    assert batch.images.dtype == torch.float32
    torch.testing.assert_close(batch.images, inputs["image"], atol=1e-4, rtol=0)
    assert batch.image_sizes == [(256, 320)] and batch.scale_factors == [(1.0, 1.0)]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 640), (800, 1066)),  # shorter side to 800, longer truncated (1066.67)
        ((640, 480), (1066, 800)),
        ((800, 1000), (800, 1000)),  # already there: unchanged
        ((1000, 3000), (444, 1332)),  # capped: round(444.33) = 444, then int(1332.0)
        ((100, 200), (666, 1332)),  # 666.5 rounds half to even, as Python's round in the official code
        ((1333, 1333), (800, 800)),
    ],
)
def test_resize_rule_matches_maskrcnn_benchmark(size, expected):
    assert ImagePreprocessor().resized_size(*size) == expected


def test_resize_rule_without_cap_and_with_other_sizes():
    assert ImagePreprocessor(min_size=800, max_size=None).resized_size(100, 400) == (800, 3200)
    assert ImagePreprocessor(min_size=64, max_size=100).resized_size(50, 200) == (25, 100)


def test_single_image_is_padded_bottom_right_with_zeros():
    bgr = random_bgr(50, 70)
    batch = ImagePreprocessor(size_divisibility=32).batch([bgr], resize=False)
    assert batch.images.shape == (1, 3, 64, 96)
    torch.testing.assert_close(batch.images[0, :, :50, :70], normalized(bgr))
    assert batch.images[0, :, 50:].abs().sum() == 0 and batch.images[0, :, :, 70:].abs().sum() == 0
    assert batch.image_sizes == [(50, 70)]


def test_batch_of_two_sizes_after_resizing():
    preprocessor = ImagePreprocessor(min_size=64, max_size=128)
    images = [random_bgr(30, 40, seed=1), random_bgr(100, 50, seed=2)]
    batch = preprocessor.batch(images)
    assert batch.image_sizes == [(64, 85), (128, 64)]
    assert batch.images.shape == (2, 3, 128, 96)
    assert batch.scale_factors == [(64 / 30, 85 / 40), (128 / 100, 64 / 50)]
    for index, image in enumerate(images):
        alone, _ = preprocessor.preprocess(image)
        height, width = batch.image_sizes[index]
        torch.testing.assert_close(batch.images[index, :, :height, :width], alone, atol=0, rtol=0)
        assert batch.images[index, :, height:].abs().sum() == 0
        assert batch.images[index, :, :, width:].abs().sum() == 0


def test_pil_rgb_numpy_bgr_and_tensor_bgr_agree():
    bgr = random_bgr(40, 60)
    pil = Image.fromarray(bgr[:, :, ::-1].copy(), mode="RGB")
    preprocessor = ImagePreprocessor(min_size=48, max_size=100)
    from_numpy = preprocessor.batch([bgr]).images
    torch.testing.assert_close(preprocessor.batch([pil]).images, from_numpy, atol=0, rtol=0)
    torch.testing.assert_close(preprocessor.batch([torch.from_numpy(bgr)]).images, from_numpy, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (240, 320, 3)])
def test_bgr_from_rgb_is_a_contiguous_copy_with_the_channels_reversed(shape):
    rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    bgr = bgr_from_rgb(rgb)
    assert bgr.flags.c_contiguous and not np.shares_memory(bgr, rgb)
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK", "1", "I;16", "YCbCr"])
@pytest.mark.parametrize("size", [(1, 1), (5, 7), (291, 198)])
def test_bgr_from_pil_gives_the_bytes_of_converting_through_rgb(mode, size):
    pixels = np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB").convert(mode)
    bgr = bgr_from_pil(image)
    assert bgr.shape == (size[1], size[0], 3) and bgr.dtype == np.uint8
    assert bgr.flags.c_contiguous and bgr.flags.writeable
    np.testing.assert_array_equal(bgr, bgr_from_rgb(np.asarray(image.convert("RGB"))))
    torch.testing.assert_close(to_bgr_uint8(image), torch.from_numpy(bgr).permute(2, 0, 1), atol=0, rtol=0)


def test_grayscale_pil_is_converted():
    gray = Image.fromarray(np.full((10, 12), 77, dtype=np.uint8), mode="L")
    assert torch.equal(to_bgr_uint8(gray), torch.full((3, 10, 12), 77, dtype=torch.uint8))


def test_resize_stays_close_to_pil_bilinear():
    bgr = random_bgr(60, 80, seed=3)
    bgr = np.ascontiguousarray(np.repeat(np.repeat(bgr, 4, axis=0), 4, axis=1))  # smooth-ish, 240x320
    preprocessor = ImagePreprocessor(min_size=600, max_size=1000)
    ours, _ = preprocessor.preprocess(bgr)
    ours_pixels = (ours * STD + MEAN).round()
    height, width = ours.shape[-2:]
    pil = Image.fromarray(bgr[:, :, ::-1].copy()).resize((width, height), Image.BILINEAR)
    reference = torch.from_numpy(np.asarray(pil)[:, :, ::-1].copy()).permute(2, 0, 1).float()
    difference = (ours_pixels - reference).abs()
    assert difference.max() <= 2 and difference.mean() < 0.1


def test_boxes_map_back_to_original_pixels():
    preprocessor = ImagePreprocessor(min_size=100, max_size=400)
    batch = preprocessor.batch([random_bgr(50, 80)])
    assert batch.image_sizes == [(100, 160)]
    boxes_in_model_pixels = torch.tensor([[20.0, 10.0, 160.0, 100.0]])
    expected = torch.tensor([[10.0, 5.0, 80.0, 50.0]])
    torch.testing.assert_close(boxes_to_original(boxes_in_model_pixels, batch.scale_factors[0]), expected)


def test_pad_to_batch_without_divisibility_uses_max_size():
    batch = pad_to_batch([torch.ones(3, 5, 7), torch.ones(3, 6, 4)], size_divisibility=0)
    assert batch.shape == (2, 3, 6, 7)
    assert batch[0, :, 5:].sum() == 0 and batch[1, :, :, 4:].sum() == 0


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (np.zeros((10, 10, 3), dtype=np.float32), ValueError),
        (np.zeros((10, 10), dtype=np.uint8), ValueError),
        (np.zeros((0, 10, 3), dtype=np.uint8), ValueError),
        ([[0, 0, 0]], TypeError),
    ],
)
def test_invalid_images_are_rejected(image, error):
    with pytest.raises(error):
        ImagePreprocessor().batch([image])


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError):
        ImagePreprocessor(min_size=800, max_size=600)
    with pytest.raises(ValueError):
        pad_to_batch([], 32)
