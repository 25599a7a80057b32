"""The measuring half of ``python bench/label_gpu.py run`` (its docstring says what is measured and how).

A module of its own because it imports ``pipeline.label`` (hence webdataset), which on the GPU machine is
importable only once ``label_gpu.py`` has put the carried wheels on ``sys.path``. Nothing here imports Ray or
spaCy: ``pipeline.executor`` imports Ray at module level, so a shard is committed by ``commit_unit``, which
does what ``pipeline.executor.run_and_commit`` does for a stage; and ``bench/label.py`` (which imports the
executor and the phrase stage) is not imported either: what both modes share is in ``bench/_label_parts.py``.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
import transformers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from glip import checkpoint
from glip.config import preset
from glip.fusion import BiAttentionBlock
from glip.model import Glip, build_model
from pipeline import storage
from pipeline.label import LabelConfig, LabelShard
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import error_table
from teacher.teacher import Teacher, TeacherConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _label_parts import TimedTeacher, cpu_model, model_inputs  # noqa: E402

_MIB = 2**20
# Device-timeline events that are waits, not work (as torch._inductor's device-time benchmark skips them).
_DEVICE_WAITS = ("Context Sync", "Stream Sync", "Event Sync", "Stream Wait Event")

Groups = list[tuple[list, list]]


# ---------------------------------------------------------------------------------------------- teacher


def random_teacher(
    preset_name: str,
    folder: Path,
    device: str,
    batch: int,
    overrides: Sequence[str],
    token_bias: float | None,
) -> Teacher:
    """A teacher of ``preset_name`` with random weights (text encoder included, no pretrained download),
    written as a checkpoint folder and loaded back as the label stage loads one. ``token_bias`` replaces
    the head's ``token_bias`` (None: the preset's prior, which scores every box below the label floor)."""
    config = preset(preset_name)
    model = build_model(config, load_pretrained_text=False)
    if token_bias is not None:
        with torch.no_grad():
            model.head.token_bias.fill_(token_bias)
    checkpoint.save(model, config, folder)
    del model  # the teacher loads its own copy
    settings = TeacherConfig(
        checkpoint=str(folder), device=device, batch_size=batch, overrides=tuple(overrides)
    )
    return Teacher.from_checkpoint(settings)


# ------------------------------------------------------------------------------------------------ inputs


def shapes(teacher: Teacher, inputs: dict[str, tuple[int, Groups]]) -> dict:
    """The model's input size (after resizing and padding) and the prompts' token counts."""
    first = next(images[0] for _, groups in inputs.values() for images, _ in groups)
    height, width = teacher.predictor.preprocessor.batch([first]).images.shape[-2:]
    tokenizer, text = teacher.predictor.tokenizer, teacher.model_config.text
    counts = [
        len(tokenizer(prompt.caption)["input_ids"])
        for _, groups in inputs.values()
        for _, prompt_lists in groups
        for prompts in prompt_lists
        for prompt in prompts
    ]
    return {
        "image_size": f"{first.width}x{first.height}",
        "input_size": f"{width}x{height}",
        "prompt_tokens": text.max_query_len if text.pad_to_max else "longest of the batch",
        "prompt_tokens_mean": sum(counts) / len(counts),
        "prompts": len(counts),
    }


# ---------------------------------------------------------------------------------------------- timing


class Timed(NamedTuple):
    """Wall-clock seconds of one call (device work finished) and its result."""

    seconds: float
    result: object


def timed(function: Callable[[], object], device: torch.device) -> Timed:
    synchronize(device)
    began = time.perf_counter()
    result = function()
    synchronize(device)
    return Timed(time.perf_counter() - began, result)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak GPU memory since ``reset_peak_memory``: allocated by tensors and reserved by the allocator."""
    if device.type != "cuda":
        return {"peak_gpu_allocated_mib": None, "peak_gpu_reserved_mib": None}
    return {
        "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated(device) / _MIB,
        "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved(device) / _MIB,
    }


def model_pass(teacher: Teacher, inputs: dict[str, tuple[int, Groups]]) -> None:
    """``label_prompts`` on every group of every shard."""
    for _, groups in inputs.values():
        for images, prompts in groups:
            teacher.label_prompts(images, prompts)


def commit_unit(worker: LabelShard, layout: Layout, shard: str) -> dict:
    """Label ``shard`` and commit it as ``pipeline.executor.run_and_commit`` commits a stage's unit: the error
    table, then the ledger entry (``LabelShard`` has no ``after_commit``); returns the entry."""
    output = worker(layout, shard)
    stage = worker.stage
    storage.write_parquet(layout.fs, layout.errors(stage, shard), error_table(output.errors, stage))
    return Ledger(layout, stage).record(shard, output.stats)


# ------------------------------------------------------------------------------------------------ figures


def label_figures(
    teacher: Teacher, root: str, inputs: dict[str, tuple[int, Groups]], rounds: int
) -> tuple[dict, Callable[[], list[dict]]]:
    """img/s end to end and model only, ``rounds`` passes each in alternating order after one untimed pass
    each; returns the figures and the end-to-end pass (for the profiled one)."""
    device = teacher.device
    clock = TimedTeacher(teacher)
    stage = LabelShard(clock, LabelConfig())
    layout = Layout(root)
    stage.prepare(layout)

    def end_to_end() -> list[dict]:
        return [commit_unit(stage, layout, shard) for shard in inputs]

    def model_only() -> None:
        model_pass(teacher, inputs)

    model_only()  # first calls: kernels chosen, allocator grown, files in the page cache
    end_to_end()
    clock.seconds = 0.0
    reset_peak_memory(device)
    e2e, model = [], []
    for index in range(rounds):
        first_e2e = index % 2 == 0
        for run_e2e in (first_e2e, not first_e2e):
            if run_e2e:
                e2e.append(timed(end_to_end, device))
            else:
                model.append(timed(model_only, device))
    images = sum(count for count, _ in inputs.values())
    entries = e2e[-1].result
    labelled = [sum(entry["images"] for entry in t.result) for t in e2e]
    if labelled != [images] * rounds:
        raise RuntimeError(f"end to end labelled {labelled} images per pass, the shards hold {images}")
    e2e_best, model_best = min(t.seconds for t in e2e), min(t.seconds for t in model)
    figures = {
        "images": images,
        "labelled_images": labelled[-1],
        "e2e_errors": sum(entry["errors"] for entry in entries),
        "boxes_per_image": sum(entry["boxes"] for entry in entries) / images,
        "e2e_images_per_s": images / e2e_best,
        "model_images_per_s": images / model_best,
        "e2e_over_model": model_best / e2e_best,
        "e2e_pass_s": [t.seconds for t in e2e],
        "model_pass_s": [t.seconds for t in model],
        "model_share_of_e2e": clock.seconds / sum(t.seconds for t in e2e),
        **peak_memory(device),
    }
    return figures, end_to_end


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (``(start, end)``, any order, overlaps counted once)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        covered += end - max(start, reach)
        reach = end
    return covered


def device_intervals(events) -> list[tuple[float, float]]:
    """``(start, end)`` in microseconds of the device work among profiler events: kernels, memcpy and memset
    on a CUDA device; waits (syncs) and user annotations left out."""
    intervals = []
    for event in events:
        if event.device_type != DeviceType.CUDA or event.name.startswith(_DEVICE_WAITS):
            continue
        annotation = getattr(event, "activity_type", None) == "gpu_user_annotation"
        if annotation or getattr(event, "is_user_annotation", False):
            continue
        intervals.append((event.time_range.start, event.time_range.end))
    return intervals


def busy_figures(pass_function: Callable[[], object], device: torch.device) -> dict:
    """One pass under ``torch.profiler`` (CUDA activity only): device-busy time over wall time."""
    if device.type != "cuda":
        return {"gpu_busy_fraction": None, "gpu_kernel_sum_fraction": None, "profiled_pass_s": None}
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        took = timed(pass_function, device)
    intervals = device_intervals(profiler.events())
    busy_s = union_length(intervals) / 1e6
    return {
        "gpu_busy_fraction": busy_s / took.seconds,
        "gpu_kernel_sum_fraction": sum(end - start for start, end in intervals) / 1e6 / took.seconds,
        "gpu_activities": len(intervals),
        "profiled_pass_s": took.seconds,
    }


@contextlib.contextmanager
def variant(model: Glip, step: str, device: torch.device) -> Iterator[str | None]:
    """``model`` as ``step`` says inside the block (``eager`` / ``sdpa``, then ``+compile_head``,
    ``+channels_last``), as built again after it; yields a note of what was not applied, or None."""
    base, *modifiers = step.split("+")
    blocks = [module for module in model.modules() if isinstance(module, BiAttentionBlock)]
    switchable = bool(blocks) and all(hasattr(block, "sdpa") for block in blocks)
    as_built = [block.sdpa for block in blocks] if switchable else []
    head, notes = model.head, []
    if switchable:
        for block in blocks:
            block.sdpa = base == "sdpa"
    else:
        notes.append("BiAttentionBlock has no sdpa switch: fusion as built")
    compiled = "compile_head" in modifiers and device.type == "cuda"
    if compiled:
        model.head = torch.compile(head)
    elif "compile_head" in modifiers:
        notes.append("compile_head skipped on CPU")
    if "channels_last" in modifiers:
        model.to(memory_format=torch.channels_last)
    try:
        yield "; ".join(notes) or None
    finally:
        model.head = head
        if "channels_last" in modifiers:
            model.to(memory_format=torch.contiguous_format)
        for block, value in zip(blocks, as_built):
            block.sdpa = value
        if compiled:
            torch._dynamo.reset()


def step_figures(
    teacher: Teacher, inputs: dict[str, tuple[int, Groups]], steps: Sequence[str], rounds: int
) -> list[dict]:
    """Model-only img/s of each step (best of ``rounds`` passes after an untimed one), its warm-up seconds and
    peak memory. A step that raises is reported with its error and the next one runs: the device time is
    one shot, and the figures measured so far are worth keeping."""
    device, images = teacher.device, sum(count for count, _ in inputs.values())
    rows = []
    for step in steps:
        row: dict = {"step": step}
        try:
            with variant(teacher.predictor.model, step, device) as note:
                reset_peak_memory(device)
                warmup = timed(lambda: model_pass(teacher, inputs), device).seconds
                best = min(timed(lambda: model_pass(teacher, inputs), device).seconds for _ in range(rounds))
                row |= {
                    "images_per_s": images / best,
                    "warmup_s": warmup,
                    "note": note,
                    **peak_memory(device),
                }
        except Exception as error:  # reported in the figures (see the docstring)
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        print(f"step {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def environment(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def measure(args, manifest: dict) -> dict:
    """Every figure of ``run``: teacher, inputs, end to end against model only, busy fraction, steps."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-label-gpu-") as work:
        root = str(Path(work) / "root")
        shutil.copytree(Path(args.data) / "root", root)
        folder = Path(work) / f"{args.preset}-random"
        teacher = random_teacher(args.preset, folder, args.device, args.batch, args.override, args.token_bias)
        inputs = {shard: model_inputs(root, shard, teacher) for shard in manifest["shards"]}
        figures, end_to_end = label_figures(teacher, root, inputs, args.rounds)
        print(f"label {figures}", file=sys.stderr, flush=True)
        try:
            figures |= busy_figures(end_to_end, teacher.device)
        except Exception as error:  # as a failing step (step_figures): reported, and the steps still run
            figures["gpu_busy_error"] = f"{type(error).__name__}: {error}"[:500]
        steps = step_figures(teacher, inputs, args.steps, args.rounds)
    return {
        **environment(teacher.device),
        "preset": args.preset,
        "teacher": teacher.teacher_id,
        "precision": teacher.precision,
        "batch": teacher.batch_size,
        "label_batch_size": LabelConfig().batch_size,
        "rounds": args.rounds,
        "shards": len(manifest["shards"]),
        "overrides": list(args.override),
        "token_bias": args.token_bias,
        **shapes(teacher, inputs),
        **figures,
        "steps": steps,
    }
