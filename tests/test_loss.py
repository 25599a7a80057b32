"""ATSS assignment and the GLIP losses: golden loss cases of the official code, hand-worked ATSS, batching,
empty images, invalid boxes, gradients and the distributed normalisers (real gloo process group)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from glip.anchors import AnchorGenerator
from glip.atss import AtssAssigner
from glip.box_ops import from_legacy
from glip.loss import (
    DEFAULT_LOSS_WEIGHTS,
    LOSS_KEYS,
    NORMALISER_KEYS,
    GroundingCriterion,
    GroundingTargets,
    total_loss,
    weight_losses,
)
from tests.conftest import reference_loss_cases

REPO = Path(__file__).resolve().parents[1]
# Our key -> the official loss_dict key of the reference files.
OFFICIAL_KEYS = {
    "loss_token": "loss_dot_product_token",
    "loss_reg": "loss_reg",
    "loss_centerness": "loss_centerness",
}


# ---------------------------------------------------------------- golden loss cases


def _head_outputs(case: Path, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head outputs feeding the loss: stored in the case, else in the forward case with its inputs."""
    if any(key.startswith("head.") for key in outputs):
        return outputs
    inputs = load_file(case / "inputs.safetensors")
    for forward_case in sorted(case.parent.glob("case*")):
        forward_inputs = load_file(forward_case / "inputs.safetensors")
        if all(torch.equal(inputs[key], forward_inputs[key]) for key in ("image", "input_ids")):
            return load_file(forward_case / "outputs.safetensors")
    pytest.fail(f"{case}: no head.* tensors and no forward case with the same inputs in {case.parent}")


def _run_loss_case(case: Path):
    outputs = load_file(case / "outputs.safetensors")
    targets = load_file(case / "targets.safetensors")
    inputs = load_file(case / "inputs.safetensors")
    head = _head_outputs(case, outputs)
    levels = range(sum(1 for key in outputs if key.startswith("assign.level")))
    anchors = [outputs[f"anchors.level{level}"] for level in levels]
    ground_truth = [
        GroundingTargets(
            boxes=from_legacy(targets["boxes"]),  # the reference stores the legacy +1 form
            positive_map=targets["positive_map"],
            image_size_hw=tuple(int(v) for v in targets["image_size_hw"]),
        )
    ]
    criterion = GroundingCriterion(AtssAssigner(top_k=9))
    losses = criterion(
        [head[f"head.dot_product_logits.{level}"] for level in levels],
        [head[f"head.bbox_reg.{level}"] for level in levels],
        [head[f"head.centerness.{level}"] for level in levels],
        anchors,
        ground_truth,
        inputs["attention_mask"],
    )
    return criterion, anchors, ground_truth, outputs, targets, losses


def test_golden_walker_finds_loss_case1(reference):
    assert reference.joinpath("tiny", "loss_case1").resolve() in reference_loss_cases()


@pytest.mark.golden
@pytest.mark.parametrize("case", reference_loss_cases(), ids=lambda path: path.name)
def test_atss_matches_official(case, reference):
    _, anchors, ground_truth, outputs, targets, _ = _run_loss_case(case)
    assignment = AtssAssigner(top_k=9).assign(anchors, targets["boxes"], ground_truth[0].image_size_hw)
    expected = torch.cat([outputs[f"assign.level{level}"] for level in range(len(anchors))])
    assert torch.equal(assignment.matched_gt_index, expected)
    assert int((assignment.matched_gt_index >= 0).sum()) == int(outputs["norm.num_pos"])
    assert torch.equal(assignment.candidate_indices, outputs["atss.candidate_idxs"])
    assert torch.equal(assignment.is_inside, outputs["atss.is_in_gts"].bool())
    assert torch.equal(assignment.is_positive, outputs["atss.is_pos"].bool())
    for ours, official in [
        (assignment.candidate_ious, "atss.candidate_ious"),
        (assignment.iou_mean, "atss.iou_mean"),
        (assignment.iou_std, "atss.iou_std"),
        (assignment.iou_thresholds, "atss.iou_thresh"),
    ]:
        torch.testing.assert_close(ours, outputs[official], rtol=0, atol=1e-6)


@pytest.mark.golden
@pytest.mark.parametrize("case", reference_loss_cases(), ids=lambda path: path.name)
def test_targets_match_official(case, reference):
    criterion, anchors, ground_truth, outputs, targets, _ = _run_loss_case(case)
    (anchor_targets,) = criterion.prepare_targets(
        anchors, ground_truth, text_length=targets["positive_map"].shape[1]
    )
    positives = anchor_targets.positive_indices
    assert torch.equal(positives, outputs["pos.index"])
    assert torch.equal(anchor_targets.matched_gt_index[positives], outputs["pos.gt_index"])
    labels = torch.zeros_like(outputs["cls_labels"])
    labels[positives] = targets["labels"][anchor_targets.matched_gt_index[positives]]
    assert torch.equal(labels, outputs["cls_labels"])
    assert torch.equal(anchor_targets.token_targets[positives].to(torch.uint8), outputs["pos.token_targets"])
    # The official NoObj slot is position 255, padding here: unassigned anchors carry only that one-hot.
    unassigned = anchor_targets.token_targets[anchor_targets.matched_gt_index < 0]
    assert torch.equal(unassigned.sum(dim=1), torch.ones(unassigned.shape[0]))
    assert bool((unassigned[:, 255] == 1).all())


@pytest.mark.golden
@pytest.mark.parametrize("case", reference_loss_cases(), ids=lambda path: path.name)
def test_losses_match_official(case, reference):
    _, _, _, outputs, _, losses = _run_loss_case(case)
    assert set(losses) == set(LOSS_KEYS) | set(NORMALISER_KEYS)
    for ours, official in OFFICIAL_KEYS.items():
        assert losses[ours].item() == pytest.approx(outputs[f"loss_unweighted.{official}"].item(), rel=1e-6)
    weighted = weight_losses(losses)
    for ours, official in OFFICIAL_KEYS.items():
        assert weighted[ours].item() == pytest.approx(outputs[f"loss.{official}"].item(), rel=1e-6)
    # The official total includes loss_cls, which is 0 by design (USE_CLASSIFICATION_LOSS False).
    assert outputs["loss.loss_cls"].item() == 0.0
    assert total_loss(losses).item() == pytest.approx(outputs["loss.total"].item(), rel=1e-6)
    assert losses["norm_num_pos"].item() == int(outputs["norm.num_pos"])
    assert losses["norm_num_pos_avg"].item() == pytest.approx(outputs["norm.num_pos_avg"].item(), rel=1e-12)
    assert losses["norm_sum_centerness_targets"].item() == pytest.approx(
        outputs["norm.sum_centerness_targets"].item(), rel=1e-6
    )


# ---------------------------------------------------------------- hand-worked ATSS

# Legacy (+1) boxes. Level 0: three 10x10 anchors, level 1: two 20x20 anchors.
HAND_ANCHORS = [
    torch.tensor([[0.0, 0, 9, 9], [5, 0, 14, 9], [20, 0, 29, 9]]),
    torch.tensor([[0.0, 0, 19, 19], [20, 0, 39, 19]]),
]


def test_atss_hand_worked_example():
    # Box [0,0,9,9], centre (4.5, 4.5). Nearest 2 per level: anchors 0 (d 0) and 1 (d 5); 3 (d 7.07) and 4.
    # IoUs (+1 areas): anchor 0: 1; anchor 1: 5x10 / (100 + 100 - 50) = 1/3; anchor 3: 100 / 400; anchor 4: 0.
    assignment = AtssAssigner(top_k=2).assign(HAND_ANCHORS, torch.tensor([[0.0, 0, 9, 9]]))
    ious = [1.0, 1 / 3, 0.25, 0.0]
    threshold = statistics.mean(ious) + statistics.stdev(ious)  # 0.8228
    assert assignment.candidate_indices[:, 0].tolist() == [0, 1, 3, 4]
    torch.testing.assert_close(assignment.candidate_ious[:, 0], torch.tensor(ious))
    assert assignment.iou_thresholds.item() == pytest.approx(threshold, abs=1e-6)
    # Only anchor 0 has its centre inside the box (anchor 1's centre x 9.5 is past x2 = 9).
    assert assignment.is_inside[:, 0].tolist() == [True, False, False, False]
    assert assignment.matched_gt_index.tolist() == [0, -1, -1, -1, -1]


def test_atss_anchor_claimed_twice_goes_to_highest_iou_then_first_index():
    box = [0.0, 0, 9, 9]
    wider = [0.0, 0, 11, 9]  # anchor 0 has IoU 100/120 with it, above its own threshold 0.747, and is inside
    assigner = AtssAssigner(top_k=2)
    assignment = assigner.assign(HAND_ANCHORS, torch.tensor([wider, box]))
    assert assignment.is_positive[0].tolist() == [True, True]  # candidate 0 is anchor 0 for both boxes
    assert assignment.matched_gt_index.tolist() == [1, -1, -1, -1, -1]  # IoU 1 beats 0.833
    assert assigner(HAND_ANCHORS, torch.tensor([box, box])).tolist() == [0, -1, -1, -1, -1]


def test_atss_centre_outside_box_is_never_positive():
    # A 10x10 anchor covering a 2x2 box at its corner: IoU 4/100 clears mean + std of [0.04, 0, 0] (0.036),
    # but the anchor centre (-3.5, -3.5) is outside the box, so nothing is assigned.
    anchors = [torch.tensor([[-8.0, -8, 1, 1], [30, 30, 39, 39]]), torch.tensor([[60.0, 60, 69, 69]])]
    assignment = AtssAssigner(top_k=2).assign(anchors, torch.tensor([[0.0, 0, 1, 1]]))
    assert assignment.candidate_ious[0, 0].item() == pytest.approx(0.04)
    assert assignment.candidate_ious[0, 0] >= assignment.iou_thresholds[0]
    assert not assignment.is_inside[0, 0]
    assert assignment.matched_gt_index.tolist() == [-1, -1, -1]


def test_atss_without_boxes_assigns_nothing():
    assignment = AtssAssigner(top_k=2).assign(HAND_ANCHORS, torch.zeros((0, 4)))
    assert assignment.matched_gt_index.tolist() == [-1] * 5
    assert assignment.candidate_indices.shape == (4, 0)


# ---------------------------------------------------------------- synthetic batches

IMAGE_HW = (64, 96)
FEATURE_SIZES = [(8, 12), (4, 6), (2, 3)]
TEXT_LENGTH = 16


def _anchors() -> list[torch.Tensor]:
    return AnchorGenerator(sizes=(32, 64, 128), strides=(8, 16, 32))(FEATURE_SIZES)


def _targets(boxes: list[list[float]], token_spans: list[tuple[int, int]]) -> GroundingTargets:
    positive_map = torch.zeros((len(boxes), TEXT_LENGTH))
    for row, (start, end) in enumerate(token_spans):
        positive_map[row, start:end] = 1.0
    return GroundingTargets(torch.tensor(boxes).reshape(-1, 4), positive_map, IMAGE_HW)


def _batch(seed: int = 0, text_lengths=(12, 16, 8)):
    """Random head outputs for len(text_lengths) images: 2 boxes, 1 box, no box (then repeating)."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(text_lengths)
    num_anchors = sum(h * w for h, w in FEATURE_SIZES)
    logits = torch.randn((batch, num_anchors, TEXT_LENGTH), generator=generator) * 2
    token_logits = list(logits.split([h * w for h, w in FEATURE_SIZES], dim=1))
    box_regression = [torch.randn((batch, 4, h, w), generator=generator) * 0.5 for h, w in FEATURE_SIZES]
    centerness = [torch.randn((batch, 1, h, w), generator=generator) for h, w in FEATURE_SIZES]
    examples = [
        _targets([[4, 6, 40, 44], [50, 10, 90, 60]], [(1, 3), (4, 7)]),
        _targets([[20, 20, 60, 62]], [(1, 4)]),
        _targets([], []),
    ]
    targets = [examples[i % 3] for i in range(batch)]
    mask = torch.zeros((batch, TEXT_LENGTH), dtype=torch.int64)
    for row, length in enumerate(text_lengths):
        mask[row, :length] = 1
    return token_logits, box_regression, centerness, targets, mask


def _image(batch, index: int):
    token_logits, box_regression, centerness, targets, mask = batch
    pick = slice(index, index + 1)
    return (
        [level[pick] for level in token_logits],
        [level[pick] for level in box_regression],
        [level[pick] for level in centerness],
        targets[pick],
        mask[pick],
    )


def _criterion_call(criterion, batch):
    token_logits, box_regression, centerness, targets, mask = batch
    return criterion(token_logits, box_regression, centerness, _anchors(), targets, mask)


def test_batched_equals_per_image():
    criterion = GroundingCriterion()
    batch = _batch()
    batched = _criterion_call(criterion, batch)
    singles = [_criterion_call(criterion, _image(batch, i)) for i in range(3)]
    assert [s["norm_num_pos"].item() > 0 for s in singles] == [True, True, False]
    assert batched["norm_num_pos"].item() == sum(s["norm_num_pos"].item() for s in singles)
    # Each loss is a sum over images divided by a batch normaliser: undo the normalisers and compare sums.
    for key, normaliser in [
        ("loss_token", "norm_num_pos_avg"),
        ("loss_centerness", "norm_num_pos_avg"),
        ("loss_reg", "norm_sum_centerness_targets"),
    ]:
        per_image_sum = sum(s[key].item() * s[normaliser].item() for s in singles)
        assert (batched[key] * batched[normaliser]).item() == pytest.approx(per_image_sum, rel=1e-5)
    anchors = _anchors()
    batched_targets = criterion.prepare_targets(anchors, batch[3], TEXT_LENGTH)
    for index in range(3):
        (single,) = criterion.prepare_targets(anchors, batch[3][index : index + 1], TEXT_LENGTH)
        assert torch.equal(batched_targets[index].matched_gt_index, single.matched_gt_index)
        assert torch.equal(batched_targets[index].token_targets, single.token_targets)


def _negatives_only_focal_sum(logits: torch.Tensor, mask: torch.Tensor, alpha=0.25, gamma=2.0) -> float:
    """In float64 by hand: sum over unmasked tokens of (1 - alpha) p^gamma (-log(1 - p)), all targets 0."""
    probability = torch.sigmoid(logits.double())
    terms = (1 - alpha) * probability**gamma * -torch.log1p(-probability)
    return float((terms * mask[:, None, :].double()).sum())


def test_images_without_boxes_give_token_loss_over_negatives_only():
    token_logits, box_regression, centerness, _, mask = _batch(text_lengths=(12, 5))
    empty = [_targets([], []), _targets([], [])]
    losses = GroundingCriterion()(token_logits, box_regression, centerness, _anchors(), empty, mask)
    assert all(torch.isfinite(losses[key]) for key in LOSS_KEYS)
    assert losses["loss_reg"].item() == 0.0
    assert losses["loss_centerness"].item() == 0.0
    assert losses["norm_num_pos"].item() == 0.0 and losses["norm_num_pos_avg"].item() == 1.0
    expected = _negatives_only_focal_sum(torch.cat(token_logits, dim=1), mask)
    assert losses["loss_token"].item() == pytest.approx(expected, rel=1e-5)


def test_no_object_slot_only_exists_in_the_256_wide_official_layout():
    anchors = [torch.tensor([[0.0, 0, 9, 9], [10, 0, 19, 9]])]
    empty = [GroundingTargets(torch.zeros((0, 4)), torch.zeros((0, 256)))]
    (full,) = GroundingCriterion().prepare_targets(anchors, empty, text_length=256)
    assert full.token_targets[:, 255].tolist() == [1.0, 1.0] and full.token_targets.sum().item() == 2.0
    short = [GroundingTargets(torch.zeros((0, 4)), torch.zeros((0, 20)))]
    (padded,) = GroundingCriterion().prepare_targets(anchors, short, text_length=20)
    assert padded.token_targets.sum().item() == 0.0
    logits = torch.randn((1, 2, 256), generator=torch.Generator().manual_seed(3))
    regression, centerness = torch.zeros((1, 4, 1, 2)), torch.zeros((1, 1, 1, 2))
    filled = torch.ones((1, 256), dtype=torch.int64)  # a caption that fills all 256 tokens
    losses = GroundingCriterion()([logits], [regression], [centerness], anchors, empty, filled)
    without_slot = GroundingCriterion(no_object_token_index=None)(
        [logits], [regression], [centerness], anchors, empty, filled
    )
    # Position 255 turns from a negative into a positive target for both anchors.
    probability = torch.sigmoid(logits[0, :, 255].double())
    positive = (0.25 * (1 - probability) ** 2 * -torch.log(probability)).sum()
    negative = (0.75 * probability**2 * -torch.log1p(-probability)).sum()
    difference = (losses["loss_token"] - without_slot["loss_token"]).item()
    assert difference == pytest.approx((positive - negative).item(), rel=1e-4)


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        ([30.0, 10, 30, 40], "x1 <= x0"),
        ([30.0, 40, 50, 20], "y1 <= y0"),
        ([math.nan, 10, 50, 40], "NaN or infinite"),
        ([10.0, 10, math.inf, 40], "NaN or infinite"),
        ([10.0, 10, 98, 40], "outside the 96x64"),
        ([-1.5, 10, 50, 40], "outside the 96x64"),
    ],
)
def test_invalid_boxes_are_rejected_naming_image_and_box(box, reason):
    token_logits, box_regression, centerness, targets, mask = _batch(text_lengths=(12, 16))
    bad = _targets([[20, 20, 60, 62], box], [(1, 4), (5, 6)])
    with pytest.raises(ValueError, match=r"image 1: box 1 \[.*\] \(continuous xyxy\) is invalid") as error:
        GroundingCriterion()(token_logits, box_regression, centerness, _anchors(), [targets[0], bad], mask)
    assert reason in str(error.value)


def test_boxes_within_a_pixel_of_the_border_are_accepted():
    token_logits, box_regression, centerness, _, mask = _batch(text_lengths=(12,))
    border = _targets([[-0.5, 0, 96.5, 65]], [(1, 2)])
    losses = GroundingCriterion()(token_logits, box_regression, centerness, _anchors(), [border], mask)
    assert losses["norm_num_pos"].item() > 0


def test_mismatched_positive_map_is_rejected():
    token_logits, box_regression, centerness, _, mask = _batch(text_lengths=(12,))
    wrong = GroundingTargets(torch.tensor([[4.0, 6, 40, 44]]), torch.ones((1, TEXT_LENGTH + 1)), IMAGE_HW)
    with pytest.raises(ValueError, match="image 0: positive_map has shape"):
        GroundingCriterion()(token_logits, box_regression, centerness, _anchors(), [wrong], mask)


def test_losses_finite_and_gradients_reach_every_head_output():
    token_logits, box_regression, centerness, targets, mask = _batch()
    inputs = [t.detach().clone().requires_grad_(True) for t in token_logits + box_regression + centerness]
    levels = len(FEATURE_SIZES)
    logits_in, regression_in, centerness_in = (
        inputs[:levels],
        inputs[levels : 2 * levels],
        inputs[2 * levels :],
    )
    criterion = GroundingCriterion()
    losses = criterion(logits_in, regression_in, centerness_in, _anchors(), targets, mask)
    assert all(bool(torch.isfinite(losses[key])) and losses[key].requires_grad for key in LOSS_KEYS)
    total_loss(losses).backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in inputs)
    logits_grad = torch.cat([t.grad for t in logits_in], dim=1)
    assert bool((logits_grad[mask[:, None, :].expand_as(logits_grad) == 1] != 0).all())
    assert bool((logits_grad[mask[:, None, :].expand_as(logits_grad) == 0] == 0).all())  # padding: no loss
    positives = torch.zeros((3, logits_grad.shape[1]), dtype=torch.bool)
    for image, anchor_targets in enumerate(criterion.prepare_targets(_anchors(), targets, TEXT_LENGTH)):
        positives[image, anchor_targets.positive_indices] = True
    regression_grad = torch.cat([t.grad.permute(0, 2, 3, 1).reshape(3, -1, 4) for t in regression_in], dim=1)
    centerness_grad = torch.cat([t.grad.reshape(3, -1) for t in centerness_in], dim=1)
    # Box and centerness losses only see positive anchors, and every positive gets a gradient.
    assert bool((regression_grad[~positives] == 0).all()) and bool(
        (regression_grad[positives] != 0).any(-1).all()
    )
    assert bool((centerness_grad[~positives] == 0).all()) and bool((centerness_grad[positives] != 0).all())


def test_weighting_uses_official_defaults_and_rejects_unknown_keys():
    losses = _criterion_call(GroundingCriterion(), _batch())
    weighted = weight_losses(losses)
    assert set(weighted) == set(LOSS_KEYS) == set(DEFAULT_LOSS_WEIGHTS)
    assert weighted["loss_reg"].item() == pytest.approx(2.0 * losses["loss_reg"].item())
    assert total_loss(losses).item() == pytest.approx(sum(weighted[key].item() for key in LOSS_KEYS))
    assert total_loss(losses, {"loss_token": 0.5}).item() == pytest.approx(0.5 * losses["loss_token"].item())
    with pytest.raises(KeyError, match="loss_cls"):
        weight_losses(losses, {"loss_cls": 0.0})


def test_reduce_hook_with_identical_ranks_keeps_single_process_values():
    batch = _batch()
    single = _criterion_call(GroundingCriterion(), batch)
    doubled = _criterion_call(GroundingCriterion(reduce_sum=lambda t: 2 * t, world_size=2), batch)
    assert doubled["norm_num_pos"].item() == 2 * single["norm_num_pos"].item()
    for key in LOSS_KEYS + ("norm_num_pos_avg", "norm_sum_centerness_targets"):
        assert doubled[key].item() == pytest.approx(single[key].item(), rel=1e-12)
    with pytest.raises(ValueError, match="both"):
        GroundingCriterion(reduce_sum=lambda t: t)


# ---------------------------------------------------------------- torch.distributed (gloo, 2 processes)


def _distributed_worker(rank: int, world_size: int, store_path: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        losses = _criterion_call(GroundingCriterion(), _image(_batch(), rank))
        results.put((rank, {key: value.item() for key, value in losses.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~15 s on 2 cores
def test_distributed_normalisers_are_all_reduced(tmp_path):
    world_size = 2
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(
        _distributed_worker,
        args=(world_size, str(tmp_path / "store"), results),
        nprocs=world_size,
        start_method="spawn",
    )
    per_rank = dict(results.get(timeout=60) for _ in range(world_size))
    local = [_criterion_call(GroundingCriterion(), _image(_batch(), rank)) for rank in range(world_size)]
    total_pos = sum(single["norm_num_pos"].item() for single in local)
    total_centerness = sum(single["norm_sum_centerness_targets"].item() for single in local)
    for rank, single in enumerate(local):
        ddp = per_rank[rank]
        assert ddp["norm_num_pos"] == total_pos
        assert ddp["norm_num_pos_avg"] == max(total_pos / world_size, 1.0)
        assert ddp["norm_sum_centerness_targets"] == pytest.approx(total_centerness / world_size, rel=1e-12)
        local_pos_avg, local_centerness = (
            single["norm_num_pos_avg"].item(),
            single["norm_sum_centerness_targets"],
        )
        for key in ("loss_token", "loss_centerness"):
            expected = single[key].item() * local_pos_avg / ddp["norm_num_pos_avg"]
            assert ddp[key] == pytest.approx(expected, rel=1e-6)
        expected_reg = (
            single["loss_reg"].item() * local_centerness.item() / ddp["norm_sum_centerness_targets"]
        )
        assert ddp["loss_reg"] == pytest.approx(expected_reg, rel=1e-6)


def _class_logits(batch_size: int, classes: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((batch_size, classes, h, w), generator=generator) for h, w in FEATURE_SIZES]


def test_class_loss_is_the_focal_loss_of_each_positive_anchors_box_row():
    token_logits, box_regression, centerness, targets, mask = _batch(text_lengths=(12, 16))
    rows = [torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]), None]  # image 2: grounding, left out
    targets = [GroundingTargets(t.boxes, t.positive_map, t.image_size_hw, r) for t, r in zip(targets, rows)]
    class_logits = _class_logits(2, 4)
    criterion = GroundingCriterion()
    losses = criterion(token_logits, box_regression, centerness, _anchors(), targets, mask, class_logits)
    without = criterion(token_logits, box_regression, centerness, _anchors(), targets, mask)
    assert "loss_class" not in without
    for key in LOSS_KEYS:  # the other losses do not change
        assert losses[key].item() == without[key].item()
    # By hand, in float64: every anchor of image 0, target = its box's row at positives, zeros elsewhere.
    (assigned,) = criterion.prepare_targets(_anchors(), targets[:1], TEXT_LENGTH)
    flat = torch.cat([level[0].flatten(1).T for level in class_logits]).double()  # [A, K]
    wanted = torch.zeros_like(flat)
    positives = assigned.positive_indices
    wanted[positives] = rows[0].double()[assigned.matched_gt_index[positives]]
    probability = flat.sigmoid()
    p_t = probability * wanted + (1 - probability) * (1 - wanted)
    alpha_t = 0.25 * wanted + 0.75 * (1 - wanted)
    terms = (
        alpha_t
        * (1 - p_t) ** 2
        * torch.nn.functional.binary_cross_entropy_with_logits(flat, wanted, reduction="none")
    )
    expected = float(terms.sum()) / losses["norm_num_pos_avg"].item()
    assert positives.numel() > 0
    assert losses["loss_class"].item() == pytest.approx(expected, rel=1e-5)


def test_class_targets_of_the_wrong_shape_are_rejected():
    token_logits, box_regression, centerness, targets, mask = _batch(text_lengths=(12,))
    bad = [GroundingTargets(targets[0].boxes, targets[0].positive_map, IMAGE_HW, torch.zeros(2, 3))]
    with pytest.raises(ValueError, match=r"class targets of shape \(2, 3\), expected \(2, 4\)"):
        GroundingCriterion()(
            token_logits, box_regression, centerness, _anchors(), bad, mask, _class_logits(1, 4)
        )
