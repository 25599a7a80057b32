"""A tiny generated crawl served on 127.0.0.1 (``jobs._loopback.ImageServer``), so that the ingest stage downloads
it with img2dataset as it would the web, and a tiny random teacher: the shared setup of the pipeline tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glip import checkpoint
from glip.config import tiny, with_overrides
from glip.model import build_model
from jobs._loopback import ImageServer
from jobs.world import WorldOptions, generate_world
from pipeline.ingest import IngestConfig

# Small inputs keep the tiny GLIP fast; a random model scores low, so nothing is thresholded away.
TEACHER_SETTINGS = ("input.min_size=96", "input.max_size=160", "text.pad_to_max=False",
                    "postprocess.score_threshold=0.0", "postprocess.detections_per_image=8")  # fmt: skip


@dataclass(frozen=True)
class ServedCrawl:
    """A generated world whose crawl images ``host`` serves (its crawl URLs point there)."""

    world: Path
    host: str

    @property
    def crawl(self) -> str:
        return str(self.world / "crawl")

    @property
    def truth(self) -> Path:
        return self.world / "crawl_truth.json"

    def ingest_config(self, **changes: Any) -> IngestConfig:
        """One download process, a few threads, this crawl and host allowed; ``changes`` override."""
        values = {"crawl": self.crawl, "processes_count": 1, "thread_count": 4, "allow_hosts": (self.host,)}
        return IngestConfig(**{**values, **changes})


@contextmanager
def served_crawl(folder: Path, **world_changes: Any) -> Iterator[ServedCrawl]:
    """Generate a small world under ``folder / "world"`` and serve its crawl images while the block runs.

    Defaults: 10 crawl images, 2 dead URLs, no leaks, 1 train and 1 eval image, 64-128 px images.
    """
    with ImageServer(folder) as server:
        values = {"out": str(folder / "world"), "train_images": 1, "eval_images": 1, "leaks": 0, "dead_urls": 2,
                  "crawl_images": 10, "image_size": (64, 128), "object_size": (16, 40)}  # fmt: skip
        options = WorldOptions(**{**values, **world_changes, "base_url": server.base_url})
        manifest = generate_world(options)
        server.point_at(folder / "world" / manifest["files"]["crawl_images"])
        yield ServedCrawl(folder / "world", f"127.0.0.1:{server.port}")


def tiny_teacher(folder: Path, seed: int = 0, *overrides: str) -> Path:
    """A random tiny GLIP saved as a checkpoint folder (inputs small, every detection kept; ``overrides``
    change its config further)."""
    torch.manual_seed(seed)
    config = with_overrides(tiny(), [*TEACHER_SETTINGS, *overrides])
    return checkpoint.save(build_model(config), config, folder)
