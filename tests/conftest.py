"""Shared fixtures. The reference tensors live in ../shared/reference (next to the repository), or wherever
GLIP_REFERENCE_DIR points."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """The official-GLIP reference folder; a clear failure (never a silent skip) when it is missing."""
    candidate = Path(os.environ.get("GLIP_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
    if not (candidate / "tiny" / "state_dict.safetensors").is_file():
        pytest.fail(
            f"reference data not found at {candidate}: clone next to the steering repo's shared/ folder or set "
            "GLIP_REFERENCE_DIR to a folder holding tiny/state_dict.safetensors"
        )
    return candidate


@pytest.fixture(scope="session")
def reference() -> Path:
    return reference_dir()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores on the CI machine: one intra-op thread keeps timings stable and avoids oversubscription.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
