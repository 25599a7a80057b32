"""`make hostile` in the default tier: the whole hostile-input suite runs and nothing crashes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["caption", "checkpoint", "config", "crawl", "image", "root", "tar"]


def test_the_hostile_suite_handles_every_kind() -> None:
    # A subprocess, as `make hostile` runs it: its last line is the JSON summary.
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hostile.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    crashed = [line for line in lines[1:-1] if " CRASH " in line]
    assert done.returncode == 0 and summary["crashes"] == 0, (crashed, done.stderr[-3000:])
    assert summary["kinds"] >= 30 and summary["handled"] == summary["kinds"]
    assert summary["categories"] == CATEGORIES and summary["captions_truncated"] == 3
    assert len(lines) == summary["kinds"] + 2  # header, one row per kind, the JSON line
