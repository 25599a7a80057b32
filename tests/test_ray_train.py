"""Student training on Ray Train (issue 12, acceptance 4): a rank's slice of a batch is its part of the whole
batch, a two-worker DDP run on CPU ends with the weights of one process at the same global batch and its
checkpoint evaluates, and a stopped two-worker run resumes to the same weights."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from glip import checkpoint
from glip.config import GlipConfig, tiny, with_overrides
from glip.model import build_model
from glip.predictor import GlipPredictor
from jobs.round import human_sources
from jobs.world import WorldOptions, generate_world
from student.data import BatchBuilder
from student.evaluate import evaluate
from student.paste import paste_pool
from student.ray_train import train_on_ray
from student.schedule import OptimConfig
from student.train import StepBatches, TrainConfig, train
from tests._ray_cluster import local_ray  # noqa: F401 (a fixture)

logger = logging.getLogger(__name__)

# fp32, no dropout of any kind, one input size and equal images: every rank pads alike, so two ranks' DDP
# step is one process's step on the whole batch up to float summation order.
TINY_DDP = [
    "input.min_size=128",
    "input.max_size=128",
    "input.train_min_sizes=(128,)",
    "text.pad_to_max=False",
    "text.dropout=0.0",
    "head.fusion_dropout=0.0",
    "head.text_layer_dropout=0.0",
    "fpn.drop_block_prob=0.0",
    "swin.drop_path_rate=0.0",
]
STEPS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(
        WorldOptions(
            out=str(out),
            seed=3,
            train_images=8,
            eval_images=2,
            crawl_images=4,
            leaks=1,
            dead_urls=1,
            image_size=(128, 128),
            object_size=(32, 64),
            objects_per_image=(1, 2),
        )
    )
    return out


def _config() -> GlipConfig:
    return with_overrides(tiny(), TINY_DDP)


def _train_config(**changes) -> TrainConfig:
    values = dict(
        steps=STEPS,
        batch_size=4,
        # AdamW divides each gradient by its own size, so rounding-level gradient differences (two ranks' sums
        # of 2 images vs one sum of 4: ~5e-7 relative) move weights whose gradient is near zero by up to a
        # fraction of lr: the largest weight difference was 2.3e-6 at lr 1e-3 (fpn.p7.weight), 1.2e-7 at 1e-4.
        optim=OptimConfig(lr=1e-4, warmup_steps=1),
        checkpoint_every=2,
        log_every=1,
        num_workers=0,
        max_negatives=5,
        amp=False,
        device="cpu",
    )
    return TrainConfig(**{**values, **changes})


def _max_difference(first: Path, second: Path) -> float:
    """Largest absolute difference between two checkpoints' tensors (same keys asserted)."""
    a, _ = checkpoint.load(first)
    b, _ = checkpoint.load(second)
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    return max(
        (a_state[key].double() - b_state[key].double()).abs().max().item()
        for key in a_state
        if a_state[key].is_floating_point()
    )


def _assert_same_weights(first: Path, second: Path) -> None:
    a, _ = checkpoint.load(first)
    b, _ = checkpoint.load(second)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("pasting", [False, True])
def test_rank_slices_are_the_whole_batch(world, pasting):
    """Two ranks' slices are the whole batch's images, prompts, boxes and augmentations (two sizes, flips),
    pasted objects included."""
    tokenizer = build_model(_config(), load_pretrained_text=False).tokenizer()
    builder = BatchBuilder(tokenizer, 128, 160, (96, 128), 32, 256, False, train=True, pseudo_box_loss=False)
    sources = human_sources(world)
    if pasting:
        reference = [(source.records, source.names) for source in sources]
        pool = paste_pool([], 1.0, 2, reference, 0.5, human=reference)
        sources = [dataclasses.replace(source, paste=pool) for source in sources]

    def batches(rank: int, world_size: int) -> StepBatches:
        return StepBatches(sources, builder, tokenizer, 4, 5, 0, 3, 5, rank=rank, world_size=world_size)

    whole, halves = batches(0, 1), [batches(rank, 2) for rank in (0, 1)]
    pasted = 0
    for step in range(3):
        batch, parts = whole[step], [half[step] for half in halves]
        images = [(batch, i) for i in range(4)]
        sliced = [(part, i) for part in parts for i in range(2)]
        for (a, i), (b, j) in zip(images, sliced, strict=True):
            assert a.image_sizes[i] == b.image_sizes[j]
            height, width = a.image_sizes[i]
            assert torch.equal(a.images[i, :, :height, :width], b.images[j, :, :height, :width])
            assert a.examples[i].prompt == b.examples[j].prompt
            assert torch.equal(a.boxes[i], b.boxes[j])
            tokens = int(a.attention_mask[i].sum())
            assert torch.equal(a.input_ids[i, :tokens], b.input_ids[j, :tokens])
            assert torch.equal(a.positive_maps[i][:, :tokens], b.positive_maps[j][:, :tokens])
            assert a.examples[i].record.pastes == b.examples[j].record.pastes
            masks = [None if m is None else m[k] for m, k in ((a.box_loss_masks, i), (b.box_loss_masks, j))]
            assert masks[0] is None and masks[1] is None or torch.equal(masks[0], masks[1])
            pasted += len(a.examples[i].record.pastes)
    assert (pasted > 0) == pasting
    with pytest.raises(ValueError, match="multiple of the 3 data-parallel"):
        batches(0, 3)


@pytest.fixture(scope="module")
def two_workers(world, tmp_path_factory, local_ray) -> tuple[Path, dict]:  # noqa: F811
    """A two-worker DDP run through Ray Train (one CPU each): its run folder and rank 0's summary."""
    run_dir = tmp_path_factory.mktemp("ray") / "two"
    summary = train_on_ray(
        _config(), _train_config(), human_sources(world), run_dir, num_workers=2, cpus_per_worker=1
    )
    return run_dir, summary


@pytest.mark.smoke
@pytest.mark.timeout(300)  # a rank stuck in a collective fails, not hangs
def test_two_workers_train_like_one_process_and_the_checkpoint_evaluates(world, two_workers, tmp_path):
    run_dir, summary = two_workers
    assert summary["step"] == STEPS and summary["images"] == STEPS * 4
    assert summary["rank_weight_spread"] == 0.0  # DDP kept both ranks' weights equal
    assert not (run_dir / "ray" / "train" / "checkpoint").exists()  # the model is saved by the run only
    one = train(_config(), _train_config(), human_sources(world), tmp_path / "one")
    difference = _max_difference(run_dir / "checkpoint", tmp_path / "one" / "checkpoint")
    logger.info("two workers vs one process: max weight difference %.3g", difference)
    _assert_same_weights(run_dir / "checkpoint", tmp_path / "one" / "checkpoint")
    assert summary["loss"] == pytest.approx(one["loss"], rel=1e-4)  # the global batch's loss, on rank 0
    model, loaded = checkpoint.load(run_dir / "checkpoint")
    result = evaluate(
        GlipPredictor(model, loaded, device="cpu"),
        world / "annotations/eval_coco.json",
        world / "annotations/eval_grounding.json",
        world / "images/eval",
    )
    assert result.images == 2 and 0.0 <= result.ap <= 1.0 and result.recall_at_1 is not None


@pytest.mark.smoke
@pytest.mark.timeout(300)  # a rank stuck in a collective fails, not hangs
def test_a_stopped_two_worker_run_resumes_to_the_same_weights(world, two_workers, tmp_path):
    run_dir = tmp_path / "parts"
    sources = human_sources(world)
    train_on_ray(
        _config(), _train_config(), sources, run_dir, num_workers=2, cpus_per_worker=1, stop_at_step=1
    )
    assert torch.load(run_dir / "train_state.pt", weights_only=True)["step"] == 1
    train_on_ray(_config(), _train_config(), sources, run_dir, num_workers=2, cpus_per_worker=1)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # rank 0 alone logs; no step repeated, none skipped
    _assert_same_weights(two_workers[0] / "checkpoint", run_dir / "checkpoint")
