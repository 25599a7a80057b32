"""One teacher-student round on an output root whose crawl is ingested (``glip-engine ingest``).

    python -m jobs.round --root demo-out/root --world demo-out/world --round 0
    python -m jobs.round --root demo-out/root --world demo-out/world --round 1    # round 0's promoted model labels
    python -m jobs.round ... --set train.steps=600 --set round.pseudo_share=0.5 --set round.margin=0.02

Round k:
1. labels the crawl with its teacher: ``--teacher``, else round k-1's promoted model (after a round that did not
   promote, its teacher), else for round 0 the shipped one. Phrase tables and label shards already made by the
   same teacher are reused (the stage table's ledger);
2. chooses the keep-threshold on the world's verified sample (``pipeline.calibrate``: the lowest threshold
   whose precision reaches ``round.target_precision``), unless ``round.threshold`` fixes it;
3. trains a student on the human set plus the pseudo-labels kept by the threshold (the verified sample left out)
   and a baseline on the human set alone, from the same initialisation (the round's teacher, or from scratch
   with ``round.from_scratch``), with the same steps, batch size and seed;
4. evaluates teacher, baseline and student on the held-out split (AP, APr, AP50, R@1);
5. promotes the student when it is not worse than the baseline on AP and on APr and better on one of them by at
   least ``round.margin``.

Pseudo-label options. On by default (the recipe measured best on the world, bench/RESULTS.md): copy-paste
(``round.paste=0.5``, ``round.pseudo_share=0``, ``student.paste``): the student trains on the baseline's human
images, into which objects cut out of the pseudo-labelled crawl images are pasted, drawn by what the human set
lacks (``round.paste_repeat``); both runs paste the human set's own objects too (``round.paste_human``: the
baseline gets copy-paste, so the gate measures the pseudo-labels, not the augmentation); each caption phrase's
best box is kept down to 0.35 (``round.phrase_best``); negative phrases for each human grounding caption from the
human set's concept dictionary, in both runs (``round.human_negatives``); LVIS repeat-factor sampling in both runs
(``round.repeat=0.1``); no box regression on pseudo boxes (``train.pseudo_box_loss`` false in the round's training
config). For whole pseudo-labelled images (``round.pseudo_share=none`` or a share): negatives from the
pseudo-labels' concept dictionary (``round.caption_negatives``), an ignore band below the threshold
(``round.ignore_low=0.3``), phrases without a kept box left out of the token loss (``round.unlabelled_phrases``),
``round.pseudo_repeat``. Off by default: ``train.inter_image_loss``, ``round.from_scratch``. A pasting round holds
none of the crawl's records: they are read a shard at a time into the paste pool's columns
(``student.paste.InstanceTable``); a round that draws whole pseudo-labelled images holds them.

Everything lands in ``<root>/rounds/r<k>/``: ``calibration.json``, ``student/`` and ``baseline/`` (training runs,
resumed when the round is run again), ``eval/<model>.json``, ``metrics.json``, ``lineage.json``, ``promoted/``
(the promoted checkpoint: the student, or a copy of the teacher when the student lost) and ``report.html``. A
killed round, run again, continues where it stopped: finished labels, training checkpoints and finished
evaluations are not redone.

The root is a local path (on a cluster, a network filesystem mounted at one path on every node) or an object store
(``s3://bucket/engine`` with ``--storage-option``; not ``memory://``, which the workers do not see). On an object
store the training runs write to a local scratch folder, ``--work`` (default ``~/.cache/glip-engine/rounds/<digest
of the root>``, the same path on every node), and mirror each save to ``rounds/r<k>/<run>/`` (``student.mirror``:
a round started again on another machine resumes from the mirrored saves); the training workers read the crawl's
images from the root by byte range with the root's options; checkpoints named by URL (the teacher,
``rounds/r<k-1>/promoted``) are copied into ``<work>/cache`` (``teacher.fetch``) by the driver and by each label
actor's node; ``promoted/`` is uploaded to the root. ``--world`` stays a local folder on the driver and on every
node that trains (the human set's images are read by path).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glip import checkpoint
from glip.config import GlipConfig
from glip.predictor import GlipPredictor
from jobs import teacher as teacher_job
from jobs._roots import add_root_arguments, layout_from_args, options_for
from jobs._settings import add_set_argument, apply_sets_or_exit
from jobs.evaluate import evaluate_world
from jobs.train import world_sources
from pipeline import graph, storage
from pipeline.calibrate import Calibration, calibrate, verified_truth
from pipeline.exports import Keep, iter_labels, label_shards, read_labels
from pipeline.label import LabelConfig, LabelSettings
from pipeline.layout import Layout
from pipeline.phrases import PhraseConfig
from pipeline.quality import quality
from pipeline.report import write_report
from student.data import (
    GroundedImage,
    concept_dictionary,
    load_coco_detection,
    load_grounding,
    repeat_factors,
)
from student.mirror import Mirror
from student.paste import paste_pool
from student.pseudo import iter_pseudo_labels, load_pseudo_labels
from student.ray_train import train_on_ray
from student.train import Source, TrainConfig, train
from teacher.fetch import cache_folder, is_remote, local_checkpoint
from teacher.teacher import TeacherConfig, teacher_id_of

logger = logging.getLogger("jobs.round")

MODELS = ("teacher", "baseline", "student")


@dataclass(frozen=True)
class RoundConfig:
    """What a round is told beyond the training config (``--set round.KEY=VALUE``).

    Attributes:
        target_precision: calibration picks the lowest threshold whose precision on the verified sample reaches
            this.
        threshold: a fixed keep-threshold (no calibration).
        phrase_best: also keep each caption phrase's best box when it scores above this (below the threshold):
            the caption says the object is there (``pipeline.exports.Keep``); calibration reads with the rule.
        margin: the promotion gate: the student must be better than the baseline on AP or APr by this much,
            and not worse on either.
        gate: ``"baseline"`` (the gate above) or ``"always"`` (every student is promoted: ablations of
            ungated rounds, as the paper ran them).
        from_scratch: student and baseline start from random weights instead of the round's teacher.
        ignore_low: pseudo boxes scoring between this and the threshold become an ignore band (their anchors
            are neither positive nor negative); None: no band.
        unlabelled_phrases: tokens of caption phrases without a kept box are left out of the token loss.
        pseudo_share: the fraction of every student batch drawn from the pseudo-labelled crawl; None: human and
            pseudo images are walked together, in proportion to their numbers; 0 (the default): no
            pseudo-labelled image is drawn whole, the crawl comes in pasted (``paste``) and the student's
            batches are the baseline's images.
        paste: paste pseudo-labelled objects into the student's human images (``student.paste``): the
            probability that an image gets pastes; None: off (then ``pseudo_share`` must not be 0). The objects
            are drawn by the LVIS repeat factors of their concepts against the human set (``paste_repeat``).
        paste_per_image: at most this many objects pasted into one image.
        paste_repeat: the repeat threshold of the paste draws (None: every kept box alike).
        paste_human: both runs paste the human set's own objects too (Simple Copy-Paste): the baseline from
            the human set, the student from the human set and the pseudo-labels, so the gate measures what the
            pseudo-labels add to pasting rather than pasting itself. Without ``paste``, neither run pastes.
        caption_negatives: append negative phrases to each pseudo-labelled caption, drawn from the concept
            dictionary of the pseudo-labels' own phrases (``student.data.concept_dictionary``), as many as a
            detection prompt's (``train.max_negatives``): the student learns what a found object is not, as
            the all-names prompt of the evaluation asks.
        human_negatives: the same for the human-annotated grounding captions, from their own phrases' concept
            dictionary, in both runs (the baseline's human data are the student's, treated alike).
        pseudo_repeat: weight each pseudo-labelled image by its LVIS repeat factor with this threshold, the
            frequencies of its concepts read off the human set (``student.data.repeat_factors``), normalised so
            the pseudo-labels keep their part of the batches: the student sees more of the crawl images that
            show what the human set lacks. None: every pseudo-labelled image alike.
        repeat: LVIS repeat-factor sampling in both runs with this threshold, the concept frequencies read
            off each run's own training set (the baseline's: the human set; the student's: human + pseudo),
            each source normalised to keep its part of the batches (``pseudo_repeat``, when set, weights the
            pseudo-labels instead). None: every image alike.
        eval_limit: evaluate on the first N held-out images only (tests).
        workers: label actors.
        train_workers: Ray Train workers of each training run (DDP when > 1; a GPU each where CUDA is present).
        ray_train: train inside a Ray Train ``TorchTrainer``; off, in this process (the same loop).
    """

    target_precision: float = 0.9
    threshold: float | None = None
    phrase_best: float | None = 0.35
    margin: float = 0.01
    gate: str = "baseline"
    from_scratch: bool = False
    ignore_low: float | None = 0.3
    unlabelled_phrases: bool = True
    pseudo_share: float | None = 0.0
    paste: float | None = 0.5
    paste_per_image: int = 2
    paste_repeat: float | None = 0.1
    paste_human: bool = True
    caption_negatives: bool = True
    human_negatives: bool = True
    pseudo_repeat: float | None = None
    repeat: float | None = 0.1
    eval_limit: int | None = None
    workers: int = 1
    train_workers: int = 1
    ray_train: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.target_precision <= 1 or self.margin < 0:
            raise ValueError("round.target_precision must be in (0, 1] and round.margin >= 0")
        if self.gate not in ("baseline", "always"):
            raise ValueError(f"round.gate must be 'baseline' or 'always', not {self.gate!r}")
        if self.pseudo_share is not None and not 0 <= self.pseudo_share < 1:
            raise ValueError(f"round.pseudo_share must be in [0, 1), not {self.pseudo_share}")
        if self.paste is not None and (not 0 < self.paste <= 1 or self.paste_per_image < 1):
            raise ValueError("round.paste must be in (0, 1] and round.paste_per_image >= 1")
        if self.pseudo_share == 0 and self.paste is None:
            raise ValueError(
                "round.pseudo_share=0 without round.paste: the student would not read the crawl (give "
                "round.pseudo_share=none or a share in (0, 1) to train on whole pseudo-labelled images)"
            )


EXIT_NOTHING_NEW = 3  # the exit status of ``glip-engine round`` when the round would repeat the last one


class NothingNew(RuntimeError):
    """Round k would repeat round k-1: its teacher was kept and no crawl shard was ingested since."""


# Student and baseline continue a trained teacher: a short, gentle schedule (the reference: 300 steps
# of batch 8 at lr 2e-4), the text encoder frozen as the teacher's was.
DEFAULT_TRAIN = TrainConfig(steps=300, batch_size=8, freeze_text=True, max_negatives=12, checkpoint_every=50,
                            optim=dataclasses.replace(TrainConfig().optim, lr=2e-4, warmup_steps=20),
                            pseudo_box_loss=False)  # fmt: skip


def previous_teacher(layout: Layout, number: int) -> tuple[str, str]:
    """The round's default teacher and why: round k-1's promoted student; after a round that did not promote,
    its teacher (kept), unless no crawl shard was ingested since, when the round would repeat round k-1
    (``NothingNew``); for round 0, the shipped teacher. A path, or a URL on an object-store root."""
    if number == 0:
        return str(teacher_job.ASSET), "the shipped teacher (round 0)"
    lineage_path = layout.round(number - 1, "lineage.json")
    if not layout.fs.exists(lineage_path):
        raise FileNotFoundError(
            f"round {number - 1} has not finished ({lineage_path} is missing): run it first"
        )
    lineage = storage.read_json(layout.fs, lineage_path)
    if lineage["promoted"]:
        return layout.url_of(layout.round(number - 1, "promoted")), f"round {number - 1}'s promoted student"
    new = sorted(set(graph.derived(layout, "phrases")) - set(lineage["labels"]["shards"]))
    if not new:
        raise NothingNew(
            f"round {number - 1} kept its teacher ({lineage.get('reason', 'not promoted')}) and no crawl "
            f"shard was ingested since: round {number} would repeat it. Ingest more captions (glip-engine "
            "ingest), or pass --teacher."
        )
    return (
        lineage["teacher"]["checkpoint"],
        f"round {number - 1}'s teacher, kept (its student was not promoted); {len(new)} new crawl shards",
    )


def label(layout: Layout, teacher: TeacherConfig, workers: int) -> LabelSettings:
    """Phrases and labels of every ingested shard not yet labelled by ``teacher``, at the labeling floor."""
    settings = LabelSettings(teacher, LabelConfig())
    for stage, config in (("phrases", PhraseConfig()), ("label", settings)):
        run = graph.run(layout, stage, config, workers=workers, progress=False)
        if run.failed:
            raise RuntimeError(f"{run.stage}: units failed after their retries: {run.failed}")
    return settings


def threshold_of(
    layout: Layout, number: int, settings: LabelSettings, world: Path, config: RoundConfig
) -> dict:
    """The round's keep-threshold: fixed, or calibrated on the verified sample (cached in calibration.json
    for the labels, target, fixed threshold and phrase rule it was chosen with)."""
    path = layout.round(number, "calibration.json")
    asked = {"labels": settings.folder, "target": config.target_precision, "fixed": config.threshold,
             "phrase_best": config.phrase_best}  # fmt: skip
    if layout.fs.exists(path):
        cached = storage.read_json(layout.fs, path)
        if cached.get("asked") == asked:
            return cached
        logger.info(
            "round %d: the keep rule changed (%s -> %s): calibrating again",
            number,
            cached.get("asked"),
            asked,
        )
    manifest = _manifest(world)
    verified = json.loads((world / manifest["files"]["verified_coco"]).read_text())
    if config.threshold is not None:
        chosen = {
            "threshold": config.threshold,
            "how": "fixed (round.threshold)",
            "uids": manifest["verified_uids"],
        }
    else:
        sample = read_labels(layout, settings.folder, uids=verified_truth(verified))  # the sample's rows only
        result: Calibration = calibrate(
            sample, verified, config.target_precision, phrase_best=config.phrase_best
        )
        how = (
            f"calibrated: lowest threshold with precision >= {result.target}"
            if result.met
            else f"calibrated: no threshold reaches precision {result.target}; the most precise one "
            f"({'no box kept' if result.precision is None else f'{result.precision:.3f}'})"
        )
        chosen = {**result.to_dict(), "how": how}
    chosen["asked"] = asked
    storage.write_json(layout.fs, path, chosen)
    return chosen


def human_sources(world: Path, caption_negatives: bool = False) -> list[Source]:
    """The world's human-annotated set: its COCO detection and grounding files; with ``caption_negatives``
    the grounding captions take negatives from the concept dictionary of their own phrases."""
    (detection,), (grounding,) = world_sources(world)
    records, names = load_coco_detection(*_split(detection))
    grounded = load_grounding(*_split(grounding))
    negatives = concept_dictionary(grounded) if caption_negatives else None
    return [Source(records, names), Source(grounded, negatives=negatives)]


def with_repeat_factors(sources: list[Source], threshold: float | None) -> list[Source]:
    """``sources`` with LVIS repeat factors as weights, the concept frequencies read off all of them together
    (a run's whole training set); None: unchanged."""
    if threshold is None:
        return sources
    reference = [(source.records, source.names) for source in sources]
    return [
        dataclasses.replace(source, weights=repeat_factors(source.records, reference, threshold, source.names))
        if source.records else source
        for source in sources
    ]  # fmt: skip


def baseline_sources(human: list[Source], config: RoundConfig) -> list[Source]:
    """What a round's baseline trains on: the human set alone, into which its own objects are pasted with
    ``round.paste_human`` (as into the student's images), weighted by ``round.repeat``'s repeat factors."""
    if config.paste is not None and config.paste_human:
        reference = [(source.records, source.names) for source in human]
        pool = paste_pool(
            [], config.paste, config.paste_per_image, reference, config.paste_repeat, human=reference
        )
        human = [dataclasses.replace(source, paste=pool) for source in human]
    return with_repeat_factors(human, config.repeat)


def _split(argument: str) -> tuple[str, str]:
    json_path, _, root = argument.partition(":")
    return json_path, root


def train_model(layout: Layout, number: int, name: str, model_config: GlipConfig, init: Path | None,
                sources: list[Source], train_config: TrainConfig, config: RoundConfig,
                work: Work | None = None) -> Path:  # fmt: skip
    """Train (or resume) ``rounds/r<k>/<name>`` from ``init`` (None: random weights of ``model_config``), on
    Ray Train unless ``config.ray_train`` is off; returns its final checkpoint (a local folder). On an
    object-store root (``work`` given), the run trains into ``work`` and mirrors its saves to the root
    (``student.mirror``); the final checkpoint is fetched from there."""
    mirror = None
    if work is None:
        run_dir = Path(layout.round(number, name))
    else:
        run_dir = work.folder / "rounds" / f"r{number}" / name
        mirror = Mirror(layout.url_of(layout.round(number, name)), layout.storage_options)
    if config.ray_train:
        use_gpu = torch.cuda.is_available()
        summary = train_on_ray(
            model_config, train_config, sources, run_dir, init, config.train_workers, use_gpu, mirror=mirror
        )
    else:
        summary = train(model_config, train_config, sources, run_dir, init, mirror=mirror)
    logger.info(
        "round %d %s: %s", number, name, {k: v for k, v in summary.items() if not isinstance(v, dict)}
    )
    if mirror is None:
        return run_dir / "checkpoint"
    return local_checkpoint(mirror.checkpoint_url(), layout.storage_options, work.cache)


def evaluate_model(layout: Layout, number: int, name: str, model_path: Path, world: Path,
                   limit: int | None) -> dict[str, float]:  # fmt: skip
    """Held-out metrics of one model (cached in ``eval/<name>.json``); a metric not measured is an error."""
    path = layout.round(number, f"eval/{name}.json")
    if layout.fs.exists(path):
        return storage.read_json(layout.fs, path)
    model, config, _ = checkpoint.load_any(model_path)
    predictor = GlipPredictor(model, config, amp_dtype=torch.bfloat16)
    metrics = evaluate_world(predictor, world, 8, limit).as_dict(strict=True)
    storage.write_json(layout.fs, path, metrics)
    return metrics


def promote(metrics: dict[str, dict[str, float]], margin: float) -> tuple[bool, str]:
    """The gate: not worse than the baseline on AP and APr, better on one of them by ``margin``."""
    student, baseline = metrics["student"], metrics["baseline"]
    gains = {key: student[key] - baseline[key] for key in ("ap", "apr")}
    if min(gains.values()) < 0:
        return (
            False,
            f"the student is worse than the baseline on {[k for k, g in gains.items() if g < 0]}: {gains}",
        )
    if max(gains.values()) < margin:
        return False, f"the student gains less than {margin} on AP and APr: {gains}"
    return True, f"the student beats the baseline: {gains}"


def check_root(layout: Layout) -> None:
    """Raise ValueError for a root that only this process sees (``memory://``): a round's label actors and
    training workers run in other processes."""
    if layout.in_driver_memory:
        raise ValueError(
            f"a round needs a root that its Ray workers see (a local path, a network mount, an object store), "
            f"not {layout.url}: the label actors and training workers run in other processes"
        )


@dataclass(frozen=True)
class Work:
    """A round's local scratch on an object-store root: ``folder`` holds the training runs (their saves are
    mirrored to the root), ``cache`` the checkpoints fetched from the root (``teacher.fetch``). The same local
    path on every node."""

    folder: Path

    @property
    def cache(self) -> str:
        return str(self.folder / "cache")

    @classmethod
    def of(cls, layout: Layout, folder: str | Path | None = None) -> Work:
        """``folder``, else ``<teacher.fetch.cache_folder>/../rounds/<digest of the root's URL>``."""
        if folder is None:
            digest = hashlib.sha256(layout.url.encode()).hexdigest()[:16]
            folder = cache_folder().parent / "rounds" / digest
        return cls(Path(folder).resolve())


def run_round(layout: Layout, world: Path, number: int, teacher: str | Path | None, config: RoundConfig,
              train_config: TrainConfig, work: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) round ``number``; returns its metrics.json content. On an object-store root the
    training runs go to ``work`` (``Work.of``), the round's results to the root."""
    check_root(layout)  # before labelling: such a root would fail only once training starts
    scratch = None if storage.is_local(layout.fs) else Work.of(layout, work)
    if scratch is not None:  # training workers read the crawl's images by URL: with the root's options
        storage.remember_options(layout.url, layout.storage_options)
    teacher, why = (
        (str(teacher), "given (--teacher)") if teacher is not None else previous_teacher(layout, number)
    )
    # Ray Train's workers and the label actors do not share this cwd: every local path absolute.
    if not is_remote(teacher):
        teacher = str(Path(teacher).resolve())
    world = Path(world).resolve()
    teacher_config = TeacherConfig(
        checkpoint=teacher,
        storage_options=options_for(teacher, layout, {}),
        cache=None if scratch is None else scratch.cache,
    )
    settings = label(layout, teacher_config, config.workers)
    local_teacher = teacher_config.local_checkpoint()
    chosen = threshold_of(layout, number, settings, world, config)
    exclude = set(chosen["uids"])
    keep = Keep(chosen["threshold"], config.phrase_best)
    ignore_low = config.ignore_low
    if ignore_low is not None and not ignore_low < keep.floor:  # the threshold fell to the band: no band
        logger.info("round %d: keep rule %s leaves no ignore band above %s", number, keep, ignore_low)
        ignore_low = None
    whole = config.pseudo_share != 0  # whole pseudo-labelled images are drawn: their records are held
    if whole:
        pseudo = load_pseudo_labels(
            layout, settings.folder, keep, exclude, ignore_low, config.unlabelled_phrases
        )
        stream: Iterable[GroundedImage] = pseudo
    else:  # the crawl comes in pasted only (RoundConfig): its objects are held as columns, its records dropped
        pseudo, stream = [], _Counted(iter_pseudo_labels(layout, settings.folder, keep, exclude))
    human = human_sources(world, config.human_negatives)
    concepts = concept_dictionary(pseudo) if config.caption_negatives and whole else None
    reference = [(source.records, source.names) for source in human]
    pasting, pool = human, None
    if config.paste is not None:
        own = reference if config.paste_human else ()
        pool = paste_pool(
            stream, config.paste, config.paste_per_image, reference, config.paste_repeat, human=own
        )
        pasting = [dataclasses.replace(source, paste=pool) for source in human]
        if pool is None or not pool.instances.object_pseudo.any():
            logger.warning("round %d: no pseudo-labelled object to paste under %s", number, keep)
    weights = None
    if config.pseudo_share == 0:  # the crawl comes in pasted only: the student's batches are the baseline's
        student_sources = with_repeat_factors(pasting, config.repeat)
    else:
        crawl = Source(pseudo, share=config.pseudo_share, negatives=concepts)
        student_sources = with_repeat_factors([*pasting, crawl], config.repeat)
        if config.pseudo_repeat is not None and pseudo:
            crawl = dataclasses.replace(
                crawl, weights=repeat_factors(pseudo, reference, config.pseudo_repeat)
            )
            student_sources[-1] = crawl
        weights = student_sources[-1].weights
    init = None if config.from_scratch else local_teacher
    model_config, _ = checkpoint.read_config(local_teacher)
    checkpoints = {
        "teacher": local_teacher,
        "baseline": train_model(
            layout,
            number,
            "baseline",
            model_config,
            init,
            baseline_sources(human, config),
            train_config,
            config,
            scratch,
        ),
        "student": train_model(
            layout, number, "student", model_config, init, student_sources, train_config, config, scratch
        ),  # fmt: skip
    }
    metrics = {name: evaluate_model(layout, number, name, path, world, config.eval_limit)
               for name, path in checkpoints.items()}  # fmt: skip
    pseudo_images = len(pseudo) if whole else stream.count
    promoted, reason = promote(metrics, config.margin)
    if config.gate == "always" and not promoted:
        promoted, reason = True, f"round.gate=always ({reason})"
    _install_promoted(layout, number, checkpoints["student"] if promoted else local_teacher)
    truth = _measured_truth(world, exclude)
    pseudo_quality = None
    if truth is not None:
        shards = (table for _, table in iter_labels(layout, settings.folder, keep))
        pseudo_quality = quality(shards, truth).to_dict()
    document = {"round": number, "models": metrics, "promoted": promoted, "reason": reason,
                "threshold": chosen["threshold"], "pseudo": pseudo_quality, "pseudo_images": pseudo_images}  # fmt: skip
    lineage = _lineage(
        layout, number, teacher, why, settings, chosen, pseudo_images, train_config, config, promoted
    )
    lineage["reason"] = reason
    if concepts is not None:
        lineage["labels"]["negative_concepts"] = len(concepts)
    if weights is not None:
        lineage["labels"]["repeat_factors"] = _factor_summary(weights)
    if pool is not None:
        found = int(pool.instances.object_pseudo.sum())
        weights = pool.weights if pool.weights is not None else [1.0]
        lineage["labels"]["paste"] = {"instances": len(pool.instances), "pseudo_instances": found,
                                      "rate": pool.rate, "per_image": pool.per_image,
                                      "human": config.paste_human} | _factor_summary(weights)  # fmt: skip
    storage.write_json(layout.fs, layout.round(number, "metrics.json"), document)
    storage.write_json(layout.fs, layout.round(number, "lineage.json"), lineage)
    write_report(layout, number, teacher=settings.folder, metrics=metrics, lineage=lineage, threshold=keep,
                 truth=truth)  # fmt: skip
    return document


def _factor_summary(factors: Sequence[float]) -> dict[str, float]:
    """How the repeat factors spread over the pseudo-labelled images (before normalising to a mean of 1)."""
    factors = np.asarray(factors, dtype=np.float64)
    total = float(np.cumsum(factors)[-1])  # summed in order, as the lineage of earlier rounds was
    return {"mean": total / len(factors), "max": float(factors.max()),
            "images_above_1": int((factors > 1).sum())}  # fmt: skip


class _Counted:
    """An iterable's items, counted as they are read (``count``: so far)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.count += 1
            yield item


def _install_promoted(layout: Layout, number: int, source: Path) -> None:
    """Copy the promoted checkpoint to ``rounds/r<k>/promoted`` (atomically: a temporary folder, renamed; on an
    object store file by file, each put whole, and ``lineage.json``, which names it, is written after)."""
    if not storage.is_local(layout.fs):
        for file in sorted(p for p in Path(source).rglob("*") if p.is_file()):
            target = layout.round(number, f"promoted/{file.relative_to(source).as_posix()}")
            storage.put_file(layout.fs, file, target)
        return
    target = Path(layout.round(number, "promoted"))
    staging = target.with_name("promoted.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _measured_truth(world: Path, exclude: set[str]) -> dict[str, Any] | None:
    """The crawl's true boxes but those of ``exclude``: a generated world's ``crawl_truth.json``; None for a
    world without one (a real crawl: the verified sample is all the truth there is)."""
    path = world / "crawl_truth.json"
    if not path.is_file():
        return None
    samples = json.loads(path.read_text())["samples"]
    return {uid: entry for uid, entry in samples.items() if uid not in exclude}


def _lineage(
    layout: Layout, number: int, teacher: str, why: str, settings: LabelSettings, chosen: dict, pseudo_images: int,
    train_config: TrainConfig, config: RoundConfig, promoted: bool,
) -> dict[str, Any]:  # fmt: skip
    return {
        "round": number,
        "parent_round": number - 1 if number > 0 else None,
        "teacher": {"checkpoint": teacher, "teacher_id": teacher_id_of(settings.teacher), "chosen": why},
        "labels": {
            "folder": settings.folder,
            "shards": label_shards(layout, settings.folder),
            "pseudo_images_used": pseudo_images,
        },  # fmt: skip
        "threshold": {k: v for k, v in chosen.items() if k != "uids"}
        | {"verified_images": len(chosen["uids"])},
        "train": dataclasses.asdict(train_config),
        "round_config": dataclasses.asdict(config),
        "promoted": promoted,
        "promoted_checkpoint": layout.url_of(layout.round(number, "promoted")),
    }


def _manifest(world: Path) -> dict[str, Any]:
    return json.loads((world / "world.json").read_text())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine round", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_root_arguments(parser)
    parser.add_argument(
        "--world", required=True, help="the world folder: human set, held-out split, verified sample"
    )
    parser.add_argument("--round", type=int, default=0, dest="number", help="round number k")
    parser.add_argument("--teacher", help="checkpoint folder, a path or an fsspec URL (default: see above)")
    parser.add_argument(
        "--work",
        help="local scratch on an object-store root: training runs, fetched checkpoints (default: see above)",
    )
    add_set_argument(parser, ["round", "train"])
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    layout = layout_from_args(parser, args)
    configs = apply_sets_or_exit(parser, args.sets, {"round": RoundConfig(), "train": DEFAULT_TRAIN})
    try:
        check_root(layout)
    except ValueError as error:
        parser.error(str(error))
    try:
        document = run_round(
            layout, Path(args.world), args.number, args.teacher, configs["round"], configs["train"], args.work
        )
    except NothingNew as stop:
        print(f"glip-engine round: nothing to do: {stop}", file=sys.stderr)
        return EXIT_NOTHING_NEW
    print(json.dumps({k: v for k, v in document.items() if k != "pseudo"}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
