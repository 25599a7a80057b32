"""The whole model against the official GLIP: tiny reference weights, every case folder.

Case folders: every ``tiny/case*/`` of the reference, plus the folders in ``GLIP_GOLDEN_CASES`` (':'-separated).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from glip.dyhead import DEFORM_KERNELS, ModulatedDeformConvNorm
from glip.postprocess import GroundingPostProcessor
from glip.predictor import GlipPredictor
from glip.prompts import Prompt
from tests.conftest import reference_forward_cases, reference_tiny_model

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module", params=DEFORM_KERNELS)
def reference_model(request):
    """The tiny reference model, its deformable convs run by each of our kernels (torchvision's op, and the
    gather form that the teacher runs on GPUs in bf16: in fp32 both must give the official numbers)."""
    model, config = reference_tiny_model()
    convs = [m for m in model.modules() if isinstance(m, ModulatedDeformConvNorm) and m.deformable]
    assert convs, "the tiny reference model has deformable convs"
    for conv in convs:
        conv.kernel = request.param
    return model.eval(), config


def _phrase_tokens(meta: dict) -> list[list[int]]:
    table = meta["positive_map_label_to_token"]
    return [table[str(label)] for label in sorted(int(k) for k in table)]


def _assert_same_detections(boxes, scores, labels, expected_boxes, expected_scores, expected_labels):
    assert boxes.shape == expected_boxes.shape

    # Match as a set of (box, label): sort both by (label, score, box) and compare elementwise.
    def order(b, s, lab):
        keys = torch.stack([lab.double(), -s.double(), b[:, 0].double(), b[:, 1].double()], 1)
        return torch.tensor(sorted(range(len(s)), key=lambda i: tuple(keys[i].tolist())))

    ours, theirs = order(boxes, scores, labels), order(expected_boxes, expected_scores, expected_labels)
    assert torch.equal(labels[ours], expected_labels[theirs].to(labels.dtype))
    torch.testing.assert_close(boxes[ours], expected_boxes[theirs], atol=1e-3, rtol=0)
    torch.testing.assert_close(scores[ours], expected_scores[theirs], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", reference_forward_cases(), ids=lambda p: p.name)
def test_head_outputs_and_detections_match_official(reference_model, case):
    model, config = reference_model
    inputs = load_file(str(case / "inputs.safetensors"))
    expected = load_file(str(case / "outputs.safetensors"))
    meta = json.loads((case / "meta.json").read_text())
    with torch.no_grad():
        outputs = model(inputs["image"], inputs["input_ids"], inputs["attention_mask"])
    for level in range(5):
        for ours, key in (
            (outputs.token_logits, "dot_product_logits"),
            (outputs.box_regression, "bbox_reg"),
            (outputs.centerness, "centerness"),
        ):
            torch.testing.assert_close(ours[level], expected[f"head.{key}.{level}"], atol=1e-4, rtol=0)
        torch.testing.assert_close(outputs.anchors[level], expected[f"anchors.{level}"], atol=0, rtol=0)
    height, width = inputs["image"].shape[-2:]
    postprocessor = GroundingPostProcessor(box_coder=None)
    (found,) = postprocessor(
        outputs.token_logits,
        outputs.box_regression,
        outputs.centerness,
        outputs.anchors,
        [_phrase_tokens(meta)],
        [(int(height), int(width))],
    )
    _assert_same_detections(
        found.boxes,
        found.scores,
        found.labels,
        expected["final.boxes"],
        expected["final.scores"],
        expected["final.labels"],
    )


@pytest.mark.parametrize("case", reference_forward_cases(), ids=lambda p: p.name)
def test_from_uint8_image_through_our_preprocessing(reference_model, case):
    """The case image as a user has it (BGR uint8) through the predictor gives the official detections."""
    model, config = reference_model
    inputs = load_file(str(case / "inputs.safetensors"))
    expected = load_file(str(case / "outputs.safetensors"))
    meta = json.loads((case / "meta.json").read_text())
    prompt = Prompt.from_caption(
        meta["caption"], [[tuple(s) for s in spans] for spans in meta["tokens_positive"]]
    )
    predictor = GlipPredictor(model, config, device="cpu", resize=False)
    # The official prompt is padded to 256 tokens (PAD_MAX); ours pads to the batch: same detections.
    (found,) = predictor.predict([inputs["image_bgr_uint8"].numpy()], [prompt])
    legacy = found.boxes.clone()
    legacy[:, 2:] -= 1  # back to the official +1 convention (no resize: scale 1)
    _assert_same_detections(
        legacy,
        found.scores,
        found.phrase_indices + 1,
        expected["final.boxes"],
        expected["final.scores"],
        expected["final.labels"],
    )
