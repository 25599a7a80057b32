"""The whole tiny reference model in training mode (stochastic parts off) + our criterion against the official
training objective: ATSS assignment exactly, every loss within 1e-4 relative.

Loss case folders: every ``tiny/loss_case*/`` plus the folders in ``GLIP_GOLDEN_LOSS_CASES`` (':'-separated).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from glip.box_ops import from_legacy
from glip.loss import GroundingTargets, weight_losses
from glip.model import build_criterion, loss_weights
from tests.conftest import reference_loss_cases, reference_tiny_model

pytestmark = pytest.mark.golden

# Every stochastic part of the official model, off (as the reference run did): dropouts, drop path, DropBlock.
DETERMINISTIC = {
    "text.dropout": 0.0,
    "head.fusion_dropout": 0.0,
    "head.text_layer_dropout": 0.0,
    "swin.drop_path_rate": 0.0,
    "fpn.drop_block_prob": 0.0,
}


@pytest.fixture(scope="module")
def training_model():
    model, config = reference_tiny_model(DETERMINISTIC)
    return model.train(), config


@pytest.mark.parametrize("case", reference_loss_cases(), ids=lambda p: p.name)
def test_training_forward_matches_official_losses(training_model, case):
    model, config = training_model
    inputs = load_file(str(case / "inputs.safetensors"))
    targets = load_file(str(case / "targets.safetensors"))
    expected = load_file(str(case / "outputs.safetensors"))
    height, width = (int(v) for v in targets["image_size_hw"])
    outputs = model(inputs["image"], inputs["input_ids"], inputs["attention_mask"])
    criterion = build_criterion(config)
    target = GroundingTargets(from_legacy(targets["boxes"]), targets["positive_map"], (height, width))
    assigned = criterion.prepare_targets(outputs.anchors, [target], outputs.token_logits[0].shape[-1])[0]
    official = torch.cat([expected[f"assign.level{level}"] for level in range(5)])
    assert torch.equal(assigned.matched_gt_index, official)
    losses = criterion(
        outputs.token_logits,
        outputs.box_regression,
        outputs.centerness,
        outputs.anchors,
        [target],
        inputs["attention_mask"],
    )
    weighted = weight_losses(losses, loss_weights(config))
    pairs = {
        "loss_token": "loss_dot_product_token",
        "loss_reg": "loss_reg",
        "loss_centerness": "loss_centerness",
    }
    for ours, theirs in pairs.items():
        torch.testing.assert_close(
            losses[ours].double(), expected[f"loss_unweighted.{theirs}"], rtol=1e-4, atol=0
        )
        torch.testing.assert_close(weighted[ours].double(), expected[f"loss.{theirs}"], rtol=1e-4, atol=0)
    total = sum(weighted.values()).double()
    torch.testing.assert_close(total, expected["loss.total"], rtol=1e-4, atol=0)
    total.backward()
    assert model.head.token_bias.grad is not None and torch.isfinite(model.head.token_bias.grad).all()
