"""Box math: hand-computed IoU/GIoU, legacy "+1" conventions, the official box coder and ml_nms semantics."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from glip import box_ops

EMPTY = torch.zeros((0, 4))


def _boxes(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_box_area_and_iou_hand_values():
    a = _boxes([0, 0, 2, 2], [0, 0, 4, 1])
    b = _boxes([1, 1, 3, 3])
    assert box_ops.box_area(a).tolist() == [4.0, 4.0]
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7; [0,0,4,1] vs it: no overlap
    expected = torch.tensor([[1 / 7], [0.0]])
    torch.testing.assert_close(box_ops.box_iou(a, b), expected)


def test_generalized_box_iou_hand_values():
    overlapping = box_ops.generalized_box_iou(_boxes([0, 0, 2, 2]), _boxes([1, 1, 3, 3]))
    # enclosing box [0,0,3,3] has area 9: GIoU = 1/7 - (9 - 7) / 9
    torch.testing.assert_close(overlapping, torch.tensor([[1 / 7 - 2 / 9]]))
    disjoint = box_ops.generalized_box_iou(_boxes([0, 0, 1, 1]), _boxes([2, 0, 3, 1]))
    # IoU 0, union 2, enclosing 3: GIoU = -(3 - 2) / 3
    torch.testing.assert_close(disjoint, torch.tensor([[-1 / 3]]))
    identical = box_ops.generalized_box_iou(_boxes([5, 5, 9, 8]), _boxes([5, 5, 9, 8]))
    torch.testing.assert_close(identical, torch.tensor([[1.0]]))


@pytest.mark.parametrize(
    "function",
    [box_ops.box_iou, box_ops.generalized_box_iou, box_ops.box_iou_legacy],
)
def test_pairwise_functions_accept_empty_inputs(function):
    boxes = _boxes([0, 0, 2, 2], [1, 1, 3, 3])
    assert function(EMPTY, boxes).shape == (0, 2)
    assert function(boxes, EMPTY).shape == (2, 0)
    assert function(EMPTY, EMPTY).shape == (0, 0)


def test_box_iou_legacy_counts_inclusive_pixels():
    # legacy [0,0,1,1] covers 2x2 pixels; [1,1,2,2] shares exactly one pixel: IoU = 1 / (4 + 4 - 1)
    iou = box_ops.box_iou_legacy(_boxes([0, 0, 1, 1]), _boxes([1, 1, 2, 2], [3, 3, 4, 4]))
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0]]))
    # a single-pixel legacy box has area 1, not 0
    torch.testing.assert_close(
        box_ops.box_iou_legacy(_boxes([4, 4, 4, 4]), _boxes([4, 4, 4, 4])), torch.ones(1, 1)
    )


def test_box_iou_legacy_equals_continuous_iou_of_converted_boxes():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand((20, 2), generator=generator) * 50
    sizes = torch.rand((20, 2), generator=generator) * 30
    legacy = torch.cat((corners, corners + sizes), dim=1)
    expected = box_ops.box_iou(box_ops.from_legacy(legacy), box_ops.from_legacy(legacy[:7]))
    torch.testing.assert_close(box_ops.box_iou_legacy(legacy, legacy[:7]), expected, atol=1e-6, rtol=1e-5)


def test_xywh_conversions_round_trip():
    xywh = _boxes([10, 20, 30, 40], [0.5, 1.5, 2, 3])
    xyxy = box_ops.xywh_to_xyxy(xywh)
    torch.testing.assert_close(xyxy, _boxes([10, 20, 40, 60], [0.5, 1.5, 2.5, 4.5]))
    torch.testing.assert_close(box_ops.xyxy_to_xywh(xyxy), xywh)


def test_legacy_conversions():
    # a COCO [x, y, w, h] = [10, 20, 30, 40] box is [10, 20, 39, 59] in the official +1 convention
    continuous = box_ops.xywh_to_xyxy(_boxes([10, 20, 30, 40]))
    legacy = box_ops.to_legacy(continuous)
    torch.testing.assert_close(legacy, _boxes([10, 20, 39, 59]))
    torch.testing.assert_close(box_ops.from_legacy(legacy), continuous)
    assert box_ops.to_legacy(EMPTY).shape == (0, 4)


def test_clip_boxes_legacy_clamps_to_last_pixel():
    boxes = _boxes([-5, -3, 400, 300], [10, 20, 30, 40], [500, 400, 600, 500])
    clipped = box_ops.clip_boxes_legacy(boxes, height=256, width=320)
    torch.testing.assert_close(clipped, _boxes([0, 0, 319, 255], [10, 20, 30, 40], [319, 255, 319, 255]))
    assert torch.equal(boxes[0], _boxes([-5, -3, 400, 300])[0]), "input must not be modified"


def test_valid_box_mask_and_remove_degenerate():
    boxes = _boxes(
        [0, 0, 1, 1],  # valid
        [0, 0, 0, 1],  # zero width
        [0, 5, 1, 4],  # inverted y
        [0, 0, float("nan"), 1],
        [0, 0, float("inf"), 1],
        [2.5, 3.5, 2.6, 3.6],  # tiny but valid
    )
    assert box_ops.valid_box_mask(boxes).tolist() == [True, False, False, False, False, True]
    torch.testing.assert_close(box_ops.remove_degenerate(boxes), boxes[[0, 5]])
    assert box_ops.remove_degenerate(EMPTY).shape == (0, 4)


def test_box_coder_encode_hand_values():
    coder = box_ops.BoxCoder()
    anchor = _boxes([-28, -28, 35, 35])  # width 64, centre 3.5
    gt = _boxes([35, 36, 125, 125])  # width 91, height 90, centre (80, 80.5)
    deltas = coder.encode(gt, anchor)
    expected = torch.tensor([[10 * 76.5 / 64, 10 * 77 / 64, 5 * math.log(91 / 64), 5 * math.log(90 / 64)]])
    torch.testing.assert_close(deltas, expected)


def test_box_coder_round_trip_and_identity():
    coder = box_ops.BoxCoder()
    generator = torch.Generator().manual_seed(1)
    anchors = torch.cat((torch.rand((50, 2), generator=generator) * 100, torch.zeros(50, 2)), dim=1)
    anchors[:, 2:] = anchors[:, :2] + 10 + torch.rand((50, 2), generator=generator) * 200
    gt = anchors + torch.randn((50, 4), generator=generator) * 8
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    torch.testing.assert_close(coder.decode(coder.encode(gt, anchors), anchors), gt, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(coder.decode(torch.zeros(50, 4), anchors), anchors, atol=1e-4, rtol=1e-6)
    assert coder.decode(torch.zeros(0, 4), EMPTY).shape == (0, 4)


def test_box_coder_decode_clamps_scale():
    coder = box_ops.BoxCoder()
    decoded = coder.decode(torch.tensor([[0.0, 0.0, 100.0, -5.0]]), _boxes([-28, -28, 35, 35]))
    width = decoded[0, 2] - decoded[0, 0] + 1
    height = decoded[0, 3] - decoded[0, 1] + 1
    torch.testing.assert_close(width, torch.tensor(64 * 1000 / 16))
    torch.testing.assert_close(height, torch.tensor(64 * math.exp(-1.0)))
    custom = box_ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(2.0))
    decoded = custom.decode(torch.tensor([[0.5, 0.0, 5.0, 0.0]]), _boxes([0, 0, 9, 9]))
    # centre 4.5 + 0.5 * 10 = 9.5, width clamped to 2 * 10 = 20 -> x in [9.5 - 9.5, 9.5 + 9.5]
    torch.testing.assert_close(decoded, _boxes([0, 0, 19, 9]))


@pytest.mark.golden
def test_box_coder_matches_official_loss_case(reference):
    loss_case = reference / "tiny" / "loss_case1"
    outputs = load_file(str(loss_case / "outputs.safetensors"))
    targets = load_file(str(loss_case / "targets.safetensors"))
    coder = box_ops.BoxCoder()
    anchors = outputs["pos.anchors"]
    gt = targets["boxes"][outputs["pos.gt_index"]]
    torch.testing.assert_close(coder.encode(gt, anchors), outputs["pos.reg_targets"], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(
        coder.decode(outputs["pos.reg_targets"], anchors), outputs["pos.gt_boxes_decoded"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        coder.decode(outputs["pos.box_regression"], anchors), outputs["pos.pred_boxes"], atol=1e-4, rtol=0
    )


def _reference_ml_nms(boxes, scores, labels, threshold):
    """Literal greedy loop of the official kernel's semantics, for comparison."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    iou = box_ops.box_iou_legacy(boxes, boxes)
    kept = []
    for index in order:
        if all(labels[k] != labels[index] or iou[k, index] <= threshold for k in kept):
            kept.append(index)
    return sorted(kept)


def test_batched_nms_legacy_uses_plus_one_iou():
    # legacy IoU = 62/100 > 0.6 (suppressed); without +1 it would be 46.8/81 = 0.578 (kept)
    boxes = _boxes([0, 0, 9, 5.2], [0, 0, 9, 9])
    keep = box_ops.batched_nms_legacy(boxes, torch.tensor([0.5, 0.9]), torch.tensor([1, 1]), 0.6)
    assert keep.tolist() == [1]
    # exactly 0.6 is not above the threshold: both kept, indices ascending
    boxes = _boxes([0, 0, 9, 5], [0, 0, 9, 9])
    keep = box_ops.batched_nms_legacy(boxes, torch.tensor([0.5, 0.9]), torch.tensor([1, 1]), 0.6)
    assert keep.tolist() == [0, 1]


def test_batched_nms_legacy_is_class_aware_and_handles_negative_coordinates():
    boxes = _boxes([-50, -50, -10, -10], [-50, -50, -10, -10], [-50, -50, -11, -10], [30, 30, 40, 40])
    scores = torch.tensor([0.3, 0.9, 0.8, 0.1])
    labels = torch.tensor([2, 1, 2, 1])
    keep = box_ops.batched_nms_legacy(boxes, scores, labels, 0.6)
    assert keep.tolist() == [1, 2, 3]
    assert (
        box_ops.batched_nms_legacy(EMPTY, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.6).numel() == 0
    )


def test_batched_nms_legacy_matches_literal_loop():
    generator = torch.Generator().manual_seed(3)
    corners = torch.rand((300, 2), generator=generator) * 60
    boxes = torch.cat((corners, corners + 5 + torch.rand((300, 2), generator=generator) * 30), dim=1)
    scores = torch.rand(300, generator=generator)
    labels = torch.randint(1, 4, (300,), generator=generator)
    keep = box_ops.batched_nms_legacy(boxes, scores, labels, 0.6)
    assert keep.tolist() == _reference_ml_nms(boxes, scores, labels.tolist(), 0.6)
    assert 0 < keep.numel() < 300
