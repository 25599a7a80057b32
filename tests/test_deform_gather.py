"""``glip.dyhead.modulated_deform_conv2d`` (the gather form the teacher runs on GPUs) against torchvision's
``deform_conv2d``: same values and gradients in fp64, sampling inside, across and outside the map, stride 1
and 2, and through ``offsets_for_output`` (offsets of another level's size, as the official DyHead feeds them).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from glip.dyhead import ModulatedDeformConvNorm, modulated_deform_conv2d, offsets_for_output


def _inputs(stride: int, size: tuple[int, int], spread: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    x = torch.randn(2, 6, height, width, generator=generator, dtype=torch.float64)
    offset = torch.randn(2, 18, out_h, out_w, generator=generator, dtype=torch.float64) * spread
    mask = torch.rand(2, 9, out_h, out_w, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 6, 3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(9, 13), (10, 7)])
@pytest.mark.parametrize("spread", [0.0, 0.7, 6.0])  # none, within a pixel, far outside the map
def test_values_and_gradients_equal_torchvision(stride, size, spread):
    tensors = _inputs(stride, size, spread)
    ours = [t.clone().requires_grad_() for t in tensors]
    theirs = [t.clone().requires_grad_() for t in tensors]
    x, offset, mask, weight, bias = theirs
    expected = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    got = modulated_deform_conv2d(ours[0], ours[1], ours[2], ours[3], ours[4], stride)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    # The offsets' gradient is left out at integer positions, where bilinear interpolation has no derivative
    # and the two pick different one-sided ones; with spread 0 every position is an integer.
    names = ("x", "offset", "mask", "weight", "bias")
    for name, mine, reference in zip(names, ours, theirs):
        if name == "offset" and spread == 0.0:
            continue
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-10, rtol=0, msg=name)


def test_the_module_kernels_agree_with_offsets_of_another_level():
    torch.manual_seed(0)
    conv = ModulatedDeformConvNorm(6, 8, stride=1, norm_groups=2).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)  # a coarser level than the offsets' 9 x 13
    offset = torch.randn(2, 18, 9, 13, dtype=torch.float64) * 2
    mask = torch.rand(2, 9, 9, 13, dtype=torch.float64)
    outputs = {}
    for kernel in ("torchvision", "gather"):
        conv.kernel = kernel
        outputs[kernel] = conv(x, offset, mask)
    torch.testing.assert_close(outputs["gather"], outputs["torchvision"], atol=1e-12, rtol=0)
    fitted, _ = offsets_for_output(offset, mask, (5, 7))
    assert fitted.shape[-2:] == (5, 7)


def test_gather_runs_in_the_autocast_dtype():
    x, offset, mask, weight, bias = (t.float() for t in _inputs(1, (9, 13), 0.7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = modulated_deform_conv2d(x, offset, mask, weight, bias, 1)
    assert out.dtype == torch.bfloat16
    expected = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    # bf16 keeps 8 bits of mantissa: the sums of 54 products stay within a few percent of their scale.
    assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()
