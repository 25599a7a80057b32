"""X-MHA fusion, DyHead blocks and the grounding head: golden comparison with the official tiny GLIP,
the deformable-conv offset quirk on a hand-made example, padding invariance and gradient reach."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from glip import checkpoint
from glip.dyhead import DyConv, DyReLU, ModulatedDeformConvNorm, TextSelfAttentionLayer, offsets_for_output
from glip.fusion import BiAttentionBlock, cpu_dropout, flatten_levels, unflatten_levels
from glip.head import GroundingHead
from glip.text import TextFeatures

OFFICIAL_PREFIX = "module.rpn.head."
LEVEL_SIZES = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]


def official_to_ours(name: str) -> str:
    """Official head name (after ``module.rpn.head.``) -> ours (after ``head.``), by the checkpoint table."""
    return checkpoint.official_to_ours(f"rpn.head.{name}").removeprefix("head.")


def tiny_head(**kwargs) -> GroundingHead:
    """The head of the reference tiny GLIP (official fusion width 2048 / 8 heads kept)."""
    return GroundingHead(
        channels=32,
        text_dim=64,
        num_convs=2,
        fusion_embed_dim=2048,
        fusion_heads=8,
        text_layer_heads=2,
        text_layer_intermediate=128,
        **kwargs,
    )


@pytest.fixture(scope="module")
def official(reference_state: dict, reference_case1: dict) -> dict:
    return {
        "state": reference_state,
        "inputs": reference_case1["inputs"],
        "outputs": reference_case1["outputs"],
    }


@pytest.fixture(scope="module")
def official_head(official: dict) -> GroundingHead:
    state = {
        official_to_ours(name[len(OFFICIAL_PREFIX) :]): tensor
        for name, tensor in official["state"].items()
        if name.startswith(OFFICIAL_PREFIX)
    }
    head = tiny_head()
    head.load_state_dict(state, strict=True)
    return head.eval()


def official_text(outputs: dict) -> TextFeatures:
    return TextFeatures(
        hidden=outputs["language_backbone.hidden"],
        embedded=outputs["language_backbone.embedded"],
        attention_mask=outputs["language_backbone.masks"],
        aggregate=outputs["language_backbone.aggregate"],
    )


def fpn_levels(outputs: dict) -> list[torch.Tensor]:
    return [outputs[f"backbone.fpn.P{level}"] for level in range(3, 8)]


def assert_levels_close(actual: list[torch.Tensor], outputs: dict, key: str, atol: float = 1e-4) -> None:
    for level, tensor in enumerate(actual):
        torch.testing.assert_close(tensor, outputs[f"{key}.{level}"], atol=atol, rtol=0, msg=f"{key}.{level}")


@pytest.mark.golden
def test_every_official_head_key_is_mapped(official: dict) -> None:
    names = [name[len(OFFICIAL_PREFIX) :] for name in official["state"] if name.startswith(OFFICIAL_PREFIX)]
    ours = tiny_head().state_dict()
    assert sorted(official_to_ours(name) for name in names) == sorted(ours)
    for name in names:
        assert ours[official_to_ours(name)].shape == official["state"][OFFICIAL_PREFIX + name].shape, name


@pytest.mark.golden
def test_tower_matches_official_module_by_module(official: dict, official_head: GroundingHead) -> None:
    outputs = official["outputs"]
    mask = outputs["language_backbone.masks"]
    visual, text_hidden = fpn_levels(outputs), outputs["language_backbone.hidden"]
    with torch.no_grad():
        for index, block in enumerate(official_head.blocks):
            visual, text_hidden = block.fusion(visual, text_hidden, mask)
            assert_levels_close(visual, outputs, f"dyhead_tower.{3 * index}.visual")
            torch.testing.assert_close(
                text_hidden, outputs[f"dyhead_tower.{3 * index}.lang_hidden"], atol=1e-4, rtol=0
            )
            text_hidden = block.text_layer(text_hidden, mask)
            torch.testing.assert_close(
                text_hidden, outputs[f"dyhead_tower.{3 * index + 1}.lang_hidden"], atol=1e-4, rtol=0
            )
            visual = block.dyconv(visual)
            assert_levels_close(visual, outputs, f"dyhead_tower.{3 * index + 2}.visual")


@pytest.mark.golden
def test_head_outputs_match_official(official: dict, official_head: GroundingHead) -> None:
    outputs = official["outputs"]
    with torch.no_grad():
        head = official_head(fpn_levels(outputs), official_text(outputs))
    assert_levels_close(head.token_logits, outputs, "head.dot_product_logits")
    assert_levels_close(head.box_regression, outputs, "head.bbox_reg")
    assert_levels_close(head.centerness, outputs, "head.centerness")
    assert_levels_close(head.legacy_class_logits, outputs, "head.cls_logits")


@pytest.mark.golden
def test_full_language_and_head_chain_matches_official(
    official: dict, official_head: GroundingHead, official_text_encoder
) -> None:
    """Our text encoder's output (not the stored one) feeding our head still lands on the official logits."""
    outputs, inputs = official["outputs"], official["inputs"]
    with torch.no_grad():
        text = official_text_encoder(inputs["input_ids"], inputs["attention_mask"])
        result = official_head(fpn_levels(outputs), text)
    assert_levels_close(result.token_logits, outputs, "head.dot_product_logits")


@pytest.mark.golden
def test_short_prompt_gives_the_official_logits_of_real_tokens(
    official: dict, official_head: GroundingHead
) -> None:
    """The official pads to 256 tokens; a prompt padded only to the batch must give the same real logits."""
    outputs = official["outputs"]
    length = int(outputs["language_backbone.masks"].sum())
    cut = length + 2  # keep two padding tokens: they must be masked, not just absent
    text = official_text(outputs)
    short = TextFeatures(
        text.hidden[:, :cut], text.embedded[:, :cut], text.attention_mask[:, :cut], text.aggregate
    )
    with torch.no_grad():
        head = official_head(fpn_levels(outputs), short)
    for level, logits in enumerate(head.token_logits):
        expected = outputs[f"head.dot_product_logits.{level}"][:, :, :length]
        torch.testing.assert_close(logits[:, :, :length], expected, atol=1e-4, rtol=0)
    assert_levels_close(head.box_regression, outputs, "head.bbox_reg")


def test_offset_quirk_reads_the_larger_buffer_as_flat_memory() -> None:
    """A 2x2 conv output driven by offsets computed on a 4x4 level (official CUDA behaviour, by hand).

    Only the centre tap (k=4) has weight 1, so output(y, x) = modulation * input(y + dy, x + dx). With
    p = y*Wo + x the CUDA kernel reads tap 4's dy at flat index (2*4)*Ho*Wo + p = 32 + p, its dx at 36 + p
    (channel 2, first row of the 4x4 offset buffer) and its modulation at 4*Ho*Wo + p = 16 + p (channel 1,
    first row of the 4x4 modulation buffer).
    """
    image = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    offset = torch.zeros(1, 18, 4, 4)
    flat = offset.view(-1)
    flat[32:36] = torch.tensor([1.0, 1.0, 0.0, -1.0])  # dy for outputs (0,0) (0,1) (1,0) (1,1)
    flat[36:40] = torch.tensor([1.0, -1.0, 1.0, 0.0])  # dx
    modulation = torch.ones(1, 9, 4, 4)
    modulation[0, 1, 0, :] = torch.tensor([0.5, 0.25, 2.0, 1.0])
    conv = ModulatedDeformConvNorm(1, 1, stride=1, norm_groups=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        fitted_offset, fitted_modulation = offsets_for_output(offset, modulation, (2, 2))
        result = deform_conv2d(
            image, fitted_offset, conv.weight, conv.bias, padding=1, mask=fitted_modulation
        )
    # (0,0)->input(1,1)=4 *0.5; (0,1)->input(1,0)=3 *0.25; (1,0)->input(1,1)=4 *2; (1,1)->input(0,1)=2 *1
    expected = torch.tensor([[[[2.0, 0.75], [8.0, 2.0]]]])
    torch.testing.assert_close(result, expected)
    # A naive crop would read tap 4 from channels 8/9 (offsets) and 4 (modulation): zeros and ones.
    cropped = deform_conv2d(
        image, offset[:, :, :2, :2], conv.weight, conv.bias, padding=1, mask=modulation[:, :, :2, :2]
    )
    assert not torch.allclose(cropped, expected)


def test_offsets_same_size_pass_through_and_too_small_raise() -> None:
    offset, modulation = torch.randn(2, 18, 3, 3), torch.rand(2, 9, 3, 3)
    same_offset, same_modulation = offsets_for_output(offset, modulation, (3, 3))
    assert same_offset is offset and same_modulation is modulation
    with pytest.raises(ValueError):
        offsets_for_output(offset, modulation, (4, 4))
    # Each image reads its own buffer: image 1's values never come from image 0.
    fitted, _ = offsets_for_output(offset, modulation, (2, 2))
    assert torch.equal(fitted[1].flatten(), offset[1].flatten()[: 18 * 4])


def test_flatten_and_unflatten_levels_round_trip() -> None:
    levels = [torch.randn(2, 4, height, width) for height, width in [(3, 5), (2, 3), (1, 1)]]
    sequence = flatten_levels(levels)
    assert sequence.shape == (2, 15 + 6 + 1, 4)
    assert torch.equal(sequence[1, 5 + 2, :], levels[0][1, :, 1, 2])  # row-major over (H, W)
    for original, restored in zip(levels, unflatten_levels(sequence, [(3, 5), (2, 3), (1, 1)]), strict=True):
        assert torch.equal(original, restored)


def test_fusion_residual_is_added_to_the_normed_input() -> None:
    torch.manual_seed(0)
    block = BiAttentionBlock(8, 6, embed_dim=16, num_heads=2, dropout=0.0, init_layer_scale=0.0).eval()
    visual = [torch.randn(1, 8, 3, 4) * 5 + 2]
    text = torch.randn(1, 5, 6) * 3 - 1
    fused_visual, fused_text = block(visual, text, torch.ones(1, 5, dtype=torch.long))
    # gamma = 0: the output is exactly the layer-normed input, not the raw input.
    torch.testing.assert_close(fused_text, block.norm_text(text))
    torch.testing.assert_close(
        fused_visual[0], block.norm_visual(visual[0].flatten(2).mT).mT.reshape(1, 8, 3, 4)
    )


def test_fusion_ignores_padding_tokens() -> None:
    torch.manual_seed(0)
    block = BiAttentionBlock(8, 6, embed_dim=16, num_heads=2, dropout=0.0, init_layer_scale=0.5).eval()
    visual = [torch.randn(1, 8, 3, 4), torch.randn(1, 8, 2, 2)]
    text = torch.randn(1, 4, 6)
    padded = torch.cat([text, torch.randn(1, 3, 6) * 100], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    out_visual, out_text = block(visual, text, mask[:, :4])
    padded_visual, padded_text = block(visual, padded, mask)
    for short, long in zip(out_visual, padded_visual, strict=True):
        torch.testing.assert_close(short, long, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_text, padded_text[:, :4], atol=1e-5, rtol=0)


def test_fused_attention_equals_the_official_explicit_form() -> None:
    """SDPA for both directions (the default) against the explicit score matrix and two softmaxes: forward
    and gradients, with padding, in fp32."""
    torch.manual_seed(0)
    block = BiAttentionBlock(8, 6, embed_dim=16, num_heads=2, dropout=0.0, init_layer_scale=0.5)
    visual = [torch.randn(2, 8, 3, 4), torch.randn(2, 8, 2, 2)]
    text = torch.randn(2, 7, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    outputs, grads = [], []
    for sdpa in (False, True):
        block.sdpa = sdpa
        block.zero_grad()
        fused_visual, fused_text = block(visual, text, mask)
        (sum(level.square().sum() for level in fused_visual) + fused_text.square().sum()).backward()
        outputs.append([*fused_visual, fused_text])
        grads.append([parameter.grad.clone() for parameter in block.parameters()])
    assert block.sdpa
    for explicit, fused in zip(*outputs, strict=True):
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    for explicit, fused in zip(*grads, strict=True):
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)


def test_cpu_dropout_keeps_one_minus_p_scaled_and_repeats_under_a_seed() -> None:
    x = torch.rand(3, 50_001) + 0.5  # odd count: the last 64-bit draw is used in part
    torch.manual_seed(7)
    out = cpu_dropout(x, 0.1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 150,003 draws: 4 standard deviations
    scale = 65536 / (65536 - round(0.1 * 65536))
    torch.testing.assert_close(out[kept], x[kept] * scale)
    torch.manual_seed(7)
    assert torch.equal(cpu_dropout(x, 0.1), out)
    assert not torch.equal(cpu_dropout(x, 0.1), out)  # the generator moved on
    # Each of a draw's four 16-bit lanes is uniform (no lane always kept or dropped).
    lanes = kept.flatten()[:150_000].view(-1, 4).float().mean(0)
    assert torch.all((lanes - 0.9).abs() < 0.006), lanes
    # Gradients are the mask times the scale; eval, p = 0 and bf16 pass through as F.dropout does.
    y = x.clone().requires_grad_()
    torch.manual_seed(7)
    cpu_dropout(y, 0.1).sum().backward()
    torch.testing.assert_close(y.grad, kept.float() * scale)
    assert cpu_dropout(x, 0.1, training=False) is x and cpu_dropout(x, 0.0) is x
    assert cpu_dropout(x.bfloat16(), 0.5).dtype == torch.bfloat16
    assert torch.equal(cpu_dropout(x, 1.0), torch.zeros_like(x))


def test_training_on_cpu_draws_the_attention_dropout_with_cpu_dropout() -> None:
    """With dropout in training on CPU the block runs the explicit form whatever ``sdpa`` says: the same
    outputs for both settings under one seed, different from eval, where the fused call runs."""
    torch.manual_seed(0)
    block = BiAttentionBlock(8, 6, embed_dim=16, num_heads=2, dropout=0.3, init_layer_scale=0.5).train()
    visual = [torch.randn(2, 8, 3, 4), torch.randn(2, 8, 2, 2)]
    text = torch.randn(2, 7, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    outputs = []
    for sdpa in (True, False):
        block.sdpa = sdpa
        torch.manual_seed(1)
        outputs.append(block(visual, text, mask)[1])
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    block.sdpa = True
    assert not torch.allclose(block.eval()(visual, text, mask)[1], outputs[0])


def test_text_layer_ignores_padding_tokens() -> None:
    torch.manual_seed(0)
    layer = TextSelfAttentionLayer(16, 2, 32).eval()
    text = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = text.clone()
    changed[:, 3:] = 50.0
    torch.testing.assert_close(layer(text, mask)[0, :3], layer(changed, mask)[0, :3])
    # Control: where positions 3-4 are real tokens, changing them does change the others.
    assert not torch.allclose(layer(text, mask)[1, :3], layer(changed, mask)[1, :3])


def test_dyrelu_starts_near_identity_and_dyconv_keeps_shapes() -> None:
    torch.manual_seed(0)
    relu = DyReLU(16)
    with torch.no_grad():
        relu.expand.weight.zero_()
        relu.expand.bias.zero_()  # coefficients = h_sigmoid(0) = 0.5: a1 = 1, a2 = 0, b = 0 -> max(x, 0)
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(relu(x), x.clamp(min=0))
    levels = [torch.randn(2, 16, height, width) for height, width in [(8, 10), (4, 5), (2, 3)]]
    outputs = DyConv(16, norm_groups=4)(levels)
    assert [tuple(o.shape) for o in outputs] == [tuple(level.shape) for level in levels]


def test_head_initialisation_follows_official() -> None:
    torch.manual_seed(0)
    head = tiny_head(prior_prob=0.01)
    assert torch.allclose(head.token_bias, torch.tensor([-4.59512]), atol=1e-5)
    assert torch.equal(head.log_scale, torch.zeros(1)) and torch.equal(
        head.token_bias_weight, torch.zeros(64)
    )
    assert torch.allclose(head.legacy_class_logits.bias, torch.full((80,), -4.59512), atol=1e-5)
    assert all(torch.equal(scale, torch.ones(1)) for scale in head.box_scales)
    for block in head.blocks:
        assert torch.equal(block.fusion.gamma_visual, torch.full((32,), 0.5))
        assert torch.equal(block.fusion.gamma_text, torch.full((64,), 0.5))
        assert torch.equal(block.fusion.visual_proj.bias, torch.zeros(2048))
    assert head.box_regression.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert not any(parameter.requires_grad for parameter in head.legacy_class_logits.parameters())


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_backward_reaches_every_trainable_parameter(
    gradient_checkpointing: bool, small_text_encoder, small_head
) -> None:
    torch.manual_seed(0)
    encoder = small_text_encoder().train()
    head = small_head(gradient_checkpointing=gradient_checkpointing).train()
    features = [
        torch.randn(2, 16, height, width) for height, width in [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    ]
    input_ids = torch.tensor([[101, 1037, 2417, 102, 0], [101, 1037, 2630, 2675, 102]])
    output = head(features, encoder(input_ids, (input_ids != 0).long()))
    assert [tuple(t.shape) for t in output.token_logits] == [
        (2, 64, 5),
        (2, 16, 5),
        (2, 4, 5),
        (2, 1, 5),
        (2, 1, 5),
    ]
    loss = sum(t.sigmoid().mean() for t in output.token_logits)
    loss = loss + sum(t.pow(2).mean() for t in output.box_regression + output.centerness)
    loss.backward()
    for name, parameter in [*head.named_parameters(), *encoder.named_parameters()]:
        if name.startswith("legacy_class_logits"):
            assert parameter.grad is None
            continue
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert not output.legacy_class_logits[0].requires_grad


def test_head_runs_under_cpu_autocast_with_the_deformable_convs_in_fp32(small_head) -> None:
    """torchvision's CPU deform_conv2d has no bf16 kernel; the official op always ran in fp32 too."""
    torch.manual_seed(0)
    head = small_head(num_convs=1).eval()
    features = [torch.randn(1, 16, size, size) for size in (8, 4, 2, 1, 1)]
    hidden = torch.randn(1, 5, 32)
    text = TextFeatures(hidden, hidden, torch.ones(1, 5, dtype=torch.long), hidden.mean(1))
    with torch.no_grad():
        reference = head(features, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = head(features, text)
    for exact, approximate in zip(reference.token_logits, mixed.token_logits, strict=True):
        torch.testing.assert_close(approximate.float(), exact, atol=0.1, rtol=0.05)
