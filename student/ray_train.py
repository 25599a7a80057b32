"""Student training on Ray Train: ``student.train.train`` inside a ``TorchTrainer``, one worker or several.

Ray Train starts the workers, sets up ``torch.distributed`` (gloo on CPU, NCCL on GPUs) and carries the
metrics (``ray.train.report`` at each logged step); with several workers ``train`` runs DDP (its module
docstring). The model's checkpoints are the run's own atomic saves in ``run_dir`` (written by rank 0), not
Ray's checkpoint storage, so a run killed at any point and started again, or restarted by Ray after a worker
failure (``max_failures``), resumes from its last save. Ray's own run state (no model) goes to
``run_dir/ray``. With several nodes, ``run_dir`` must be storage every node sees (a shared file system), or a
local folder of each node with the saves mirrored to object storage (``student.mirror``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from glip.config import GlipConfig
from pipeline import storage
from student.mirror import Mirror
from student.train import Source, TrainConfig, train

logger = logging.getLogger(__name__)


def train_on_ray(
    model_config: GlipConfig,
    train_config: TrainConfig,
    sources: Sequence[Source],
    run_dir: str | Path,
    init_checkpoint: str | Path | None = None,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: int | None = None,
    stop_at_step: int | None = None,
    max_failures: int = 0,
    mirror: Mirror | None = None,
) -> dict:
    """Train (or resume) like ``train`` on ``num_workers`` Ray Train workers; returns rank 0's summary.

    ``train_config.batch_size`` is the global batch, split evenly over the workers (each step equals one
    process's step on the whole batch). ``cpus_per_worker`` (default: the cluster's CPUs // ``num_workers``)
    is what each worker reserves and the threads its torch uses; ``use_gpu`` gives each worker one GPU.
    ``max_failures``: how many times Ray restarts the workers after a failure (each restart resumes from the
    last save). ``mirror``: as ``train``'s (``run_dir`` is then a local folder on each worker's node). Workers read
    record images with the storage options this process remembered (``pipeline.storage.remember_options``).
    Starts a local in-process Ray (or joins ``RAY_ADDRESS``) unless Ray is up.

    Raises:
        ValueError: ``num_workers`` < 1, or ``batch_size`` not a multiple of it.
        ray.train.TrainingFailedError: a worker failed (more than ``max_failures`` times).
    """
    if num_workers < 1 or train_config.batch_size % num_workers:
        raise ValueError(
            f"batch_size {train_config.batch_size} must be a multiple of num_workers {num_workers} (>= 1)"
        )
    _connect()
    run_dir = Path(run_dir).resolve()
    cpus = cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)
    logger.info("training %s on %d Ray Train workers, %d CPUs each", run_dir, num_workers, cpus)
    trainer_class = TorchTrainer if _has_state_api() else _LocalTrainer
    # The sources (a paste pool of a 24M crawl: ~2 GB) go to the object store once, by reference: inside the
    # config, Ray Train stored them three or four times over (6.5 GB spilled for a 2 GB pool) and each worker
    # unpickled its own copy; by reference, a node's workers read the pool's arrays from one shared copy.
    trainer = trainer_class(
        _train_worker,
        train_loop_config={
            "model_config": model_config,
            "train_config": train_config,
            "sources": ray.put(list(sources)),
            "run_dir": str(run_dir),
            "init_checkpoint": None if init_checkpoint is None else str(init_checkpoint),
            "stop_at_step": stop_at_step,
            "threads": cpus,
            # By reference too: Ray Train writes its config to disk, and storage options may hold credentials.
            "storage": ray.put({"mirror": mirror, "options": storage.remembered_options()}),
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train's INFO lines repeat every report; the loop logs its own metrics (metrics.jsonl).
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit().return_value


class _LocalTrainer(TorchTrainer):
    """``TorchTrainer`` without its placement-group cleaner, for a Ray started here without a dashboard: the
    cleaner (a detached actor that frees the run's placement group if the controller dies) polls the state
    API, which needs the dashboard, and warns every second that it cannot. A local Ray's placement groups end
    with it. (Ray 2.60: ``_create_default_callbacks`` is where the cleaner is added.)"""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]


def _has_state_api() -> bool:
    """Whether the connected Ray serves the state API (it runs a dashboard)."""
    try:
        return bool(ray._private.worker.get_dashboard_url())
    except Exception:  # noqa: BLE001 - in doubt, Ray's own trainer
        return True


def _train_worker(config: dict) -> dict:
    """One worker: torch threads to its CPUs, its device (Ray Train's), then ``train``."""
    # Ray sets OMP_NUM_THREADS to the worker's CPUs; torch's intra-op pool is sized here to the same.
    torch.set_num_threads(config["threads"])
    remote = ray.get(config["storage"])
    for prefix, options in remote["options"].items():
        storage.remember_options(prefix, options)
    train_config: TrainConfig = config["train_config"]
    if train_config.device == "auto":
        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        train_config = replace(train_config, device=str(device))
    return train(
        config["model_config"],
        train_config,
        ray.get(config["sources"]),
        config["run_dir"],
        config["init_checkpoint"],
        config["stop_at_step"],
        on_metrics=ray.train.report,
        mirror=remote["mirror"],
    )


def _connect() -> None:
    """Ray as ``pipeline.executor.init_ray`` starts it (student/ does not import the executor): the running
    one, the cluster at ``RAY_ADDRESS``, else a local in-process Ray with this machine's cores."""
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "configure_logging": True}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
