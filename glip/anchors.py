"""Legacy Detectron anchors of the official GLIP (ATSS) head, one set per FPN level.

Anchors are legacy "+1" ``xyxy`` boxes in pixels of the model input (see ``glip.box_ops``). The cell anchors
are buffers because official checkpoints carry them as ``rpn.anchor_generator.cell_anchors.{i}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def legacy_cell_anchors(stride: int, size: float, aspect_ratios: Sequence[float]) -> Tensor:
    """Cell anchors ``[A, 4]`` float32 (legacy ``xyxy``) of one level, ``A = len(aspect_ratios)``.

    The official recipe: the base window ``[0, 0, stride - 1, stride - 1]`` (centre ``(stride - 1) / 2``) is
    reshaped to each aspect ratio ``h / w`` at constant area with widths and heights rounded to whole pixels,
    then scaled by ``size / stride``; corners are ``centre -+ (side - 1) / 2``. With ratio 1, stride 8 and
    size 64 this gives ``[-28, -28, 35, 35]``.
    """
    ratios = torch.tensor(aspect_ratios, dtype=torch.float64)
    center = (stride - 1) / 2.0
    widths = torch.round(torch.sqrt(stride * stride / ratios))
    heights = torch.round(widths * ratios)
    scale = size / stride
    widths, heights = widths * scale, heights * scale
    anchors = torch.stack(
        (
            center - 0.5 * (widths - 1),
            center - 0.5 * (heights - 1),
            center + 0.5 * (widths - 1),
            center + 0.5 * (heights - 1),
        ),
        dim=1,
    )
    return anchors.to(torch.float32)


class _BufferList(nn.Module):
    """Holds tensors as buffers named ``"0"``, ``"1"``, ... so state_dict keys read ``<name>.{i}``."""

    def __init__(self, buffers: Sequence[Tensor]) -> None:
        super().__init__()
        for index, buffer in enumerate(buffers):
            self.register_buffer(str(index), buffer)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers.values())


class AnchorGenerator(nn.Module):
    """Anchors for each FPN level (P3..P7 by default) given the feature-map sizes.

    Args:
        sizes: anchor side in pixels per level (one size per level, the official 8 x stride).
        strides: feature stride per level, same length as ``sizes``.
        aspect_ratios: ``h / w`` ratios; each location gets one anchor per ratio.
    """

    def __init__(
        self,
        sizes: Sequence[float] = (64, 128, 256, 512, 1024),
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        aspect_ratios: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per stride is needed, got sizes={sizes} strides={strides}")
        self.strides = tuple(int(s) for s in strides)
        self.cell_anchors = _BufferList(
            [legacy_cell_anchors(stride, size, aspect_ratios) for stride, size in zip(self.strides, sizes)]
        )

    @property
    def num_anchors_per_location(self) -> int:
        """Anchors per feature-map location (the number of aspect ratios)."""
        return next(iter(self.cell_anchors)).shape[0]

    def forward(self, feature_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Anchors per level for feature maps of sizes ``[(H_l, W_l), ...]`` (one entry per level).

        Returns:
            list of float32 ``[H_l * W_l * A, 4]`` legacy ``xyxy`` anchors on the device of the buffers,
            ordered y-major, then x, then anchor index (the order of the head's flattened outputs).
        """
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature sizes, got {len(feature_sizes)}")
        return [
            _grid_anchors(cell, stride, int(height), int(width))
            for cell, stride, (height, width) in zip(self.cell_anchors, self.strides, feature_sizes)
        ]


def _grid_anchors(cell_anchors: Tensor, stride: int, height: int, width: int) -> Tensor:
    """Shift cell anchors ``[A, 4]`` to every location of an ``height x width`` grid -> ``[H * W * A, 4]``."""
    device = cell_anchors.device
    shifts_x = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=device)
    shifts_y = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # [H, W] each
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)  # [H * W, 4]
    return (shifts[:, None, :] + cell_anchors[None, :, :]).reshape(-1, 4)
