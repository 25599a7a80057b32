"""DyHead blocks of GLIP's grounding head: the visual DyConv block and the head's own text layer.

``DyConv`` is the official DyHead block: three modulated deformable 3x3 convs (coarser level, same level,
finer level), scale-aware attention, a mean over the available levels, then DyReLU. ``TextSelfAttentionLayer``
is the post-LN BERT layer that the official tower runs on the text after every fusion, with the official
+-50000 clamps; it is randomly initialised, never loaded from pretrained BERT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

__all__ = [
    "DyConv",
    "DyReLU",
    "ModulatedDeformConvNorm",
    "TextSelfAttentionLayer",
    "DEFORM_KERNELS",
    "hard_sigmoid",
    "modulated_deform_conv2d",
    "offsets_for_output",
]

_KERNEL = 3
_TAPS = _KERNEL * _KERNEL
_DYRELU_REDUCTION = 4
_CLAMP = 50_000.0
# How ModulatedDeformConvNorm runs its deformable conv: torchvision's op (always fp32, the official numbers on
# CPU) or modulated_deform_conv2d (gathers and one matmul in the autocast dtype; compiles with the head).
DEFORM_KERNELS = ("torchvision", "gather")


def hard_sigmoid(x: Tensor) -> Tensor:
    """``relu6(x + 3) / 6``, the official ``h_sigmoid``."""
    return F.relu6(x + 3.0) / 6.0


def offsets_for_output(
    offset: Tensor, modulation: Tensor, output_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Fit offset/modulation maps computed on one level to a conv whose output has another size.

    The official DyHead computes offsets on level l and feeds them unchanged to the conv applied to the
    coarser level l+1. Its CUDA kernel does not check shapes and reads each image's buffer as flat memory
    with the OUTPUT's strides, i.e. ``offset[b].flatten()[:18*Ho*Wo].view(18, Ho, Wo)``; torchvision checks
    shapes, so that read is made explicit here to keep official checkpoints' numbers.

    Args:
        offset: ``[B, 2*9, H, W]`` (dy, dx) per kernel tap, torchvision layout.
        modulation: ``[B, 9, H, W]`` in ``[0, 1]``.
        output_size: ``(Ho, Wo)`` of the conv output.

    Returns:
        ``offset [B, 18, Ho, Wo]``, ``modulation [B, 9, Ho, Wo]`` (the inputs themselves when sizes match).

    Raises:
        ValueError: the buffer is smaller than the output needs (the CUDA kernel would read out of bounds).
    """
    height, width = output_size
    if offset.shape[-2:] == (height, width):
        return offset, modulation
    if offset.shape[-2] * offset.shape[-1] < height * width:
        raise ValueError(f"offsets of size {tuple(offset.shape[-2:])} cannot drive a {output_size} output")
    batch = offset.shape[0]
    flat_offset = offset.flatten(1)[:, : 2 * _TAPS * height * width]
    flat_modulation = modulation.flatten(1)[:, : _TAPS * height * width]
    return flat_offset.view(batch, 2 * _TAPS, height, width), flat_modulation.view(
        batch, _TAPS, height, width
    )


def modulated_deform_conv2d(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor, stride: int = 1, padding: int = 1
) -> Tensor:
    """``torchvision.ops.deform_conv2d`` (one offset group, dilation 1) written as gathers and one matmul, in
    the autocast dtype when autocast is on (else ``x``'s dtype), so that a bf16 model stays in bf16 and
    ``torch.compile`` sees ordinary tensor ops (torchvision's op is fp32 under autocast: its im2col and GEMM).

    Sampling as torchvision's kernel: output ``(h, w)``, tap ``(i, j)`` reads ``x`` at ``(h*stride - padding
    + i + dy, w*stride - padding + j + dx)`` by bilinear interpolation, corners outside the map read 0, the
    value scaled by the tap's modulation. Positions, weights and modulation stay fp32; the four corner reads
    are taken channels-last (each a contiguous row of ``C`` values) and summed, then ``[B*Ho*Wo, 9*C] @
    [9*C, Cout]``. In fp32 it equals torchvision's op up to summation order (tested).

    Args:
        x: ``[B, C, H, W]``.
        offset: ``[B, 2*kh*kw, Ho, Wo]``, ``(dy, dx)`` per tap, taps row-major (torchvision's layout).
        mask: ``[B, kh*kw, Ho, Wo]`` modulation.
        weight: ``[Cout, C, kh, kw]``; bias ``[Cout]``.

    Returns:
        ``[B, Cout, Ho, Wo]`` (channels-last memory).
    """
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = offset.shape[-2:]
    taps = kernel_h * kernel_w
    device = x.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
    exact = torch.promote_types(offset.dtype, torch.float32)  # positions and weights: fp32 (fp64 stays)
    with torch.autocast(device.type, enabled=False):
        tap_y = torch.arange(kernel_h, device=device, dtype=exact).repeat_interleave(kernel_w)
        tap_x = torch.arange(kernel_w, device=device, dtype=exact).repeat(kernel_h)
        row = torch.arange(out_h, device=device, dtype=exact) * stride - padding
        column = torch.arange(out_w, device=device, dtype=exact) * stride - padding
        shifts = (
            offset.to(exact).view(batch, taps, 2, out_h, out_w).permute(0, 3, 4, 1, 2)
        )  # [B,Ho,Wo,taps,2]
        y = row.view(1, out_h, 1, 1) + tap_y + shifts[..., 0]  # [B, Ho, Wo, taps]
        x_pos = column.view(1, 1, out_w, 1) + tap_x + shifts[..., 1]
        modulation = mask.to(exact).permute(0, 2, 3, 1)  # [B, Ho, Wo, taps]
        y0, x0 = y.floor(), x_pos.floor()
        fy, fx = y - y0, x_pos - x0
        y0, x0 = y0.long(), x0.long()
        first = (torch.arange(batch, device=device) * (height * width)).view(batch, 1, 1, 1)
        source = x.to(dtype).permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        columns = None
        for dy, dx, corner in (
            (0, 0, (1 - fy) * (1 - fx)),
            (0, 1, (1 - fy) * fx),
            (1, 0, fy * (1 - fx)),
            (1, 1, fy * fx),
        ):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            index = first + yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1)
            scale = (corner * modulation * inside).to(dtype).reshape(-1, 1)
            term = source.index_select(0, index.reshape(-1)) * scale  # [B*Ho*Wo*taps, C]
            columns = term if columns is None else columns + term
        kernel = weight.to(dtype).permute(0, 2, 3, 1).reshape(out_channels, taps * channels)
        out = torch.addmm(bias.to(dtype), columns.view(batch * out_h * out_w, taps * channels), kernel.t())
    return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)


class ModulatedDeformConvNorm(nn.Module):
    """Modulated deformable 3x3 conv (padding 1, bias) followed by GroupNorm.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: 1 or 2.
        norm_groups: GroupNorm groups (official 16).
        deformable: False gives the official ``USE_DFCONV False`` variant, a plain 3x3 conv with the same
            parameters (offsets and modulation are then not used): several times faster on CPU.

    ``kernel`` (an instance attribute, one of ``DEFORM_KERNELS``) picks how the deformable conv runs:
    ``torchvision`` (the default: fp32, as the official op) or ``gather`` (``modulated_deform_conv2d``: the
    autocast dtype, compilable; equal in fp32, bf16-rounded under bf16 autocast).
    """

    kernel = "torchvision"

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm_groups: int, deformable: bool = True
    ) -> None:
        super().__init__()
        self.stride = stride
        self.deformable = deformable
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, _KERNEL, _KERNEL))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.norm = nn.GroupNorm(norm_groups, out_channels)
        # Official ModulatedDeformConv init; DyConv's N(0, 0.01) loop only touches nn.Conv2d, not this op.
        bound = 1.0 / math.sqrt(in_channels * _TAPS)
        nn.init.uniform_(self.weight, -bound, bound)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the conv output for an ``H x W`` input (kernel 3, padding 1)."""
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def forward(self, x: Tensor, offset: Tensor | None, modulation: Tensor | None) -> Tensor:
        """``x [B, Cin, H, W]`` -> ``[B, Cout, Ho, Wo]``; offsets as for :func:`offsets_for_output`."""
        if not self.deformable:
            return self.norm(F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=_KERNEL // 2))
        output_size = self.output_size(x.shape[-2], x.shape[-1])
        offset, modulation = offsets_for_output(offset, modulation, output_size)
        if self.kernel == "gather":
            out = modulated_deform_conv2d(x, offset, modulation, self.weight, self.bias, self.stride)
            return self.norm(out)
        # The official op always runs in fp32 (custom_fwd cast_inputs=float32), and torchvision's CPU kernel
        # has no bf16/fp16 path. Under autocast the fp32 result feeds GroupNorm, which autocast keeps in fp32.
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays fp64
        out = deform_conv2d(
            x.to(dtype),
            offset.to(dtype),
            self.weight.to(dtype),
            self.bias.to(dtype),
            stride=self.stride,
            padding=_KERNEL // 2,
            mask=modulation.to(dtype),
        )
        if not torch.is_autocast_enabled(x.device.type):
            out = out.to(x.dtype)
        return self.norm(out)


class DyReLU(nn.Module):
    """Dynamic ReLU (K=2, with bias): ``max(x*a1 + b1, x*a2 + b2)``, coefficients from global context.

    Args:
        channels: channels ``C`` of input and output.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.squeeze = nn.Linear(channels, channels // _DYRELU_REDUCTION)
        self.expand = nn.Linear(channels // _DYRELU_REDUCTION, 4 * channels)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        context = F.adaptive_avg_pool2d(x, 1).flatten(1)  # [B, C]
        coefficients = hard_sigmoid(self.expand(F.relu(self.squeeze(context))))
        slope1, intercept1, slope2, intercept2 = coefficients[:, :, None, None].split(self.channels, dim=1)
        # Official: lambda_a = 2, init_a = (1, 0), init_b = (0, 0), so branch 1 starts as the identity.
        slope1 = (slope1 - 0.5) * 2.0 + 1.0
        slope2 = (slope2 - 0.5) * 2.0
        return torch.maximum(x * slope1 + (intercept1 - 0.5), x * slope2 + (intercept2 - 0.5))


class DyConv(nn.Module):
    """One DyHead block over all pyramid levels (scale-, spatial- and task-aware attention).

    Args:
        channels: channels ``C`` of every level (input and output).
        norm_groups: GroupNorm groups of the three deformable convs (official 16).
        deformable: modulated deformable convs (official ``USE_DFCONV``) or plain 3x3 convs.
    """

    def __init__(self, channels: int, norm_groups: int = 16, deformable: bool = True) -> None:
        super().__init__()
        self.conv_from_coarser = ModulatedDeformConvNorm(channels, channels, 1, norm_groups, deformable)
        self.conv_same = ModulatedDeformConvNorm(channels, channels, 1, norm_groups, deformable)
        self.conv_from_finer = ModulatedDeformConvNorm(channels, channels, 2, norm_groups, deformable)
        # Official: the offset conv exists only with deformable convs (USE_DFCONV).
        self.offset_conv = (
            nn.Conv2d(channels, 3 * _TAPS, kernel_size=_KERNEL, padding=_KERNEL // 2) if deformable else None
        )
        self.scale_attention = nn.Conv2d(channels, 1, kernel_size=1)
        self.dyrelu = DyReLU(channels)
        nn.init.normal_(self.scale_attention.weight, std=0.01)
        nn.init.zeros_(self.scale_attention.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Per level ``[B, C, H_l, W_l]`` (finest first) -> same shapes."""
        fused = [self._fuse_level(features, level) for level in range(len(features))]
        return [self.dyrelu(level_features) for level_features in fused]

    def _fuse_level(self, features: list[Tensor], level: int) -> Tensor:
        """Scale-aware mean of the same, finer (stride 2) and coarser (upsampled) convs at ``level``."""
        feature = features[level]
        offset = modulation = None
        if self.offset_conv is not None:
            offset_and_modulation = self.offset_conv(feature)  # [B, 27, H, W]
            offset = offset_and_modulation[:, : 2 * _TAPS]
            modulation = offset_and_modulation[:, 2 * _TAPS :].sigmoid()
        candidates = [self.conv_same(feature, offset, modulation)]
        if level > 0:
            candidates.append(self.conv_from_finer(features[level - 1], offset, modulation))
        if level < len(features) - 1:
            coarser = self.conv_from_coarser(features[level + 1], offset, modulation)
            upsampled = F.interpolate(coarser, size=feature.shape[-2:], mode="bilinear", align_corners=True)
            candidates.append(upsampled)
        stacked = torch.stack(candidates)  # [K, B, C, H, W]
        pooled = F.adaptive_avg_pool2d(stacked.flatten(0, 1), 1)  # [K*B, C, 1, 1]
        attention = hard_sigmoid(F.relu(self.scale_attention(pooled)))
        attention = attention.view(len(candidates), feature.shape[0], 1, 1, 1)
        return (stacked * attention).mean(dim=0)


class TextSelfAttentionLayer(nn.Module):
    """Post-LN BERT encoder layer with the official GLIP +-50000 clamps (fp16 overflow guards).

    Args:
        hidden_size: token width ``D``.
        num_heads: attention heads; ``hidden_size`` must be divisible by it.
        intermediate_size: FFN width.
        dropout: dropout after the attention output and FFN output projections (BERT 0.1).
        attention_dropout: dropout on the attention probabilities (BERT 0.1).
        layer_norm_eps: LayerNorm eps (BERT 1e-12).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attention_output = nn.Linear(hidden_size, hidden_size)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = nn.Dropout(attention_dropout)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """``hidden [B, T, D]``, ``attention_mask [B, T]`` (1 real, 0 padding) -> ``[B, T, D]``."""
        attended = self.attention_norm(
            self.dropout(self.attention_output(self._attend(hidden, attention_mask))) + hidden
        )
        inner = F.gelu(self.intermediate(attended).clamp(-_CLAMP, _CLAMP)).clamp(-_CLAMP, _CLAMP)
        out = self.dropout(self.output(inner)).clamp(-_CLAMP, _CLAMP)
        return self.output_norm(out + attended).clamp(-_CLAMP, _CLAMP)

    def _attend(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Masked multi-head self-attention context, ``[B, T, D]``."""
        batch, length, width = hidden.shape
        head_dim = width // self.num_heads

        def split(states: Tensor) -> Tensor:
            return states.view(batch, length, self.num_heads, head_dim).transpose(1, 2)

        query, key, value = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        scores = (query @ key.transpose(-1, -2) / math.sqrt(head_dim)).clamp(-_CLAMP, _CLAMP)
        # BERT's extended mask: the dtype's lowest value on padding keys, added after the clamp.
        padding = (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        probs = self.attention_dropout((scores + padding).softmax(dim=-1))
        return (probs @ value).transpose(1, 2).reshape(batch, length, width)
