"""The measuring half of ``python bench/label_gpu.py run`` (its docstring says what is measured and how).

A module of its own because it imports ``pipeline.label`` (hence webdataset), which on the GPU machine is
importable only once ``label_gpu.py`` has put the carried wheels on ``sys.path``. Nothing here imports Ray or
spaCy: ``pipeline.executor`` imports Ray at module level, so a shard is committed by ``commit_unit``, which
does what ``pipeline.executor.run_and_commit`` does for a stage; and ``bench/label.py`` (which imports the
executor and the phrase stage) is not imported either: what both modes share is in ``bench/_label_parts.py``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
import torchvision
import transformers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from glip import checkpoint
from glip.config import preset
from glip.fusion import BiAttentionBlock
from glip.model import build_model
from glip.postprocess import PhraseDetections
from glip.preprocess import to_bgr_uint8
from glip.prompts import tokenize_prompts
from pipeline import storage, tars
from pipeline.images import simplejpeg
from pipeline.label import LabelConfig, LabelShard, decode_bgr
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import error_table, url_uid
from teacher.teacher import DEFAULT_SIZE_BUCKET, DEFAULT_TOKEN_BUCKET, Teacher, TeacherConfig, _phrase_boxes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _label_parts import TimedTeacher, cpu_model, model_inputs  # noqa: E402

_MIB = 2**20
# Device-timeline events that are waits, not work (as torch._inductor's device-time benchmark skips them).
_DEVICE_WAITS = ("Context Sync", "Stream Sync", "Event Sync", "Stream Wait Event")

Groups = list[tuple[list, list]]


# ---------------------------------------------------------------------------------------------- teacher


def random_checkpoint(preset_name: str, folder: Path, token_bias: float | None) -> Path:
    """A checkpoint folder of ``preset_name`` with random weights (text encoder included, no pretrained
    download). ``token_bias`` replaces the head's ``token_bias`` (None: the preset's prior, which scores every
    box below the label floor)."""
    config = preset(preset_name)
    model = build_model(config, load_pretrained_text=False)
    if token_bias is not None:
        with torch.no_grad():
            model.head.token_bias.fill_(token_bias)
    checkpoint.save(model, config, folder)
    return folder


def freeze_heap() -> None:
    """What a label actor does once its teacher is loaded (``pipeline.executor.freeze_heap``, which this module
    cannot import: the executor imports Ray): one full collection, then everything alive is frozen out of the
    collector's sight, so that its full passes do not rescan the libraries and the model during the passes."""
    gc.collect()
    gc.freeze()


def load_teacher(folder: Path, device: str, batch: int, overrides: Sequence[str], **settings) -> Teacher:
    """The checkpoint loaded as the label stage loads one; ``settings``: ``TeacherConfig`` fields (``deform``,
    ``compile``, ``size_bucket``; their defaults are the teacher's own: on CUDA torchvision's deformable conv
    with TF32 products, the compiled head and CUDA graphs)."""
    config = TeacherConfig(
        checkpoint=str(folder), device=device, batch_size=batch, overrides=tuple(overrides), **settings
    )
    return Teacher.from_checkpoint(config)


# ------------------------------------------------------------------------------------------------ inputs


def repeated_root(root: str, shards: Sequence[str], times: int) -> None:
    """Rewrite every shard of ``root`` as ``times`` copies of its samples, each copy under new keys, URLs and
    uids (``<url>&repeat=<copy>``; its phrase table rows copied with them), so that the ~40 MiB a device call
    carries make shards nearer the 10,000 images of a real one: a shard's fixed costs (opening it, the first
    decodes, writing its outputs) then weigh on the end-to-end figures as little as they would there."""
    layout = Layout(root)
    for shard in shards:
        images = storage.read_parquet(layout.fs, layout.image_shard(shard, ".parquet"))
        phrases = storage.read_parquet(layout.fs, layout.phrase_table(shard))
        samples = [
            s for s in tars.iter_samples(layout.fs, layout.image_shard(shard, ".tar")) if isinstance(s, dict)
        ]
        phrase_rows = {row["uid"]: row for row in phrases.to_pylist()}
        rows, copied_phrases, members = [], [], []
        for copy in range(times):
            names = {}
            for row in images.to_pylist():
                url = f"{row['url']}&repeat={copy}"
                names[row["key"]] = (f"{copy:03d}{row['key']}", url_uid(url), url)
                key, uid, _ = names[row["key"]]
                rows.append(row | {"key": key, "uid": uid, "url": url})
                if row["uid"] in phrase_rows:
                    copied_phrases.append(phrase_rows[row["uid"]] | {"uid": uid})
            for sample in samples:
                key, uid, url = names[sample["__key__"]]
                kept = {name: value for name, value in sample.items() if not name.startswith("_")}
                members.append(kept | {"__key__": key, "json": json.dumps({"uid": uid, "url": url}).encode()})
        tars.write_samples(layout.fs, layout.image_shard(shard, ".tar"), members)
        storage.write_parquet(
            layout.fs, layout.image_shard(shard, ".parquet"), pa.Table.from_pylist(rows, schema=images.schema)
        )
        storage.write_parquet(
            layout.fs, layout.phrase_table(shard), pa.Table.from_pylist(copied_phrases, schema=phrases.schema)
        )


def shapes(teacher: Teacher, inputs: dict[str, tuple[int, Groups]]) -> dict:
    """The model's input size (after resizing and padding) and the prompts' token counts."""
    first = next(images[0] for _, groups in inputs.values() for images, _ in groups)
    height, width = teacher.predictor.preprocessor.batch([first], device="cpu").images.shape[-2:]
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
        "prompt_tokens": (
            text.max_query_len
            if text.pad_to_max
            else f"bucketed by {teacher.token_bucket}"
            if teacher.token_bucket
            else "longest of the batch"
        ),
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


def streamed_model_pass(teacher: Teacher, inputs: dict[str, tuple[int, Groups]]) -> None:
    """``label_prompts`` once a shard, on all its groups' images: the teacher keeps ``in_flight`` batches
    submitted, so converting the next batch's images overlaps the device's work on the last (one call per
    group, as ``model_pass``, leaves the device idle while the host converts and post-processes)."""
    for _, groups in inputs.values():
        teacher.label_prompts(
            [i for images, _ in groups for i in images], [p for _, ps in groups for p in ps]
        )


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
    each, then one end-to-end pass of each variant (``E2E_VARIANTS``); returns the figures and the end-to-end
    pass (for the profiled one)."""
    device = teacher.device
    clock = TimedTeacher(teacher)
    layout = Layout(root)
    stages = {name: LabelShard(clock, LabelConfig(**config)) for name, (config, _) in E2E_VARIANTS.items()}
    stage = stages["default"]
    stage.prepare(layout)

    def end_to_end(name: str = "default") -> list[dict]:
        clock.in_flight = E2E_VARIANTS[name][1] or teacher.in_flight
        return [commit_unit(stages[name], layout, shard) for shard in inputs]

    def model_only() -> None:
        model_pass(teacher, inputs)

    warmup = timed(model_only, device).seconds  # first calls: compiled, kernels chosen, allocator grown
    end_to_end()  # and the files in the page cache
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
        "model_warmup_s": warmup,
        "in_flight": teacher.in_flight,
        "decode_workers": LabelConfig().decode_workers,
        **peak_memory(device),
    }
    figures["model_streamed_images_per_s"] = (
        images / timed(lambda: streamed_model_pass(teacher, inputs), device).seconds
    )
    variants = {}
    for name in E2E_VARIANTS:
        if name != "default":
            variants[name] = images / timed(lambda name=name: end_to_end(name), device).seconds
    figures["e2e_variants_images_per_s"] = variants
    return figures, end_to_end


# The end-to-end variants: LabelConfig fields, and the batches kept in flight (None: the teacher's own).
E2E_VARIANTS = {
    "default": ({}, None),
    "one_decode_thread": ({"decode_workers": 1}, None),
    "one_batch_in_flight": ({}, 1),
}


class _NoModel(TimedTeacher):
    """The teacher for ``LabelShard`` with its forward pass taken out: prompts and batch keys as the teacher's,
    no boxes. The stage over it runs everything but the model: what the host side alone can feed."""

    def submit(self, images: list, prompts: list) -> int:
        return len(images)

    def collect(self, pending: int) -> list:
        return [[] for _ in range(pending)]


def host_only_figures(teacher: Teacher, root: str, shards: Sequence[str]) -> dict:
    """img/s of the label stage with no forward pass (``_NoModel``; its own output folder), best of two passes
    after a warm one: reading, decoding in the stage's pool, prompts, batching, writing, committing."""
    stage = LabelShard(_NoModel(teacher), LabelConfig(teacher="host-only"))
    layout = Layout(root)
    stage.prepare(layout)
    images = 0
    for shard in shards:  # warm: threads, page cache
        images += commit_unit(stage, layout, shard)["images"]
    best = min(timed(lambda: [commit_unit(stage, layout, s) for s in shards], torch.device("cpu")).seconds
               for _ in range(2))  # fmt: skip
    return {"host_only_images_per_s": images / best}


class SimulatedDevice(TimedTeacher):
    """The teacher for ``LabelShard`` with its forward pass run by a simulated device of ``images_per_s``: one
    worker thread takes the submitted batches in order and sleeps ``batch_size / images_per_s`` seconds a batch
    (a GPU pads every batch to ``batch_size``; the GIL is free meanwhile, as while a GPU computes), then its
    boxes are ready. Around it, the host work that ``GlipPredictor`` does on CUDA: in ``submit`` each image
    made a tensor and copied once into staging memory (its pinned copy) and the prompts tokenized; in
    ``collect`` ``boxes`` detections a pair (random, fixed: scores 0.3-0.7, the label floor's side of 0.5)
    made ``PhraseBox`` es as ``Teacher.collect`` makes them. So the stage around it (reading, decoding in its
    pool, batching, filters, writing, committing) meets the device it would feed, and the device's busy
    fraction says whether the host keeps up: what a GPU's would be if the model took exactly that long."""

    def __init__(self, teacher: Teacher, images_per_s: float, boxes: int, seed: int = 0) -> None:
        super().__init__(teacher)
        self.in_flight = 2  # as on CUDA
        self.images_per_s = images_per_s
        generator = torch.Generator().manual_seed(seed)
        corner = torch.rand(boxes, 2, generator=generator) * 1000
        size = 8 + torch.rand(boxes, 2, generator=generator) * 300
        self._boxes = torch.cat([corner, corner + size], 1)
        self._scores = 0.3 + 0.4 * torch.rand(boxes, generator=generator)
        self._phrases = torch.arange(boxes)
        self._staging = np.empty(0, dtype=np.uint8)
        self._queue: queue.Queue = queue.Queue()
        self.intervals: list[tuple[float, float]] = []
        self._worker = threading.Thread(target=self._run, name="simulated-device", daemon=True)
        self._worker.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            seconds, done = item
            began = time.perf_counter()
            time.sleep(seconds)
            self.intervals.append((began, time.perf_counter()))
            done.set()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def submit(self, images: list, prompts: list):
        began = time.perf_counter()
        for image in images:
            pixels = to_bgr_uint8(image).permute(1, 2, 0).numpy().reshape(-1)
            if self._staging.size < pixels.size:
                self._staging = np.empty(pixels.size, dtype=np.uint8)
            np.copyto(self._staging[: pixels.size], pixels)
        predictor = self.teacher.predictor
        text = predictor.config.text
        tokenize_prompts(
            predictor.tokenizer, prompts, text.max_query_len, text.pad_to_max, predictor.token_bucket
        )
        done = threading.Event()
        self._queue.put((max(len(images), self.batch_size) / self.images_per_s, done))
        self.seconds += time.perf_counter() - began
        return done, [prompt.phrase_ids for prompt in prompts]

    def collect(self, pending) -> list:
        began = time.perf_counter()
        done, phrase_ids = pending
        done.wait()
        found = [
            _phrase_boxes(PhraseDetections(self._boxes, self._scores, self._phrases % len(ids)), ids)
            for ids in phrase_ids
        ]
        self.seconds += time.perf_counter() - began
        return found


class _Collections:
    """The garbage collector's pauses while open (``gc.callbacks``): their count, sum and longest, and the
    full (generation 2) collections among them."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._began = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._began))

    def __enter__(self) -> _Collections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)

    def figures(self) -> dict:
        full = [seconds for generation, seconds in self.pauses if generation == 2]
        return {
            "gc_pauses": len(self.pauses),
            "gc_seconds": sum(seconds for _, seconds in self.pauses),
            "gc_longest_s": max((seconds for _, seconds in self.pauses), default=0.0),
            "gc_full_collections": len(full),
        }


def feed_figures(
    teacher: Teacher, root: str, shards: Sequence[str], rates: Sequence[float], boxes: int, passes: int = 2
) -> dict:
    """For each device rate: the label stage over ``SimulatedDevice`` (decoding in threads, as on a GPU; its own
    output folder), ``passes`` passes after a warm one, the best kept: img/s, the device's busy fraction (its
    sleeping over the pass's wall time) and its three longest idle gaps, the model's share of the stage's thread
    (inside ``submit`` and ``collect``) and the collector's pauses in that pass."""
    layout = Layout(root)
    figures = {}
    for rate in rates:
        device = SimulatedDevice(teacher, rate, boxes)
        stage = LabelShard(device, LabelConfig(decode="thread", teacher=f"feed-{rate:g}"))
        stage.prepare(layout)
        try:
            for shard in shards:  # warm: threads, page cache, first writes
                commit_unit(stage, layout, shard)
            best = None
            for _ in range(passes):
                device.intervals.clear()
                device.seconds = 0.0
                with _Collections() as collections:
                    began = time.perf_counter()
                    images = sum(commit_unit(stage, layout, shard)["images"] for shard in shards)
                    ended = time.perf_counter()
                wall = ended - began
                inside = [(max(a, began), min(b, ended)) for a, b in device.intervals]
                row = {
                    "images_per_s": images / wall,
                    "busy": union_length(inside) / wall,
                    "longest_idle_s": idle_gaps(inside)[:3],
                    "model_share": device.seconds / wall,
                    **collections.figures(),
                }
                if best is None or row["images_per_s"] > best["images_per_s"]:
                    best = row
        finally:
            device.close()
        figures[f"{rate:g}"] = best
    return {"feed": figures, "feed_boxes_per_pair": boxes, "feed_images": images}


def decode_figures(root: str, shards: Sequence[str], device: torch.device) -> dict:
    """Decoding img/s of the shards' JPEGs: ``decode_bgr`` (the BGR array the teacher takes) in a
    pool of 1, 4 and 8 threads, and, on CUDA, ``torchvision.io.decode_jpeg`` on the GPU in batches of 16 (the
    RGB tensor on the device; not used by the label stage: the figure that would choose it)."""
    layout = Layout(root)
    jpegs = [
        sample["jpg"]
        for shard in shards
        for sample in tars.iter_samples(layout.fs, layout.image_shard(shard, ".tar"), suffixes={"jpg"})
    ]
    figures = {"decode_images": len(jpegs)}
    for threads in (1, 4, 8):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode_bgr, jpegs[: 2 * threads]))  # threads started
            began = time.perf_counter()
            list(pool.map(decode_bgr, jpegs))
            figures[f"cpu_decode_{threads}_threads_images_per_s"] = len(jpegs) / (time.perf_counter() - began)
    if device.type == "cuda":
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        batches = [data[i : i + 16] for i in range(0, len(data), 16)]
        torchvision.io.decode_jpeg(batches[0], device=device)
        took = timed(lambda: [torchvision.io.decode_jpeg(b, device=device) for b in batches], device)
        figures["gpu_decode_images_per_s"] = len(jpegs) / took.seconds
    return figures


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


def busy_figures(pass_function: Callable[[], object], device: torch.device, out: Path | None = None) -> dict:
    """One pass under ``torch.profiler`` (CUDA activity only): device-busy time over wall time, and the
    longest idle gaps between device activities; its kernel table goes to ``out/kernels_e2e.txt``."""
    if device.type != "cuda":
        return {"gpu_busy_fraction": None, "gpu_kernel_sum_fraction": None, "profiled_pass_s": None}
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        took = timed(pass_function, device)
    intervals = device_intervals(profiler.events())
    busy_s = union_length(intervals) / 1e6
    if out is not None:
        (out / "kernels_e2e.txt").write_text(kernel_rows(profiler))
    return {
        "gpu_busy_fraction": busy_s / took.seconds,
        "gpu_kernel_sum_fraction": sum(end - start for start, end in intervals) / 1e6 / took.seconds,
        "gpu_activities": len(intervals),
        "gpu_idle_gaps_ms": [gap / 1e3 for gap in idle_gaps(intervals)[:8]],
        "profiled_pass_s": took.seconds,
    }


def idle_gaps(intervals: Sequence[tuple[float, float]]) -> list[float]:
    """The gaps between the union of ``intervals`` (same unit), longest first."""
    gaps, reach = [], None
    for start, end in sorted(intervals):
        if reach is not None and start > reach:
            gaps.append(start - reach)
        reach = end if reach is None else max(reach, end)
    return sorted(gaps, reverse=True)


def kernel_rows(profiler, rows: int = 150) -> str:
    return profiler.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=160
    )


def step_settings(step: str, batch: int, device: torch.device) -> tuple[dict, bool, bool, list[str]]:
    """``(TeacherConfig fields, fused attention, channels-last, notes)`` of a step such as
    ``sdpa+gather+compile_head+b32`` (see ``label_gpu.py``'s docstring); compiling and CUDA graphs are skipped
    on CPU."""
    base, *modifiers = step.split("+")
    compiled = (
        "backbone+head" if "compile_all" in modifiers else "head" if "compile_head" in modifiers else "off"
    )
    notes = []
    if compiled != "off" and device.type != "cuda":
        notes.append("compiling skipped on CPU")
        compiled = "off"
    graphs = "graphs" in modifiers
    if graphs and device.type != "cuda":
        notes.append("CUDA graphs skipped on CPU")
        graphs = False
    sizes = [int(m[1:]) for m in modifiers if m[0] == "b" and m[1:].isdigit()]
    tokens = [int(m[1:]) for m in modifiers if m[0] == "t" and m[1:].isdigit()]
    settings = {
        "deform": "gather" if "gather" in modifiers else "torchvision",
        "compile": compiled,
        "tf32": "on" if "tf32" in modifiers else "off",
        "cuda_graphs": graphs,
        "batch_size": sizes[-1] if sizes else batch,
    }
    if tokens:
        settings["token_bucket"] = tokens[-1]
    return settings, base == "sdpa", "channels_last" in modifiers, notes


def step_figures(
    folder: Path, args, inputs: dict[str, tuple[int, Groups]], steps: Sequence[str], known: dict[str, dict]
) -> list[dict]:
    """Model-only img/s of each step (best of ``--step-rounds`` passes after an untimed one, which compiles),
    on a teacher loaded for it, its warm-up seconds and peak memory. A step already measured (``known``, e.g.
    the teacher's own settings) is not run again. A step that raises is reported with its error and the next
    one runs: the device time is one shot, and the figures measured so far are worth keeping."""
    device = torch.device(args.device)
    rows = []
    for step in steps:
        row: dict = {"step": step}
        try:
            settings, fused, channels_last, notes = step_settings(step, args.batch, device)
            key = json.dumps([settings, fused, channels_last], sort_keys=True)
            if key in known:
                row |= known[key] | {"note": "the end-to-end teacher's figures"}
            else:
                row |= measure_step(folder, args, inputs, settings, fused, channels_last)
                row["note"] = "; ".join(notes) or None
                release(device)
        except Exception as error:  # reported in the figures (see the docstring)
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        print(f"step {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def measure_step(
    folder: Path,
    args,
    inputs: dict[str, tuple[int, Groups]],
    settings: dict,
    fused: bool,
    channels_last: bool,
) -> dict:
    """One step's figures on a teacher loaded for it (dropped on return)."""
    device, images = torch.device(args.device), sum(count for count, _ in inputs.values())
    teacher = step_teacher(folder, args, settings, fused, channels_last)
    batch = teacher.batch_size
    reset_peak_memory(device)
    warmup = timed(lambda: model_pass(teacher, inputs), device).seconds
    passes = [timed(lambda: model_pass(teacher, inputs), device).seconds for _ in range(args.step_rounds)]
    return {"images_per_s": images / min(passes), "warmup_s": warmup, "batch": batch, **peak_memory(device)}


def step_teacher(folder: Path, args, settings: dict, fused: bool, channels_last: bool) -> Teacher:
    """A teacher loaded with a step's settings (``step_settings``)."""
    settings = dict(settings)
    batch = settings.pop("batch_size")
    teacher = load_teacher(folder, args.device, batch, args.override, **settings)
    model = teacher.predictor.model
    for block in model.modules():
        if isinstance(block, BiAttentionBlock):
            block.sdpa = fused
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return teacher


def teacher_step_key(teacher: Teacher) -> str:
    """``step_figures``' key of the teacher's own settings."""
    model = teacher.predictor.model
    fused = all(block.sdpa for block in model.modules() if isinstance(block, BiAttentionBlock))
    settings = {
        "deform": teacher.deform,
        "compile": teacher.compiled,
        "tf32": "on" if teacher.tf32 else "off",
        "cuda_graphs": teacher.cuda_graphs,
        "batch_size": teacher.batch_size,
    }
    if teacher.size_bucket and teacher.token_bucket != DEFAULT_TOKEN_BUCKET:  # as a step's +tN
        settings["token_bucket"] = teacher.token_bucket
    channels_last = any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )
    return json.dumps([settings, fused, channels_last], sort_keys=True)


def release(device: torch.device) -> None:
    """Give a dropped teacher's memory and compiled graphs back before the next step."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kernel_table(function: Callable[[], object], device: torch.device) -> str | None:
    """The CUDA kernels of one call of ``function`` by total device time (``torch.profiler``), as text."""
    if device.type != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        timed(function, device)
    return kernel_rows(profiler)


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
        "jpeg_decoder": f"simplejpeg {simplejpeg.__version__}" if simplejpeg else "PIL (no simplejpeg)",
    }


def measure(args, manifest: dict) -> dict:
    """Every figure of ``run``: teacher, inputs, end to end against model only, busy fraction, decoding,
    steps. Figure groups are printed to stderr as they are measured, and kernel tables written to
    ``$OUT`` (when set), so that a run cut short still leaves what it measured."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-label-gpu-") as work:
        root = str(Path(work) / "root")
        shutil.copytree(Path(args.data) / "root", root)
        if args.repeat > 1:
            repeated_root(root, manifest["shards"], args.repeat)
        folder = random_checkpoint(args.preset, Path(work) / f"{args.preset}-random", args.token_bias)
        about, figures, known, inputs = teacher_figures(folder, root, args, manifest, out)
        release(device)
        steps = step_figures(folder, args, inputs, args.steps, known)
    return {
        **about,
        "label_batch_size": LabelConfig().batch_size,
        "rounds": args.rounds,
        "shards": len(manifest["shards"]),
        "repeat": args.repeat,
        "overrides": list(args.override),
        "token_bias": args.token_bias,
        **figures,
        "steps": steps,
    }


def feed(args, manifest: dict) -> dict:
    """``feed``: the label stage over simulated devices (``feed_figures``), on a copy of DIR's root, with a
    teacher of ``--preset`` on the CPU for prompts and batch keys (its size bucket the graphed teacher's)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-label-feed-") as work:
        root = str(Path(work) / "root")
        shutil.copytree(Path(args.data) / "root", root)
        if args.repeat > 1:
            repeated_root(root, manifest["shards"], args.repeat)
        folder = random_checkpoint(args.preset, Path(work) / f"{args.preset}-random", None)
        teacher = load_teacher(folder, "cpu", args.batch, [], size_bucket=DEFAULT_SIZE_BUCKET)
        freeze_heap()
        figures = feed_figures(teacher, root, manifest["shards"], args.rates, args.boxes)
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jpeg_decoder": f"simplejpeg {simplejpeg.__version__}" if simplejpeg else "PIL",
        "image_size": manifest["image_size"],
        "repeat": args.repeat,
        "batch": args.batch,
        "decode_workers": LabelConfig().decode_workers,
        **figures,
    }


def teacher_figures(folder: Path, root: str, args, manifest: dict, out: Path | None) -> tuple:
    """The teacher with its own settings: ``(about it, its figures, its step row, the model inputs)``."""
    device = torch.device(args.device)
    if args.teacher:
        teacher = step_teacher(folder, args, *step_settings(args.teacher, args.batch, device)[:3])
    else:
        teacher = load_teacher(folder, args.device, args.batch, args.override)
    inputs = {shard: model_inputs(root, shard, teacher) for shard in manifest["shards"]}
    freeze_heap()
    figures, end_to_end = label_figures(teacher, root, inputs, args.rounds)
    print(f"label {figures}", file=sys.stderr, flush=True)
    try:
        figures |= busy_figures(end_to_end, teacher.device, out)
        print(f"busy {figures.get('gpu_busy_fraction')}", file=sys.stderr, flush=True)
        first = dict(list(inputs.items())[:1])
        table = kernel_table(lambda: model_pass(teacher, first), device)
        if table and out:
            (out / "kernels_model.txt").write_text(table)
    except Exception as error:  # as a failing step (step_figures): reported, and the steps still run
        figures["gpu_busy_error"] = f"{type(error).__name__}: {error}"[:500]
    figures |= decode_figures(root, manifest["shards"], device)
    figures |= host_only_figures(teacher, root, manifest["shards"])
    print(f"decode {figures}", file=sys.stderr, flush=True)
    own = {
        "images_per_s": figures["model_images_per_s"],
        "batch": teacher.batch_size,
        "peak_gpu_allocated_mib": figures["peak_gpu_allocated_mib"],
        "peak_gpu_reserved_mib": figures["peak_gpu_reserved_mib"],
    }
    about = {
        **environment(teacher.device),
        "preset": args.preset,
        "teacher": teacher.teacher_id,
        "precision": teacher.precision,
        "deform": teacher.deform,
        "compile": teacher.compiled,
        "tf32": teacher.tf32,
        "cuda_graphs": teacher.cuda_graphs,
        "size_bucket": teacher.size_bucket,
        "batch": teacher.batch_size,
        **shapes(teacher, inputs),
    }
    return about, figures, {teacher_step_key(teacher): own}, inputs
