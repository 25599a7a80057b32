"""The official GLIP (ATSS) grounding post-processing: head outputs -> phrase-level detections per image.

Steps (official ``ATSSPostProcessor`` with the dot-product token head), per image and FPN level:
sigmoid of the token logits; a phrase's score is the mean probability of its tokens; candidates are
(location, phrase) pairs scoring above ``score_threshold``; the best ``pre_nms_top_n`` by
``score * sigmoid(centerness)`` are kept; their boxes are decoded from the anchors; the reported score is
``sqrt(score * sigmoid(centerness))``; boxes are clipped to the image. Then the levels are concatenated,
class-aware NMS with the "+1" IoU runs per phrase, and the ``detections_per_image`` best survive.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glip.box_ops import BoxCoder, batched_nms_legacy, clip_boxes_legacy, from_legacy

logger = logging.getLogger(__name__)

# A phrase given as a binary [P, T] positive map, a list of token-index lists (phrase i -> label i + 1), or
# the official {label (1-based): [token indices]} mapping.
PhraseTokens = Tensor | Sequence[Sequence[int]] | Mapping[int, Sequence[int]]


@dataclass(frozen=True)
class PhraseDetections:
    """Detections in the project's convention (DESIGN.md "Boxes").

    Attributes:
        boxes: float32 ``[N, 4]`` continuous ``xyxy`` in original-image pixels.
        scores: float32 ``[N]``.
        phrase_indices: int64 ``[N]``, 0-based index of the phrase each box grounds.
    """

    boxes: Tensor
    scores: Tensor
    phrase_indices: Tensor


@dataclass(frozen=True)
class Detections:
    """Detections of one image in the official convention, sorted by score descending.

    Attributes:
        boxes: float32 ``[N, 4]`` legacy "+1" ``xyxy`` in pixels of the model input (before padding).
        scores: float32 ``[N]``, ``sqrt(phrase score * sigmoid(centerness))``.
        labels: int64 ``[N]``, 1-based phrase ids (phrase index + 1), as the official code returns them.
        image_size: ``(height, width)`` of the model input the boxes refer to.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_original(
        self, scale: float | tuple[float, float], original_size: tuple[int, int] | None = None
    ) -> PhraseDetections:
        """Convert to continuous boxes in original-image pixels and 0-based phrase indices.

        Args:
            scale: resize factor ``model-input pixels / original pixels``; a float, or ``(scale_x, scale_y)``.
            original_size: optional ``(height, width)`` of the original image; boxes are clamped to it.
        """
        scale_x, scale_y = (scale, scale) if isinstance(scale, int | float) else scale
        boxes = from_legacy(self.boxes) / self.boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
        if original_size is not None:
            height, width = original_size
            boxes = torch.stack(
                (
                    boxes[:, 0].clamp(0, width),
                    boxes[:, 1].clamp(0, height),
                    boxes[:, 2].clamp(0, width),
                    boxes[:, 3].clamp(0, height),
                ),
                dim=1,
            )
        return PhraseDetections(boxes=boxes, scores=self.scores, phrase_indices=self.labels - 1)


class GroundingPostProcessor:
    """Head outputs of a batch -> ``Detections`` per image (the official inference post-processing).

    Args:
        score_threshold: a (location, phrase) pair is a candidate if its phrase score is above this
            (before centerness; official ``MODEL.ATSS.INFERENCE_TH``).
        pre_nms_top_n: candidates kept per image and level (``MODEL.ATSS.PRE_NMS_TOP_N``).
        nms_threshold: IoU above which class-aware NMS suppresses (``MODEL.ATSS.NMS_TH``).
        detections_per_image: detections kept per image after NMS (``TEST.DETECTIONS_PER_IMG``); ties at
            the cut are all kept, as in the official code; ``<= 0`` keeps all.
        min_size: boxes with a legacy width or height below this are dropped after clipping.
        box_coder: decodes regression deltas against the anchors.
        batched: post-process the batch's images and levels together (``batched_detections``: a few host
            syncs an image instead of ~25, which on a GPU cost the model's thread more than launching
            the forward pass) rather than one image and level at a time (the official order, kept on CPUs);
            None: batched when the outputs are on CUDA. Same detections up to float rounding (phrase means as
            one matrix product) and the order of exact ties.
    """

    def __init__(
        self,
        score_threshold: float = 0.05,
        pre_nms_top_n: int = 1000,
        nms_threshold: float = 0.6,
        detections_per_image: int = 100,
        min_size: float = 0,
        box_coder: BoxCoder | None = None,
        batched: bool | None = None,
    ) -> None:
        self.batched = batched
        self.score_threshold = score_threshold
        self.pre_nms_top_n = pre_nms_top_n
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.min_size = min_size
        self.box_coder = box_coder if box_coder is not None else BoxCoder()

    def __call__(
        self,
        dot_product_logits: Sequence[Tensor],
        box_regression: Sequence[Tensor],
        centerness: Sequence[Tensor],
        anchors: Sequence[Tensor],
        phrase_tokens: Sequence[PhraseTokens],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[Detections]:
        """Detections for every image of a batch.

        Args:
            dot_product_logits: per level ``[B, H_l * W_l, T]`` token logits.
            box_regression: per level ``[B, 4, H_l, W_l]`` (head layout) or ``[B, H_l * W_l, 4]`` deltas.
            centerness: per level ``[B, 1, H_l, W_l]`` or ``[B, H_l * W_l]`` logits.
            anchors: per level ``[H_l * W_l, 4]`` legacy ``xyxy`` anchors (shared by the batch).
            phrase_tokens: per image, the tokens of each phrase (see ``PhraseTokens``).
            image_sizes: per image ``(height, width)`` of the model input before padding.
        """
        num_levels = len(anchors)
        if not len(dot_product_logits) == len(box_regression) == len(centerness) == num_levels:
            raise ValueError(
                "dot_product_logits, box_regression, centerness and anchors need one entry per level"
            )
        batch_size = dot_product_logits[0].shape[0]
        if not len(phrase_tokens) == len(image_sizes) == batch_size:
            raise ValueError(f"need phrase_tokens and image_sizes for each of the {batch_size} images")
        box_regression = [_flatten_level(level, 4) for level in box_regression]
        centerness = [_flatten_level(level, 1).squeeze(-1) for level in centerness]
        batched = self.batched if self.batched is not None else dot_product_logits[0].is_cuda
        if batched:
            return self.batched_detections(
                dot_product_logits, box_regression, centerness, anchors, phrase_tokens, image_sizes
            )
        results = []
        for index in range(batch_size):
            per_level = [
                self.level_candidates(
                    dot_product_logits[level][index],
                    box_regression[level][index],
                    centerness[level][index],
                    anchors[level],
                    phrase_tokens[index],
                    image_sizes[index],
                )
                for level in range(num_levels)
            ]
            results.append(self.select_over_levels(per_level))
        return results

    def level_candidates(
        self,
        dot_product_logits: Tensor,
        box_regression: Tensor,
        centerness: Tensor,
        anchors: Tensor,
        phrase_tokens: PhraseTokens,
        image_size: tuple[int, int],
    ) -> Detections:
        """Candidates of one image and one level, before NMS, sorted by score descending.

        Args:
            dot_product_logits: ``[L, T]`` token logits of the ``L`` locations.
            box_regression: ``[L, 4]`` deltas.
            centerness: ``[L]`` logits.
            anchors: ``[L, 4]`` legacy ``xyxy``.
            phrase_tokens: tokens of each phrase (see ``PhraseTokens``).
            image_size: ``(height, width)`` of the model input before padding.
        """
        scores = phrase_scores(dot_product_logits.float().sigmoid(), phrase_tokens)  # [L, P]
        candidates = scores > self.score_threshold
        num_kept = min(int(candidates.sum()), self.pre_nms_top_n)
        scores = scores * centerness.float().sigmoid()[:, None]
        top_scores, top_index = scores[candidates].topk(num_kept, sorted=True)
        location, phrase = candidates.nonzero().unbind(1)
        location, phrase = location[top_index], phrase[top_index]
        boxes = self.box_coder.decode(box_regression[location].float(), anchors[location])
        boxes = clip_boxes_legacy(boxes, *image_size)
        keep = self._large_enough(boxes)
        return Detections(boxes[keep], top_scores[keep].sqrt(), phrase[keep] + 1, tuple(image_size))

    def select_over_levels(self, per_level: Sequence[Detections]) -> Detections:
        """Concatenate the levels' candidates of one image, run class-aware NMS, keep the best."""
        boxes = torch.cat([level.boxes for level in per_level])
        scores = torch.cat([level.scores for level in per_level])
        labels = torch.cat([level.labels for level in per_level])
        keep = batched_nms_legacy(boxes, scores, labels, self.nms_threshold)
        return self._best(boxes[keep], scores[keep], labels[keep], per_level[0].image_size)

    def batched_detections(
        self,
        dot_product_logits: Sequence[Tensor],
        box_regression: Sequence[Tensor],
        centerness: Sequence[Tensor],
        anchors: Sequence[Tensor],
        phrase_tokens: Sequence[PhraseTokens],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[Detections]:
        """``__call__``'s detections with every image and level at once (flattened inputs: per level
        ``[B, L, T]`` logits, ``[B, L, 4]`` deltas, ``[B, L]`` centerness); returned on the CPU.

        Per level, each image's phrase scores are one matrix product (token probabilities times a ``[T, P]``
        table of 1 / the phrase's token count), and its candidates the ``pre_nms_top_n`` best of the
        score-times-centerness map with non-candidates ranked below every candidate (the candidates that
        ``level_candidates`` keeps, without counting them on the host); NMS per image; the per-image cut on the
        CPU. About B + 5 host syncs a batch."""
        device = dot_product_logits[0].device
        weights = _phrase_weight_table(phrase_tokens, dot_product_logits[0].shape[-1]).to(device)  # [B, T, P]
        phrases = weights.shape[-1]
        heights = torch.tensor([h for h, _ in image_sizes], dtype=torch.float32, device=device)[:, None]
        widths = torch.tensor([w for _, w in image_sizes], dtype=torch.float32, device=device)[:, None]
        boxes, scores, labels, kept = [], [], [], []
        nms = self.nms_threshold
        for logits, deltas, centers, level_anchors in zip(
            dot_product_logits, box_regression, centerness, anchors
        ):
            with tf32_matmul(False):  # a TF32 product would round the scores at the third digit
                phrase = torch.bmm(logits.float().sigmoid(), weights)  # [B, L, P]
            ranked = torch.where(
                phrase > self.score_threshold, phrase * centers.float().sigmoid()[..., None], -1.0
            ).flatten(1)
            top, index = ranked.topk(min(self.pre_nms_top_n, ranked.shape[1]), dim=1, sorted=True)
            location, label = index // phrases, index % phrases
            decoded = self.box_coder.decode(
                deltas.gather(1, location[..., None].expand(-1, -1, 4)).float(), level_anchors[location]
            )
            x = decoded[..., 0::2].clamp(min=0).minimum(widths[..., None] - 1)
            y = decoded[..., 1::2].clamp(min=0).minimum(heights[..., None] - 1)
            decoded = torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
            boxes.append(decoded)
            scores.append(top.clamp(min=0).sqrt())
            labels.append(label + 1)
            kept.append((top >= 0) & self._large_enough(decoded))
        boxes, scores, labels, kept = (torch.cat(x, dim=1) for x in (boxes, scores, labels, kept))
        counts = kept.sum(1).tolist()  # host syncs: the candidates of each image, then where they are
        where = kept.flatten().nonzero().squeeze(1)  # image-major: each image's candidates are contiguous
        boxes = boxes.flatten(0, 1)[where]
        scores, labels = scores.flatten()[where], labels.flatten()[where]
        # NMS one image at a time (a sync each): over the whole batch its pairwise work would grow with the
        # square of the batch's candidates (up to 5,000 an image).
        keeps, start = [], 0
        for count in counts:
            end = start + count
            keeps.append(
                start + batched_nms_legacy(boxes[start:end], scores[start:end], labels[start:end], nms)
            )
            start = end
        keep = torch.cat(keeps) if keeps else torch.empty((0,), dtype=torch.int64, device=device)
        boxes, scores, labels = (x[keep].cpu() for x in (boxes, scores, labels))
        sizes = [len(k) for k in keeps]
        parts = zip(boxes.split(sizes), scores.split(sizes), labels.split(sizes), image_sizes, strict=True)
        return [self._best(*found, tuple(size)) for *found, size in parts]

    def _best(self, boxes: Tensor, scores: Tensor, labels: Tensor, image_size: tuple[int, int]) -> Detections:
        """One image's detections after NMS: the ``detections_per_image`` best, sorted by score."""
        count = scores.shape[0]
        if count > self.detections_per_image > 0:
            # kthvalue cut as the official code: every score tied with the cut value survives.
            cut = torch.kthvalue(scores.cpu(), count - self.detections_per_image + 1).values.item()
            keep = scores >= cut
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = scores.argsort(descending=True, stable=True)
        logger.debug("post-process kept %d of %d candidates", order.shape[0], count)
        return Detections(boxes[order], scores[order], labels[order], image_size)

    def _large_enough(self, boxes: Tensor) -> Tensor:
        """Bool ``[N]``: legacy width and height ``>= min_size`` (official ``remove_small_boxes``)."""
        widths = boxes[..., 2] - boxes[..., 0] + 1
        heights = boxes[..., 3] - boxes[..., 1] + 1
        return (widths >= self.min_size) & (heights >= self.min_size)


def phrase_scores(token_probabilities: Tensor, phrase_tokens: PhraseTokens) -> Tensor:
    """Mean token probability of each phrase (official SCORE_AGG MEAN).

    Args:
        token_probabilities: ``[L, T]`` sigmoid of the token logits.
        phrase_tokens: binary ``[P, T]`` map, list of token-index lists, or ``{label: tokens}`` (1-based).

    Returns:
        ``[L, P]`` scores; a phrase without tokens scores 0.
    """
    token_index, token_mask = _phrase_token_table(phrase_tokens, token_probabilities.device)  # [P, K] each
    gathered = token_probabilities[:, token_index] * token_mask  # [L, P, K]
    counts = token_mask.sum(-1).clamp(min=1)  # [P]
    return gathered.sum(-1) / counts


def _phrase_token_table(phrase_tokens: PhraseTokens, device: torch.device) -> tuple[Tensor, Tensor]:
    """Padded token indices (int64 ``[P, K]``) and their validity (float32 ``[P, K]``) per phrase."""
    if isinstance(phrase_tokens, Tensor):
        groups = [row.nonzero().flatten().tolist() for row in phrase_tokens]
    elif isinstance(phrase_tokens, Mapping):
        labels = {int(label): list(tokens) for label, tokens in phrase_tokens.items()}
        groups = [labels.get(label, []) for label in range(1, max(labels, default=0) + 1)]
    else:
        groups = [list(tokens) for tokens in phrase_tokens]
    width = max((len(group) for group in groups), default=0)
    token_index = torch.zeros((len(groups), width), dtype=torch.int64)
    token_mask = torch.zeros((len(groups), width), dtype=torch.float32)
    for row, group in enumerate(groups):
        token_index[row, : len(group)] = torch.as_tensor(group, dtype=torch.int64)
        token_mask[row, : len(group)] = 1.0
    return token_index.to(device), token_mask.to(device)


@contextlib.contextmanager
def tf32_matmul(allowed: bool | None):
    """Within the block, CUDA's fp32 matrix products may (``allowed``) or may not run as TF32; None leaves the
    setting alone. It is put back after; cuBLAS reads it when a product is launched, so work launched inside
    the block keeps it and the rest of the process is not changed. The legacy flag (``allow_tf32``) unless the
    process has set the new one (``fp32_precision``): torch raises when the legacy flag is read after the new
    one was set, while a legacy setting reads both ways."""
    if allowed is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        name, before, value = "allow_tf32", matmul.allow_tf32, allowed
    except RuntimeError:  # the process chose the new API: keep to it
        name, before, value = "fp32_precision", matmul.fp32_precision, "tf32" if allowed else "ieee"
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def _phrase_weight_table(phrase_tokens: Sequence[PhraseTokens], tokens: int) -> Tensor:
    """float32 ``[B, T, P]``: for each image, 1 / (its token count) where a token belongs to a phrase (a token
    listed twice counts twice, as in ``phrase_scores``), so that token probabilities times it are the phrases'
    mean probabilities; images with fewer phrases get zero columns (scores 0, never candidates)."""
    tables = [_phrase_token_table(tokens_of, torch.device("cpu")) for tokens_of in phrase_tokens]
    phrases = max((index.shape[0] for index, _ in tables), default=0)
    weights = torch.zeros((len(tables), tokens, phrases), dtype=torch.float32)
    for image, (index, mask) in enumerate(tables):
        share = mask / mask.sum(-1, keepdim=True).clamp(min=1)  # [P, K]
        columns = torch.arange(index.shape[0])[:, None].expand_as(index)
        weights[image].index_put_((index.flatten(), columns.flatten()), share.flatten(), accumulate=True)
    return weights


def _flatten_level(level: Tensor, channels: int) -> Tensor:
    """Head layout ``[B, A * C, H, W]`` -> ``[B, H * W * A, C]`` (y-major, x, anchor); 3-D input unchanged."""
    if level.dim() == 3:
        return level
    if level.dim() == 2:
        return level[..., None]
    batch, _, height, width = level.shape
    level = level.view(batch, -1, channels, height, width).permute(0, 3, 4, 1, 2)
    return level.reshape(batch, -1, channels)
