"""Swin + FPN backbone: golden comparison with the official GLIP tiny model, plus unit tests."""

from __future__ import annotations

import pytest
import torch

from glip import checkpoint
from glip.backbone import (
    DropBlock2d,
    FeaturePyramid,
    ResNetBody,
    SwinTransformer,
    VisionBackbone,
    relative_position_index,
    shifted_window_mask,
    window_merge,
    window_partition,
)
from tests.conftest import reference_dir

torch.set_num_threads(2)

REFERENCE = reference_dir() / "tiny"
OFFICIAL_PREFIX = "module.backbone."


def official_to_ours(name: str) -> str:
    """Official backbone name (after ``module.backbone.``) -> ours, by the checkpoint rename table."""
    return checkpoint.official_to_ours(f"backbone.{name}").removeprefix("backbone.")


def tiny_backbone(drop_path_rate: float = 0.2, drop_block_prob: float = 0.3, **swin_kwargs) -> VisionBackbone:
    swin = SwinTransformer(
        16, (2, 2, 2, 2), (1, 2, 4, 8), window_size=7, drop_path_rate=drop_path_rate, **swin_kwargs
    )
    return VisionBackbone(swin, FeaturePyramid((32, 64, 128), 32, drop_block_prob=drop_block_prob))


@pytest.fixture(scope="module")
def official_backbone_state(reference_state) -> dict[str, torch.Tensor]:
    return {k[len(OFFICIAL_PREFIX) :]: v for k, v in reference_state.items() if k.startswith(OFFICIAL_PREFIX)}


@pytest.fixture(scope="module")
def golden_backbone(official_backbone_state) -> VisionBackbone:
    model = tiny_backbone()
    model.load_state_dict({official_to_ours(k): v for k, v in official_backbone_state.items()}, strict=True)
    return model.eval()


@pytest.mark.golden
def test_matches_official_swin_and_fpn_outputs(golden_backbone, reference_case1):
    inputs, expected = reference_case1["inputs"], reference_case1["outputs"]
    with torch.no_grad():
        stages = golden_backbone.swin(inputs["image"])
        levels = golden_backbone(inputs["image"])
    assert len(stages) == 4 and len(levels) == 5
    for index, stage in enumerate(stages):
        torch.testing.assert_close(stage, expected[f"backbone.body.out{index}"], atol=1e-4, rtol=0)
    for index, level in enumerate(levels):
        torch.testing.assert_close(level, expected[f"backbone.fpn.P{index + 3}"], atol=1e-4, rtol=0)


@pytest.mark.golden
def test_relative_position_index_equals_official_buffer(official_backbone_state):
    fresh = tiny_backbone().state_dict()
    for name, official in official_backbone_state.items():
        if name.endswith("relative_position_index"):
            torch.testing.assert_close(fresh[official_to_ours(name)], official, atol=0, rtol=0)


@pytest.mark.golden
def test_official_names_and_shapes_map_one_to_one(official_backbone_state):
    ours = {name: tuple(t.shape) for name, t in tiny_backbone().state_dict().items()}
    mapped = {official_to_ours(name): tuple(t.shape) for name, t in official_backbone_state.items()}
    assert mapped == ours


@pytest.mark.golden
@pytest.mark.parametrize(
    ("manifest", "embed_dim", "depths", "num_heads", "window_size"),
    [
        ("glip_t_state_dict_keys.tsv", 96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
        ("glip_l_state_dict_keys.tsv", 192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
    ],
)
def test_full_size_names_and_shapes_match_official_manifests(
    manifest, embed_dim, depths, num_heads, window_size
):
    path = REFERENCE.parent / manifest
    official = {}
    for line in path.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith(OFFICIAL_PREFIX):
            official[official_to_ours(name[len(OFFICIAL_PREFIX) :])] = tuple(int(d) for d in shape.split("x"))
    with torch.device("meta"):
        swin = SwinTransformer(embed_dim, depths, num_heads, window_size=window_size)
        model = VisionBackbone(swin, FeaturePyramid(swin.stage_channels[1:], 256))
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == official


def test_relative_position_index_hand_computed():
    # Window 2: tokens (0,0) (0,1) (1,0) (1,1); index = (dr + 1) * 3 + (dc + 1).
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    torch.testing.assert_close(relative_position_index(2), expected, atol=0, rtol=0)


def test_shifted_window_mask_regions():
    mask = shifted_window_mask(8, 8, window_size=4, shift_size=2)
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # Top-left window holds one region; top-right and bottom-left two of 8 tokens; bottom-right four of 4.
    zeros_per_window = (mask == 0).sum(dim=(1, 2)).tolist()
    assert zeros_per_window == [256, 2 * 64, 2 * 64, 4 * 16]
    torch.testing.assert_close(mask, mask.transpose(1, 2))


def test_window_partition_and_merge_round_trip():
    features = torch.randn(2, 14, 21, 5)
    windows = window_partition(features, 7)
    assert windows.shape == (2 * 2 * 3, 49, 5)
    # Batch-major, then windows row-major: image 0 row 1 col 1 is window 4, image 1's first is window 6.
    torch.testing.assert_close(windows[4], features[0, 7:14, 7:14].reshape(49, 5))
    torch.testing.assert_close(windows[6], features[1, :7, :7].reshape(49, 5))
    torch.testing.assert_close(window_merge(windows, 7, 14, 21), features)


def test_output_shapes_for_sizes_not_divisible_by_windows_or_patches():
    model = tiny_backbone().eval()
    with torch.no_grad():
        stages = model.swin(torch.randn(1, 3, 70, 90))
        levels = model.fpn(stages[1:])
    assert [tuple(s.shape) for s in stages] == [
        (1, 16, 18, 23),
        (1, 32, 9, 12),
        (1, 64, 5, 6),
        (1, 128, 3, 3),
    ]
    assert [tuple(p.shape[-2:]) for p in levels] == [(9, 12), (5, 6), (3, 3), (2, 2), (1, 1)]
    assert all(p.shape[1] == 32 for p in levels)


def test_batch_equals_images_run_one_by_one():
    torch.manual_seed(0)
    model = tiny_backbone().eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        batched = model(images)
        single = [model(images[i : i + 1]) for i in range(2)]
    for level, per_image in zip(batched, zip(*single)):
        torch.testing.assert_close(level, torch.cat(per_image), atol=1e-5, rtol=1e-5)


def test_eval_is_deterministic_and_training_is_stochastic():
    torch.manual_seed(0)
    model = tiny_backbone(drop_path_rate=0.5)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_runs = [model.train()(images)[0] for _ in range(2)]
        eval_runs = [model.eval()(images)[0] for _ in range(2)]
    assert not torch.equal(train_runs[0], train_runs[1])
    assert torch.equal(eval_runs[0], eval_runs[1])


def test_training_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = tiny_backbone().train()
    levels = model(torch.randn(2, 3, 64, 96))
    sum(level.square().mean() for level in levels).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert model.swin.patch_embed.projection.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = tiny_backbone(drop_path_rate=0.0, drop_block_prob=0.0).train()
    checkpointed = tiny_backbone(drop_path_rate=0.0, drop_block_prob=0.0, use_checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 64, 64)
    for model in (plain, checkpointed):
        sum(level.sum() for level in model(images)).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_drop_block_acts_only_on_p3_and_p4_in_training():
    torch.manual_seed(0)
    fpn = FeaturePyramid((8, 16, 32), 8, drop_block_prob=0.3)
    features = [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    with torch.no_grad():
        reference = fpn.eval()(features)
        trained = fpn.train()(features)
    assert not torch.equal(trained[0], reference[0]) and not torch.equal(trained[1], reference[1])
    for index in (2, 3, 4):
        assert torch.equal(trained[index], reference[index])
    disabled = FeaturePyramid((8, 16, 32), 8, drop_block_prob=0.0)
    disabled.load_state_dict(fpn.state_dict())
    with torch.no_grad():
        for a, b in zip(disabled.train()(features), reference):
            assert torch.equal(a, b)


def test_drop_block_mask_is_shared_across_channels_and_rescaled():
    torch.manual_seed(0)
    drop = DropBlock2d(0.3, 3).train()
    out = drop(torch.ones(2, 6, 20, 20))
    dropped = out == 0
    assert dropped.any() and not dropped.all()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))
    kept_fraction = (~dropped[:, 0]).float().mean()
    torch.testing.assert_close(out[~dropped].unique(), (1 / kept_fraction).reshape(1))
    assert torch.equal(drop.eval()(out), out)


def test_mismatched_fpn_channels_are_rejected():
    swin = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 4, 8))
    with pytest.raises(ValueError, match="in_channels"):
        VisionBackbone(swin, FeaturePyramid((16, 32, 64), 32))


def test_resnet_body_gives_the_swin_grid_and_channels():
    body = ResNetBody(width=8, depths=(1, 2, 1, 1)).eval()
    swin = SwinTransformer(8, (2, 2, 2, 2), (1, 2, 4, 8)).eval()
    images = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        ours, theirs = body(images), swin(images)
    assert body.stage_channels == swin.stage_channels == (8, 16, 32, 64)
    assert [tuple(s.shape) for s in ours] == [tuple(s.shape) for s in theirs]
    assert [len(stage) for stage in body.stages] == [1, 2, 1, 1]


def test_resnet_backbone_stores_its_body_under_its_own_name_and_trains_end_to_end():
    torch.manual_seed(0)
    body = ResNetBody(width=8)
    model = VisionBackbone(body, FeaturePyramid(body.stage_channels[1:], 16))
    names = list(model.state_dict())
    assert any(n.startswith("resnet.stem.") for n in names) and not any(n.startswith("swin.") for n in names)
    sum(level.square().mean() for level in model(torch.randn(2, 3, 64, 96))).backward()
    assert all(p.grad is not None for p in model.parameters())
    # Each residual branch starts as the identity (its last BatchNorm scale is zero), and that scale learns.
    blocks = [block for stage in body.stages for block in stage]
    assert all(
        block.bn2.weight.abs().sum() == 0 and block.bn2.weight.grad.abs().sum() > 0 for block in blocks
    )
    assert body.stem[0].weight.grad.abs().sum() > 0 and model.fpn.p7.weight.grad.abs().sum() > 0
