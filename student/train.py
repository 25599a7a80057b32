"""The GLIP training loop: resumable, deterministic in its data, logged as jsonl.

A run directory holds ``checkpoint/`` (model weights + config, our safetensors format), ``train_state.pt``
(optimizer, scheduler, step; tensors and plain values only, loaded with ``weights_only=True``) and
``metrics.jsonl``. Batches are a pure function of (seed, step), so a run killed at any point and started again
continues from the last saved step with the same optimizer state and the next unseen batch: no data is
repeated or skipped. The state records the run's identity (``run_identity``: its options and data); a run
started again with other options or data is refused rather than continued as a mixture of two runs.
Checkpoints are written to a staging folder, marked complete, then moved into place, so a kill at any point of
a save leaves the previous save or the new one (``_save``), never half of one. With a mirror (``student.mirror``),
each save is uploaded to object storage too, and a run folder older than the mirror is brought up to it first.

Data-parallel (DDP): when ``torch.distributed`` is initialised with W > 1 processes (``student.ray_train`` does
it through Ray Train; gloo on CPU, NCCL on GPUs), rank r builds only positions ``[s*B + r*B/W, s*B +
(r+1)*B/W)`` of step s's global batch of B, with the prompts and augmentations those images get in the whole
batch; the model is wrapped in ``DistributedDataParallel``. The criterion all-reduces its normalisers
(``glip.loss``), so the averaged gradient, and with it every step, equals one process's at the same global
batch. Only rank 0 writes checkpoints and metrics, and the others wait for each save at a barrier; every rank
resumes from the same save, at any W that divides B.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from glip import checkpoint as glip_checkpoint
from glip.config import GlipConfig
from glip.loss import GroundingTargets, total_loss
from glip.model import Glip, build_criterion, build_model, loss_weights
from glip.predictor import autocast_supported
from student.data import WORD, Batch, BatchBuilder, GroundedImage, make_example
from student.mirror import Mirror
from student.paste import PastePool, paste_into
from student.schedule import OptimConfig, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=100))
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    num_workers: int = 1
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16; fp32 elsewhere
    freeze_text: bool = False
    # Train only the top N layers of a pretrained text encoder (None: all of it, unless freeze_text). The
    # lower layers and embeddings stay fixed, and a checkpoint holds only the N layers it changed.
    text_layers: int | None = None
    max_negatives: int = 85
    device: str = "auto"
    # The first N steps train the classification loss alone with the head's tower skipped
    # (``GroundingHead.skip_tower``): the class conv reads the pyramid, so the vision body and the pyramid learn
    # what tells the categories apart (shape takes a from-scratch body ~2,000 such steps; bench/RESULTS.md) at
    # about half the cost of a full step. Needs loss.weight_class > 0.
    pyramid_warmup_steps: int = 0
    # The next N steps train the classification loss alone through the tower (loss.weight_class > 0): a
    # from-scratch tower first learns what tells the categories apart, and only then meets the token loss,
    # whose early gradients (through a still random alignment) otherwise wash it out.
    class_warmup_steps: int = 0
    # The next N steps back-propagate the token loss into the alignment only (``GroundingHead.align_only``):
    # the projection learns to read the tower's features before its gradients may reshape them (as
    # linear-probing before fine-tuning); the other losses train the whole model meanwhile.
    alignment_warmup_steps: int = 0
    # False: the boxes of pseudo-labelled records (``GroundedImage.pseudo``) train the token loss only, not
    # box regression nor centerness (YOLO-World's choice: a teacher's box extents are not trusted). The
    # ignore band and unlabelled phrases are read with the labels (``student.pseudo.load_pseudo_labels``).
    pseudo_box_loss: bool = True
    # The weight of GLIPv2's inter-image region-word loss (``loss_token_inter``: each positive region against
    # the other images' prompt tokens of the batch, as negatives); 0: off.
    inter_image_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.inter_image_loss < 0:
            raise ValueError(f"inter_image_loss is a loss weight >= 0, got {self.inter_image_loss}")
        if min(self.pyramid_warmup_steps, self.class_warmup_steps, self.alignment_warmup_steps) < 0:
            raise ValueError(
                "pyramid_warmup_steps, class_warmup_steps and alignment_warmup_steps must be >= 0"
            )
        if self.text_layers is not None and (self.freeze_text or self.text_layers < 0):
            raise ValueError("text_layers needs freeze_text off and a count >= 0")


@dataclass(frozen=True)
class Source:
    """Training records of one dataset; ``names`` is the vocabulary of detection records (None: grounding).
    ``share``: the fraction of every batch drawn from this source (its own endless epochs); None: the source
    is walked with the other unshared sources, in proportion to its size. ``negatives``: grounding sources, a
    concept dictionary (``student.data.concept_dictionary``) whose phrases are appended to each caption as
    negatives (``make_example``); None: the caption alone. ``weights``: per record, how often it is drawn
    relative to the source's other records (e.g. ``student.data.repeat_factors``), normalised to a mean of 1
    so the source keeps its size in the mix: which of its records are seen changes, not how many. ``paste``:
    objects pasted into this source's images as they are drawn (``student.paste``); None: none."""

    records: Sequence[GroundedImage]
    names: Sequence[str] | None = None
    share: float | None = None
    negatives: Sequence[str] | None = None
    weights: Sequence[float] | None = None
    paste: PastePool | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and (
            len(self.weights) != len(self.records) or min(self.weights, default=1) <= 0
        ):
            raise ValueError(f"a source's weights: one > 0 per record ({len(self.records)} records)")


def _class_keys(name: str, mode: str) -> list[str]:
    """The classes a category name stands for: itself, or its lower-cased words."""
    return WORD.findall(name.lower()) if mode == "words" else [name]


def class_vocabulary(sources: Sequence[Source], mode: str) -> list[str]:
    """The classes of the classification loss: every category name, or every word of the names, of the
    detection sources, in first-seen order."""
    classes: dict[str, None] = {}
    for source in sources:
        for name in source.names or ():
            for key in _class_keys(name, mode):
                classes.setdefault(key, None)
    return list(classes)


def class_matrices(sources: Sequence[Source], mode: str, num_outputs: int) -> list[torch.Tensor | None]:
    """Per source, a ``[num_names, num_outputs]`` 0/1 matrix from its category index to class targets
    (None for grounding sources).

    Raises:
        ValueError: more classes than the class conv has outputs.
    """
    vocabulary = class_vocabulary(sources, mode)
    if len(vocabulary) > num_outputs:
        raise ValueError(
            f"{len(vocabulary)} {mode} classes but the class conv has {num_outputs} outputs; raise "
            "head.num_legacy_classes or use loss.class_targets=words"
        )
    column = {key: index for index, key in enumerate(vocabulary)}
    matrices: list[torch.Tensor | None] = []
    for source in sources:
        if source.names is None:
            matrices.append(None)
            continue
        matrix = torch.zeros(len(source.names), num_outputs)
        for row, name in enumerate(source.names):
            for key in _class_keys(name, mode):
                matrix[row, column[key]] = 1.0
        matrices.append(matrix)
    return matrices


class StepBatches(Dataset):
    """Batch ``i`` of this dataset is the batch of training step ``start + i``.

    The sample order is an endless sequence of epochs, each a permutation seeded by (seed, epoch); step ``s``
    takes positions ``[s*B, (s+1)*B)``. With ``class_only_steps`` (a class warm-up), those first steps walk
    the records that have class targets instead, and the epochs of all records start after them. Prompt
    sampling and augmentation use a generator seeded by (seed, step), so every batch is reproducible wherever
    and whenever it is built.

    Sources with a ``share`` take ``round(share * B)`` slots of every batch from their own epochs (seeded by
    (seed, source, epoch)); the other sources fill the rest as above; the batch's slots are then interleaved by
    a permutation seeded by (seed, step), so a rank's slice holds its part of each source.

    With ``world_size`` W > 1, item ``i`` is rank ``rank``'s slice of that batch: its B/W images, with the
    prompts and augmentations they get in the whole batch (every rank draws the whole batch's prompts, which
    reads no image, and skips the other images' augmentation draws), so the W slices together are the batch.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        builder: BatchBuilder,
        tokenizer,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        max_negatives: int,
        class_targets: Sequence[torch.Tensor | None] | None = None,
        class_only_steps: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of the {world_size} data-parallel processes"
            )
        self.rank_slice = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.items = [
            (source, index, source_index)
            for source_index, source in enumerate(sources)
            for index in range(len(source.records))
        ]
        self.class_targets = class_targets
        # The class warm-up only draws records that have class targets (a grounding image adds nothing then).
        self.class_only_steps = class_only_steps
        self._classified = [
            index
            for index, (_, _, source_index) in enumerate(self.items)
            if class_targets is not None and class_targets[source_index] is not None
        ]
        if class_only_steps and not self._classified:
            raise ValueError("a class warm-up needs detection records (with category names)")
        if not self.items:
            raise ValueError("no training records")
        self._groups = self._share_groups(sources, batch_size)
        if any(source.weights is not None for source in sources):
            self._groups = [
                (key, self._weighted(sources, pool, seed), slots) for key, pool, slots in self._groups
            ]
        self.builder, self.tokenizer = builder, tokenizer
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start, stop
        self.max_negatives = max_negatives
        self._permutations: dict[tuple[str, int], list[int]] = {}

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _share_groups(self, sources: Sequence[Source], batch_size: int) -> list[tuple[str, list[int], int]]:
        """(epoch key, item pool, slots per batch) of the unshared sources together and of each shared one."""
        shared = {i: source.share for i, source in enumerate(sources) if source.share is not None}
        if not shared:
            return [("epoch", list(range(len(self.items))), batch_size)]
        slots = {i: round(share * batch_size) for i, share in shared.items()}
        rest = batch_size - sum(slots.values())
        if any(not 0 < share < 1 for share in shared.values()) or rest < 0 or 0 in slots.values():
            raise ValueError(
                f"source shares {shared} of a batch of {batch_size}: each must be in (0, 1), give at least one "
                "slot, and together leave room"
            )
        pools: dict[int | None, list[int]] = {}
        for index, (_, _, source_index) in enumerate(self.items):
            pools.setdefault(source_index if source_index in shared else None, []).append(index)
        if rest and None not in pools:
            raise ValueError(f"the shares {shared} leave {rest} slots of each batch but no unshared source")
        groups = [("epoch", pools[None], rest)] if rest else []
        return groups + [(f"epoch-source{i}", pools[i], slots[i]) for i in sorted(shared) if i in pools]

    def _weighted(self, sources: Sequence[Source], pool: list[int], seed: int) -> list[int]:
        """``pool`` with each item of a weighted source repeated its normalised weight times, rounded
        stochastically once per run (seeded): a weight of 2.4 is 2 or 3 copies, 0.6 is 0 or 1."""
        rng = random.Random(f"{seed}-weights")
        means = {
            index: sum(source.weights) / len(source.weights)
            for index, source in enumerate(sources)
            if source.weights is not None and source.weights
        }
        result = []
        for item in pool:
            source, record_index, source_index = self.items[item]
            if source_index not in means:
                result.append(item)
                continue
            weight = source.weights[record_index] / means[source_index]
            result += [item] * (int(weight) + (rng.random() < weight - int(weight)))
        if not result:
            raise ValueError("the weights left no record to draw")
        return result

    def positions(self, step: int) -> list[int]:
        """Item indices of ``step``: class-only steps walk the items that have class targets, then every
        item is walked in epochs (per share group) from the first step after them."""
        if step < self.class_only_steps:
            return self._walk(self._classified, "class-epoch", step * self.batch_size, self.batch_size)
        step -= self.class_only_steps
        result = []
        for key, pool, slots in self._groups:
            result += self._walk(pool, key, step * slots, slots)
        if len(self._groups) > 1:
            random.Random(f"{self.seed}-mix-{step}").shuffle(result)
        return result

    def _walk(self, pool: list[int], key: str, position0: int, count: int) -> list[int]:
        result = []
        for position in range(position0, position0 + count):
            epoch, offset = divmod(position, len(pool))
            if (key, epoch) not in self._permutations:
                order = list(range(len(pool)))
                random.Random(f"{self.seed}-{key}-{epoch}").shuffle(order)
                self._permutations[(key, epoch)] = order
                while len(self._permutations) > 2 * len(self._groups) + 1:  # keep the current epochs only
                    del self._permutations[next(iter(self._permutations))]
            result.append(pool[self._permutations[(key, epoch)][offset]])
        return result

    def __getitem__(self, index: int) -> Batch:
        step = self.start + index
        rng = random.Random(f"{self.seed}-step-{step}")
        examples, source_indices = [], []
        for slot, position in enumerate(self.positions(step)):
            source, record_index, source_index = self.items[position]
            source_indices.append(source_index)
            record = source.records[record_index]
            if source.paste is not None:  # its own generator: the batch's other draws stay as without it
                paste_rng = random.Random(f"{self.seed}-paste-{step}-{slot}")
                record = paste_into(record, source.names, source.paste, paste_rng)
            examples.append(
                make_example(
                    record,
                    source.names,
                    self.tokenizer,
                    rng,
                    self.max_negatives,
                    self.builder.max_query_len,
                    source.negatives,
                )
            )
        ranked = self.rank_slice
        _skip_augmentation_draws(self.builder, rng, ranked.start)
        batch = self.builder(examples[ranked], rng)
        if self.class_targets is not None:
            matrices = [self.class_targets[index] for index in source_indices[ranked]]
            batch.class_targets = [
                None if matrix is None else matrix[labels]
                for matrix, labels in zip(matrices, batch.labels, strict=True)
            ]
        return batch


def _skip_augmentation_draws(builder: BatchBuilder, rng: random.Random, count: int) -> None:
    """Advance ``rng`` past what ``BatchBuilder.__call__`` draws for ``count`` images: a flip draw (training
    only), then a size draw, per image; a rank's slice of a batch then gets the augmentations it has in the
    whole batch. Mirrors the builder's draw order (tests/test_ray_train.py checks the slices against it)."""
    sizes = sorted(builder.preprocessors)
    for _ in range(count):
        if builder.train:
            rng.random()
        rng.choice(sizes)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def grounding_targets(batch: Batch) -> list[GroundingTargets]:
    """The criterion's targets of each image of ``batch`` (boxes, token maps and the pseudo-label options)."""
    none = [None] * len(batch.boxes)
    return [
        GroundingTargets(boxes, maps, size, targets, box_loss_mask, ignore_boxes, token_loss_mask)
        for boxes, maps, size, targets, box_loss_mask, ignore_boxes, token_loss_mask in zip(
            batch.boxes,
            batch.positive_maps,
            batch.image_sizes,
            batch.class_targets or none,
            batch.box_loss_masks or none,
            batch.ignore_boxes or none,
            batch.token_loss_masks or none,
            strict=True,
        )
    ]


def compute_losses(
    model: Glip, criterion, batch: Batch, network: nn.Module | None = None, inter_image: bool = False
) -> dict[str, torch.Tensor]:
    """Named, unweighted losses of one batch (the model's forward, then the criterion); ``network`` runs the
    forward when given (``model`` wrapped in ``DistributedDataParallel``); ``inter_image`` adds
    ``loss_token_inter``."""
    outputs = (network or model)(batch.images, batch.input_ids, batch.attention_mask)
    return criterion(
        outputs.token_logits,
        outputs.box_regression,
        outputs.centerness,
        outputs.anchors,
        grounding_targets(batch),
        batch.attention_mask,
        outputs.class_logits if model.head.train_class_logits else None,
        outputs.alignment if inter_image else None,
        batch.input_ids if inter_image else None,
    )


def _saved_text(model: Glip, config: GlipConfig, train_config: TrainConfig) -> bool | list[str]:
    """What of the text encoder a checkpoint holds: the frozen part of a pretrained encoder is not written
    (it is read back from its package at load time)."""
    if config.text.pretrained is None:
        return True
    if train_config.freeze_text:
        return False
    if train_config.text_layers is not None:
        return model.text_encoder.top_layer_prefixes(train_config.text_layers, glip_checkpoint.TEXT_PREFIX)
    return True


def _frozen_text_parts(model: Glip, train_config: TrainConfig) -> list[nn.Module]:
    """The parts of the text encoder that do not train (kept in eval mode: no dropout on fixed features)."""
    encoder = model.text_encoder
    if train_config.freeze_text:
        return [encoder]
    if train_config.text_layers is None:
        return []
    top = encoder.top_layers(train_config.text_layers)
    return [encoder.bert.embeddings, *(layer for layer in encoder.bert.encoder.layer if layer not in top)]


_STAGING = ".saving"
_COMMITTED = "complete"  # written last in the staging folder: the save is whole


def _save(
    run_dir: Path,
    model: Glip,
    config: GlipConfig,
    optimizer,
    scheduler,
    step: int,
    train_config: TrainConfig,
    identity: str,
) -> None:
    """Write checkpoint + state to ``run_dir/.saving``, mark it complete, then move it into place.

    The mark is the commit: killed before it, the previous save stands and the staging folder is dropped;
    killed after it, while the files move, ``_finish_save`` completes the move at the next start. Either
    way the run folder never holds half a save, nor one save's weights with another's optimizer state.
    """
    staging = run_dir / _STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    glip_checkpoint.save(
        model, config, staging / "checkpoint", include_text=_saved_text(model, config, train_config)
    )
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "train_config": json.dumps(asdict(train_config)),
            "identity": identity,
        },
        staging / "train_state.pt",
    )
    (staging / _COMMITTED).touch()
    _finish_save(run_dir)


def _finish_save(run_dir: Path) -> None:
    """Move a committed ``.saving`` into place, or drop an uncommitted one. Idempotent, so a move killed half-way
    is finished by running it again: a staged file still there has not been moved yet (checkpoint first)."""
    staging = run_dir / _STAGING
    if not (staging / _COMMITTED).exists():
        shutil.rmtree(staging, ignore_errors=True)
        return
    if (staging / "checkpoint").exists():
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        os.replace(staging / "checkpoint", run_dir / "checkpoint")
    if (staging / "train_state.pt").exists():
        os.replace(staging / "train_state.pt", run_dir / "train_state.pt")
    shutil.rmtree(staging)


# Options that do not change what a run computes: a run resumes under other values of these.
_RESUMABLE_OPTIONS = ("checkpoint_every", "log_every", "num_workers", "device")


def run_identity(train_config: TrainConfig, sources: Sequence[Source]) -> str:
    """A digest of what a run computes: its training options (but ``_RESUMABLE_OPTIONS``) and its data (every
    record's image file name, boxes, labels, caption, phrases, ignore band; each source's vocabulary, share,
    negatives, weights and paste pool)."""
    options = {k: v for k, v in asdict(train_config).items() if k not in _RESUMABLE_OPTIONS}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())

    def record_key(record: GroundedImage) -> bytes:
        # The image by its file name (a root moved elsewhere still resumes), and everything the loss reads.
        text = (f"{Path(record.image_path).name}|{record.image_range}|{record.labels}|{record.caption}|"
                f"{record.box_spans}|{record.ignore_spans}|{record.unlabelled_spans}|{record.pseudo}|")  # fmt: skip
        boxes = [record.boxes] if record.ignore_boxes is None else [record.boxes, record.ignore_boxes]
        return text.encode() + b"".join(np.round(np.asarray(b, dtype=np.float64), 2).tobytes() for b in boxes)

    for source in sources:
        head = [len(source.records), list(source.names or ()), source.share, list(source.negatives or ())]
        digest.update(json.dumps(head).encode())
        for record in source.records:
            digest.update(record_key(record))
        if source.weights is not None:
            digest.update(np.round(np.asarray(source.weights, dtype=np.float64), 6).tobytes())
        if source.paste is not None:
            pool = source.paste
            digest.update(f"paste|{pool.rate}|{pool.per_image}|".encode())
            pool.instances.update_digest(digest)
            if pool.weights is not None:
                digest.update(np.round(np.asarray(pool.weights, dtype=np.float64), 6).tobytes())
    return digest.hexdigest()[:16]


def _restore(run_dir: Path) -> tuple[Path | None, dict | None]:
    """The run's last save: (checkpoint folder, train state), or (None, None). Call after ``_finish_save``."""
    if (run_dir / "checkpoint").is_dir() and (run_dir / "train_state.pt").is_file():
        return run_dir / "checkpoint", torch.load(run_dir / "train_state.pt", weights_only=True)
    return None, None


def train(
    model_config: GlipConfig,
    train_config: TrainConfig,
    sources: Sequence[Source],
    run_dir: str | Path,
    init_checkpoint: str | Path | None = None,
    stop_at_step: int | None = None,
    on_metrics: Callable[[dict], None] | None = None,
    mirror: Mirror | None = None,
) -> dict:
    """Train (or resume training) a GLIP; returns a summary dict with the last step, losses and speed.

    ``init_checkpoint`` starts a fresh run from given weights (e.g. round k's teacher); it is ignored when
    ``run_dir`` already holds a checkpoint to resume from. ``stop_at_step`` ends early (tests, chaos).
    ``on_metrics`` receives each logged metrics dict, on every rank (e.g. ``ray.train.report``). ``mirror``:
    each save is uploaded there too, and a newer save found there is resumed from (``student.mirror``; then
    ``run_dir`` may be a local folder of each node: each node's local rank 0 brings the save).

    Under ``torch.distributed`` with W > 1 processes (module docstring) every rank calls this with the same
    arguments and ``run_dir`` (storage all ranks see); the losses in the metrics and the summary are the
    global batch's (averaged over ranks), and the summary adds ``rank_weight_spread``, the largest difference
    of any weight between two ranks at the end (0.0: the ranks stayed in step).

    Raises:
        ValueError: ``batch_size`` is not a multiple of W.
    """
    ranks = _Ranks.current()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(train_config.device)
    # A save killed half-way is finished (committed) or dropped, by the one process of each run folder: rank 0,
    # or with a mirror (run folders local to each node) each node's local rank 0, which then brings a newer save.
    if (ranks.rank if mirror is None else int(os.environ.get("LOCAL_RANK", ranks.rank))) == 0:
        _finish_save(run_dir)
        if mirror is not None:
            mirror.pull(run_dir, run_dir / _STAGING, _finish_save)
    if ranks.rank == 0 and mirror is not None:
        mirror.push_if_newer(run_dir)
    if ranks.parallel:
        dist.barrier()  # every rank restores the same save
    resume_from, state = _restore(run_dir)
    identity = run_identity(train_config, sources)
    if state is not None and state.get("identity", identity) != identity:
        raise ValueError(
            f"{run_dir} holds a run of other options or data (identity {state['identity']}, this one "
            f"{identity}; saved at step {state['step']}): train it with what it was started with, or into "
            "another folder"
        )
    if resume_from is not None:
        model, model_config = glip_checkpoint.load(resume_from)
        logger.info("resuming %s from step %d", run_dir, state["step"])
    elif init_checkpoint is not None:
        model, _ = glip_checkpoint.load(init_checkpoint)
    else:
        torch.manual_seed(train_config.seed)
        model = build_model(model_config)
    model.to(device)
    for part in _frozen_text_parts(model, train_config):
        part.requires_grad_(False)
    # Wrapping broadcasts rank 0's weights, a collective: no rank trains (nor saves) before all have restored.
    network = _data_parallel(model, device) if ranks.parallel else None
    criterion = build_criterion(model_config)
    weights = loss_weights(model_config)
    if train_config.inter_image_loss > 0:
        weights["loss_token_inter"] = train_config.inter_image_loss
    class_only_steps = train_config.pyramid_warmup_steps + train_config.class_warmup_steps
    if class_only_steps and "loss_class" not in weights:
        raise ValueError(
            "pyramid_warmup_steps and class_warmup_steps need the classification loss on (loss.weight_class > 0)"
        )
    optimizer = build_optimizer(model, train_config.optim)
    scheduler = build_scheduler(optimizer, train_config.steps, train_config.optim)
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
    stop = min(train_config.steps, stop_at_step if stop_at_step is not None else train_config.steps)
    tokenizer = model.tokenizer()
    builder = BatchBuilder(
        tokenizer,
        model_config.input.min_size,
        model_config.input.max_size,
        model_config.input.train_min_sizes,
        model_config.input.size_divisibility,
        model_config.text.max_query_len,
        model_config.text.pad_to_max,
        train=True,
        pixel_mean=model_config.input.pixel_mean,
        pixel_std=model_config.input.pixel_std,
        pseudo_box_loss=train_config.pseudo_box_loss,
    )
    dataset = StepBatches(
        sources,
        builder,
        tokenizer,
        train_config.batch_size,
        train_config.seed,
        start,
        stop,
        train_config.max_negatives,
        class_matrices(sources, model_config.loss.class_targets, model_config.head.num_legacy_classes)
        if model.head.train_class_logits
        else None,
        class_only_steps if model.head.train_class_logits else 0,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=train_config.num_workers,
        persistent_workers=False,
        prefetch_factor=2 if train_config.num_workers else None,
        # Its own generator: drawing the workers' base seed must not consume the global RNG that dropout and
        # drop-path use, or a resumed run would draw different masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(train_config.seed),
    )
    return _loop(
        model,
        network,
        model_config,
        criterion,
        weights,
        optimizer,
        scheduler,
        loader,
        device,
        run_dir,
        train_config,
        start,
        stop,
        ranks,
        on_metrics,
        identity,
        mirror,
    )


def _loop(
    model,
    network,
    model_config,
    criterion,
    weights,
    optimizer,
    scheduler,
    loader,
    device,
    run_dir,
    train_config,
    start,
    stop,
    ranks,
    on_metrics,
    identity: str,
    mirror: Mirror | None = None,
) -> dict:
    # bf16 autocast on CUDA and on CPUs with native bf16 (~3x faster than fp32 there; the loss stays fp32).
    use_amp = train_config.amp and autocast_supported(device, torch.bfloat16)
    model.train()
    for part in _frozen_text_parts(model, train_config):
        part.eval()  # a frozen encoder gives the same features every time (no dropout)
    metrics_path = run_dir / "metrics.jsonl"
    began, images, last = time.perf_counter(), 0, {}
    progress = tqdm(
        total=stop - start, initial=0, desc="train", unit="step", disable=True if ranks.rank else None
    )
    for step, batch in enumerate(loader, start=start):
        # Dropout / drop-path masks are a function of (seed, step, rank): a resumed run draws what an
        # uninterrupted one does, and two runs of one config agree whatever consumed the RNG before training.
        torch.manual_seed(_rank_seed(train_config.seed, step, ranks.rank))
        batch = batch.to(device)
        class_only = train_config.pyramid_warmup_steps + train_config.class_warmup_steps
        warming_up = step < class_only
        model.head.skip_tower = step < train_config.pyramid_warmup_steps
        model.head.align_only = not warming_up and step < class_only + train_config.alignment_warmup_steps
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            losses = compute_losses(model, criterion, batch, network, train_config.inter_image_loss > 0)
        loss = total_loss(losses, {"loss_class": weights["loss_class"]} if warming_up else weights)
        # Under DDP every rank sees the global batch's values, so a non-finite loss stops all ranks alike.
        values = _mean_over_ranks({"loss": loss, **losses}, ranks)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"step {step}: non-finite loss {values}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.optim.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        images += len(batch.image_sizes) * ranks.world_size
        last = {
            "step": step + 1,
            **values,
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": images / (time.perf_counter() - began),
        }
        progress.update(1)
        if (step + 1) % train_config.log_every == 0 or step + 1 == stop:
            progress.set_postfix(loss=f"{last['loss']:.3f}")
            if ranks.rank == 0:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(last) + "\n")
            if on_metrics is not None:
                on_metrics(last)
        if (step + 1) % train_config.checkpoint_every == 0 or step + 1 == stop:
            if ranks.rank == 0:
                _save(run_dir, model, model_config, optimizer, scheduler, step + 1, train_config, identity)
                if mirror is not None:
                    mirror.push(run_dir, step + 1)
            if ranks.parallel:
                dist.barrier()  # no rank runs on, or ends the run, while the save is half written
    progress.close()
    model.head.align_only = model.head.skip_tower = False
    summary = {**last, "seconds": time.perf_counter() - began, "images": images}
    if ranks.parallel:
        summary["rank_weight_spread"] = _rank_weight_spread(model)
    return summary


@dataclass(frozen=True)
class _Ranks:
    """This process's place in data-parallel training (rank 0 of 1 without ``torch.distributed``)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> _Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def _data_parallel(model: Glip, device: torch.device) -> DistributedDataParallel:
    """``model`` under DDP. It looks for parameters a step leaves unused: the warm-ups (tower skipped, class
    loss alone, token loss into the alignment only) leave different parts of the model without gradient."""
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def _rank_seed(seed: int, step: int, rank: int) -> int:
    """Torch seed of one rank's step (rank 0 in a single process). Under DDP ranks draw different dropout /
    drop-path masks (one shared generator state would repeat a rank's masks on every other rank); the masks
    are a function of (seed, step, rank), so a resumed run draws what an uninterrupted one does."""
    return random.Random(f"{seed}-torch-{step}-{rank}").getrandbits(63)


def _mean_over_ranks(values: dict[str, torch.Tensor], ranks: _Ranks) -> dict[str, float]:
    """0-d tensors as floats, averaged over the ranks under DDP: each rank's losses are its share of the
    global batch's (normalised by the global positives / W), so their mean is the global batch's loss."""
    if not ranks.parallel:
        return {key: value.item() for key, value in values.items()}
    stacked = torch.stack([value.detach().double() for value in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / ranks.world_size).tolist(), strict=True))


def _rank_weight_spread(model: nn.Module) -> float:
    """The largest difference of any parameter value between two ranks (two all-reduces per parameter)."""
    spread = 0.0
    for parameter in model.parameters():
        high, low = parameter.detach().clone(), parameter.detach().clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        spread = max(spread, (high - low).abs().max().item())
    return spread
