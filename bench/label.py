"""Labeling throughput and memory: the label stage against the bare model, the phrase stage against bare
spaCy, and peak memory for a small and a large labeling job.

    python bench/label.py [--teacher jobs/assets/teacher] [--images-small 1000] [--images-large 10000]
                          [--shard-size 1000] [--ratio-images 640] [--ratio-shard-size 64]
                          [--captions 5000] [--rounds 4]
                          [--threads 2] [--out DIR] [--quick]
    python bench/label.py --gpu [bench/label_gpu.py run's options]      # the GPU mode

``--gpu`` is the GPU mode: ``bench/label_gpu.py run`` (the label stage against the bare model on a GLIP-T sized
teacher on CUDA, the GPU busy fraction, a table of optimisation steps; its docstring says how), handed over
before anything here imports Ray or spaCy, which the GPU machine does not have.

Measures, in one run on one teacher:

- end-to-end img/s: ``LabelShard`` on a real image shard under a local root (tar + parquet reading,
  decoding, prompts, inference, filters, parquet / tar writing) and the executor's commit of the shard
  (error table, ledger entry), in this process; over model-only
  img/s: ``Teacher.label_prompts`` on the same images decoded beforehand with their prompts built beforehand,
  grouped exactly as ``LabelShard`` groups them (``LabelConfig.batch_size`` images with prompts per call, the
  teacher's forward batch inside). Target >= 0.95. The two alternate shard by shard (``--ratio-shard-size``)
  back to back, each shard in both orders, so that the two runs of a pair see the same load on a shared
  machine (``ratio_figures`` says how the pairs become one ratio). The model's share of
  the end-to-end time (inside the forward passes, ``submit`` and ``collect``) says where the rest goes. A shard has
  fixed costs (reading its two tables, decoding the first forward batch before the model can start, writing
  its parquet, tar and error table, the ledger entry): ~15 ms a shard on this machine, 3.5% of a 16-image
  shard, 1% of a 64-image one (the default here) and nothing of a real one (ingest writes 10,000 a shard).
- phrase stage captions/s (``PhraseExtractor.analyze``: cleaning, checks, parsing, chunk rules) over raw
  ``nlp.pipe`` captions/s of the same loaded pipeline (same excluded components, same batch size) on the
  same captions, alternated 500 captions at a time, as the label figure. Target >= 0.9.
- peak RSS of labeling ``--images-small`` and ``--images-large`` images (shards of ``--shard-size``), each
  in a fresh interpreter (``bench/_memory.py``). Labeling streams, so the ratio should stay near 1 (target
  <= 1.2).

Data: the crawl of a generated world (``jobs.world``); its images are reused under distinct URLs (hence
distinct uids) to reach the image counts, written as img2dataset-style shards with ingest and phrase ledger
entries, and the phrase tables are made by the phrase stage itself (``pipeline.phrases.extract_shard``
through the executor). Prints a table, then as its last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch

# Run as `python bench/label.py` from anywhere: the repository root holds the packages.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if __name__ == "__main__" and sys.argv[1:2] == ["--gpu"]:  # the GPU mode, before Ray and spaCy are imported
    import runpy

    sys.argv = [str(REPO / "bench" / "label_gpu.py"), "run", *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")

from jobs.world import WorldOptions, generate_world  # noqa: E402
from pipeline import graph, storage, tars  # noqa: E402
from pipeline.executor import failed_units, run_and_commit, run_units  # noqa: E402
from pipeline.label import LabelConfig, LabelShard  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.ledger import Ledger  # noqa: E402
from pipeline.phrases import PhraseExtractor, extract_shard  # noqa: E402
from pipeline.schema import UnitOutput, url_uid  # noqa: E402
from teacher.teacher import Teacher, TeacherConfig  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from _label_parts import TimedTeacher, cpu_model, model_inputs  # noqa: E402

DEFAULT_TEACHER = REPO / "jobs" / "assets" / "teacher"
PARTITION = "part-00000"
TARGETS = {"e2e_over_model": 0.95, "phrases_over_nlp_pipe": 0.9, "memory_large_over_small": 1.2}
QUICK = {
    "images_small": 16,
    "images_large": 48,
    "shard_size": 16,
    "ratio_images": 16,
    "ratio_shard_size": 8,
    "captions": 400,
    "rounds": 2,
}


class Sample(NamedTuple):
    """A crawl sample of the world: its URL, caption and JPEG bytes."""

    url: str
    caption: str
    jpeg: bytes


# -------------------------------------------------------------------------------------------------- data


def world_samples(folder: Path, count: int) -> list[Sample]:
    """The served crawl samples of a generated world of ``count`` crawl images (no dead URLs, no leaks)."""
    options = WorldOptions(
        out=str(folder), train_images=0, eval_images=0, crawl_images=count, leaks=0, dead_urls=0
    )
    manifest = generate_world(options)
    samples = []
    for partition in manifest["files"]["crawl"]:
        for row in pq.read_table(folder / partition).to_pylist():
            image = folder / "crawl_images" / row["url"].rsplit("/", 1)[-1]
            samples.append(Sample(row["url"], row["caption"], image.read_bytes()))
    return samples


def build_root(root: str, samples: list[Sample], images: int, shard_size: int) -> list[str]:
    """Image shards of ``images`` samples (cycling ``samples`` under distinct URLs) in the ingest layout,
    with the ingest ledger entry listing them (the phrase stage's units); returns the shard names."""
    layout = Layout(root)
    shards = []
    for number, start in enumerate(range(0, images, shard_size)):
        shard = f"{PARTITION}/{number:05d}"
        indices = range(start, min(start + shard_size, images))
        _write_image_shard(layout, shard, [(f"{number:05d}{i - start:05d}", i) for i in indices], samples)
        shards.append(shard)
    Ledger(layout, "ingest").record(PARTITION, {"shards": shards})
    return shards


def _write_image_shard(
    layout: Layout, shard: str, keys: list[tuple[str, int]], samples: list[Sample]
) -> None:
    """The shard's tar (key.jpg / .txt / .json, as img2dataset) and parquet (one row per key)."""
    rows, members = [], []
    for key, index in keys:
        sample = samples[index % len(samples)]
        url = f"{sample.url}?copy={index}"
        uid = url_uid(url)
        rows.append(_ingest_row(key, uid, url, sample))
        members.append(
            {
                "__key__": key,
                "jpg": sample.jpeg,
                "txt": sample.caption.encode(),
                "json": json.dumps({"uid": uid, "url": url}).encode(),
            }
        )
    tars.write_samples(layout.fs, layout.image_shard(shard, ".tar"), members)
    storage.write_parquet(layout.fs, layout.image_shard(shard, ".parquet"), pa.Table.from_pylist(rows))


def _ingest_row(key: str, uid: str, url: str, sample: Sample) -> dict:
    return {
        "key": key,
        "uid": uid,
        "url": url,
        "caption": sample.caption,
        "status": "success",
        "error_message": None,
        "sha256": hashlib.sha256(sample.jpeg).hexdigest(),
    }


class _LoadedPhrases:
    """The phrase stage's worker around an extractor that is already loaded (``PhraseWorker`` loads its own
    spaCy pipeline; the benchmark reuses one)."""

    def __init__(self, extractor: PhraseExtractor) -> None:
        self.extractor = extractor

    def __call__(self, layout: Layout, shard: str) -> UnitOutput:
        return extract_shard(layout, shard, self.extractor)


def prepared_root(root: str, samples: list[Sample], images: int, shard_size: int, extractor) -> list[str]:
    """``build_root`` plus the phrase stage over its shards (committed: phrase tables, errors, ledger)."""
    shards = build_root(root, samples, images, shard_size)
    layout = Layout(root)
    worker = _LoadedPhrases(extractor)
    pending = graph.pending(layout, "phrases")
    results = run_units(layout, pending, lambda: worker, "phrases", in_process=True, progress=False)
    if failed_units(results):
        raise RuntimeError(f"the phrase stage failed on {failed_units(results)} under {root}")
    return shards


# ------------------------------------------------------------------------------------------- throughput


class Timed(NamedTuple):
    """Wall-clock seconds spent in one call, the CPU seconds of this process (all its threads) in it, and
    its result."""

    seconds: float
    cpu_seconds: float
    result: object


def timed(function, *args) -> Timed:
    began, began_cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return Timed(time.perf_counter() - began, time.process_time() - began_cpu, result)


def alternated(first, second, rounds: int, pieces: list) -> tuple[list[Timed], list[Timed]]:
    """``first(piece)`` and ``second(piece)`` back to back for every piece, ``rounds`` times; which of the
    two runs first flips from piece to piece and from round to round, so every piece is run in both orders
    (whatever runs second on a piece finds warmer caches) and both see the same load on a shared machine.
    ``times[step]`` is piece ``step % len(pieces)``."""
    times_first, times_second = [], []
    for step, piece in enumerate(pieces * rounds):
        if (step % len(pieces) + step // len(pieces)) % 2 == 0:
            times_first.append(timed(first, piece))
            times_second.append(timed(second, piece))
        else:
            times_second.append(timed(second, piece))
            times_first.append(timed(first, piece))
    return times_first, times_second


def ratio_figures(
    name: str, count: int, numerator: list[Timed], denominator: list[Timed], pieces: int
) -> dict:
    """The ratio of ``numerator``'s rate to ``denominator``'s over ``count`` items (``times[step]`` is piece
    ``step % pieces``). ``name``: per piece, the geometric mean of its pairs' ratios (the two orders cancel
    when ``alternated`` ran an even number of rounds), then the median over pieces (the two runs of a pair
    are seconds apart and share the machine's load; a burst of load spoils a piece, not the figure). Rates
    come from each piece's best time over the rounds (the least disturbed run, as ``timeit`` takes); the
    ratio of all times summed is given too, and ``{name}_cpu``: the same figure from CPU seconds (what
    the work costs, whatever else the machine ran meanwhile)."""
    pairs = [b.seconds / a.seconds for a, b in zip(numerator, denominator)]
    per_piece = [statistics.geometric_mean(pairs[piece::pieces]) for piece in range(pieces)]
    cpu_pairs = [b.cpu_seconds / a.cpu_seconds for a, b in zip(numerator, denominator)]
    cpu_per_piece = [statistics.geometric_mean(cpu_pairs[piece::pieces]) for piece in range(pieces)]
    best = [
        sum(min(t.seconds for t in times[piece::pieces]) for piece in range(pieces))
        for times in (numerator, denominator)
    ]
    totals = [sum(t.seconds for t in times) for times in (numerator, denominator)]
    per_round = count / (len(numerator) // pieces)
    return {
        name: statistics.median(per_piece),
        f"{name}_cpu": statistics.median(cpu_per_piece),
        f"{name}_of_totals": totals[1] / totals[0],
        f"{name}_pairs": [round(ratio, 3) for ratio in pairs],
        f"{name}_rates": [per_round / best[0], per_round / best[1]],
    }


def label_figures(teacher: Teacher, root: str, shards: list[str], rounds: int) -> dict:
    """img/s of ``LabelShard`` (end to end, committed as the executor commits a unit) and of the model alone
    on the same shards, alternated shard by shard, after one untimed warm-up group; and how much of the
    end-to-end time the model took."""
    inputs = {shard: model_inputs(root, shard, teacher) for shard in shards}
    inside = TimedTeacher(teacher)
    stage = LabelShard(inside, LabelConfig())
    layout = Layout(root)
    stage.prepare(layout)

    def model_only(shard: str) -> None:
        for images, prompts in inputs[shard][1]:
            teacher.label_prompts(images, prompts)

    for shard in shards:  # first calls of a shape create its CPU kernels: keep that out of both
        model_only(shard)

    def end_to_end(shard: str) -> dict:
        return run_and_commit(stage, layout, shard, stage.stage)

    e2e, model = alternated(end_to_end, model_only, rounds, shards)
    images = sum(count for count, _ in inputs.values())
    labelled = sum(t.result["images"] for t in e2e)
    if labelled != images * rounds:
        raise RuntimeError(f"end to end labelled {labelled} images, model-only {images * rounds}")
    figures = ratio_figures("e2e_over_model", images * rounds, e2e, model, len(shards))
    e2e_seconds = sum(t.seconds for t in e2e)
    return {
        **figures,
        "ratio_images": images,
        "ratio_images_with_prompts": sum(len(g[0]) for _, groups in inputs.values() for g in groups),
        "e2e_images_per_s": figures["e2e_over_model_rates"][0],
        "model_images_per_s": figures["e2e_over_model_rates"][1],
        "model_share_of_e2e": inside.seconds / e2e_seconds,
        "model_only_over_model_in_e2e": sum(t.seconds for t in model) / inside.seconds,
        "boxes_per_image": sum(t.result["boxes"] for t in e2e) / labelled,
    }


def phrase_figures(extractor: PhraseExtractor, captions: list[str], rounds: int, piece: int = 500) -> dict:
    """captions/s of ``PhraseExtractor.analyze`` and of raw ``nlp.pipe``, alternated ``piece`` captions at a
    time."""
    config = extractor.config

    def raw_pipe(texts: list[str]) -> None:
        for _doc in extractor.nlp.pipe(texts, batch_size=config.batch_size, n_process=config.n_process):
            pass

    extractor.analyze(captions[:64])  # warm-up: first batches allocate spaCy's buffers
    pieces = [captions[i : i + piece] for i in range(0, len(captions), piece)]
    stage, pipe = alternated(extractor.analyze, raw_pipe, rounds, pieces)
    figures = ratio_figures("phrases_over_nlp_pipe", len(captions) * rounds, stage, pipe, len(pieces))
    return {
        **figures,
        "captions": len(captions),
        "phrase_captions_per_s": figures["phrases_over_nlp_pipe_rates"][0],
        "nlp_pipe_captions_per_s": figures["phrases_over_nlp_pipe_rates"][1],
        "captions_skipped": sum(1 for t in stage[: len(pieces)] for r in t.result if r.error is not None),
        "spacy_components": extractor.provenance["components"],
    }


# ---------------------------------------------------------------------------------------------- memory


def child_memory(root: str, checkpoint: str, threads: int) -> dict:
    """Label ``root`` in a fresh interpreter (``bench/_memory.py``); returns its last-line JSON."""
    command = [sys.executable, str(REPO / "bench" / "_memory.py"), "--root", root, "--teacher", checkpoint]
    result = subprocess.run(
        [*command, "--threads", str(threads)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_figures(small: dict, large: dict) -> dict:
    return {
        "peak_rss_small_mib": small["peak_rss_mib"],
        "peak_rss_large_mib": large["peak_rss_mib"],
        "memory_large_over_small": large["peak_rss_mib"] / small["peak_rss_mib"],
        "rss_after_load_mib": large["rss_after_load_mib"],
        "peak_rss_after_load_mib": large["peak_rss_after_load_mib"],
        "rss_after_shard_large_mib": large["rss_after_shard_mib"],
        "peak_rss_after_shard_large_mib": large["peak_rss_after_shard_mib"],
        "small_images_per_s": small["images"] / small["seconds"],
        "large_images_per_s": large["images"] / large["seconds"],
        "large_shards": large["shards"],
    }


# ------------------------------------------------------------------------------------------------ report


def table_rows(figures: dict) -> list[tuple[str, str, str]]:
    """(what, value, note) lines of the printed table."""
    small, large = figures["images_small"], figures["images_large"]
    return [
        ("model only", f"{figures['model_images_per_s']:.2f} img/s", "decoded images, prompts built"),
        ("end to end", f"{figures['e2e_images_per_s']:.2f} img/s", f"{figures['ratio_images']} images"),
        ("  ratio", f"{figures['e2e_over_model']:.3f}", _verdict(figures, "e2e_over_model", ">=")),
        ("  ratio, CPU time", f"{figures['e2e_over_model_cpu']:.3f}", "same pairs, CPU seconds"),
        ("  model's share of e2e", f"{figures['model_share_of_e2e']:.3f}", "time inside submit + collect"),
        ("phrase stage", f"{figures['phrase_captions_per_s']:.0f} captions/s", "PhraseExtractor.analyze"),
        ("raw nlp.pipe", f"{figures['nlp_pipe_captions_per_s']:.0f} captions/s", "same nlp and captions"),
        ("  ratio", f"{figures['phrases_over_nlp_pipe']:.3f}", _verdict(figures, "phrases_over_nlp_pipe", ">=")),
        ("  ratio, CPU time", f"{figures['phrases_over_nlp_pipe_cpu']:.3f}", "same pairs, CPU seconds"),
        (f"peak RSS {small} img", f"{figures['peak_rss_small_mib']:.0f} MiB",
         f"labelled at {figures['small_images_per_s']:.2f} img/s"),
        (f"peak RSS {large} img", f"{figures['peak_rss_large_mib']:.0f} MiB",
         f"labelled at {figures['large_images_per_s']:.2f} img/s"),
        ("  ratio", f"{figures['memory_large_over_small']:.3f}", _verdict(figures, "memory_large_over_small", "<=")),
    ]  # fmt: skip


def _verdict(figures: dict, key: str, sense: str) -> str:
    target = TARGETS[key]
    met = figures[key] >= target if sense == ">=" else figures[key] <= target
    return f"target {sense} {target}: {'met' if met else 'MISSED'}"


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="checkpoint folder (our format)")
    parser.add_argument("--images-small", type=int, default=1000)
    parser.add_argument("--images-large", type=int, default=10000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--ratio-images", type=int, default=640, help="images of the throughput figure")
    parser.add_argument("--ratio-shard-size", type=int, default=64, help="its shards (the unit alternated)")
    parser.add_argument("--captions", type=int, default=5000, help="captions of the phrase figure")
    parser.add_argument("--world-images", type=int, default=300, help="distinct crawl images generated")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of every piece (even)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--out", help="keep the generated roots here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny numbers for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if (
        min(
            args.images_small,
            args.images_large,
            args.shard_size,
            args.ratio_images,
            args.ratio_shard_size,
            args.rounds,
        )
        < 1
    ):
        parser.error("image counts, shard size and rounds must be >= 1")
    if not Path(args.teacher, "model.safetensors").is_file():
        parser.error(f"no teacher checkpoint at {args.teacher}: pass --teacher <checkpoint folder>")
    return args


def run(args: argparse.Namespace, work: Path) -> dict:
    """Every figure, measured in this order: phrases, throughput, memory (small, then large)."""
    torch.set_num_threads(args.threads)
    for name in ("ratio", "small", "large"):
        shutil.rmtree(work / name, ignore_errors=True)  # a kept --out folder: start from nothing again
    samples = world_samples(work / "world", args.world_images)
    extractor = PhraseExtractor()
    captions = [samples[i % len(samples)].caption for i in range(args.captions)]
    figures = phrase_figures(extractor, captions, args.rounds)
    roots = {name: str(work / name) for name in ("ratio", "small", "large")}
    ratio_shards = prepared_root(roots["ratio"], samples, args.ratio_images, args.ratio_shard_size, extractor)
    for name in ("small", "large"):
        prepared_root(roots[name], samples, getattr(args, f"images_{name}"), args.shard_size, extractor)
    teacher = Teacher.from_checkpoint(TeacherConfig(checkpoint=args.teacher, device="cpu"))
    figures |= label_figures(teacher, roots["ratio"], ratio_shards, args.rounds)
    small = child_memory(roots["small"], args.teacher, args.threads)
    large = child_memory(roots["large"], args.teacher, args.threads)
    figures |= memory_figures(small, large)
    return {
        **figures,
        "images_small": args.images_small,
        "images_large": args.images_large,
        "shard_size": args.shard_size,
        "teacher": teacher.teacher_id,
        "precision": teacher.precision,
        "label_batch_size": LabelConfig().batch_size,
        "teacher_batch_size": teacher.batch_size,
        "threads": args.threads,
        "cpu": cpu_model(),
        "e2e_over_model_target": TARGETS["e2e_over_model"],
        "phrases_over_nlp_pipe_target": TARGETS["phrases_over_nlp_pipe"],
        "memory_10k_over_1k": figures["memory_large_over_small"],
        "memory_10k_over_1k_target": TARGETS["memory_large_over_small"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        figures = run(args, Path(args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-label-") as folder:
            figures = run(args, Path(folder))
    print(f"teacher {figures['teacher']} ({figures['precision']}, {figures['threads']} threads)")
    for name, value, note in table_rows(figures):
        print(f"{name:<22} {value:<20} {note}")
    print(json.dumps({key: rounded(value) for key, value in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
