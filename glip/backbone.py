"""Visual backbone of GLIP: a Swin Transformer v1 body and a feature pyramid with levels P3-P7.

The numerics follow the official microsoft/GLIP ``SWINT-FPN-RETINANET`` backbone: relative position bias,
cyclically shifted windows with the official additive mask (-100, not -inf), zero padding of every block's
input to window multiples (padded tokens are attended to, as in the official code), patch merging in the
order (even row, even col), (odd, even), (even, odd), (odd, odd), a LayerNorm on the stride-8/16/32 outputs
and none on the stride-4 output. Stochastic depth and DropBlock act only in training mode.

Feature maps inside the Swin body are channels-last ``[B, H, W, C]``; everything returned is ``[B, C, H, W]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import stochastic_depth

# The official shifted-window mask adds -100 (not -inf) between tokens of different image regions; keeping
# the same constant keeps the softmax (and so the golden outputs) identical.
MASKED_ATTENTION_BIAS = -100.0
PATCH_SIZE = 4


def window_partition(features: Tensor, window_size: int) -> Tensor:
    """Split a feature map into non-overlapping windows.

    Args:
        features: ``[B, H, W, C]`` with H and W multiples of ``window_size``.
    Returns:
        ``[B * nW, window_size**2, C]``, batch-major, windows in row-major order, tokens row-major inside.
    """
    batch, height, width, channels = features.shape
    windows = features.view(
        batch, height // window_size, window_size, width // window_size, window_size, channels
    )
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def window_merge(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, window_size**2, C]`` -> ``[B, H, W, C]``."""
    channels = windows.shape[-1]
    features = windows.view(
        -1, height // window_size, width // window_size, window_size, window_size, channels
    )
    return features.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def relative_position_index(window_size: int) -> Tensor:
    """Index into the relative position bias table for every (query, key) token pair of one window.

    Returns:
        ``[N, N]`` int64 with ``N = window_size**2`` and values in ``[0, (2 * window_size - 1)**2)``.
    """
    axis = torch.arange(window_size)
    coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij")).flatten(1)  # [2, N] (row, col)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # [N, N, 2]
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> Tensor:
    """Additive attention mask for windows taken after rolling a padded map by ``-shift_size``.

    After the roll, a window at the bottom/right edge holds tokens from up to four image regions that are not
    neighbours in the image; tokens may attend only to tokens of their own region.

    Args:
        height, width: padded map size, multiples of ``window_size``.
    Returns:
        ``[nW, N, N]`` float32, 0 where query and key share a region, -100 elsewhere. Built from aranges and
        comparisons alone (no Python number written into a device tensor, which on a GPU makes the host wait),
        so that a CUDA graph can record it; ``cached_shifted_window_mask`` keeps one per size for eager passes.
    """

    def band(length: int) -> Tensor:  # [length]: 0, 1 or 2, the region along one axis after the roll
        index = torch.arange(length, device=device)
        return (index >= length - window_size).long() + (index >= length - shift_size).long()

    region = (band(height)[:, None] * 3 + band(width)[None, :]).view(1, height, width, 1)  # 9 regions
    region_per_window = window_partition(region, window_size).squeeze(-1)  # [nW, N]
    different = region_per_window.unsqueeze(1) != region_per_window.unsqueeze(2)
    return torch.zeros(different.shape, device=device).masked_fill(different, MASKED_ATTENTION_BIAS)


# Kept read-only per (size, device): an eager pass on a GPU then launches nothing to build it.
cached_shifted_window_mask = functools.lru_cache(maxsize=64)(shifted_window_mask)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias per head."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent so that official checkpoints (which store it) map one to one onto this module.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)

    def relative_position_bias(self) -> Tensor:
        """``[num_heads, N, N]`` bias added to the attention logits of every window."""
        tokens = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend within each window.

        Args:
            windows: ``[B * nW, N, C]`` batch-major as produced by :func:`window_partition`.
            mask: ``[nW, N, N]`` additive mask shared by all images, or None.
        Returns:
            ``[B * nW, N, C]``.
        """
        total_windows, tokens, channels = windows.shape
        qkv = self.qkv(windows).reshape(total_windows, tokens, 3, self.num_heads, channels // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*nW, heads, N, head_dim]
        logits = (query * self.scale) @ key.transpose(-2, -1)  # [B*nW, heads, N, N]
        logits = logits + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            logits = logits.view(-1, num_windows, self.num_heads, tokens, tokens) + mask[None, :, None]
            logits = logits.view(total_windows, self.num_heads, tokens, tokens)
        attended = logits.softmax(dim=-1) @ value  # [B*nW, heads, N, head_dim]
        return self.projection(attended.transpose(1, 2).reshape(total_windows, tokens, channels))


class SwinMlp(nn.Module):
    """Two-layer feed-forward network with exact GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """``[..., dim]`` -> ``[..., dim]``."""
        return self.fc2(F.gelu(self.fc1(tokens)))


class SwinBlock(nn.Module):
    """Pre-norm transformer block on (optionally shifted) windows, with stochastic depth on both branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path_prob: float,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop_path_prob = drop_path_prob
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = WindowAttention(dim, num_heads, window_size)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))

    def forward(self, features: Tensor, shift_mask: Tensor | None) -> Tensor:
        """Attention branch then MLP branch, each added to its input.

        Args:
            features: ``[B, H, W, C]``.
            shift_mask: ``[nW, N, N]`` from :func:`shifted_window_mask` for the padded map; used only when
                this block shifts.
        Returns:
            ``[B, H, W, C]``.
        """
        attended = self._windowed_attention(self.attention_norm(features), shift_mask)
        features = features + self._drop_path(attended)
        return features + self._drop_path(self.mlp(self.mlp_norm(features)))

    def _windowed_attention(self, normed: Tensor, shift_mask: Tensor | None) -> Tensor:
        _, height, width, _ = normed.shape
        pad_bottom = (self.window_size - height % self.window_size) % self.window_size
        pad_right = (self.window_size - width % self.window_size) % self.window_size
        padded = F.pad(normed, (0, 0, 0, pad_right, 0, pad_bottom))
        shift = self.shift_size
        if shift > 0:
            padded = torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(padded, self.window_size)  # [B*nW, N, C]
        attended = self.attention(windows, shift_mask if shift > 0 else None)
        merged = window_merge(attended, self.window_size, height + pad_bottom, width + pad_right)
        if shift > 0:
            merged = torch.roll(merged, shifts=(shift, shift), dims=(1, 2))
        return merged[:, :height, :width, :]

    def _drop_path(self, branch: Tensor) -> Tensor:
        return stochastic_depth(branch, self.drop_path_prob, "row", self.training)


class PatchMerging(nn.Module):
    """Halve the resolution, double the channels: concatenate 2x2 neighbours, LayerNorm, linear (no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), 2C]`` (odd sizes are zero-padded bottom/right)."""
        _, height, width, _ = features.shape
        features = F.pad(features, (0, 0, 0, width % 2, 0, height % 2))
        # Channel order (even row, even col), (odd, even), (even, odd), (odd, odd) as in the official weights.
        neighbours = [
            features[:, 0::2, 0::2],
            features[:, 1::2, 0::2],
            features[:, 0::2, 1::2],
            features[:, 1::2, 1::2],
        ]
        return self.reduction(self.norm(torch.cat(neighbours, dim=-1)))


class PatchEmbedding(nn.Module):
    """Non-overlapping 4x4 patches projected to ``embed_dim`` channels, then LayerNorm."""

    def __init__(self, embed_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.projection = nn.Conv2d(in_channels, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, ceil(H/4), ceil(W/4), embed_dim]`` (input zero-padded bottom/right)."""
        height, width = images.shape[-2:]
        images = F.pad(images, (0, -width % PATCH_SIZE, 0, -height % PATCH_SIZE))
        return self.norm(self.projection(images).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """Blocks of one resolution, alternating plain and shifted windows, and the patch merging after them."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path_probs: Sequence[float],
        downsample: bool,
        use_checkpoint: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, window_size // 2 if j % 2 else 0, mlp_ratio, p)
            for j, p in enumerate(drop_path_probs[:depth])
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, features: Tensor) -> Tensor:
        """Run the blocks (not the downsampling): ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        shift_mask = self._shift_mask(features)
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                features = checkpoint(block, features, shift_mask, use_reentrant=False)
            else:
                features = block(features, shift_mask)
        return features

    def _shift_mask(self, features: Tensor) -> Tensor | None:
        shift = self.window_size // 2
        if len(self.blocks) < 2 or shift == 0:
            return None
        padded_height = math.ceil(features.shape[1] / self.window_size) * self.window_size
        padded_width = math.ceil(features.shape[2] / self.window_size) * self.window_size
        size = (padded_height, padded_width, self.window_size, shift, features.device)
        if features.is_cuda and torch.cuda.is_current_stream_capturing():
            # Recorded with the graph, which then owns its memory: a cached mask could be evicted and its
            # memory reused while a recorded graph still reads it.
            return shifted_window_mask(*size).to(features.dtype)
        return cached_shifted_window_mask(*size).to(features.dtype)


class SwinTransformer(nn.Module):
    """Swin Transformer v1 body returning the four stage outputs (strides 4, 8, 16, 32).

    Args:
        embed_dim: channels of stage 1; stage i has ``embed_dim * 2**i``.
        depths, num_heads: blocks and attention heads per stage.
        window_size: window side in tokens (7 for GLIP-T, 12 for GLIP-L).
        mlp_ratio: hidden width of the block MLP relative to its input.
        drop_path_rate: stochastic depth of the last block; rates grow linearly from 0 over all blocks.
        out_norm_stages: stages whose output gets a LayerNorm; the others pass through unchanged (GLIP's
            RetinaNet-style body has none on stage 0).
        use_checkpoint: recompute blocks in the backward pass to save memory (training only).
    """

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        out_norm_stages: Sequence[int] = (1, 2, 3),
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        self.stage_channels = tuple(embed_dim * 2**i for i in range(len(depths)))
        self.patch_embed = PatchEmbedding(embed_dim)
        total_blocks = sum(depths)
        # Linear from 0 to drop_path_rate over all blocks (plain floats so the module can be built on "meta").
        rates = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            SwinStage(
                dim=channels,
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                drop_path_probs=rates[starts[i] : starts[i] + depths[i]],
                downsample=i < len(depths) - 1,
                use_checkpoint=use_checkpoint,
            )
            for i, channels in enumerate(self.stage_channels)
        )
        self.output_norms = nn.ModuleList(
            nn.LayerNorm(channels) if i in out_norm_stages else nn.Identity()
            for i, channels in enumerate(self.stage_channels)
        )
        self.apply(_init_swin_weights)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """``[B, 3, H, W]`` -> one ``[B, C_i, H_i, W_i]`` per stage.

        ``H_0 = ceil(H/4)``, ``H_i = ceil(H_{i-1}/2)`` (likewise W); ``C_i = stage_channels[i]``.
        """
        features = self.patch_embed(images)  # [B, H/4, W/4, C]
        outputs = []
        for stage, output_norm in zip(self.stages, self.output_norms):
            features = stage(features)
            outputs.append(output_norm(features).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                features = stage.downsample(features)
        return tuple(outputs)


def _init_swin_weights(module: nn.Module) -> None:
    # The standard Swin initialisation (GLIP starts from ImageNet weights, but our demo trains from scratch).
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)


class DropBlock2d(nn.Module):
    """DropBlock as in the official GLIP FPN: one spatial mask shared by all channels, seed rate p / block**2.

    torchvision's ``DropBlock2d`` samples a mask per channel with a size-corrected rate, which regularises
    differently from what GLIP was trained with, hence this small module.
    """

    def __init__(self, drop_prob: float, block_size: int) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.block_size = block_size

    def forward(self, features: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> same shape; identity in eval mode or when ``drop_prob`` is 0."""
        if not self.training or self.drop_prob == 0.0:
            return features
        batch, _, height, width = features.shape
        seed_rate = self.drop_prob / self.block_size**2
        seeds = (torch.rand(batch, 1, height, width, device=features.device) < seed_rate).to(features.dtype)
        dropped = F.max_pool2d(seeds, self.block_size, stride=1, padding=self.block_size // 2)
        keep = 1.0 - dropped[:, :, :height, :width]  # even block sizes pool to one extra row/col
        # Rescale so the expected activation is unchanged; clamp avoids 0/0 when every position is dropped.
        return features * keep * (keep.numel() / keep.sum().clamp(min=1.0))


class FeaturePyramid(nn.Module):
    """Top-down feature pyramid on the stride-8/16/32 stage outputs plus two extra levels (P6, P7).

    Args:
        in_channels: channels of the input maps, finest first (strides 8, 16, 32).
        out_channels: channels of every pyramid level.
        drop_block_prob, drop_block_size: DropBlock on the merged maps that feed every output conv except the
            coarsest one (P4 and P3), in training only; probability 0 disables it.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        drop_block_prob: float = 0.3,
        drop_block_size: int = 3,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.drop_block = DropBlock2d(drop_block_prob, drop_block_size)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                # Caffe2's XavierFill, as the official FPN initialises its convs.
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)

    @property
    def num_inputs(self) -> int:
        """Number of backbone maps consumed (the last ones of the body's outputs)."""
        return len(self.lateral_convs)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Merge the maps top-down and add the two extra levels.

        Args:
            features: ``num_inputs`` maps ``[B, C_k, H_k, W_k]``, finest first.
        Returns:
            ``num_inputs + 2`` maps ``[B, out_channels, H_l, W_l]``, finest first (P3..P7 for three inputs);
            P6 and P7 are stride-2 3x3 convs on P5 and relu(P6).
        """
        merged = self.lateral_convs[-1](features[-1])
        levels = [self.output_convs[-1](merged)]
        for index in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[index](features[index])
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            levels.insert(0, self.output_convs[index](self.drop_block(merged)))
        p6 = self.p6(levels[-1])
        return levels + [p6, self.p7(F.relu(p6))]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, a projection shortcut where the shape changes, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.bn2.weight)  # each residual branch starts as the identity (Goyal et al. 2017)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, features: Tensor) -> Tensor:
        branch = F.relu(self.bn1(self.conv1(features)), inplace=True)
        return F.relu(self.bn2(self.conv2(branch)) + self.shortcut(features), inplace=True)


class ResNetBody(nn.Module):
    """A ResNet of basic blocks returning four stage outputs (strides 4, 8, 16, 32), as GLIP's
    ``R-*-FPN-RETINANET`` bodies do. Not one of the released GLIP models: a convolutional body that learns
    shape from scratch on a few hundred images far sooner than a Swin (bench/RESULTS.md).

    Args:
        width: channels of stage 1; stage i has ``width * 2**i``.
        depths: blocks per stage.
    """

    def __init__(self, width: int = 32, depths: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        half = max(width // 2, 8)
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, 2, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.stage_channels = tuple(width * 2**i for i in range(len(depths)))
        stages, channels = [], width
        for index, (out_channels, depth) in enumerate(zip(self.stage_channels, depths, strict=True)):
            blocks = [BasicBlock(channels, out_channels, 1 if index == 0 else 2)]
            blocks += [BasicBlock(out_channels, out_channels, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.stages = nn.ModuleList(stages)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """``[B, 3, H, W]`` -> one ``[B, C_i, H_i, W_i]`` per stage, ``H_0 = ceil(H/4)``, ``H_i = ceil(H_{i-1}/2)``."""
        features = self.stem(images)
        outputs = []
        for stage in self.stages:
            features = stage(features)
            outputs.append(features)
        return tuple(outputs)


class VisionBackbone(nn.Module):
    """A body (Swin, or a ResNet) followed by the feature pyramid, fed the body's last ``fpn.num_inputs`` stage
    outputs. The body is stored as ``swin`` or ``resnet`` so checkpoint keys name what they hold."""

    def __init__(self, body: SwinTransformer | ResNetBody, fpn: FeaturePyramid) -> None:
        super().__init__()
        expected = body.stage_channels[-fpn.num_inputs :]
        actual = tuple(conv.in_channels for conv in fpn.lateral_convs)
        if expected != actual:
            raise ValueError(f"FPN in_channels {actual} do not match the body's stage channels {expected}")
        self.body_name = "resnet" if isinstance(body, ResNetBody) else "swin"
        setattr(self, self.body_name, body)
        self.fpn = fpn

    @property
    def out_channels(self) -> int:
        """Channels of every pyramid level."""
        return self.fpn.out_channels

    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` float32 normalised BGR -> levels ``[B, C, H_l, W_l]`` (P3..P7, strides 8..128)."""
        stage_outputs = getattr(self, self.body_name)(images)
        return self.fpn(stage_outputs[-self.fpn.num_inputs :])
