"""`make demo` end to end on a small world: world -> ingest -> round 0 (label, calibrate, student and baseline,
evaluate, gate, report), in a fresh interpreter as `make demo` runs it. It must fail on a broken loop: the
shipped teacher's quality has floors that an untrained model does not reach, and every metric must be there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORLD = ["--train-images", "12", "--eval-images", "24", "--crawl-images", "16", "--leaks", "2"]
ROUND = ["--set", "train.steps=2", "--set", "train.batch_size=2"]
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


@pytest.mark.smoke
@pytest.mark.timeout(900)
def test_demo_runs_the_whole_loop_and_writes_its_summary(tmp_path):
    out = tmp_path / "demo-out"
    result = run_demo(out)
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
