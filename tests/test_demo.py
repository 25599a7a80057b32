"""`make demo` end to end on a small world: world -> shipped teacher -> evaluate -> ingest -> phrases -> label ->
quality, in a fresh interpreter as `make demo` runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.smoke
@pytest.mark.timeout(600)
def test_demo_runs_the_whole_loop_and_writes_its_summary(tmp_path):
    out = tmp_path / "demo-out"
    world = ["--train-images", "4", "--eval-images", "8", "--crawl-images", "10", "--leaks", "2"]
    command = [sys.executable, "-m", "jobs.demo", "--out", str(out), "--eval-limit", "8", *world]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=580, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("teacher_ap", "teacher_apr", "teacher_apr_prompt", "teacher_ap50", "teacher_r1", "pseudo_precision",
                "pseudo_recall", "seconds"):  # fmt: skip
        assert key in summary, key
    assert 0 <= summary["teacher_ap50"] <= 1 and 0 <= summary["teacher_r1"] <= 1
    counts, ingest = summary["world"], summary["ingest"]
    assert ingest["rows"] == counts["crawl_rows"] == 10 + 2 + 6  # fresh images, leaks, dead URLs (default 6)
    assert ingest["failed_to_download"] == counts["dead_urls"]
    assert ingest["decontaminated"] == counts["leaks"] == 2, (
        "the planted held-out leaks never reach labelling"
    )
    assert ingest["success"] == 10
    assert summary["pseudo_boxes"] >= 0
    precision = summary["pseudo_precision"]  # None when the teacher kept no box
    assert precision is None or 0 <= precision <= 1
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["pseudo_recall"] == summary["pseudo_recall"], "the printed figures are the written ones"
