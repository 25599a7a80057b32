"""The teacher: official .pth and our checkpoint format, prompts from caption spans, long-caption windows."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from glip import checkpoint
from glip.config import from_reference_config
from glip.predictor import autocast_supported
from teacher import PhraseBox, Teacher, TeacherConfig, teacher_id_of
from tests.conftest import reference_dir

REPO = Path(__file__).resolve().parents[1]

SMALL_INPUT = ("input.min_size=128", "input.max_size=192", "text.pad_to_max=False")
CAPTION = "a red circle next to a blue square on grass"
SPANS = [(0, 12), (21, 34), (38, 43)]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(60, 200, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, width // 2, height // 2), fill=(220, 30, 30))
    draw.rectangle((width // 2, height // 2, width - 10, height - 10), fill=(30, 30, 220))
    return image


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
    """The reference tiny weights as an official trainer checkpoint ("model" dict, "module." keys)."""
    from safetensors.torch import load_file

    state = load_file(str(reference_dir() / "tiny" / "state_dict.safetensors"))
    assert all(k.startswith("module.") for k in state)
    path = tmp_path_factory.mktemp("official") / "glip_tiny_reference.pth"
    torch.save({"model": state, "iteration": 7}, path)
    return path


@pytest.fixture(scope="module")
def official_teacher(official_pth):
    config = TeacherConfig(
        checkpoint=str(official_pth),
        official_config=str(reference_dir() / "tiny" / "config.json"),
        device="cpu",
        batch_size=4,
        overrides=SMALL_INPUT,
    )
    return Teacher.from_checkpoint(config)


def test_official_pth_teacher_labels_an_image(official_teacher, official_pth):
    image = _image(160, 120)
    [boxes] = official_teacher.label([image], [CAPTION], [SPANS])
    assert boxes and all(isinstance(b, PhraseBox) for b in boxes)
    assert {b.phrase for b in boxes} <= {0, 1, 2}
    for b in boxes:
        x0, y0, x1, y1 = b.box
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
        assert 0.0 < b.score <= 1.0
    scores = [b.score for b in boxes]
    assert scores == sorted(scores, reverse=True)
    digest = hashlib.sha256(official_pth.read_bytes()).hexdigest()
    assert official_teacher.teacher_id == f"glip_tiny_reference-{digest[:10]}"
    assert teacher_id_of(TeacherConfig(checkpoint=str(official_pth))) == official_teacher.teacher_id
    # bf16 autocast on CUDA and on bf16-capable CPUs (glip.predictor.autocast_supported), else fp32
    bf16 = autocast_supported(torch.device(official_teacher.device), torch.bfloat16)
    assert official_teacher.precision == ("bfloat16" if bf16 else "float32")


def test_our_format_gives_the_same_boxes_and_config_hash_tracks_settings(official_teacher, tmp_path):
    reference = json.loads((reference_dir() / "tiny" / "config.json").read_text())
    config = from_reference_config(reference)
    model = checkpoint.import_official(reference_dir() / "tiny" / "state_dict.safetensors", config)
    folder = checkpoint.save(model, config, tmp_path / "ref-tiny")
    ours = Teacher.from_checkpoint(
        TeacherConfig(checkpoint=str(folder), device="cpu", batch_size=4, overrides=SMALL_INPUT)
    )
    image = _image(150, 130, seed=3)
    [expected] = official_teacher.label([image], [CAPTION], [SPANS])
    [got] = ours.label([image], [CAPTION], [SPANS])
    assert [b.phrase for b in got] == [b.phrase for b in expected]
    assert np.allclose([b.box for b in got], [b.box for b in expected], atol=1e-3)
    assert ours.teacher_id.startswith("ref-tiny-") and ours.teacher_id == teacher_id_of(
        TeacherConfig(checkpoint=str(folder))
    )
    assert ours.weights_digest != official_teacher.weights_digest  # another file, so another teacher id


def _official_tiny(official_pth, **settings) -> Teacher:
    """The official tiny checkpoint as a CPU teacher with ``settings`` (``TeacherConfig`` fields)."""
    return Teacher.from_checkpoint(
        TeacherConfig(
            checkpoint=str(official_pth),
            official_config=str(reference_dir() / "tiny" / "config.json"),
            device="cpu",
            **settings,
        )
    )


def test_config_hash_is_stable_and_tracks_inference_settings(official_pth):
    def build(overrides):
        return _official_tiny(official_pth, overrides=overrides)

    first, again, other = build(SMALL_INPUT), build(SMALL_INPUT), build(SMALL_INPUT + ("input.min_size=160",))
    assert first.config_hash == again.config_hash and first.teacher_id == again.teacher_id
    assert other.config_hash != first.config_hash and other.teacher_id == first.teacher_id


def test_images_without_phrases_never_reach_the_model(official_teacher):
    not_an_image = object()  # the preprocessor would raise on it
    assert official_teacher.label([not_an_image], ["just words"], [[]]) == [[]]


def test_batches_of_different_sizes_keep_each_image_in_its_own_pixels(official_teacher):
    sizes = [(160, 120), (96, 200), (230, 90)]
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    results = official_teacher.label(images, [CAPTION] * 3, [SPANS, SPANS[:1], []])
    assert results[2] == []
    assert results[1] and {b.phrase for b in results[1]} == {0}
    for (width, height), boxes in zip(sizes, results):
        for b in boxes:
            assert 0 <= b.box[0] < b.box[2] <= width and 0 <= b.box[1] < b.box[3] <= height
    # BGR arrays are accepted too and give the boxes of the same picture as PIL
    bgr = np.ascontiguousarray(np.asarray(images[0])[:, :, ::-1])
    [from_array] = official_teacher.label([bgr], [CAPTION], [SPANS])
    assert from_array == official_teacher.label(images[:1], [CAPTION], [SPANS])[0]


def test_long_captions_are_windowed_and_phrase_ids_map_back(official_teacher):
    filler = " ".join(["lovely"] * 150)
    caption = f"a red circle {filler} and a blue square {filler} beside a green triangle"
    spans = [
        (caption.index(p), caption.index(p) + len(p))
        for p in ("a red circle", "a blue square", "a green triangle")
    ]
    prompts = official_teacher.prompts(caption, spans)
    assert len(prompts) >= 2
    assert sorted(i for p in prompts for i in p.phrase_ids) == [0, 1, 2]
    for prompt in prompts:
        for phrase_id, (span,) in zip(prompt.phrase_ids, prompt.spans):
            start, end = spans[phrase_id]
            assert prompt.caption[span[0] : span[1]] == caption[start:end]
    [boxes] = official_teacher.label([_image(128, 128)], [caption], [spans])
    last_window = set(prompts[-1].phrase_ids)
    assert {b.phrase for b in boxes} & last_window, "boxes of the last window's phrases are mapped back"
    assert {b.phrase for b in boxes} <= {0, 1, 2}


def test_bad_spans_raise_value_error(official_teacher):
    with pytest.raises(ValueError):
        official_teacher.prompts("short", [(2, 40)])


def test_teacher_config_checks():
    with pytest.raises(ValueError, match="only"):
        TeacherConfig(checkpoint="x", overrides=("head.num_convs=3",))
    with pytest.raises(ValueError, match="batch_size"):
        TeacherConfig(checkpoint="x", batch_size=0)
    with pytest.raises(ValueError, match="name"):
        TeacherConfig(checkpoint="x", name="a/b")


def test_official_file_needs_its_config(official_pth):
    with pytest.raises(ValueError, match="official_config"):
        Teacher.from_checkpoint(TeacherConfig(checkpoint=str(official_pth)))


def test_gpu_settings_padding_and_the_config_hash(official_pth):
    """The settings a CUDA teacher takes by default (``deform``, ``compile``, ``size_bucket``), tried on CPU
    without compiling: the gather kernel gives the boxes of torchvision's in fp32; a batch filled up to
    ``batch_size`` with copies gives the same boxes; every setting that changes boxes enters the config hash,
    and the CPU defaults leave it as it was."""

    def build(**settings):
        return _official_tiny(official_pth, amp=False, batch_size=4, overrides=SMALL_INPUT, **settings)

    default = build()
    settings = (default.deform, default.compiled, default.size_bucket, default.tf32, default.cuda_graphs)
    assert settings == ("torchvision", "off", 0, False, False)  # graphs default to on with CUDA only
    assert build(deform="torchvision", compile="off", size_bucket=0).config_hash == default.config_hash
    assert build(tf32="on").tf32 is False  # TF32 is CUDA's: nothing changes on a CPU, nor the hash
    batched = build()
    batched.predictor.postprocessor.batched = True  # a CUDA teacher's post-processing
    assert batched.config_hash != default.config_hash
    gather = build(deform="gather")
    bucketed = build(size_bucket=64)  # prompts padded to 256 tokens, as the official code
    assert (bucketed.token_bucket, bucketed.model_config.text.pad_to_max) == (0, True)
    short_prompts = build(size_bucket=64, token_bucket=32)
    assert (short_prompts.token_bucket, short_prompts.model_config.text.pad_to_max) == (32, False)
    assert build(token_bucket=16).config_hash == default.config_hash  # no size bucket: prompts pad as before
    hashes = {default.config_hash, gather.config_hash, bucketed.config_hash, short_prompts.config_hash}
    assert len(hashes) == 4

    images = [_image(150, 130, seed=1), _image(120, 160, seed=2), _image(140, 100, seed=3)]
    spans = [SPANS] * 3
    expected = default.label(images, [CAPTION] * 3, spans)
    assert sum(map(len, expected)) > 0
    default.predictor.pad_batch = 4  # as a compiled teacher: 3 pairs and a copy of the last
    filled = default.label(images, [CAPTION] * 3, spans)
    default.predictor.pad_batch = 0
    # Equal up to rounding: the batch's size changes how the matrix products are blocked, not what they sum.
    for got in (gather.label(images, [CAPTION] * 3, spans), filled):
        for mine, theirs in zip(got, expected):
            assert [b.phrase for b in mine] == [b.phrase for b in theirs]
            assert np.allclose([b.box for b in mine], [b.box for b in theirs], atol=1e-3)
            assert np.allclose([b.score for b in mine], [b.score for b in theirs], atol=1e-5)

    padded = bucketed.predictor.preprocessor.batch(images).images
    assert padded.shape[-2:] == (192, 192)  # sides 160 and 160 -> multiples of 64, capped at max_size 192


def test_with_token_buckets_each_pair_gets_the_boxes_it_gets_alone(official_pth):
    """A bucketed teacher batches only pairs of one padded image size and one padded prompt length: prompts of
    under 32 and of 33-64 tokens side by side go to separate forward passes of 32 and 64 tokens (not one of
    256, nor one padded to the longer), and every pair's boxes are the ones it gets alone."""
    teacher = _official_tiny(
        official_pth, amp=False, batch_size=4, overrides=SMALL_INPUT, size_bucket=64, token_bucket=32
    )
    lengths = []
    teacher.predictor.model.register_forward_pre_hook(lambda _, args: lengths.append(args[1].shape[1]))
    long = (
        CAPTION + ", with a green triangle, a yellow star, an orange hexagon and a purple cross under a cloud"
    )
    assert 32 < teacher.token_counts([long])[0] <= 64 and teacher.token_counts([CAPTION])[0] <= 32
    images = [_image(150, 130, seed=5), _image(140, 120, seed=6), _image(150, 125, seed=7), _image(150, 140)]
    captions = [CAPTION, long, long, CAPTION]
    together = teacher.label(images, captions, [SPANS] * 4)
    assert sorted(lengths) == [32, 64] and sum(map(len, together)) > 0
    for image, caption, got in zip(images, captions, together):
        [alone] = teacher.label([image], [caption], [SPANS])
        assert [b.phrase for b in got] == [b.phrase for b in alone]
        assert np.allclose([b.box for b in got], [b.box for b in alone], atol=1e-3)
        assert np.allclose([b.score for b in got], [b.score for b in alone], atol=1e-5)


def test_padded_sides_and_mode_checks():
    from glip.preprocess import padded_side

    assert [padded_side(side, 32) for side in (800, 801, 1333)] == [800, 832, 1344]
    assert [padded_side(side, 32, 160, 1344) for side in (800, 801, 1000, 1300, 1333)] == [
        800, 960, 1120, 1344, 1344
    ]  # fmt: skip
    assert padded_side(1500, 32, 160, 1344) == 1504  # beyond the cap (no resizing): divisibility only
    bad_settings = ({"deform": "cuda"}, {"compile": "everything"}, {"size_bucket": -1}, {"tf32": "yes"},
                    {"token_bucket": -32})  # fmt: skip
    for bad in bad_settings:
        with pytest.raises(ValueError):
            TeacherConfig(checkpoint="x", **bad)


def test_tf32_products_are_on_for_the_forward_pass_only(official_pth):
    """A teacher with TF32 (``GlipPredictor.tf32``, on by default with CUDA) launches its forward pass with
    CUDA's fp32 products allowed to run as TF32, and leaves the process's setting as it found it; a process that
    chose torch's newer ``fp32_precision`` API keeps to it (reading the legacy flag would raise there)."""
    teacher = _official_tiny(official_pth, amp=False, batch_size=2, overrides=SMALL_INPUT)
    seen = []
    teacher.predictor.model.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.matmul.allow_tf32)
    )
    before = torch.backends.cuda.matmul.allow_tf32
    teacher.label([_image(120, 140, seed=4)], [CAPTION], [SPANS])
    teacher.predictor.tf32 = True
    teacher.label([_image(120, 140, seed=4)], [CAPTION], [SPANS])
    assert seen == [before, True]
    assert torch.backends.cuda.matmul.allow_tf32 == before

    script = (
        "import torch\n"
        "from glip.postprocess import tf32_matmul\n"
        "matmul = torch.backends.cuda.matmul\n"
        "matmul.fp32_precision = 'ieee'\n"
        "with tf32_matmul(True):\n"
        "    inside = matmul.fp32_precision\n"
        "print(inside, matmul.fp32_precision)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.split() == ["tf32", "ieee"]


def test_grouped_batches_keep_order_within_a_key():
    from teacher.teacher import grouped_batches

    items, keys = list("abcdefg"), [1, 2, 1, 1, 2, 3, 1]
    assert grouped_batches(items, keys, 2) == [["a", "c"], ["d", "g"], ["b", "e"], ["f"]]
    assert grouped_batches(items, [None] * 7, 3) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert grouped_batches([], [], 4) == []


def test_with_a_size_bucket_the_order_images_come_in_changes_no_box(small_world_options):
    """img2dataset writes a shard's images in the order their downloads finish, so two ingests of one crawl
    give other orders. Padded to each batch's largest image, the shipped teacher's boxes depend on their
    neighbours; batched by padded size (``Teacher.batch_key``), every image's boxes are its own, up to
    rounding, in any order."""
    from tests.test_bf16_agreement import SHIPPED, _world

    images, captions, spans = _world(small_world_options(eval_images=24, crawl_images=4, leaks=0))
    order = [int(i) for i in np.random.default_rng(3).permutation(len(images))]

    def labels(bucket: int, indices: list[int]) -> dict[int, list[PhraseBox]]:
        teacher = Teacher.from_checkpoint(
            TeacherConfig(checkpoint=str(SHIPPED), device="cpu", batch_size=4, size_bucket=bucket)
        )
        found = teacher.label([images[i] for i in indices], [captions[i] for i in indices],
                              [spans[i] for i in indices])  # fmt: skip
        return {i: [b for b in boxes if b.score >= 0.3] for i, boxes in zip(indices, found)}

    def same(first: dict, second: dict) -> bool:
        def rows(boxes: list[PhraseBox]) -> np.ndarray:
            return np.array([(b.phrase, *b.box, b.score) for b in boxes]).reshape(-1, 6)

        return all(
            len(first[i]) == len(second[i]) and np.allclose(rows(first[i]), rows(second[i]), atol=1e-2)
            for i in first
        )

    bucketed = labels(64, list(range(len(images))))
    assert sum(map(len, bucketed.values())) >= len(images)
    assert same(bucketed, labels(64, order))
    assert not same(labels(0, list(range(len(images)))), labels(0, order))
