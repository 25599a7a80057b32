"""`make demo` end to end on a small world: world -> ingest -> round 0 (label, calibrate, student and baseline,
evaluate, gate, report), in a fresh interpreter as `make demo` runs it. It must fail on a broken loop: the
shipped teacher's quality has floors that an untrained model does not reach, and every metric must be there."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._ray_cluster import free_port

REPO = Path(__file__).resolve().parents[1]
WORLD = ["--train-images", "12", "--eval-images", "24", "--crawl-images", "16", "--leaks", "2"]
# 8 steps: enough paste draws that another port (other uids, another pool order) changes the student
ROUND = ["--set", "train.steps=8", "--set", "train.batch_size=2"]
MODELS = ("teacher", "baseline", "student")
METRICS = ("ap", "apr", "apr_prompt", "ap50", "r1")
# The shipped teacher on this world's 24 held-out images; a random-weight teacher scores ~0 on each.
FLOORS = {"teacher_ap50": 0.25, "teacher_r1": 0.6, "pseudo_precision": 0.6}


def run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The demo with a relative ``--out`` from ``out``'s parent, as `make demo` runs it (``demo-out``): every
    path that reaches a Ray worker, whose cwd differs, must have been made absolute."""
    command = [sys.executable, "-m", "jobs.demo", "--out", out.name, *WORLD, *ROUND, *extra]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=out.parent, env=environment, capture_output=True, text=True, timeout=880,
                          check=False)  # fmt: skip


@pytest.fixture(scope="module")
def port() -> int:
    """One port for every demo of this module (a free one: `make demo`'s default may be in use here)."""
    return free_port()


@pytest.fixture(scope="module")
def first_demo(tmp_path_factory, port) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("first") / "demo-out"
    return out, run_demo(out, "--port", str(port))


def _weights(out: Path, model: str) -> str:
    """sha256 of a round-0 model's weights files."""
    files = sorted((out / "root" / "rounds" / "r0" / model).rglob("*.safetensors"))
    assert files, f"no weights under {out}/root/rounds/r0/{model}"
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()


@pytest.mark.smoke
@pytest.mark.timeout(900)
def test_demo_runs_the_whole_loop_and_writes_its_summary(first_demo):
    out, result = first_demo
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in [f"{model}_{metric}" for model in MODELS for metric in METRICS]:
        assert isinstance(summary[key], float) and 0 <= summary[key] <= 1, key  # never a missing metric
    for key in ("pseudo_precision", "pseudo_recall", "threshold", "promoted", "seconds"):
        assert summary[key] is not None, key
    for key, floor in FLOORS.items():
        assert summary[key] >= floor, f"{key} {summary[key]} < {floor}: the loop is broken"
    counts, ingest = summary["world"], summary["ingest"]
    assert ingest["rows"] == counts["crawl_rows"] == 16 + 2 + 6  # fresh images, leaks, dead URLs (default 6)
    assert ingest["failed_to_download"] == counts["dead_urls"]
    assert ingest["decontaminated"] == counts["leaks"] == 2, (
        "the planted held-out leaks never reach labelling"
    )
    assert ingest["success"] == 16
    assert Path(summary["report"]).is_file() and summary["rounds"][0]["threshold"] == summary["threshold"]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["student_apr"] == summary["student_apr"], "the printed figures are the written ones"


@pytest.mark.smoke
@pytest.mark.timeout(900)
def test_a_second_demo_trained_in_process_gives_the_same_figures_and_student(first_demo, port, tmp_path):
    """The port is part of every crawl URL, hence of every uid and of the order the student reads pseudo-labels
    in: on one port, a whole round repeats bit for bit (world, labels, baseline, student, gate). The second demo
    trains in this process (``round.ray_train=false``) where the first trained on Ray Train, so this also holds
    Ray Train's worker to the plain loop's weights, and skips its ~25 s of start-up a model here."""
    first, result = first_demo
    assert result.returncode == 0, result.stderr[-4000:]
    second = tmp_path / "demo-out"
    again = run_demo(second, "--port", str(port), "--set", "round.ray_train=false")
    assert again.returncode == 0, again.stderr[-4000:]
    one, two = (json.loads((out / "summary.json").read_text()) for out in (first, second))
    assert one["port"] == two["port"] == port, "the demo did not get the port it asked for"
    for summary in (one, two):
        del summary["seconds"], summary["report"]
    assert one == two
    for model in ("baseline", "student"):
        assert _weights(first, model) == _weights(second, model), f"the {model} differs"
