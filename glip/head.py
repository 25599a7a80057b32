"""GLIP's grounding head: the deep-fusion DyHead tower and the token-alignment, box and centerness outputs.

The tower repeats ``num_convs`` times [X-MHA fusion -> text self-attention layer -> DyConv]. Per anchor (one
per location, ATSS) the head then predicts: alignment logits against every text token (dot product of the
visual feature with a projection of the L2-normalised fused text, plus a text-dependent bias), 4 box deltas
(times a learnable per-level scale) and a centerness logit. The legacy 80-way class conv of the official
checkpoints is kept frozen so they load; its output never feeds a score or a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from glip.dyhead import DyConv, TextSelfAttentionLayer
from glip.fusion import BiAttentionBlock
from glip.text import TextFeatures

__all__ = ["GroundingHead", "HeadOutput", "TowerBlock"]

_LOGIT_CLAMP = 50_000.0


@dataclass(frozen=True)
class HeadOutput:
    """Per-level head outputs, finest level (P3) first; anchors of a level are row-major over ``(H, W)``.

    Attributes:
        token_logits: per level ``[B, H*W, T]`` float, alignment logit of every anchor with every token
            (padding tokens get logits too; losses and scores must use the text attention mask).
        box_regression: per level ``[B, 4, H, W]`` float, deltas ``(dx, dy, dw, dh)`` after the level's Scale.
        centerness: per level ``[B, 1, H, W]`` float, centerness logits.
        legacy_class_logits: per level ``[B, K, H, W]`` float, the legacy class conv (no gradient unless the
            head was built with ``train_class_logits``).
        text_hidden: ``[B, T, D]`` float, the text the logits were computed from (the fused text after the
            tower, or the encoder's features when the fused text is not scored).
        alignment: what the token logits are made of, to score regions against other images' tokens.
    """

    token_logits: list[Tensor]
    box_regression: list[Tensor]
    centerness: list[Tensor]
    legacy_class_logits: list[Tensor]
    text_hidden: Tensor
    alignment: Alignment | None = None


@dataclass(frozen=True)
class Alignment:
    """The parts of the dot-product alignment: logit(region v of image b, token t of image c) =
    ``<v, projected[c, t]> / scale + bias[c, t]``; ``token_logits`` are its c == b entries.

    Attributes:
        visual: per level ``[B, C, H_l, W_l]``, the tower output the regions are read from.
        projected: ``[B, T, C]`` the projected tokens.
        bias: ``[B, T]`` the per-token bias.
        scale: 0-d, ``exp(log_scale)``.
    """

    visual: list[Tensor]
    projected: Tensor
    bias: Tensor
    scale: Tensor

    def across_images(self, image_index: Tensor, anchor_index: Tensor) -> Tensor:
        """``[P, B, T]`` logits of P regions (image, anchor over the levels concatenated) with every token of
        every image of the batch (GLIPv2's inter-image region-word alignment), clamped like the token logits."""
        regions = torch.cat([level.flatten(2).transpose(1, 2) for level in self.visual], dim=1)
        queries = regions[image_index, anchor_index]  # [P, C]
        batch, length, channels = self.projected.shape
        logits = queries @ self.projected.reshape(batch * length, channels).T / self.scale
        logits = logits + self.bias.reshape(1, batch * length)
        return logits.clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP).view(-1, batch, length)


class TowerBlock(nn.Module):
    """One tower step: bi-directional fusion, then the text layer on the text, then DyConv on the image.

    Args:
        fusion: image-text fusion block.
        text_layer: self-attention layer applied to the fused text (None: the text is left as fused; the
            official last block when the fused text is not scored).
        dyconv: DyHead block applied to the fused visual levels.
    """

    def __init__(
        self, fusion: BiAttentionBlock, text_layer: TextSelfAttentionLayer | None, dyconv: DyConv
    ) -> None:
        super().__init__()
        self.fusion = fusion
        self.text_layer = text_layer
        self.dyconv = dyconv

    def forward(
        self, visual: list[Tensor], text_hidden: Tensor, text_attention_mask: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """Per level ``[B, C, H_l, W_l]`` and ``[B, T, D]`` -> the same shapes."""
        visual, text_hidden = self.fusion(visual, text_hidden, text_attention_mask)
        if self.text_layer is not None:
            text_hidden = self.text_layer(text_hidden, text_attention_mask)
        return self.dyconv(visual), text_hidden


class GroundingHead(nn.Module):
    """Deep-fusion DyHead tower with dot-product token alignment (the official ``VLDyHead``, MHA-B fusion).

    Args:
        channels: channels ``C`` of every pyramid level (input and tower).
        text_dim: width ``D`` of the text features.
        num_convs: tower depth (GLIP-T 6, GLIP-L 8).
        fusion_embed_dim: joint attention width of the fusion (official 2048).
        fusion_heads: fusion attention heads (official 8).
        text_layer_heads: heads of the tower's text layers (BERT config of the language backbone).
        text_layer_intermediate: FFN width of the tower's text layers.
        num_levels: pyramid levels (P3-P7: 5).
        num_legacy_classes: output channels of the frozen legacy class conv (official 80).
        prior_prob: initial foreground probability of the token logits (sets ``token_bias``).
        log_scale_init: initial ``log_scale``; logits are divided by ``exp(log_scale)``.
        norm_groups: GroupNorm groups of the DyConv convs.
        fusion_dropout: attention-probability dropout of the fusion.
        text_layer_dropout: dropouts of the tower's text layers.
        text_layer_norm_eps: LayerNorm eps of the tower's text layers.
        gradient_checkpointing: recompute each tower block in backward (saves memory when training).
        deformable: modulated deformable convs in the DyConv blocks (official ``USE_DFCONV``); False uses
            plain 3x3 convs, much faster on CPU.
        fused_text_dot_product: score tokens with the tower's fused text (official
            ``USE_FUSED_FEATURES_DOT_PRODUCT``); False scores the text encoder's features and builds no text
            layer in the last block.
        train_class_logits: the legacy class conv trains (official ``USE_CLASSIFICATION_LOSS``): its
            outputs then carry gradient into the tower. False keeps it frozen and detached.
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        num_convs: int,
        fusion_embed_dim: int,
        fusion_heads: int,
        text_layer_heads: int,
        text_layer_intermediate: int,
        num_levels: int = 5,
        num_legacy_classes: int = 80,
        prior_prob: float = 0.01,
        log_scale_init: float = 0.0,
        norm_groups: int = 16,
        fusion_dropout: float = 0.1,
        text_layer_dropout: float = 0.1,
        text_layer_norm_eps: float = 1e-12,
        gradient_checkpointing: bool = False,
        deformable: bool = True,
        fused_text_dot_product: bool = True,
        train_class_logits: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.fused_text_dot_product = fused_text_dot_product
        self.train_class_logits = train_class_logits
        # Training switch (not a weight, not saved): True computes the token logits from detached visual and
        # text features, so the token loss trains only the alignment (``text_projection``, ``log_scale``,
        # the token bias) and leaves the tower and the encoders to the other losses.
        self.align_only = False
        # Training switch (not saved): True skips the tower, so every output branch reads the pyramid levels
        # directly. A class warm-up uses it to teach the body and pyramid the categories at about half the cost
        # of a full step; inference never sets it.
        self.skip_tower = False
        self.blocks = nn.ModuleList(
            TowerBlock(
                BiAttentionBlock(
                    channels, text_dim, fusion_embed_dim, fusion_heads, fusion_dropout, 1.0 / num_convs
                ),
                TextSelfAttentionLayer(
                    text_dim,
                    text_layer_heads,
                    text_layer_intermediate,
                    text_layer_dropout,
                    text_layer_dropout,
                    text_layer_norm_eps,
                )
                if index < num_convs - 1 or fused_text_dot_product
                else None,
                DyConv(channels, norm_groups, deformable),
            )
            for index in range(num_convs)
        )
        self.box_regression = nn.Conv2d(channels, 4, kernel_size=1)
        self.centerness = nn.Conv2d(channels, 1, kernel_size=1)
        self.legacy_class_logits = nn.Conv2d(channels, num_legacy_classes, kernel_size=1)
        self.box_scales = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in range(num_levels))
        self.text_projection = nn.Linear(text_dim, channels)
        prior_logit = -math.log((1.0 - prior_prob) / prior_prob)
        self.log_scale = nn.Parameter(torch.tensor([float(log_scale_init)]))
        self.token_bias_weight = nn.Parameter(torch.zeros(text_dim))
        self.token_bias = nn.Parameter(torch.tensor([prior_logit]))
        self._reset_output_convs(prior_logit, train_class_logits)

    def _reset_output_convs(self, prior_logit: float, train_class_logits: bool) -> None:
        for conv in (self.box_regression, self.centerness, self.legacy_class_logits):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.legacy_class_logits.bias, prior_logit)
        # Kept so official checkpoints load strictly; the official training freezes it unless the
        # classification loss is on.
        self.legacy_class_logits.requires_grad_(train_class_logits)

    def forward(self, features: list[Tensor], text: TextFeatures) -> HeadOutput:
        """Run the tower and the output branches.

        Args:
            features: pyramid levels ``[B, C, H_l, W_l]``, finest first (P3..P7).
            text: language backbone output; ``hidden [B, T, D]`` and ``attention_mask [B, T]`` are used.

        Returns:
            :class:`HeadOutput`.
        """
        if self.skip_tower:
            visual, text_hidden = list(features), text.hidden
        else:
            visual, text_hidden = self.run_tower(features, text.hidden, text.attention_mask)
        if not self.fused_text_dot_product:
            text_hidden = text.embedded  # the official ``language_dict_features["embedded"]``
        token_logits = self.token_logits(visual, text_hidden)
        # The token projection again ([B, T, D] x [D, C], cheap) for losses across the batch's images.
        alignment = self.alignment(visual, text_hidden)
        box_regression = [
            self.box_regression(level) * scale for level, scale in zip(visual, self.box_scales, strict=True)
        ]
        centerness = [self.centerness(level) for level in visual]
        legacy = [
            self.legacy_class_logits(level if self.train_class_logits else level.detach()) for level in visual
        ]
        return HeadOutput(token_logits, box_regression, centerness, legacy, text_hidden, alignment)

    def run_tower(
        self, features: list[Tensor], text_hidden: Tensor, text_attention_mask: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """All tower blocks: per level ``[B, C, H_l, W_l]`` and ``[B, T, D]`` -> the same shapes."""
        visual = list(features)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                visual, text_hidden = checkpoint(
                    block, visual, text_hidden, text_attention_mask, use_reentrant=False
                )
            else:
                visual, text_hidden = block(visual, text_hidden, text_attention_mask)
        return visual, text_hidden

    def alignment(self, visual: list[Tensor], text_hidden: Tensor) -> Alignment:
        """The parts of the dot-product alignment of ``visual`` (per level ``[B, C, H_l, W_l]``) with
        ``text_hidden`` (``[B, T, D]``): the tokens L2-normalised, halved and projected, their bias, the scale."""
        if self.align_only:
            visual, text_hidden = [level.detach() for level in visual], text_hidden.detach()
        embedding = F.normalize(text_hidden, p=2, dim=-1)
        projected = self.text_projection(embedding / 2.0)  # [B, T, C]
        bias = embedding @ self.token_bias_weight + self.token_bias  # [B, T]
        return Alignment(visual, projected, bias, self.log_scale.exp())

    def token_logits(self, visual: list[Tensor], text_hidden: Tensor) -> list[Tensor]:
        """Dot-product alignment logits.

        Args:
            visual: per level ``[B, C, H_l, W_l]`` tower output.
            text_hidden: ``[B, T, D]`` fused text.

        Returns:
            per level ``[B, H_l*W_l, T]``:
            ``<v, W(t/2) + b> / exp(log_scale) + t . token_bias_weight + token_bias``, clamped to +-50000,
            with ``v`` the anchor's visual feature and ``t`` the L2-normalised fused token.
        """
        parts = self.alignment(visual, text_hidden)
        logits = []
        for level in parts.visual:
            queries = level.flatten(2).transpose(1, 2)  # [B, H*W, C]
            level_logits = (queries @ parts.projected.transpose(1, 2)) / parts.scale + parts.bias[:, None, :]
            logits.append(level_logits.clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP))
        return logits
