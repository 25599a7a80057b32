"""Shared fixtures. The reference tensors live in ../shared/reference (next to the repository), or wherever
GLIP_REFERENCE_DIR points.

Modules beyond torch are imported inside the fixtures that need them, so that collecting the tests that use
none of them stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from glip.config import GlipConfig
    from glip.head import GroundingHead
    from glip.model import Glip
    from glip.text import TextEncoder
    from jobs.world import WorldOptions

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_TEXT_PREFIX = "module.language_backbone.body.model."


def reference_dir() -> Path:
    """The official-GLIP reference folder; a clear failure (never a silent skip) when it is missing."""
    candidate = Path(os.environ.get("GLIP_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
    if not (candidate / "tiny" / "state_dict.safetensors").is_file():
        pytest.fail(
            f"reference data not found at {candidate}: clone next to the steering repo's shared/ folder or set "
            "GLIP_REFERENCE_DIR to a folder holding tiny/state_dict.safetensors"
        )
    return candidate


def _case_folders(pattern: str, required: str, variable: str) -> list[Path]:
    root = reference_dir() / "tiny"
    found = sorted(path for path in root.glob(pattern) if (path / required).is_file())
    extra = [Path(entry) for entry in os.environ.get(variable, "").split(":") if entry]
    return list(dict.fromkeys(path.resolve() for path in found + extra))  # each folder once, in order


def reference_forward_cases() -> list[Path]:
    """Forward cases to parametrize over: every ``tiny/case*/`` holding ``outputs.safetensors``, then the
    ':'-separated folders of ``GLIP_GOLDEN_CASES``; each folder once (resolved paths)."""
    return _case_folders("case*", "outputs.safetensors", "GLIP_GOLDEN_CASES")


def reference_loss_cases() -> list[Path]:
    """Loss cases to parametrize over: every ``tiny/loss_case*/`` holding ``targets.safetensors``, then the
    ':'-separated folders of ``GLIP_GOLDEN_LOSS_CASES``; each folder once (resolved paths)."""
    return _case_folders("loss_case*", "targets.safetensors", "GLIP_GOLDEN_LOSS_CASES")


def reference_tiny_model(overrides: Mapping[str, Any] | None = None) -> tuple[Glip, GlipConfig]:
    """The official tiny GLIP with the reference weights (loaded strictly) and its config, ``overrides``
    (dotted keys, as ``with_overrides`` takes them) applied first. The model is left in training mode."""
    from glip.checkpoint import import_official, read_official_state_dict
    from glip.config import from_reference_config, with_overrides

    root = reference_dir() / "tiny"
    config = from_reference_config(json.loads((root / "config.json").read_text()))
    if overrides:
        config = with_overrides(config, overrides)
    return import_official(read_official_state_dict(root / "state_dict.safetensors"), config), config


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()


@pytest.fixture(scope="session")
def reference_state(reference: Path) -> dict[str, torch.Tensor]:
    """The official tiny GLIP's state dict as stored (``module.`` keys). Shared by the session: read only."""
    from safetensors.torch import load_file

    return load_file(reference / "tiny" / "state_dict.safetensors")


@pytest.fixture(scope="session")
def reference_case1(reference: Path) -> dict[str, Any]:
    """The official tiny GLIP's forward case 1: ``inputs`` and ``outputs`` (name -> tensor) and ``meta`` (its
    meta.json). Shared by the session: read only."""
    from safetensors.torch import load_file

    folder = reference / "tiny" / "case1"
    return {
        "inputs": load_file(folder / "inputs.safetensors"),
        "outputs": load_file(folder / "outputs.safetensors"),
        "meta": json.loads((folder / "meta.json").read_text()),
    }


@pytest.fixture
def official_text_encoder(reference: Path, reference_state: dict[str, torch.Tensor]) -> TextEncoder:
    """The tiny reference language backbone in eval mode, loaded strictly (official name -> ``bert.<same>``)."""
    from transformers import BertConfig

    from glip.text import TextEncoder

    state = {}
    for name, tensor in reference_state.items():
        if not name.startswith(OFFICIAL_TEXT_PREFIX):
            continue
        local = name[len(OFFICIAL_TEXT_PREFIX) :]
        if local == "embeddings.position_ids":
            # A persistent buffer in transformers 4.x checkpoints, non-persistent now: it must be arange.
            assert torch.equal(tensor[0], torch.arange(tensor.shape[1]))
            continue
        state[f"bert.{local}"] = tensor
    values = json.loads((reference / "tiny" / "config.json").read_text())["bert_config_tiny"]
    encoder = TextEncoder.from_config(BertConfig(**values))
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


@pytest.fixture
def small_text_encoder() -> Callable[[], TextEncoder]:
    """``small_text_encoder() -> TextEncoder``: a random-init BERT of 1 layer, 32 wide, 2 heads, intermediate
    64. Built at the call, so a ``torch.manual_seed`` before it fixes the weights."""
    from transformers import BertConfig

    from glip.text import TextEncoder

    def make() -> TextEncoder:
        config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        return TextEncoder.from_config(config)

    return make


@pytest.fixture
def small_head() -> Callable[..., GroundingHead]:
    """``small_head(**changes) -> GroundingHead``: a head that reads ``small_text_encoder``'s text.

    Defaults: channels 16, text_dim 32, num_convs 2, a 32-wide 4-head fusion, text layers of 2 heads and
    intermediate 64, 4 norm groups; the rest as GroundingHead's defaults (deformable convs). Built at the call,
    so a ``torch.manual_seed`` before it fixes the weights.
    """
    from glip.head import GroundingHead

    def make(**changes: Any) -> GroundingHead:
        values = dict(
            channels=16,
            text_dim=32,
            num_convs=2,
            fusion_embed_dim=32,
            fusion_heads=4,
            text_layer_heads=2,
            text_layer_intermediate=64,
            norm_groups=4,
        )
        return GroundingHead(**{**values, **changes})

    return make


@pytest.fixture(scope="session")
def small_world_options(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., WorldOptions]:
    """``small_world_options(**changes) -> WorldOptions``: a demo world that generates in about a second.

    Defaults: ``out`` a fresh temporary folder per call (``.../w``, not yet created), seed 7, 10 train and 9
    eval images, 24 fresh crawl images (12 of them the verified sample), 6 leaks (every leak kind twice),
    3 dead URLs, 2 crawl partitions; the rest as WorldOptions' defaults (long-tailed: with 9 rare names, each
    of the 10 train images shows one; 6 shapes x 6 colours = 36 categories, images 160-320 px, 1-5 objects).
    Any field can be changed by keyword. Session-scoped, so module-scoped fixtures can use it too.
    """
    from jobs.world import WorldOptions

    def make(**changes: Any) -> WorldOptions:
        values: dict[str, Any] = dict(
            seed=7, train_images=10, eval_images=9, crawl_images=24, leaks=6, dead_urls=3, crawl_partitions=2
        )
        if "out" not in changes:
            values["out"] = str(tmp_path_factory.mktemp("world") / "w")
        return WorldOptions(**{**values, **changes})

    return make


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on the CI machine: one intra-op thread keeps timings stable and avoids oversubscription.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
