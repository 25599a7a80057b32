"""The GLIP training objective: ATSS targets and the official losses (``ATSSLossComputation``, GLIP-T config).

``GroundingCriterion`` returns NAMED, UNWEIGHTED losses; ``weight_losses`` / ``total_loss`` apply the weights
in one place (official defaults ``DEFAULT_LOSS_WEIGHTS``: token 1.0, reg 2.0, centerness 1.0):

* ``loss_token`` (official ``loss_dot_product_token``): token-level sigmoid focal loss (alpha 0.25, gamma 2)
  over ALL anchors x the tokens whose text attention mask is 1, divided by ``num_pos_avg``;
* ``loss_reg``: ``sum_pos c_a (1 - GIoU(decode(pred), decode(encode(gt)))) / sum_pos c_a`` with ``c_a`` the
  centerness target (the official multiplies by REG_LOSS_WEIGHT 2.0 inside the loss; here the weight does);
* ``loss_centerness``: ``sum_pos BCEWithLogits(centerness logit, c_a) / num_box_pos_avg``.

``num_pos_avg = max(P_total / world_size, 1)`` and the centerness-target sum are all-reduced over processes
when ``torch.distributed`` is initialised, exactly as the official; a single process uses its local values.

Three target options for incomplete labels (teacher pseudo-labels), each absent by default, where the losses
are the official ones bit for bit:

* ``GroundingTargets.box_loss_mask``: the positives of a box whose mask is False train the token loss only
  (YOLO-World keeps pseudo boxes out of box regression). ``loss_reg`` and ``loss_centerness`` then sum over the
  other positives and divide by their own normalisers (their centerness-target sum, and
  ``num_box_pos_avg = max(P_box_total / world_size, 1)``), so a batch of only such boxes gives 0, not NaN.
* ``GroundingTargets.ignore_boxes``: anchors that ATSS would make positive for an ignore box (assigned with
  the ignore boxes alone) and that are not positive for a real box are left out of the token loss at every
  token: neither positive nor negative. They are not positives, so nothing else changes.
* ``GroundingTargets.token_loss_mask``: token columns whose mask is 0 are left out of the image's token loss
  at every anchor (tokens of phrases nobody labelled: unknown, not negative).
The official legacy 80-class ``loss_cls`` is multiplied by 0 there (USE_CLASSIFICATION_LOSS False): it adds
nothing and no gradient, so by default it is not computed here. Given ``class_logits`` and per-box ``class_targets``,
the criterion adds ``loss_class``: the ATSS sigmoid focal loss (same alpha and gamma) of the legacy class conv,
with each positive anchor's target the ``class_targets`` row of its box (one-hot category, or the words of its
name), over all anchors of the images that carry class targets (detection data; grounding images are left
out), divided by ``num_pos_avg``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn

from glip.atss import AtssAssigner
from glip.box_ops import BoxCoder, to_legacy
from glip.head import Alignment

LOSS_KEYS = ("loss_token", "loss_reg", "loss_centerness")
NORMALISER_KEYS = ("norm_num_pos", "norm_num_pos_avg", "norm_sum_centerness_targets", "norm_num_box_pos")
DEFAULT_LOSS_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"loss_token": 1.0, "loss_reg": 2.0, "loss_centerness": 1.0}
)
# The official prompt is always padded to 256 tokens and gives every unassigned anchor a one-hot target at
# its last position (a "[NoObj]" slot). That position is padding, hence masked out, unless the caption fills
# all 256 tokens, so for shorter prompts the unassigned anchors simply get all-zero targets.
OFFICIAL_NO_OBJECT_TOKEN_INDEX = 255

ReduceSum = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class GroundingTargets:
    """Ground truth of one image.

    Attributes:
        boxes: [G, 4] float, CONTINUOUS xyxy pixels of the model input (after resize, before padding).
        positive_map: [G, T] token targets per box; nonzero entries count as 1 (the official collator casts
            the map to bool), T = the text length of the batch.
        image_size_hw: (H, W) of the unpadded model input, used to reject boxes outside it; None skips that.
        class_targets: [G, K] float 0/1 class targets per box (classification loss only: one-hot category,
            or the words of its name); None leaves the image out of that loss.
        box_loss_mask: [G] bool, False for a box whose positives train the token loss only (not ``loss_reg``
            nor ``loss_centerness``: a pseudo box whose extent is not trusted); None: every box trains all.
        ignore_boxes: [M, 4] float, CONTINUOUS xyxy pixels of the model input like ``boxes``: objects that
            may be there (teacher candidates below the keep-threshold). Anchors ATSS would make positive for
            them, and not positive for a box, are left out of the token loss; None or M = 0: none.
        token_loss_mask: [T] bool or 0/1, 0 for token columns left out of this image's token loss at every
            anchor (tokens of phrases with no label: unknown, not negative); None: every token counts.
    """

    boxes: Tensor
    positive_map: Tensor
    image_size_hw: tuple[int, int] | None = None
    class_targets: Tensor | None = None
    box_loss_mask: Tensor | None = None
    ignore_boxes: Tensor | None = None
    token_loss_mask: Tensor | None = None


@dataclass(frozen=True)
class AnchorTargets:
    """Per-anchor targets of one image with A anchors (levels concatenated) and text length T.

    Attributes:
        matched_gt_index: [A] int64, assigned box per anchor, -1 = unassigned.
        positive_indices: [P] int64, ascending indices of the assigned anchors.
        positive_boxes: [P, 4] float, LEGACY xyxy box assigned to each of them.
        token_targets: [A, T] float 0/1: the binary positive-map row of the assigned box; unassigned anchors
            get zeros, plus a 1 at ``no_object_token_index`` when that position exists.
        positive_box_loss: [P] bool, whether each positive trains ``loss_reg`` and ``loss_centerness``.
        ignored: [A] bool, anchors left out of the token loss (ignore boxes); all False without them.
        token_loss_mask: [T] bool, token columns that count in this image's token loss.
    """

    matched_gt_index: Tensor
    positive_indices: Tensor
    positive_boxes: Tensor
    token_targets: Tensor
    positive_box_loss: Tensor
    ignored: Tensor
    token_loss_mask: Tensor


class _Normalisers(NamedTuple):
    """Batch totals over all processes and the official averages (``max(total / world_size, 1)``)."""

    num_pos_total: float  # positive anchors
    num_pos_avg: float  # token loss normaliser
    sum_centerness_avg: float  # loss_reg normaliser: centerness targets of the box-loss positives / world
    num_box_pos_total: float  # positives that train the box losses
    num_box_pos_avg: float  # loss_centerness normaliser


def weight_losses(
    losses: Mapping[str, Tensor], weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS
) -> dict[str, Tensor]:
    """Return ``{key: weights[key] * losses[key]}`` for every weighted key (normalisers are left out).

    Raises:
        KeyError: a weight names a loss that ``losses`` does not have.
    """
    missing = sorted(set(weights) - set(losses))
    if missing:
        raise KeyError(f"weights for unknown losses {missing}; the losses are {sorted(losses)}")
    return {key: losses[key] * weight for key, weight in weights.items()}


def total_loss(losses: Mapping[str, Tensor], weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS) -> Tensor:
    """0-d tensor: the sum of ``weight_losses(losses, weights)``, the value to back-propagate."""
    return torch.stack(list(weight_losses(losses, weights).values())).sum()


def torch_distributed_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over all processes when torch.distributed is initialised, else ``tensor`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def torch_distributed_world_size() -> int:
    """Number of processes of the default torch.distributed group, 1 when it is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GroundingCriterion(nn.Module):
    """GLIP loss: ATSS assignment, token focal loss, centerness-weighted GIoU and centerness BCE.

    Args:
        assigner: the ATSS assigner (``AtssAssigner(top_k=9)`` in every official config).
        box_coder: the legacy box coder (weights (10, 10, 5, 5)).
        focal_alpha, focal_gamma: token focal loss parameters (official TOKEN_ALPHA 0.25, TOKEN_GAMMA 2.0).
        no_object_token_index: where the official puts the one-hot target of unassigned anchors (255, the
            last of its 256 positions); it only exists, and only counts if unmasked, when T > this index.
            None gives unassigned anchors all-zero targets for every T.
        reduce_sum, world_size: how totals are summed over processes. Both None: torch.distributed when it
            is initialised, else local values. Pass both to use another collective (e.g. a sub-group).
    """

    def __init__(
        self,
        assigner: AtssAssigner | None = None,
        box_coder: BoxCoder | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        no_object_token_index: int | None = OFFICIAL_NO_OBJECT_TOKEN_INDEX,
        reduce_sum: ReduceSum | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if (reduce_sum is None) != (world_size is None):
            raise ValueError("pass both reduce_sum and world_size, or neither (torch.distributed then)")
        if world_size is not None and world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.assigner = assigner if assigner is not None else AtssAssigner()
        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.no_object_token_index = no_object_token_index
        self._reduce_sum = reduce_sum
        self._world_size = world_size

    def forward(
        self,
        token_logits: Sequence[Tensor],
        box_regression: Sequence[Tensor],
        centerness: Sequence[Tensor],
        anchors_per_level: Sequence[Tensor],
        targets: Sequence[GroundingTargets],
        text_attention_mask: Tensor,
        class_logits: Sequence[Tensor] | None = None,
        alignment: Alignment | None = None,
        input_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the losses of a batch of B images.

        Args:
            token_logits: per level l, [B, H_l*W_l, T] float dot-product logits (positions row-major (y, x)).
            box_regression: per level, [B, 4, H_l, W_l] float deltas (after the per-level Scale).
            centerness: per level, [B, 1, H_l, W_l] float centerness logits.
            anchors_per_level: per level, [H_l*W_l, 4] float LEGACY xyxy anchors, shared by the batch.
            targets: B ground truths; an image may have no boxes.
            text_attention_mask: [B, T] int/bool, 1 for real tokens (incl. [CLS]/[SEP]), 0 for padding.
            class_logits: per level, [B, K, H_l, W_l] legacy class logits; given, ``loss_class`` is added.
            alignment, input_ids: the head's :class:`~glip.head.Alignment` and the [B, T] prompt ids; given,
                ``loss_token_inter`` (GLIPv2's inter-image region-word loss, see ``inter_image_token_sum``)
                is added.

        Returns:
            ``LOSS_KEYS`` (0-d float tensors with gradient), ``loss_class`` when ``class_logits`` is given,
            and ``NORMALISER_KEYS`` (0-d float64, detached, for logging: positive anchors over all processes,
            num_pos_avg, sum of the centerness targets of the positives that train the box losses over all
            processes divided by world size, and the number of those positives over all processes).
        """
        device_type = token_logits[0].device.type
        # The official loss is computed in float32 even under mixed precision (custom_fwd cast_inputs).
        with torch.autocast(device_type=device_type, enabled=False):
            logits, regression, centerness_logits = _flatten_head(token_logits, box_regression, centerness)
            _check_batch(
                logits, regression, centerness_logits, anchors_per_level, targets, text_attention_mask
            )
            per_image = self.prepare_targets(anchors_per_level, targets, logits.shape[-1])
            losses = self._losses(
                logits, regression, centerness_logits, anchors_per_level, per_image, text_attention_mask
            )
            if class_logits is not None:
                class_sum = self._class_focal_sum(class_logits, targets, per_image)
                losses["loss_class"] = class_sum / float(losses["norm_num_pos_avg"])
            if alignment is not None:
                if input_ids is None:
                    raise ValueError("the inter-image loss needs the prompts' input_ids")
                inter_sum = self.inter_image_token_sum(alignment, per_image, input_ids, text_attention_mask)
                losses["loss_token_inter"] = inter_sum / float(losses["norm_num_pos_avg"])
            return losses

    def inter_image_token_sum(
        self, alignment: Alignment, per_image: Sequence[AnchorTargets], input_ids: Tensor, text_mask: Tensor
    ) -> Tensor:
        """GLIPv2's inter-image region-word contrastive term: every positive region of image b against the
        tokens of the OTHER images of the batch, all negatives (focal loss, target 0), except tokens whose id
        is one of the region's own positive tokens (the same word in another caption may name the same kind
        of object). The region's own prompt is ``loss_token``'s. The batch is this process's: under DDP each
        rank contrasts its own images (GLIPv2 gathers across GPUs; not done here).
        """
        image_index = torch.cat([torch.full_like(t.positive_indices, i) for i, t in enumerate(per_image)])
        anchor_index = torch.cat([t.positive_indices for t in per_image])
        if image_index.numel() == 0 or len(per_image) < 2:
            return alignment.projected.sum() * 0.0  # keeps the graph (DDP) with nothing to contrast
        logits = _at_least_float32(alignment.across_images(image_index, anchor_index))  # [P, B, T]
        positive_tokens = torch.cat([t.token_targets[t.positive_indices] for t in per_image]) > 0  # [P, T]
        # Each region's positive token ids, [P, K] with K the most any region has (-1 pads).
        most = max(int(positive_tokens.sum(1).max()), 1)
        order = positive_tokens.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :most]
        own_ids = torch.where(
            positive_tokens.gather(1, order), input_ids[image_index].gather(1, order), -1
        )  # [P, K]
        same_word = (input_ids[None, :, :, None] == own_ids[:, None, None, :]).any(-1)  # [P, B, T]
        other_image = image_index[:, None] != torch.arange(len(per_image), device=image_index.device)[None]
        valid = other_image[:, :, None] & (text_mask > 0)[None] & ~same_word
        return torchvision.ops.sigmoid_focal_loss(
            logits[valid],
            torch.zeros_like(logits[valid]),
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="sum",
        )

    def _class_focal_sum(
        self,
        class_logits: Sequence[Tensor],
        targets: Sequence[GroundingTargets],
        per_image: list[AnchorTargets],
    ) -> Tensor:
        """Sum of the class focal loss over all anchors of the images that carry class targets."""
        flat = torch.cat(
            [
                _at_least_float32(level).permute(0, 2, 3, 1).reshape(level.shape[0], -1, level.shape[1])
                for level in class_logits
            ],
            dim=1,
        )  # [B, A, K]
        total = flat.sum() * 0.0  # keeps the graph (and a zero) when no image has categories
        for index, (target, assigned) in enumerate(zip(targets, per_image, strict=True)):
            class_targets = target.class_targets
            if class_targets is None:
                continue
            if class_targets.shape != (target.boxes.shape[0], flat.shape[-1]):
                raise ValueError(
                    f"image {index}: class targets of shape {tuple(class_targets.shape)}, expected "
                    f"({target.boxes.shape[0]}, {flat.shape[-1]}): one row per box, one column per output of "
                    "the class conv (head.num_legacy_classes)"
                )
            wanted = torch.zeros_like(flat[index])
            positives = assigned.positive_indices
            wanted[positives] = class_targets.to(wanted)[assigned.matched_gt_index[positives]]
            total = total + torchvision.ops.sigmoid_focal_loss(
                flat[index], wanted, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
            )
        return total

    @torch.no_grad()
    def prepare_targets(
        self, anchors_per_level: Sequence[Tensor], targets: Sequence[GroundingTargets], text_length: int
    ) -> list[AnchorTargets]:
        """ATSS-assign every image and build its per-anchor targets (see ``AnchorTargets``)."""
        return [
            self._targets_per_image(anchors_per_level, target, text_length, image_index)
            for image_index, target in enumerate(targets)
        ]

    def _targets_per_image(
        self,
        anchors_per_level: Sequence[Tensor],
        target: GroundingTargets,
        text_length: int,
        image_index: int,
    ) -> AnchorTargets:
        dtype, device = anchors_per_level[0].dtype, anchors_per_level[0].device
        boxes = to_legacy(target.boxes.to(device=device, dtype=dtype))
        _check_positive_map(target, text_length, image_index)
        _check_options(target, text_length, image_index)
        matched = self.assigner(anchors_per_level, boxes, target.image_size_hw, image_index)
        positive_indices = torch.nonzero(matched >= 0).squeeze(1)
        binary_map = (target.positive_map != 0).to(dtype)
        token_targets = torch.zeros((matched.shape[0], text_length), dtype=dtype, device=matched.device)
        token_targets[positive_indices] = binary_map[matched[positive_indices]].to(matched.device)
        if self.no_object_token_index is not None and self.no_object_token_index < text_length:
            token_targets[matched < 0, self.no_object_token_index] = 1.0
        box_loss = target.box_loss_mask
        positive_box_loss = (
            torch.ones_like(positive_indices, dtype=torch.bool)
            if box_loss is None
            else box_loss.to(device=matched.device, dtype=torch.bool)[matched[positive_indices]]
        )
        token_loss_mask = (
            torch.ones(text_length, dtype=torch.bool, device=matched.device)
            if target.token_loss_mask is None
            else target.token_loss_mask.to(matched.device) != 0
        )
        return AnchorTargets(
            matched,
            positive_indices,
            boxes[matched[positive_indices]],
            token_targets,
            positive_box_loss,
            self._ignored(anchors_per_level, target, matched, image_index),
            token_loss_mask,
        )

    def _ignored(
        self, anchors_per_level: Sequence[Tensor], target: GroundingTargets, matched: Tensor, image_index: int
    ) -> Tensor:
        """[A] bool: anchors ATSS makes positive for an ignore box and that no real box claims.

        The ignore boxes are assigned on their own, so they never take a positive from a real box; an
        anchor ATSS would train on a missed object gets no token target at all, while the anchors around it
        stay negatives as they would be were the object labelled.
        """
        ignored = torch.zeros_like(matched, dtype=torch.bool)
        if target.ignore_boxes is None or target.ignore_boxes.shape[0] == 0:
            return ignored
        dtype, device = anchors_per_level[0].dtype, anchors_per_level[0].device
        ignore_boxes = to_legacy(target.ignore_boxes.to(device=device, dtype=dtype))
        try:
            assigned = self.assigner(anchors_per_level, ignore_boxes, target.image_size_hw, image_index)
        except ValueError as error:
            raise ValueError(f"ignore boxes: {error}") from error
        return (assigned >= 0) & (matched < 0)

    def _losses(
        self,
        logits: Tensor,
        regression: Tensor,
        centerness_logits: Tensor,
        anchors_per_level: Sequence[Tensor],
        per_image: list[AnchorTargets],
        text_attention_mask: Tensor,
    ) -> dict[str, Tensor]:
        anchors = torch.cat(list(anchors_per_level), dim=0).to(regression.dtype)  # [A, 4]
        image_index, anchor_index, gt_boxes = self._box_loss_positives(per_image, anchors)
        positive_anchors = anchors[anchor_index]
        centerness_targets = _centerness_targets(gt_boxes, positive_anchors)
        norms = self._normalisers(
            sum(t.positive_indices.numel() for t in per_image), anchor_index.numel(), centerness_targets
        )
        predicted = self.box_coder.decode(regression[image_index, anchor_index], positive_anchors)
        token_targets = torch.stack([t.token_targets for t in per_image]).to(logits.dtype)
        token_sum = self._token_focal_sum(
            logits, token_targets, _token_loss_valid(per_image, text_attention_mask)
        )
        reg_sum = (_giou_loss(predicted, gt_boxes) * centerness_targets).sum()
        centerness_sum = F.binary_cross_entropy_with_logits(
            centerness_logits[image_index, anchor_index], centerness_targets, reduction="sum"
        )
        # The centerness-target sum is > 0 whenever there is a positive training the box losses (its centre
        # lies strictly inside its box); with none the sum is an empty 0 and any nonzero normaliser gives 0.
        reg_normaliser = norms.sum_centerness_avg if norms.sum_centerness_avg > 0 else 1.0
        logged = (norms.num_pos_total, norms.num_pos_avg, norms.sum_centerness_avg, norms.num_box_pos_total)
        normalisers = torch.tensor(logged, dtype=torch.float64, device=logits.device)
        return {
            "loss_token": token_sum / norms.num_pos_avg,
            "loss_reg": reg_sum / reg_normaliser,
            "loss_centerness": centerness_sum / norms.num_box_pos_avg,
            **dict(zip(NORMALISER_KEYS, normalisers.unbind())),
        }

    def _box_loss_positives(
        self, per_image: list[AnchorTargets], anchors: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Image index [P], anchor index [P] and legacy gt box [P, 4] of every positive anchor of the batch
        that trains the box losses (all positives unless a ``box_loss_mask`` leaves some out).

        Positives are image-major and ascending within an image, the order of the official sums. The gt box
        is decode(encode(gt)), equal to the gt up to rounding: exactly what the official compares with.
        """
        kept = [t.positive_indices[t.positive_box_loss] for t in per_image]
        image_index = torch.cat([torch.full_like(indices, i) for i, indices in enumerate(kept)])
        anchor_index = torch.cat(kept)
        positive_anchors = anchors[anchor_index]
        gt_boxes = torch.cat([t.positive_boxes[t.positive_box_loss] for t in per_image]).to(anchors.dtype)
        gt_boxes = self.box_coder.decode(self.box_coder.encode(gt_boxes, positive_anchors), positive_anchors)
        return image_index, anchor_index, gt_boxes

    def _normalisers(
        self, num_pos_local: int, num_box_pos_local: int, centerness_targets: Tensor
    ) -> _Normalisers:
        """The batch normalisers, one collective per call; ``num_box_pos_local`` counts the positives that
        train the box losses and ``centerness_targets`` are theirs.

        Every process calls the collective on every step, with or without positives, so none waits forever.
        """
        device = centerness_targets.device
        local = torch.stack(
            (
                torch.tensor(float(num_pos_local), dtype=torch.float64, device=device),
                centerness_targets.detach().sum().to(torch.float64),
                torch.tensor(float(num_box_pos_local), dtype=torch.float64, device=device),
            )
        )
        if self._reduce_sum is not None:
            totals, world_size = self._reduce_sum(local), self._world_size
        else:
            totals, world_size = torch_distributed_reduce_sum(local), torch_distributed_world_size()
        num_pos_total, centerness_total, num_box_pos_total = (float(value) for value in totals.tolist())
        return _Normalisers(
            num_pos_total=num_pos_total,
            num_pos_avg=max(num_pos_total / world_size, 1.0),
            sum_centerness_avg=centerness_total / world_size,
            num_box_pos_total=num_box_pos_total,
            num_box_pos_avg=max(num_box_pos_total / world_size, 1.0),
        )

    def _token_focal_sum(self, logits: Tensor, token_targets: Tensor, valid: Tensor) -> Tensor:
        """Sum of the sigmoid focal loss over the [B, A, T] entries where ``valid`` is True; [B, A, T] inputs."""
        return torchvision.ops.sigmoid_focal_loss(
            logits[valid],
            token_targets[valid],
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            reduction="sum",
        )


def _token_loss_valid(per_image: Sequence[AnchorTargets], text_attention_mask: Tensor) -> Tensor:
    """[B, A, T] bool, the entries of the token loss: real tokens that count, at anchors not ignored."""
    tokens = (text_attention_mask > 0) & torch.stack([t.token_loss_mask for t in per_image]).to(
        text_attention_mask.device
    )  # [B, T]
    ignored = torch.stack([t.ignored for t in per_image]).to(text_attention_mask.device)  # [B, A]
    return tokens[:, None, :] & ~ignored[:, :, None]


def _flatten_head(
    token_logits: Sequence[Tensor], box_regression: Sequence[Tensor], centerness: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate the levels: [B, A, T] logits, [B, A, 4] deltas, [B, A] centerness, at least float32."""
    logits = torch.cat([_at_least_float32(level) for level in token_logits], dim=1)
    regression = torch.cat(
        [
            _at_least_float32(level).permute(0, 2, 3, 1).reshape(level.shape[0], -1, 4)
            for level in box_regression
        ],
        dim=1,
    )
    centerness_logits = torch.cat(
        [_at_least_float32(level).permute(0, 2, 3, 1).reshape(level.shape[0], -1) for level in centerness],
        dim=1,
    )
    return logits, regression, centerness_logits


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _centerness_targets(gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """[P] sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of each anchor centre in its [P, 4] legacy gt box."""
    centre_x = (anchors[:, 2] + anchors[:, 0]) / 2
    centre_y = (anchors[:, 3] + anchors[:, 1]) / 2
    left_right = torch.stack((centre_x - gt_boxes[:, 0], gt_boxes[:, 2] - centre_x), dim=1)
    top_bottom = torch.stack((centre_y - gt_boxes[:, 1], gt_boxes[:, 3] - centre_y), dim=1)
    return torch.sqrt(
        (left_right.min(dim=-1).values / left_right.max(dim=-1).values)
        * (top_bottom.min(dim=-1).values / top_bottom.max(dim=-1).values)
    )


def _giou_loss(predicted: Tensor, gt_boxes: Tensor) -> Tensor:
    """[P] official 1 - GIoU of paired [P, 4] boxes: areas WITHOUT +1, predicted x2/y2 raised to x1/y1."""
    x1, y1, x2, y2 = predicted.unbind(dim=-1)
    fixed = torch.stack((x1, y1, torch.max(x1, x2), torch.max(y1, y2)), dim=-1)
    return torchvision.ops.generalized_box_iou_loss(fixed, gt_boxes, reduction="none", eps=1e-7)


def _check_positive_map(target: GroundingTargets, text_length: int, image_index: int) -> None:
    expected = (target.boxes.shape[0], text_length)
    if tuple(target.positive_map.shape) != expected:
        raise ValueError(
            f"image {image_index}: positive_map has shape {tuple(target.positive_map.shape)}, expected "
            f"{expected} (one row per box, one column per text token)"
        )


def _check_options(target: GroundingTargets, text_length: int, image_index: int) -> None:
    """Raise ValueError when a box-loss mask, ignore boxes or token mask has the wrong shape."""
    num_boxes = target.boxes.shape[0]
    checks = [
        ("box_loss_mask", target.box_loss_mask, (num_boxes,), "one entry per box"),
        ("token_loss_mask", target.token_loss_mask, (text_length,), "one entry per text token"),
    ]
    if target.ignore_boxes is not None and target.ignore_boxes.shape[0] > 0:
        checks.append(("ignore_boxes", target.ignore_boxes, (target.ignore_boxes.shape[0], 4), "[M, 4]"))
    for name, value, expected, meaning in checks:
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(
                f"image {image_index}: {name} has shape {tuple(value.shape)}, expected {expected} ({meaning})"
            )


def _check_batch(
    logits: Tensor,
    regression: Tensor,
    centerness_logits: Tensor,
    anchors_per_level: Sequence[Tensor],
    targets: Sequence[GroundingTargets],
    text_attention_mask: Tensor,
) -> None:
    """Raise ValueError when the flattened head outputs, anchors, targets and text mask disagree in size."""
    batch, num_anchors, text_length = logits.shape
    num_anchor_boxes = sum(level.shape[0] for level in anchors_per_level)
    sizes = (tuple(regression.shape[:2]), tuple(centerness_logits.shape), num_anchor_boxes)
    if sizes != ((batch, num_anchors), (batch, num_anchors), num_anchors):
        raise ValueError(
            f"head outputs disagree: token logits give {batch} images x {num_anchors} anchors, "
            f"box regression {sizes[0]}, centerness {sizes[1]}, anchors_per_level {num_anchor_boxes} anchors"
        )
    if len(targets) != batch or tuple(text_attention_mask.shape) != (batch, text_length):
        raise ValueError(
            f"batch of {batch} images with {text_length} tokens, but {len(targets)} targets and a text "
            f"attention mask of shape {tuple(text_attention_mask.shape)}"
        )
