"""GLIPv2's inter-image region-word loss: the head's alignment scores regions against other images' tokens
consistently with its own token logits, and the loss is the focal sum over exactly the entries it names
(other images' real tokens, the region's own words left out), checked against a brute-force loop."""

from __future__ import annotations

import pytest
import torch

from glip.config import tiny, with_overrides
from glip.head import Alignment
from glip.loss import GroundingCriterion, GroundingTargets
from glip.model import build_model
from tests.test_loss_pseudo import (
    BOX_A,
    BOX_B,
    FEATURE_SIZES,
    IMAGE_HW,
    TEXT_LENGTH,
    _anchors,
    _focal_terms,
    _head,
    _map,
)

CHANNELS = 6


def test_the_alignment_reproduces_the_heads_token_logits_on_the_diagonal():
    torch.manual_seed(0)
    config = with_overrides(tiny(), ["text.pad_to_max=False", "fpn.drop_block_prob=0.0"])
    model = build_model(config, load_pretrained_text=False).eval()
    images = torch.randn(3, 3, 64, 96)
    input_ids = torch.randint(1000, 2000, (3, 7))
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        outputs = model(images, input_ids, mask)
    logits = torch.cat(outputs.token_logits, dim=1)  # [B, A, T]
    anchor_index = torch.tensor([0, 5, logits.shape[1] - 1, 17])
    image_index = torch.tensor([0, 2, 1, 1])
    across = outputs.alignment.across_images(image_index, anchor_index)  # [P, B, T]
    assert across.shape == (4, 3, 7)
    for row, (image, anchor) in enumerate(zip(image_index.tolist(), anchor_index.tolist(), strict=True)):
        torch.testing.assert_close(across[row, image], logits[image, anchor], rtol=1e-5, atol=1e-5)
        other = (image + 1) % 3  # another image's tokens: a real difference, not a copy of the own prompt
        assert not torch.allclose(across[row, other], across[row, image])


def _alignment(batch: int, seed: int = 1) -> Alignment:
    generator = torch.Generator().manual_seed(seed)
    visual = [
        torch.randn((batch, CHANNELS, h, w), generator=generator, dtype=torch.float64).requires_grad_(True)
        for h, w in FEATURE_SIZES
    ]
    projected = torch.randn((batch, TEXT_LENGTH, CHANNELS), generator=generator, dtype=torch.float64)
    bias = torch.randn((batch, TEXT_LENGTH), generator=generator, dtype=torch.float64) * 0.1
    return Alignment(visual, projected.requires_grad_(True), bias, torch.tensor(2.0, dtype=torch.float64))


def _targets() -> list[GroundingTargets]:
    boxes = lambda *b: torch.tensor(b, dtype=torch.float32).reshape(-1, 4)  # noqa: E731
    return [
        GroundingTargets(boxes(BOX_A), _map([(1, 3)]), IMAGE_HW),
        GroundingTargets(boxes(BOX_B, BOX_A), _map([(1, 2), (3, 5)]), IMAGE_HW),
        GroundingTargets(
            boxes(), _map([]), IMAGE_HW
        ),  # no box: its tokens are still negatives for the others
    ]


def _brute_force(alignment: Alignment, targets, input_ids, mask) -> float:
    """By loops: each positive (b, a) against each token (c, t), c != b, real, its id not one of the region's
    positive ids; the focal terms with target 0, summed, over the positives' count."""
    per_image = GroundingCriterion().prepare_targets(_anchors(), targets, TEXT_LENGTH)
    regions = torch.cat([v.detach().flatten(2).transpose(1, 2) for v in alignment.visual], dim=1)
    total, count = 0.0, 0
    for b, image in enumerate(per_image):
        for a in image.positive_indices.tolist():
            count += 1
            own = {int(input_ids[b, t]) for t in range(TEXT_LENGTH) if image.token_targets[a, t] > 0}
            for c in range(len(per_image)):
                for t in range(TEXT_LENGTH):
                    if c == b or mask[c, t] == 0 or int(input_ids[c, t]) in own:
                        continue
                    logit = regions[b, a] @ alignment.projected[c, t].detach() / alignment.scale
                    logit = logit + alignment.bias[c, t]
                    total += float(_focal_terms(logit.reshape(1), torch.zeros(1)).sum())
    return total / max(count, 1)


@pytest.mark.parametrize("shared_word", [False, True])
def test_the_inter_image_loss_is_the_focal_sum_over_other_images_tokens(shared_word):
    alignment, targets = _alignment(3), _targets()
    input_ids = torch.arange(100, 100 + 3 * TEXT_LENGTH).reshape(3, TEXT_LENGTH)
    if shared_word:  # image 2 says image 0's word (its tokens 1-2): not a negative for image 0's regions
        input_ids[2, 4:6] = input_ids[0, 1:3]
    mask = torch.zeros((3, TEXT_LENGTH), dtype=torch.int64)
    mask[:, :8] = 1
    mask[2, 6:] = 0  # image 2's prompt is shorter: its padding is never a negative
    losses = GroundingCriterion()(
        *_head(3), _anchors(), targets, mask, alignment=alignment, input_ids=input_ids
    )
    expected = _brute_force(alignment, targets, input_ids, mask)
    assert expected > 0
    assert losses["loss_token_inter"].item() == pytest.approx(expected, rel=1e-9)
    losses["loss_token_inter"].backward()
    assert alignment.projected.grad.abs().sum() > 0 and all(
        v.grad.abs().sum() > 0 for v in alignment.visual[:1]
    )


def test_the_same_word_elsewhere_is_not_a_negative():
    alignment, targets = _alignment(3), _targets()
    mask = torch.ones((3, TEXT_LENGTH), dtype=torch.int64)
    distinct = torch.arange(100, 100 + 3 * TEXT_LENGTH).reshape(3, TEXT_LENGTH)
    echoed = distinct.clone()
    echoed[1:, :] = echoed[0, 1]  # every token of the other images is image 0's word
    criterion = GroundingCriterion()
    run = lambda ids: criterion(*_head(3), _anchors(), targets, mask, alignment=alignment, input_ids=ids)  # noqa: E731
    assert run(echoed)["loss_token_inter"] < run(distinct)["loss_token_inter"]
    assert run(echoed)["loss_token_inter"].item() == pytest.approx(
        _brute_force(alignment, targets, echoed, mask), rel=1e-9
    )


def test_one_image_or_no_positive_gives_zero_with_a_graph():
    alignment = _alignment(1)
    one = [GroundingTargets(torch.tensor([BOX_A]), _map([(1, 3)]), IMAGE_HW)]
    mask = torch.ones((1, TEXT_LENGTH), dtype=torch.int64)
    ids = torch.arange(TEXT_LENGTH)[None]
    loss = GroundingCriterion()(*_head(1), _anchors(), one, mask, alignment=alignment, input_ids=ids)
    assert loss["loss_token_inter"].item() == 0.0 and loss["loss_token_inter"].requires_grad
    with pytest.raises(ValueError, match="input_ids"):
        GroundingCriterion()(*_head(1), _anchors(), one, mask, alignment=alignment)
