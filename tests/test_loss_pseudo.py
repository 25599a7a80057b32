"""The loss options for incomplete (pseudo) labels, checked against brute-force sums on tiny inputs: boxes kept
out of the box losses, an ignore band of anchors, token columns left out; the defaults stay the official loss.
Then the data side: BatchBuilder carries the options of a record into the criterion's targets."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from glip.anchors import AnchorGenerator
from glip.atss import AtssAssigner
from glip.box_ops import to_legacy
from glip.loss import LOSS_KEYS, NORMALISER_KEYS, GroundingCriterion, GroundingTargets, total_loss
from glip.pretrained import minilm_path
from student.data import BatchBuilder, GroundedImage, make_example
from student.train import grounding_targets

IMAGE_HW = (64, 96)
FEATURE_SIZES = [(8, 12), (4, 6), (2, 3)]
NUM_ANCHORS = sum(h * w for h, w in FEATURE_SIZES)
TEXT_LENGTH = 10
ALPHA, GAMMA = 0.25, 2.0


def _anchors() -> list[torch.Tensor]:
    return AnchorGenerator(sizes=(32, 64, 128), strides=(8, 16, 32))(FEATURE_SIZES)


def _head(batch: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Random float64 head outputs (token logits, box regression, centerness), with gradients."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, NUM_ANCHORS, TEXT_LENGTH), generator=generator, dtype=torch.float64) * 2
    token_logits = list(logits.split([h * w for h, w in FEATURE_SIZES], dim=1))
    regression = [
        torch.randn((batch, 4, h, w), generator=generator, dtype=torch.float64) * 0.5
        for h, w in FEATURE_SIZES
    ]
    centerness = [
        torch.randn((batch, 1, h, w), generator=generator, dtype=torch.float64) for h, w in FEATURE_SIZES
    ]
    return [[t.requires_grad_(True) for t in part] for part in (token_logits, regression, centerness)]


def _map(spans: list[tuple[int, int]]) -> torch.Tensor:
    positive_map = torch.zeros((len(spans), TEXT_LENGTH))
    for row, (start, end) in enumerate(spans):
        positive_map[row, start:end] = 1.0
    return positive_map


def _target(boxes, spans, **options) -> GroundingTargets:
    return GroundingTargets(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), _map(spans), IMAGE_HW, **options
    )


def _mask(batch: int, length: int = 8) -> torch.Tensor:
    mask = torch.zeros((batch, TEXT_LENGTH), dtype=torch.int64)
    mask[:, :length] = 1
    return mask


def _run(head, targets, mask, criterion=None):
    criterion = criterion or GroundingCriterion()
    return criterion(*head, _anchors(), targets, mask)


def _flat(level_tensors: list[torch.Tensor], channels_last: bool) -> torch.Tensor:
    if channels_last:  # token logits: [B, HW, T] per level
        return torch.cat(level_tensors, dim=1)
    batch, channels = level_tensors[0].shape[:2]
    return torch.cat([t.permute(0, 2, 3, 1).reshape(batch, -1, channels) for t in level_tensors], dim=1)


def _focal_terms(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """By hand, float64: -alpha_t (1 - p_t)^gamma log(p_t) per entry."""
    probability = torch.sigmoid(logits.double())
    p_t = probability * targets + (1 - probability) * (1 - targets)
    alpha_t = ALPHA * targets + (1 - ALPHA) * (1 - targets)
    return -alpha_t * (1 - p_t) ** GAMMA * torch.log(p_t)


def _brute_force_token_loss(head, targets, mask, counted: torch.Tensor) -> float:
    """Sum of the focal terms over the [B, A, T] entries where ``counted``, over max(positives, 1)."""
    per_image = GroundingCriterion().prepare_targets(_anchors(), [_plain(t) for t in targets], TEXT_LENGTH)
    token_targets = torch.stack([t.token_targets for t in per_image]).double()
    logits = _flat(head[0], channels_last=True).detach()
    terms = _focal_terms(logits, token_targets)
    valid = counted & (mask > 0)[:, None, :]
    num_pos = sum(t.positive_indices.numel() for t in per_image)
    return float(terms[valid].sum()) / max(num_pos, 1)


def _plain(target: GroundingTargets) -> GroundingTargets:
    return GroundingTargets(target.boxes, target.positive_map, target.image_size_hw)


BOX_A = [4.0, 6, 40, 44]
BOX_B = [50.0, 10, 90, 60]


# ---------------------------------------------------------------- defaults


def test_neutral_options_give_bit_identical_losses_and_gradients():
    """All-True box mask, no ignore box, all-ones token mask: exactly the official loss, to the last bit."""
    plain = [_target([BOX_A, BOX_B], [(1, 3), (4, 7)]), _target([], [])]
    neutral = [
        _target(
            [BOX_A, BOX_B],
            [(1, 3), (4, 7)],
            box_loss_mask=torch.ones(2, dtype=torch.bool),
            ignore_boxes=torch.zeros((0, 4)),
            token_loss_mask=torch.ones(TEXT_LENGTH),
        ),
        _target(
            [], [], box_loss_mask=torch.ones(0, dtype=torch.bool), token_loss_mask=torch.ones(TEXT_LENGTH)
        ),
    ]
    results = []
    for targets in (plain, neutral):
        head = _head(2)
        losses = _run(head, targets, _mask(2))
        total_loss(losses).backward()
        results.append((losses, [t.grad for part in head for t in part]))
    (plain_losses, plain_grads), (neutral_losses, neutral_grads) = results
    assert set(plain_losses) == set(LOSS_KEYS) | set(NORMALISER_KEYS)
    for key in plain_losses:
        assert torch.equal(plain_losses[key], neutral_losses[key]), key
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, neutral_grads, strict=True))
    assert plain_losses["norm_num_box_pos"].item() == plain_losses["norm_num_pos"].item() > 0


# ---------------------------------------------------------------- 1. no box losses on pseudo boxes


def test_pseudo_positives_train_tokens_but_get_no_box_gradient():
    human = _target([BOX_A], [(1, 3)])
    pseudo = _target([BOX_B], [(4, 7)], box_loss_mask=torch.zeros(1, dtype=torch.bool))
    head = _head(2)
    losses = _run(head, [human, pseudo], _mask(2))
    total_loss(losses).backward()
    per_image = GroundingCriterion().prepare_targets(_anchors(), [human, pseudo], TEXT_LENGTH)
    positives = torch.zeros((2, NUM_ANCHORS), dtype=torch.bool)
    for image, assigned in enumerate(per_image):
        positives[image, assigned.positive_indices] = True
    assert positives.sum(dim=1).min() > 0
    regression_grad = _flat([t.grad for t in head[1]], channels_last=False)  # [B, A, 4]
    centerness_grad = _flat([t.grad for t in head[2]], channels_last=False)[..., 0]  # [B, A]
    token_grad = _flat([t.grad for t in head[0]], channels_last=True)  # [B, A, T]
    assert bool((regression_grad[1] == 0).all()) and bool((centerness_grad[1] == 0).all())
    assert bool((regression_grad[0][positives[0]] != 0).any(-1).all())
    assert bool((centerness_grad[0][positives[0]] != 0).all())
    assert bool((token_grad[1][positives[1], 4:7] != 0).all())  # the pseudo positives still train tokens
    # Box losses and their normalisers are those of the human image alone; the token loss is unchanged.
    human_only = _run([[t[:1] for t in part] for part in _head(2)], [human], _mask(1))
    default = _run(_head(2), [human, _plain(pseudo)], _mask(2))
    for key in ("loss_reg", "loss_centerness", "norm_sum_centerness_targets"):
        assert losses[key].item() == pytest.approx(human_only[key].item(), rel=1e-12)
    assert losses["norm_num_box_pos"].item() == positives[0].sum().item()
    assert losses["norm_num_pos"].item() == positives.sum().item()
    assert losses["loss_token"].item() == pytest.approx(default["loss_token"].item(), rel=1e-12)


def test_a_batch_of_only_pseudo_boxes_has_finite_zero_box_losses():
    targets = [
        _target([BOX_A, BOX_B], [(1, 3), (4, 7)], box_loss_mask=torch.zeros(2, dtype=torch.bool)),
        _target([BOX_B], [(2, 5)], box_loss_mask=torch.zeros(1, dtype=torch.bool)),
    ]
    head = _head(2)
    losses = _run(head, targets, _mask(2))
    assert all(bool(torch.isfinite(losses[key])) for key in LOSS_KEYS)
    assert losses["loss_reg"].item() == 0.0 and losses["loss_centerness"].item() == 0.0
    assert losses["norm_num_box_pos"].item() == 0.0 and losses["norm_num_pos"].item() > 0
    expected = _brute_force_token_loss(
        head, targets, _mask(2), torch.ones((2, NUM_ANCHORS, TEXT_LENGTH), dtype=torch.bool)
    )
    assert losses["loss_token"].item() == pytest.approx(expected, rel=1e-12)
    total_loss(losses).backward()
    assert all(bool(torch.isfinite(t.grad).all()) for part in head for t in part)
    assert all(bool((t.grad == 0).all()) for t in head[1] + head[2])


def test_box_loss_normalisers_are_reduced_over_processes():
    targets = [
        _target([BOX_A], [(1, 3)]),
        _target([BOX_B], [(4, 7)], box_loss_mask=torch.zeros(1, dtype=torch.bool)),
    ]
    single = _run(_head(2), targets, _mask(2))
    doubled = _run(_head(2), targets, _mask(2), GroundingCriterion(reduce_sum=lambda t: 2 * t, world_size=2))
    assert doubled["norm_num_box_pos"].item() == 2 * single["norm_num_box_pos"].item()
    for key in LOSS_KEYS:
        assert doubled[key].item() == pytest.approx(single[key].item(), rel=1e-12)


# ---------------------------------------------------------------- 2. ignore band


def test_ignored_anchors_are_those_atss_gives_the_ignore_box_and_no_real_box():
    ignore = torch.tensor([BOX_B, [30.0, 20, 70, 62]])  # the second overlaps BOX_A's region
    target = _target([BOX_A], [(1, 3)], ignore_boxes=ignore)
    (assigned,) = GroundingCriterion().prepare_targets(_anchors(), [target], TEXT_LENGTH)
    (plain,) = GroundingCriterion().prepare_targets(_anchors(), [_plain(target)], TEXT_LENGTH)
    would_be_positive = AtssAssigner()(_anchors(), to_legacy(ignore), IMAGE_HW) >= 0
    assert torch.equal(assigned.ignored, would_be_positive & (plain.matched_gt_index < 0))
    assert bool(assigned.ignored.any())
    # An ignore box never takes a positive from a real box: assignment and token targets are unchanged.
    assert torch.equal(assigned.matched_gt_index, plain.matched_gt_index)
    assert torch.equal(assigned.token_targets, plain.token_targets)
    assert not bool(assigned.ignored[assigned.positive_indices].any())


def test_an_ignored_anchors_token_loss_is_exactly_removed():
    ignore = torch.tensor([BOX_B])
    with_band = [_target([BOX_A], [(1, 3)], ignore_boxes=ignore), _target([], [])]
    without = [_plain(t) for t in with_band]
    (ignored, _) = (
        t.ignored for t in GroundingCriterion().prepare_targets(_anchors(), with_band, TEXT_LENGTH)
    )
    head = _head(2)
    losses = _run(head, with_band, _mask(2))
    baseline = _run(_head(2), without, _mask(2))
    counted = torch.ones((2, NUM_ANCHORS, TEXT_LENGTH), dtype=torch.bool)
    counted[0, ignored] = False
    assert losses["loss_token"].item() == pytest.approx(
        _brute_force_token_loss(head, with_band, _mask(2), counted), rel=1e-12
    )
    # The removed part is exactly the ignored anchors' terms at every real token.
    removed = _brute_force_token_loss(head, with_band, _mask(2), ~counted)
    assert baseline["loss_token"].item() - losses["loss_token"].item() == pytest.approx(removed, rel=1e-9)
    assert removed > 0
    for key in ("loss_reg", "loss_centerness", "norm_num_pos", "norm_sum_centerness_targets"):
        assert losses[key].item() == baseline[key].item()  # not positives: nothing else moves
    total_loss(losses).backward()
    token_grad = _flat([t.grad for t in head[0]], channels_last=True)
    assert bool((token_grad[0, ignored] == 0).all())
    assert bool((token_grad[0, ~ignored, :8] != 0).all()) and bool((token_grad[1, :, :8] != 0).all())


def test_invalid_ignore_boxes_are_rejected():
    bad = _target([BOX_A], [(1, 3)], ignore_boxes=torch.tensor([[10.0, 10, 5, 20]]))
    with pytest.raises(ValueError, match="ignore boxes: image 0: box 0"):
        _run(_head(1), [bad], _mask(1))
    wrong_shape = _target([BOX_A], [(1, 3)], ignore_boxes=torch.zeros((2, 3)))
    with pytest.raises(ValueError, match="ignore_boxes has shape"):
        _run(_head(1), [wrong_shape], _mask(1))


# ---------------------------------------------------------------- 3. unlabelled phrase tokens


def test_masked_tokens_contribute_nothing_at_any_anchor():
    token_mask = torch.ones(TEXT_LENGTH)
    token_mask[4:7] = 0  # an unlabelled phrase
    targets = [_target([BOX_A], [(1, 3)], token_loss_mask=token_mask), _target([BOX_B], [(4, 7)])]
    head = _head(2)
    losses = _run(head, targets, _mask(2))
    counted = torch.ones((2, NUM_ANCHORS, TEXT_LENGTH), dtype=torch.bool)
    counted[0, :, 4:7] = False
    expected = _brute_force_token_loss(head, targets, _mask(2), counted)
    assert losses["loss_token"].item() == pytest.approx(expected, rel=1e-12)
    baseline = _run(_head(2), [_plain(t) for t in targets], _mask(2))
    for key in ("loss_reg", "loss_centerness", "norm_num_pos"):
        assert losses[key].item() == baseline[key].item()
    total_loss(losses).backward()
    token_grad = _flat([t.grad for t in head[0]], channels_last=True)
    assert bool((token_grad[0, :, 4:7] == 0).all())  # positives and negatives alike
    assert bool((token_grad[0, :, [0, 1, 2, 3, 7]] != 0).all()) and bool((token_grad[1, :, 4:7] != 0).all())


def test_every_option_at_once_and_everything_masked_stays_finite():
    targets = [
        _target(
            [BOX_A],
            [(1, 3)],
            box_loss_mask=torch.zeros(1, dtype=torch.bool),
            ignore_boxes=torch.tensor([BOX_B]),
            token_loss_mask=torch.zeros(TEXT_LENGTH, dtype=torch.bool),
        )
    ]
    head = _head(1)
    losses = _run(head, targets, _mask(1))
    assert all(losses[key].item() == 0.0 for key in LOSS_KEYS)
    total_loss(losses).backward()
    assert all(bool((t.grad == 0).all()) for part in head for t in part)


def test_token_and_box_masks_of_the_wrong_shape_are_rejected():
    with pytest.raises(ValueError, match="image 0: token_loss_mask has shape"):
        _run(_head(1), [_target([BOX_A], [(1, 3)], token_loss_mask=torch.ones(TEXT_LENGTH + 1))], _mask(1))
    with pytest.raises(ValueError, match="image 0: box_loss_mask has shape"):
        _run(_head(1), [_target([BOX_A], [(1, 3)], box_loss_mask=torch.ones(2, dtype=torch.bool))], _mask(1))


# ---------------------------------------------------------------- data: records -> batch -> targets

CAPTION = "a red circle and a blue square"  # tokens: [CLS] a red circle and a blue square [SEP]
RED, BLUE = (0, 12), (17, 30)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())  # bert-base-uncased vocabulary, shipped offline


def _pseudo_record(tmp_path, **fields) -> GroundedImage:
    path = tmp_path / "image.png"
    Image.new("RGB", (120, 80), (90, 40, 160)).save(path)
    base = dict(
        image_path=str(path),
        width=120,
        height=80,
        boxes=np.asarray([[10.0, 8, 50, 60]], dtype=np.float32),
        caption=CAPTION,
        box_spans=((RED,),),
    )
    return GroundedImage(**{**base, **fields})


def _build(tokenizer, records, seed: int, **builder_options):
    rng = random.Random(seed)
    examples = [make_example(record, None, tokenizer, rng) for record in records]
    return BatchBuilder(tokenizer, min_size=64, max_size=96, train_min_sizes=(64, 48), **builder_options)(
        examples, rng
    )


def test_records_without_options_give_batches_without_options(tmp_path, tokenizer):
    batch = _build(tokenizer, [_pseudo_record(tmp_path, pseudo=True)], seed=0)
    assert batch.box_loss_masks is None and batch.ignore_boxes is None and batch.token_loss_masks is None
    (target,) = grounding_targets(batch)
    assert target.box_loss_mask is None and target.ignore_boxes is None and target.token_loss_mask is None


def test_ignore_boxes_follow_the_flip_and_resize_of_the_boxes(tmp_path, tokenizer):
    band = np.asarray([[10.0, 8, 50, 60], [70, 20, 118, 79]], dtype=np.float32)
    record = _pseudo_record(
        tmp_path,
        boxes=band[:1],
        pseudo=True,
        ignore_boxes=band,
        ignore_spans=((BLUE,), (RED,)),
    )
    flipped = set()
    for seed in range(8):
        batch = _build(tokenizer, [record, _pseudo_record(tmp_path)], seed)
        ignore, box = batch.ignore_boxes[0], batch.boxes[0]
        assert ignore.dtype == torch.float32 and ignore.shape == (2, 4)
        assert torch.equal(ignore[:1], box)  # the first ignore box is the box: same transform
        height, width = batch.image_sizes[0]
        scale = torch.tensor([width / 120, height / 80] * 2)
        unflipped = torch.from_numpy(band) * scale
        mirrored = unflipped.clone()
        mirrored[:, [0, 2]] = width - unflipped[:, [2, 0]]
        assert torch.allclose(ignore, unflipped) or torch.allclose(ignore, mirrored, atol=1e-4)
        flipped.add(not torch.allclose(ignore, unflipped))
        assert batch.ignore_boxes[1] is None
        targets = grounding_targets(batch)
        assert torch.equal(targets[0].ignore_boxes, ignore) and targets[1].ignore_boxes is None
    assert flipped == {True, False}


def test_unlabelled_phrase_tokens_are_masked_and_pseudo_boxes_lose_box_loss(tmp_path, tokenizer):
    pseudo = _pseudo_record(tmp_path, pseudo=True, unlabelled_spans=((BLUE,),))
    human = _pseudo_record(tmp_path)
    batch = _build(tokenizer, [pseudo, human], seed=0, pseudo_box_loss=False)
    expected = torch.ones(batch.input_ids.shape[1], dtype=torch.bool)
    expected[5:8] = False  # "a blue square"
    assert torch.equal(batch.token_loss_masks[0], expected) and batch.token_loss_masks[1] is None
    assert batch.box_loss_masks[0].tolist() == [False] and batch.box_loss_masks[1] is None
    # A kept phrase's tokens keep counting even when an unlabelled span overlaps them.
    overlapping = _pseudo_record(tmp_path, pseudo=True, unlabelled_spans=((RED,), (BLUE,)))
    (mask,) = _build(tokenizer, [overlapping], seed=0).token_loss_masks
    assert torch.equal(mask, expected)
    targets = grounding_targets(batch)
    assert torch.equal(targets[0].token_loss_mask, expected) and targets[1].token_loss_mask is None
    assert targets[0].box_loss_mask.tolist() == [False] and targets[1].box_loss_mask is None
    assert _build(tokenizer, [pseudo, human], seed=0).box_loss_masks is None  # the default keeps box losses


def test_a_batch_with_every_option_goes_through_the_criterion(tmp_path, tokenizer):
    record = _pseudo_record(
        tmp_path,
        pseudo=True,
        ignore_boxes=np.asarray([[60.0, 10, 110, 70]], dtype=np.float32),
        ignore_spans=((BLUE,),),
        unlabelled_spans=((BLUE,),),
    )
    batch = _build(tokenizer, [record, _pseudo_record(tmp_path)], seed=1, pseudo_box_loss=False)
    height, width = batch.images.shape[-2:]
    feature_sizes = [(height // 8, width // 8), (height // 16, width // 16)]
    anchors = AnchorGenerator(sizes=(32, 64), strides=(8, 16))(feature_sizes)
    tokens = batch.input_ids.shape[1]
    generator = torch.Generator().manual_seed(0)
    head = (
        [torch.randn((2, h * w, tokens), generator=generator) for h, w in feature_sizes],
        [torch.randn((2, 4, h, w), generator=generator) * 0.1 for h, w in feature_sizes],
        [torch.randn((2, 1, h, w), generator=generator) for h, w in feature_sizes],
    )
    losses = GroundingCriterion()(*head, anchors, grounding_targets(batch), batch.attention_mask)
    assert all(bool(torch.isfinite(losses[key])) for key in LOSS_KEYS)
    assert 0 < losses["norm_num_box_pos"].item() < losses["norm_num_pos"].item()
