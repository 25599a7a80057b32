"""Every benchmark in one command (``make bench``): one table of ratios with the target beside each.

    python bench/suite.py [--runs 3] [--quick]

Runs each benchmark script as its own process and reads the JSON object on its last line:

- ``bench/label.py`` (``--runs`` times): labeling end to end over model only on CPU (target >= 0.95), the phrase
  stage over raw ``nlp.pipe`` (>= 0.9), peak memory labelling 10k over 1k images (<= 1.2);
- ``bench/ingest.py`` (``--runs`` times): a no-op re-run over a full ingest (<= 0.02);
- ``bench/actors.py``: two label actors over one on this machine (reported);
- ``bench/train_speed.py``: student training images/s (reported);
- ``bench/decode.py``: JPEG decoding, PIL's decode and conversion over the label stage's ``decode_bgr`` (ms per
  image; world images and 1333x800 ones; reported);
- ``bench/host_feed.py``: the label stage fed to simulated devices of 100 and 200 img/s, the device's busy
  fraction (whether this host's side of the stage keeps a GPU busy; reported);
- with CUDA: ``bench/model_forward.py`` (GLIP-T forward rows) and ``bench/label_gpu.py`` (end to end over model
  only on the GPU, >= 0.9; GPU busy fraction, >= 0.9).

A ratio measured ``--runs`` times is reported as the median of the runs (these machines are noisy), with every
run's value beside it. Prints the table, then as its very last line one JSON object of the figures; exits 1 when
a benchmark fails (a missed target is reported, not an error).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One line of the table: ``key`` of the script's JSON, its target (``None``: reported only)."""

    name: str
    script: str
    key: str
    sense: str | None = None  # ">=" or "<="
    target: float | None = None
    unit: str = ""


ROWS = (
    Row("labeling, end to end / model only (CPU)", "label", "e2e_over_model", ">=", 0.95),
    Row("phrase stage / raw nlp.pipe", "label", "phrases_over_nlp_pipe", ">=", 0.9),
    Row("peak memory, 10k / 1k images", "label", "memory_large_over_small", "<=", 1.2),
    Row("ingest, no-op re-run / full run", "ingest", "noop_rerun_ratio", "<=", 0.02),
    Row("label actors, two / one (1 CPU each)", "actors", "two_actors_over_one"),
    Row("label actors, 2x1 CPU / 1x2 CPUs", "actors", "two_actors_over_one_2cpu"),
    Row("labeling, end to end (CPU)", "label", "e2e_images_per_s", unit="img/s"),
    Row("labeling, model only (CPU)", "label", "model_images_per_s", unit="img/s"),
    Row("student training (CPU, demo preset)", "train_speed", "train_images_per_s", unit="img/s"),
    Row("JPEG decoding, PIL / decode_bgr (world)", "decode", "world_pil_over_decode_bgr"),
    Row("JPEG decoding, PIL / decode_bgr (1333x800)", "decode", "large_pil_over_decode_bgr"),
    Row("device busy, stage fed a 100 img/s device", "host_feed", "busy_at_100"),
    Row("device busy, stage fed a 200 img/s device", "host_feed", "busy_at_200"),
)
GPU_ROWS = (
    Row("labeling, end to end / model only (GPU)", "label_gpu", "e2e_over_model", ">=", 0.9),
    Row("GPU busy fraction, end to end", "label_gpu", "gpu_busy_fraction", ">=", 0.9),
    Row("GLIP-T model only (GPU, bf16)", "label_gpu", "model_images_per_s", ">=", 200.0, "img/s"),
)
QUICK_ARGS = {
    "label": ["--quick"],
    "ingest": ["--images", "40", "--processes", "1", "--threads", "4", "--seen", "100000"],
    "actors": ["--images", "48", "--shard-size", "16"],
    "train_speed": ["--steps", "3", "--warmup", "1", "--batch-size", "2"],
    "decode": ["--images", "10", "--large-images", "2", "--rounds", "1"],
    "host_feed": ["--images", "16", "--shard-size", "8", "--repeat", "1", "--world-images", "4"],
    "label_gpu": [],
}


def run_script(script: str, args: list[str]) -> dict:
    """``python bench/<script>.py args``; its last-line JSON (``RuntimeError`` with its output's tail when it
    fails)."""
    command = [sys.executable, str(REPO / "bench" / f"{script}.py"), *args]
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{tail}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {script} {' '.join(args)}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return figures


def summarise(rows: tuple[Row, ...], runs: dict[str, list[dict]]) -> list[dict]:
    """Per row: the median over the script's runs, every run's value, the target and whether it is met."""
    summary = []
    for row in rows:
        values = [run[row.key] for run in runs.get(row.script, []) if run.get(row.key) is not None]
        value = statistics.median(values) if values else None
        met = None
        if value is not None and row.target is not None:
            met = value >= row.target if row.sense == ">=" else value <= row.target
        summary.append({"row": row, "value": value, "values": values, "met": met})
    return summary


def table(summary: list[dict]) -> str:
    lines = [f"{'figure':<42} {'value':>12}  {'target':<10} {'':<7} runs"]
    for item in summary:
        row, value = item["row"], item["value"]
        shown = "-" if value is None else f"{value:.4g} {row.unit}".rstrip()
        target = "reported" if row.target is None else f"{row.sense} {row.target:g}"
        verdict = {True: "met", False: "MISSED", None: ""}[item["met"]]
        runs = ", ".join(f"{v:.4g}" for v in item["values"]) if len(item["values"]) > 1 else ""
        lines.append(f"{row.name:<42} {shown:>12}  {target:<10} {verdict:<7} {runs}")
    return "\n".join(lines)


def figures_json(summary: list[dict], runs: dict[str, list[dict]], extra: dict) -> dict:
    figures = dict(extra)
    for item in summary:
        row = item["row"]
        name = f"{row.script}.{row.key}"
        figures[name] = None if item["value"] is None else round(item["value"], 4)
        if row.target is not None:
            figures[f"{name}_target"] = row.target
            figures[f"{name}_met"] = item["met"]
        if len(item["values"]) > 1:
            figures[f"{name}_runs"] = [round(v, 4) for v in item["values"]]
    figures["targets_met"] = all(item["met"] is not False for item in summary)
    figures["runs_per_ratio"] = max((len(r) for r in runs.values()), default=0)
    return figures


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each CPU-ratio benchmark (median)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke run of the suite")
    parser.add_argument(
        "--gpu-data", default=str(REPO / "bench" / "gpu-data"), help="bench/label_gpu.py data"
    )
    args = parser.parse_args(argv)
    runs_per_ratio = 1 if args.quick else args.runs
    plan = {"label": runs_per_ratio, "ingest": runs_per_ratio, "actors": 1, "train_speed": 1, "decode": 1,
            "host_feed": 1}  # fmt: skip
    rows = ROWS
    gpu = cuda_available()
    if gpu:
        plan["label_gpu"] = 1
        rows = ROWS + GPU_ROWS
    runs: dict[str, list[dict]] = {}
    failed = []
    for script, count in plan.items():
        script_args = QUICK_ARGS[script] if args.quick else []
        if script == "label_gpu":
            script_args = ["run", "--data", args.gpu_data, "--device", "cuda", *script_args]
        for _ in range(count):
            try:
                runs.setdefault(script, []).append(run_script(script, script_args))
            except RuntimeError as error:
                print(error, file=sys.stderr)
                failed.append(script)
                break
    if gpu:
        try:
            runs["model_forward"] = [run_script("model_forward", ["--repeats", "3"])]
        except RuntimeError as error:
            print(error, file=sys.stderr)
            failed.append("model_forward")
    summary = summarise(rows, runs)
    label = (runs.get("label") or [{}])[0]
    extra = {
        "cpu": label.get("cpu"),
        "threads": label.get("threads"),
        "cores": os.cpu_count(),
        "cuda": gpu,
        "quick": args.quick,
        "failed": failed,
    }
    print(table(summary))
    if failed:
        print(f"failed: {', '.join(failed)}")
    print(json.dumps(figures_json(summary, runs, extra)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
