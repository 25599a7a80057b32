"""X-MHA: GLIP's bi-directional image-text cross-attention (the official "MHA-B" fusion).

One shared score matrix between every visual position of all pyramid levels (flattened and concatenated
into a single sequence) and every text token drives two softmaxes: image<-text over tokens (padding masked)
and text<-image over visual positions (no mask). Each side is updated with a layer-scaled residual that is
added to its LAYER-NORMED input, as the official code does (not to the raw input, as the paper's equation
suggests).

Both softmaxes run as fused attention (``F.scaled_dot_product_attention``) by default: image<-text is one call
with the padding mask; text<-image is a second call with the roles swapped (query = the text projection, key =
the scaled visual projection, scale 1), whose scores are exactly the first call's transposed, so it is the
official column softmax without ever holding the ``[B, heads, N, T]`` score matrix. ``sdpa = False`` runs the
official explicit form (one score matrix, two softmaxes, the ``+-attention_clamp`` fp16 clamp); the two agree
to float rounding in fp32 (the clamp bounds scores of +-50,000, which fp32 and bf16 activations do not reach).

Training on CPU with attention dropout runs the explicit form, with the masks drawn by :func:`cpu_dropout`:
the fused call's dropout and ``F.dropout`` draw one number from the CPU generator per attention weight. At the
demo's training shapes (8 images, 1,349 positions, 51 tokens, 4 heads, bf16, 2 cores) the two fused calls took
114 ms forward with dropout and 9 ms without; a layer's forward and backward take 80 ms this way against 195.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BiAttentionBlock", "cpu_dropout", "flatten_levels", "unflatten_levels"]

# Official value for padding tokens on the image side; finite so that fp16 never sees -inf - -inf.
_PADDING_SCORE = -9e15


def flatten_levels(features: list[Tensor]) -> Tensor:
    """Concatenate pyramid levels into one sequence.

    Args:
        features: per level ``[B, C, H_l, W_l]``.

    Returns:
        ``[B, sum_l H_l*W_l, C]``, each level flattened row-major over ``(H, W)``, levels in order.
    """
    return torch.cat([level.flatten(2).transpose(1, 2) for level in features], dim=1)


def unflatten_levels(sequence: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
    """Inverse of :func:`flatten_levels`: ``[B, N, C]`` -> per level ``[B, C, H_l, W_l]``."""
    batch, _, channels = sequence.shape
    chunks = sequence.split([height * width for height, width in sizes], dim=1)
    return [
        chunk.transpose(1, 2).reshape(batch, channels, height, width)
        for chunk, (height, width) in zip(chunks, sizes, strict=True)
    ]


def cpu_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout`` with a cheaper mask on CPU: each 64-bit draw from the generator gives four 16-bit lanes.

    Torch's CPU dropout draws one number per element, ~10-20 ns each; this draws a quarter as many. An element
    is kept with probability ``1 - q`` and scaled by ``1 / (1 - q)``, where ``q = round(p * 2**16) / 2**16``
    (within 2**-17 of ``p``), so the output's expectation is ``x`` exactly. Reproducible under
    ``torch.manual_seed``. Off the CPU, or for ``p`` not in ``(0, 1)``, it is ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    dropped = round(p * 65536)
    count = x.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # every bit uniform
    keep = words.view(torch.int16)[:count].view(x.shape) >= dropped - 32768
    return torch.where(keep, x * (65536 / (65536 - dropped)), 0.0)


class BiAttentionBlock(nn.Module):
    """Bi-directional multi-head attention between visual positions and text tokens, with layer scale.

    Args:
        visual_dim: channels ``C`` of the visual features.
        text_dim: width ``D`` of the text features.
        embed_dim: width of the joint attention space (official: 2048, hard-coded).
        num_heads: attention heads (official: 8); ``embed_dim`` must be divisible by it.
        dropout: dropout on both attention-probability maps (official 0.1), active in train mode only.
        init_layer_scale: initial value of ``gamma_visual``/``gamma_text`` (official ``1 / num_convs``).
        attention_clamp: scores are clamped to ``[-attention_clamp, attention_clamp]`` (fp16 safety, 50000).
        layer_norm_eps: eps of the two input LayerNorms (official: PyTorch default 1e-5).
    """

    def __init__(
        self,
        visual_dim: int,
        text_dim: int,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.1,
        init_layer_scale: float = 1e-4,
        attention_clamp: float = 50_000.0,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.attention_clamp = attention_clamp
        self.norm_visual = nn.LayerNorm(visual_dim, eps=layer_norm_eps)
        self.norm_text = nn.LayerNorm(text_dim, eps=layer_norm_eps)
        self.visual_proj = nn.Linear(visual_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.visual_value_proj = nn.Linear(visual_dim, embed_dim)
        self.text_value_proj = nn.Linear(text_dim, embed_dim)
        self.visual_out_proj = nn.Linear(embed_dim, visual_dim)
        self.text_out_proj = nn.Linear(embed_dim, text_dim)
        self.gamma_visual = nn.Parameter(torch.full((visual_dim,), float(init_layer_scale)))
        self.gamma_text = nn.Parameter(torch.full((text_dim,), float(init_layer_scale)))
        self.sdpa = True  # fused attention (a switch, not a weight: the explicit form is kept for comparison)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        projections = (self.visual_proj, self.text_proj, self.visual_value_proj)
        for linear in (*projections, self.text_value_proj, self.visual_out_proj, self.text_out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, visual: list[Tensor], text: Tensor, text_attention_mask: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """Fuse all pyramid levels with the text in one attention.

        Args:
            visual: per level ``[B, C, H_l, W_l]``.
            text: ``[B, T, D]`` token features.
            text_attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding.

        Returns:
            ``(visual', text')``: per level ``[B, C, H_l, W_l]`` and ``[B, T, D]``, where
            ``v' = LN_v(v) + gamma_visual * dv`` and ``t' = LN_t(t) + gamma_text * dt``.
        """
        sizes = [(level.shape[-2], level.shape[-1]) for level in visual]
        visual_normed = self.norm_visual(flatten_levels(visual))  # [B, N, C]
        text_normed = self.norm_text(text)  # [B, T, D]
        delta_visual, delta_text = self._attend(visual_normed, text_normed, text_attention_mask)
        visual_out = visual_normed + self.gamma_visual * delta_visual
        text_out = text_normed + self.gamma_text * delta_text
        return unflatten_levels(visual_out, sizes), text_out

    def _split_heads(self, states: Tensor) -> Tensor:
        """``[B, L, E]`` -> ``[B, heads, L, E / heads]``."""
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, states: Tensor) -> Tensor:
        """``[B, heads, L, E / heads]`` -> ``[B, L, E]``."""
        batch, _, length, _ = states.shape
        return states.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)

    def _attend(self, visual: Tensor, text: Tensor, text_attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(visual update ``[B, N, C]``, text update ``[B, T, D]``), fused or explicit (``self.sdpa``; the
        explicit form also where the fused call would draw dropout masks on CPU)."""
        dropout = self.dropout if self.training else 0.0
        if not self.sdpa or (dropout > 0.0 and visual.device.type == "cpu"):
            return self._attend_explicit(visual, text, text_attention_mask)
        query = self._split_heads(self.visual_proj(visual) * (self.head_dim**-0.5))  # [B, heads, N, d]
        key = self._split_heads(self.text_proj(text))  # [B, heads, T, d]
        # Image <- text over the real tokens only (padding gets probability 0, as the official -9e15 gives).
        real_tokens = text_attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        text_values = self._split_heads(self.text_value_proj(text))
        delta_visual = F.scaled_dot_product_attention(
            query, key, text_values, attn_mask=real_tokens, dropout_p=dropout, scale=1.0
        )
        # Text <- image: the same scores transposed, softmax over every visual position (no mask).
        visual_values = self._split_heads(self.visual_value_proj(visual))
        delta_text = F.scaled_dot_product_attention(key, query, visual_values, dropout_p=dropout, scale=1.0)
        return self.visual_out_proj(self._merge_heads(delta_visual)), self.text_out_proj(
            self._merge_heads(delta_text)
        )

    def _attend_explicit(
        self, visual: Tensor, text: Tensor, text_attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Shared scores ``[B, heads, N, T]`` -> (visual update ``[B, N, C]``, text update ``[B, T, D]``)."""
        query = self._split_heads(self.visual_proj(visual) * (self.head_dim**-0.5))
        key = self._split_heads(self.text_proj(text))
        scores = (query @ key.transpose(-1, -2)).clamp(-self.attention_clamp, self.attention_clamp)

        # Text <- image: each token attends over all visual positions; no visual mask exists.
        scores_text = scores.transpose(-1, -2)  # [B, heads, T, N]
        scores_text = scores_text - scores_text.amax(dim=-1, keepdim=True)
        probs_text = scores_text.clamp(-self.attention_clamp, self.attention_clamp).softmax(dim=-1)

        # Image <- text: the official adds the raw mask (+1 on real tokens, a per-row constant that cancels
        # in the softmax) and -9e15 on padding; reproduced as is so rounding matches.
        mask = text_attention_mask.to(scores.dtype)
        mask = mask.masked_fill(text_attention_mask == 0, _PADDING_SCORE)[:, None, None, :]  # [B, 1, 1, T]
        probs_visual = (scores + mask).softmax(dim=-1)

        probs_visual = cpu_dropout(probs_visual, self.dropout, self.training)
        probs_text = cpu_dropout(probs_text, self.dropout, self.training)
        delta_visual = self._merge_heads(probs_visual @ self._split_heads(self.text_value_proj(text)))
        delta_text = self._merge_heads(probs_text @ self._split_heads(self.visual_value_proj(visual)))
        return self.visual_out_proj(delta_visual), self.text_out_proj(delta_text)
