"""Anchors and the official grounding post-processing, against the tiny golden case and hand-built inputs."""

from __future__ import annotations

import pytest
import torch

from glip.anchors import AnchorGenerator
from glip.box_ops import BoxCoder
from glip.postprocess import Detections, GroundingPostProcessor, phrase_scores

NUM_LEVELS = 5


@pytest.fixture(scope="module")
def case1(reference_case1):
    return reference_case1["outputs"], reference_case1["inputs"], reference_case1["meta"]


@pytest.fixture(params=[False, True], ids=["per_image", "batched"])
def batched(request):
    """``GroundingPostProcessor.batched``: one image and level at a time (the official order, on CPUs) or all
    at once (on GPUs); both run here."""
    return request.param


def _head_outputs(outputs):
    logits = [outputs[f"head.dot_product_logits.{level}"] for level in range(NUM_LEVELS)]
    regression = [outputs[f"head.bbox_reg.{level}"] for level in range(NUM_LEVELS)]
    centerness = [outputs[f"head.centerness.{level}"] for level in range(NUM_LEVELS)]
    return logits, regression, centerness


def _feature_sizes(outputs):
    return [tuple(outputs[f"head.bbox_reg.{level}"].shape[-2:]) for level in range(NUM_LEVELS)]


def _label_to_token(meta):
    return {int(label): tokens for label, tokens in meta["positive_map_label_to_token"].items()}


def _sorted_by_score(boxes, scores, labels):
    order = scores.argsort(descending=True, stable=True)
    return boxes[order], scores[order], labels[order]


def _assert_same_detection_set(ours: Detections, boxes, scores, labels):
    """Every reference (box, label) has exactly one match in ours (box within 1e-3 px), scores within 1e-5."""
    assert len(ours) == scores.shape[0]
    box_distance = (ours.boxes[:, None, :] - boxes[None, :, :]).abs().amax(-1)  # [ours, reference]
    matches = (box_distance < 1e-3) & (ours.labels[:, None] == labels[None, :])
    assert (matches.sum(0) == 1).all(), "a reference detection is missing or matched twice"
    assert (matches.sum(1) == 1).all(), "a detection of ours matches no reference detection"
    ours_index, reference_index = matches.nonzero().unbind(1)
    torch.testing.assert_close(ours.scores[ours_index], scores[reference_index], atol=1e-5, rtol=0)


@pytest.mark.golden
def test_anchors_equal_official(case1):
    outputs, _, _ = case1
    anchors = AnchorGenerator()(_feature_sizes(outputs))
    assert len(anchors) == NUM_LEVELS
    for level, level_anchors in enumerate(anchors):
        assert torch.equal(level_anchors, outputs[f"anchors.{level}"]), f"level {level}"


@pytest.mark.golden
def test_cell_anchor_buffers_load_from_official_state_dict(reference_state):
    prefix = "module.rpn.anchor_generator."
    official = {key[len(prefix) :]: value for key, value in reference_state.items() if key.startswith(prefix)}
    generator = AnchorGenerator()
    assert set(generator.state_dict()) == set(official) == {f"cell_anchors.{i}" for i in range(NUM_LEVELS)}
    for key, value in generator.state_dict().items():
        assert torch.equal(value, official[key]), key
    generator.load_state_dict(official, strict=True)


@pytest.mark.golden
def test_level_candidates_match_official(case1):
    outputs, _, meta = case1
    logits, regression, centerness = _head_outputs(outputs)
    anchors = AnchorGenerator()(_feature_sizes(outputs))
    processor = GroundingPostProcessor()
    for level in range(NUM_LEVELS):
        ours = processor.level_candidates(
            logits[level][0],
            regression[level][0].permute(1, 2, 0).reshape(-1, 4),
            centerness[level][0].reshape(-1),
            anchors[level],
            _label_to_token(meta),
            (256, 320),
        )
        boxes, scores, labels = _sorted_by_score(ours.boxes, ours.scores, ours.labels)
        assert scores.shape == outputs[f"postprocess.level{level}.scores"].shape, f"level {level}"
        torch.testing.assert_close(scores, outputs[f"postprocess.level{level}.scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(boxes, outputs[f"postprocess.level{level}.boxes"], atol=1e-3, rtol=0)
        assert torch.equal(labels, outputs[f"postprocess.level{level}.labels"]), f"level {level}"


@pytest.mark.golden
@pytest.mark.parametrize("tokens_form", ["label_to_token", "token_lists", "positive_map"])
def test_final_detections_match_official(case1, tokens_form, batched):
    outputs, inputs, meta = case1
    phrase_tokens = {
        "label_to_token": _label_to_token(meta),
        "token_lists": [_label_to_token(meta)[label] for label in (1, 2, 3)],
        "positive_map": inputs["positive_map"] > 0,
    }[tokens_form]
    logits, regression, centerness = _head_outputs(outputs)
    anchors = AnchorGenerator()(_feature_sizes(outputs))
    (ours,) = GroundingPostProcessor(batched=batched)(
        logits, regression, centerness, anchors, [phrase_tokens], [(256, 320)]
    )
    assert ours.image_size == (256, 320)
    assert (ours.scores[:-1] >= ours.scores[1:]).all(), "detections come sorted by score"
    _assert_same_detection_set(ours, outputs["final.boxes"], outputs["final.scores"], outputs["final.labels"])


@pytest.mark.golden
def test_batch_with_per_image_sizes_and_phrases_equals_single_images(case1, batched):
    outputs, _, meta = case1
    logits, regression, centerness = _head_outputs(outputs)
    flipped = [torch.cat((x, x.flip(-1)), dim=0) for x in regression]  # a different second image
    logits2 = [torch.cat((x, x.roll(1, dims=1)), dim=0) for x in logits]
    centerness2 = [torch.cat((x, x.flip(-2)), dim=0) for x in centerness]
    anchors = AnchorGenerator()(_feature_sizes(outputs))
    tokens = [_label_to_token(meta), [[5, 6, 7], [1, 2, 3]]]
    sizes = [(256, 320), (200, 250)]
    processor = GroundingPostProcessor(batched=batched)
    batch = processor(logits2, flipped, centerness2, anchors, tokens, sizes)
    for index in range(2):
        (single,) = processor(
            [x[index : index + 1] for x in logits2],
            [x[index : index + 1] for x in flipped],
            [x[index : index + 1] for x in centerness2],
            anchors,
            [tokens[index]],
            [sizes[index]],
        )
        assert torch.equal(batch[index].boxes, single.boxes)
        assert torch.equal(batch[index].labels, single.labels)
    second = batch[1]
    assert second.image_size == (200, 250)
    assert second.labels.max() <= 2
    assert second.boxes[:, 0::2].max() <= 249 and second.boxes[:, 1::2].max() <= 199
    assert second.boxes.min() >= 0


def _one_level_inputs(token_logits: torch.Tensor, centerness_logits: torch.Tensor):
    """A 1-level, 2x2-grid, stride-8 problem; token logits ``[4, T]``, centerness ``[4]``."""
    anchors = AnchorGenerator(sizes=(16,), strides=(8,))([(2, 2)])
    regression = torch.zeros((1, 4, 2, 2))
    return [token_logits[None]], [regression], [centerness_logits.view(1, 1, 2, 2)], anchors


def test_phrase_scores_mean_of_token_probabilities():
    probabilities = torch.tensor([[0.2, 0.4, 0.9, 0.1], [1.0, 0.0, 0.5, 0.5]])
    expected = torch.tensor([[0.3, 0.5, 0.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(phrase_scores(probabilities, [[0, 1], [2, 3], []]), expected)
    torch.testing.assert_close(phrase_scores(probabilities, {1: [0, 1], 2: [2, 3], 3: []}), expected)
    positive_map = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    torch.testing.assert_close(phrase_scores(probabilities, positive_map), expected)


def test_threshold_centerness_sqrt_and_labels(batched):
    # tokens 0,1 -> phrase 1; token 2 -> phrase 2. Location 3 scores sigmoid(0) = 0.5 for phrase 2 only.
    logits = torch.full((4, 3), -20.0)
    logits[3, 2] = 0.0
    logits[1, :2] = torch.tensor([0.0, -20.0])  # phrase 1 at location 1: mean(0.5, ~0) = 0.25
    centerness = torch.tensor([0.0, 0.0, 0.0, 2.0])
    inputs = _one_level_inputs(logits, centerness)
    (result,) = GroundingPostProcessor(batched=batched)(*inputs, [[[0, 1], [2]]], [(16, 16)])
    expected_scores = torch.tensor([(0.5 * torch.sigmoid(torch.tensor(2.0))) ** 0.5, (0.25 * 0.5) ** 0.5])
    torch.testing.assert_close(result.scores, expected_scores, atol=1e-6, rtol=0)
    assert result.labels.tolist() == [2, 1]
    # zero deltas decode to the anchors (location 3 is x=8, y=8), then clipped to the 16x16 image
    anchor_of_location_3 = torch.tensor([8 - 4.0, 8 - 4.0, 8 + 11.0, 8 + 11.0]).clamp(max=15)
    torch.testing.assert_close(result.boxes[0], anchor_of_location_3)
    none = GroundingPostProcessor(score_threshold=0.6, batched=batched)(*inputs, [[[0, 1], [2]]], [(16, 16)])[
        0
    ]
    assert len(none) == 0 and none.boxes.shape == (0, 4) and none.labels.dtype == torch.int64


def test_pre_nms_top_n_keeps_best_by_score_times_centerness():
    logits = torch.tensor([[2.0], [1.0], [3.0], [0.5]])
    centerness = torch.tensor([0.0, 5.0, -5.0, 0.0])
    processor = GroundingPostProcessor(pre_nms_top_n=2)
    token_logits, regression, centerness_maps, anchors = _one_level_inputs(logits, centerness)
    candidates = processor.level_candidates(
        token_logits[0][0], torch.zeros((4, 4)), centerness, anchors[0], [[0]], (32, 32)
    )
    # products: sig(2)*0.5=0.44, sig(1)*sig(5)=0.73, sig(3)*sig(-5)=0.006, sig(.5)*0.5=0.31
    kept_boxes = anchors[0][[1, 0]].clamp(min=0, max=31)
    torch.testing.assert_close(candidates.boxes, kept_boxes)
    torch.testing.assert_close(
        candidates.scores, (logits[[1, 0], 0].sigmoid() * centerness[[1, 0]].sigmoid()).sqrt()
    )


def test_nms_is_per_phrase_and_top_n_keeps_ties(batched):
    # 2x2 grid of anchors [-4, -4, 11, 11] + 8 * (x, y); clipped to a 100x100 image they are
    # A=[0,0,11,11], B=[4,0,19,11], C=[0,4,11,19], D=[4,4,19,19] with legacy IoUs A-B = A-C = B-D = C-D = 0.4,
    # A-D = 64/336, B-C = 64/320. Two phrases score equally everywhere.
    inputs = _one_level_inputs(torch.zeros((4, 2)), torch.zeros(4))
    (result,) = GroundingPostProcessor(nms_threshold=0.6, batched=batched)(
        *inputs, [[[0], [1]]], [(100, 100)]
    )
    assert len(result) == 8
    assert sorted(result.labels.tolist()) == [1, 1, 1, 1, 2, 2, 2, 2]
    # at 0.3 each phrase keeps one diagonal pair (A, D or B, C); phrases never suppress each other
    tight = GroundingPostProcessor(nms_threshold=0.3, batched=batched)(*inputs, [[[0], [1]]], [(100, 100)])[0]
    assert sorted(tight.labels.tolist()) == [1, 1, 2, 2]
    # all 8 scores are equal: the kthvalue cut keeps every tie even though only 3 are asked for
    assert (
        len(
            GroundingPostProcessor(detections_per_image=3, batched=batched)(
                *inputs, [[[0], [1]]], [(100, 100)]
            )[0]
        )
        == 8
    )


def test_top_n_cut_keeps_best_scores(batched):
    logits = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    # far-apart anchors (stride 64, size 16) so NMS keeps all four
    anchors = AnchorGenerator(sizes=(16,), strides=(64,))([(2, 2)])
    inputs = ([logits[None]], [torch.zeros((1, 4, 2, 2))], [torch.zeros((1, 1, 2, 2))], anchors)
    (result,) = GroundingPostProcessor(detections_per_image=2, batched=batched)(
        *inputs, [[[0]]], [(200, 200)]
    )
    torch.testing.assert_close(result.scores, (logits[[3, 2], 0].sigmoid() * 0.5).sqrt())


def test_min_size_drops_small_boxes(batched):
    # anchors A..D of the test above clipped to an 8x8 image: [0,0,7,7] (8x8 legacy pixels), [4,0,7,7] (4x8),
    # [0,4,7,7] (8x4), [4,4,7,7] (4x4); the largest legacy IoU between them is 0.5, so NMS keeps all four
    inputs = _one_level_inputs(torch.zeros((4, 1)), torch.zeros(4))
    assert len(GroundingPostProcessor(min_size=4, batched=batched)(*inputs, [[[0]]], [(8, 8)])[0]) == 4
    kept = GroundingPostProcessor(min_size=5, batched=batched)(*inputs, [[[0]]], [(8, 8)])[0]
    assert len(kept) == 1 and kept.boxes[0].tolist() == [0.0, 0.0, 7.0, 7.0]


def test_to_original_gives_continuous_boxes_and_phrase_indices():
    detections = Detections(
        boxes=torch.tensor([[10.0, 20.0, 39.0, 59.0], [0.0, 0.0, 99.0, 49.0]]),
        scores=torch.tensor([0.9, 0.5]),
        labels=torch.tensor([2, 1]),
        image_size=(50, 100),
    )
    original = detections.to_original(0.5)
    torch.testing.assert_close(
        original.boxes, torch.tensor([[20.0, 40.0, 80.0, 120.0], [0.0, 0.0, 200.0, 100.0]])
    )
    assert original.phrase_indices.tolist() == [1, 0]
    torch.testing.assert_close(original.scores, detections.scores)
    per_axis = detections.to_original((0.5, 0.25), original_size=(150, 190))
    torch.testing.assert_close(
        per_axis.boxes, torch.tensor([[20.0, 80.0, 80.0, 150.0], [0.0, 0.0, 190.0, 150.0]])
    )


def test_anchor_generator_aspect_ratios_and_order():
    generator = AnchorGenerator(sizes=(32,), strides=(16,), aspect_ratios=(0.5, 1.0, 2.0))
    assert generator.num_anchors_per_location == 3
    (anchors,) = generator([(2, 3)])
    assert anchors.shape == (2 * 3 * 3, 4)
    cell = generator.cell_anchors.get_buffer("0")
    # official Detectron cell anchors for stride 16, size 32, ratios (0.5, 1, 2)
    # (ratio 0.5: width round(sqrt(256 / 0.5)) = 23, height round(11.5) = 12, both doubled for size 32)
    expected = torch.tensor([[-15.0, -4.0, 30.0, 19.0], [-8.0, -8.0, 23.0, 23.0], [-3.0, -14.0, 18.0, 29.0]])
    torch.testing.assert_close(cell, expected)
    # y-major, then x, then ratio: the 4th location is (y=1, x=0)
    torch.testing.assert_close(anchors[3 * 3 : 3 * 3 + 3], expected + torch.tensor([0.0, 16.0, 0.0, 16.0]))
    torch.testing.assert_close(anchors[3:6], expected + torch.tensor([16.0, 0.0, 16.0, 0.0]))
    with pytest.raises(ValueError):
        generator([(2, 3), (1, 1)])


def test_box_coder_is_configurable():
    processor = GroundingPostProcessor(box_coder=BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)))
    assert processor.box_coder.weights == (1.0, 1.0, 1.0, 1.0)


@pytest.mark.golden
def test_batched_detections_equal_the_per_image_ones(case1):
    """The batched post-processing (GPUs) against the official per-image order (CPUs) on a batch of four
    images built from the golden head outputs: other sizes, other phrase lists (one phrase without tokens, a
    token in two phrases), few enough ``pre_nms_top_n`` and ``detections_per_image`` that both cuts bite. Same
    detections: boxes within 1e-4 px, scores within 1e-6 (the phrase means are summed in another order)."""
    outputs, _, meta = case1
    logits, regression, centerness = _head_outputs(outputs)
    generator = torch.Generator().manual_seed(0)

    def four(level: torch.Tensor, scale: float) -> torch.Tensor:
        noise = [torch.randn(level.shape, generator=generator) * scale for _ in range(3)]
        return torch.cat([level, *(level + n for n in noise)], dim=0)

    logits4 = [four(x, 1.0) for x in logits]
    regression4 = [four(x, 0.1) for x in regression]
    centerness4 = [four(x, 1.0) for x in centerness]
    anchors = AnchorGenerator()(_feature_sizes(outputs))
    tokens = [_label_to_token(meta), [[5, 6, 7], [1, 2, 3], []], [[1], [1, 2], [3, 4, 5, 6]], [[2, 3]]]
    sizes = [(256, 320), (200, 250), (256, 300), (120, 320)]
    settings = {"pre_nms_top_n": 50, "detections_per_image": 30, "score_threshold": 0.3}
    per_image = GroundingPostProcessor(batched=False, **settings)(
        logits4, regression4, centerness4, anchors, tokens, sizes
    )
    batched = GroundingPostProcessor(batched=True, **settings)(
        logits4, regression4, centerness4, anchors, tokens, sizes
    )
    assert sum(len(found) for found in per_image) > 60
    for ours, theirs in zip(batched, per_image):
        assert ours.image_size == theirs.image_size
        assert len(ours) == len(theirs)
        torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-6, rtol=0)
        assert torch.equal(ours.labels, theirs.labels)
        torch.testing.assert_close(ours.boxes, theirs.boxes, atol=1e-4, rtol=0)
