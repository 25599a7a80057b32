"""The assembled model: shapes, the work of one forward, batching that does not leak between images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from glip.config import tiny
from glip.model import build_model
from glip.predictor import GlipPredictor
from glip.prompts import Prompt, caption_from_phrases


def _image(seed: int, height: int = 160, width: int = 224) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    image[40:100, 50:120] = (20, 200, 220)  # a yellow-ish block (BGR)
    return image


def _predictor() -> GlipPredictor:
    torch.manual_seed(0)
    model = build_model(tiny())
    with torch.no_grad():  # make scores cross the 0.05 threshold so detections exist
        model.head.token_bias.fill_(-1.0)
    return GlipPredictor(model, tiny(), device="cpu", resize=False)


def _count_forward_calls(model: torch.nn.Module) -> Counter[str]:
    """Calls of every submodule's forward, by qualified name (the model itself is ``""``), from now on."""
    calls: Counter[str] = Counter()
    for name, module in model.named_modules():
        module.register_forward_hook(lambda *_, name=name: calls.update([name]))
    return calls


def test_tiny_forward_shapes_and_one_pass_of_each_part():
    model = build_model(tiny()).eval()
    calls = _count_forward_calls(model)
    images = torch.randn(2, 3, 256, 320)
    ids = torch.tensor([[101, 1037, 2417, 4418, 1012, 102]] * 2)
    with torch.no_grad():
        outputs = model(images, ids, torch.ones_like(ids))
    # The work of a forward: body, pyramid, text encoder, head and each tower block run once for the batch,
    # and no module (shared per-level convs included) runs more than once per pyramid level.
    blocks = [f"head.blocks.{index}" for index in range(len(model.head.blocks))]
    once = [
        "",
        "backbone",
        "backbone.swin",
        "backbone.fpn",
        "text_encoder",
        "head",
        "anchor_generator",
        *blocks,
    ]
    assert {name: calls[name] for name in once} == dict.fromkeys(once, 1)
    assert max(calls.values()) == len(outputs.token_logits)
    sizes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    for level, (height, width) in enumerate(sizes):
        assert outputs.token_logits[level].shape == (2, height * width, 6)
        assert outputs.box_regression[level].shape == (2, 4, height, width)
        assert outputs.centerness[level].shape == (2, 1, height, width)
        assert outputs.anchors[level].shape == (height * width, 4)


def test_batched_prompts_of_different_lengths_equal_single_image_runs():
    """Text padding never leaks: a short prompt batched with a long one scores exactly as alone."""
    predictor = _predictor()
    images = [_image(1), _image(2)]
    prompts = [
        caption_from_phrases(["yellow square"]),
        Prompt.from_caption("a big yellow box next to a small red ball on a table", [(6, 16), (36, 44)]),
    ]
    batched = predictor.predict(images, prompts)
    for image, prompt, together in zip(images, prompts, batched):
        (alone,) = predictor.predict([image], [prompt])
        assert len(alone.scores) > 0
        torch.testing.assert_close(together.boxes, alone.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(together.scores, alone.scores, atol=1e-5, rtol=0)
        assert torch.equal(together.phrase_indices, alone.phrase_indices)


def test_vocabulary_larger_than_one_prompt_is_chunked():
    predictor = _predictor()
    names = [f"object number {i}" for i in range(120)]  # ~600 tokens: three prompts
    (found,) = predictor.predict_vocabulary([_image(3)], names)
    assert len(found.scores) > 0
    assert found.phrase_indices.max() >= 60  # detections come from later chunks too
    assert found.phrase_indices.min() >= 0 and found.phrase_indices.max() < len(names)


def test_unfused_dot_product_scores_the_encoder_text_and_drops_the_last_text_layer():
    from glip.config import with_overrides

    config = with_overrides(tiny(), {"head.fused_text_dot_product": False})
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert model.head.blocks[-1].text_layer is None
    assert all(block.text_layer is not None for block in model.head.blocks[:-1])
    images = torch.randn(1, 3, 128, 160)
    ids = torch.tensor([[101, 1037, 2417, 4418, 1012, 102]])
    mask = torch.ones_like(ids)
    seen = {}
    original = model.head.token_logits

    def spy(visual, text_hidden):
        seen["visual"], seen["text"] = visual, text_hidden
        return original(visual, text_hidden)

    model.head.token_logits = spy
    with torch.no_grad():
        outputs = model(images, ids, mask)
        encoded = model.text_encoder(ids, mask)
    torch.testing.assert_close(seen["text"], encoded.embedded)  # not the tower's fused text
    for level, logits in enumerate(outputs.token_logits):
        assert logits.shape[-1] == 6 and torch.isfinite(logits).all(), level


def test_a_warm_forward_never_makes_the_host_wait_for_the_device():
    """A GPU caller queues batch k+1's forward pass while batch k's runs (``glip.predictor``); any op that
    reads a device value on the host (``.item()``, ``nonzero``, a bool of a tensor) or writes a Python number
    into a device tensor makes the host wait for everything queued. None may run in a forward pass once the
    per-size caches are warm, given what the predictor knows on the host (whether any token is padding);
    and that knowledge changes no number, in fp32 or bf16, padded or not (checked on CPU: the ops are the same).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    waits = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "lift_fresh", "masked_select", "unique"}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket.__name__ in waits:
                self.seen.append(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model(tiny(), load_pretrained_text=False).eval()
    ids = torch.randint(1000, 5000, (2, 24))
    ids[:, 0], ids[:, -1] = 101, 102
    images = torch.randn(2, 3, 96, 128)
    for padded in (True, False):
        mask = torch.ones(2, 24, dtype=torch.long)
        if padded:
            mask[1, 12:] = 0
        for amp in (False, True):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                asked = model(images, ids, mask)  # transformers asks the device; fills the per-size caches
                with Record() as record:
                    told = model(images, ids, mask, text_padded=padded)
            assert record.seen == [], (padded, amp)
            for ours, theirs in zip(told.token_logits, asked.token_logits):
                assert torch.equal(ours, theirs), (padded, amp)
