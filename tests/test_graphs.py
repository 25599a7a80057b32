"""CUDA graphs of the inference forward pass (``glip.graphs``).

Recording needs a GPU; what makes a pass recordable does not: after one warm-up call, a forward pass must make
no host sync (``.item()``, ``nonzero``, a Python branch on a tensor's value) and copy nothing from the host (a
tensor made from Python numbers), on any path the teacher can take. That is checked here on CPU with a
dispatch mode that sees every aten op; the recording itself, and that replayed labels equal eager ones, run
under the ``gpu`` marker.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glip.config import demo, tiny, with_overrides
from glip.dyhead import ModulatedDeformConvNorm
from glip.model import build_model
from glip.predictor import GlipPredictor
from glip.prompts import Prompt, tokenize_prompts
from teacher import Teacher, TeacherConfig

# Ops that wait for the device or read host memory: each breaks a CUDA graph recording (or is recorded with
# the value it had then). ``_local_scalar_dense`` is what ``.item()``, ``bool(t)`` and ``.tolist()`` call.
UNRECORDABLE = {
    "_local_scalar_dense",
    "nonzero",
    "lift_fresh",
    "masked_select",
    "unique",
    "_unique2",
    "equal",
}
CAPTION = "a red circle next to a blue square"
SPANS = [(2, 12), (21, 34)]


class _OpLog(TorchDispatchMode):
    """Counts every aten op dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _inputs(config, sizes: tuple[tuple[int, int], ...]):
    """A batch of two random images of other sizes, prompts of other lengths (so one is padded)."""
    predictor = GlipPredictor(build_model(config, load_pretrained_text=False), config, "cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    prompts = [Prompt.from_caption(CAPTION, SPANS), Prompt.from_caption(CAPTION[:12], SPANS[:1])]
    batch = predictor.preprocessor.batch(images, device="cpu")
    tokens = tokenize_prompts(predictor.tokenizer, prompts, config.text.max_query_len, config.text.pad_to_max)
    return predictor.model, (batch.images, tokens.input_ids, tokens.attention_mask)


@pytest.mark.parametrize(
    "preset, kernel",
    [(tiny, "torchvision"), (tiny, "gather"), (demo, "torchvision"), (demo, "gather")],
    ids=["swin-torchvision", "swin-gather", "resnet-torchvision", "resnet-gather"],
)
@pytest.mark.parametrize("pad_to_max", [True, False], ids=["padded", "trimmed"])
def test_a_warm_forward_pass_makes_no_host_sync(preset, kernel, pad_to_max):
    config = with_overrides(
        preset(), [f"text.pad_to_max={pad_to_max}", "input.min_size=96", "input.max_size=160"]
    )
    model, inputs = _inputs(config, ((120, 150), (90, 140)))
    for module in model.modules():
        if isinstance(module, ModulatedDeformConvNorm):
            module.kernel = kernel
    text_padded = not bool(inputs[2].all())  # the predictor's host-side flag
    assert text_padded  # the shorter prompt is padded: the padded path is the one checked
    with torch.no_grad():
        model(*inputs, text_padded=text_padded)  # the warm-up a GraphedForward makes before recording
        with _OpLog() as log:
            outputs = model(*inputs, text_padded=text_padded)
    unrecordable = {name: count for name, count in log.ops.items() if name in UNRECORDABLE}
    assert unrecordable == {}, f"ops that a CUDA graph cannot record: {unrecordable}"
    assert sum(log.ops.values()) > 500  # the log saw the pass (a few thousand ops)
    assert len(outputs.token_logits) == 5


def test_the_log_sees_a_host_sync():
    """The check above can fail: a pass that reads a value on the host is caught."""
    with _OpLog() as log:
        value = torch.ones(3).sum()
        if value > 2:  # bool(tensor): a host sync on a GPU
            torch.tensor([1.0, 2.0])  # a tensor from Python numbers: a host-to-device copy on a GPU
    assert log.ops["_local_scalar_dense"] == 1 and log.ops["lift_fresh"] == 1


def test_cuda_graphs_need_a_cuda_device():
    config = tiny()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GlipPredictor(build_model(config, load_pretrained_text=False), config, "cpu", cuda_graphs=True)
    assert TeacherConfig(checkpoint="x", cuda_graphs=True).cuda_graphs  # the device is known only at load


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_replayed_labels_equal_eager_ones(tmp_path):
    """A teacher with CUDA graphs labels as the same teacher without: the first batch of a shape is recorded,
    the next ones replayed, with two batches in flight (outputs cloned before the next replay)."""
    from glip import checkpoint

    config = with_overrides(tiny(), ["input.min_size=128", "input.max_size=192"])
    checkpoint.save(build_model(config, load_pretrained_text=False), config, tmp_path / "teacher")

    def teacher(graphs: bool) -> Teacher:
        return Teacher.from_checkpoint(
            TeacherConfig(
                checkpoint=str(tmp_path / "teacher"),
                device="cuda",
                batch_size=2,
                compile="off",
                size_bucket=64,
                cuda_graphs=graphs,
            )  # fmt: skip
        )

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (150, 120 + 10 * i, 3), dtype=np.uint8) for i in range(7)]
    captions, spans = [CAPTION] * len(images), [SPANS] * len(images)
    graphed, eager = teacher(True), teacher(False)
    assert graphed.config_hash != eager.config_hash
    first = graphed.label(images, captions, spans)  # records, then replays the later batches
    again = graphed.label(images, captions, spans)  # replays only
    expected = eager.label(images, captions, spans)
    assert len(graphed.predictor._graphed.graphs) >= 1 and not graphed.predictor._graphed.eager
    for found in (first, again):
        for mine, theirs in zip(found, expected, strict=True):
            assert [b.phrase for b in mine] == [b.phrase for b in theirs]
            assert np.allclose([b.box for b in mine], [b.box for b in theirs], atol=1e-2)
            assert np.allclose([b.score for b in mine], [b.score for b in theirs], atol=1e-3)
