"""The phrase job killed for real: ``python -m jobs.phrases`` SIGKILLed (its whole process group, in-process
Ray included) part-way through an ingested crawl, then run again: every shard's phrase table is written once,
byte for byte the table of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import graph
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.phrases import PhraseConfig
from tests._crawl import served_crawl

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
ROWS = 24  # one caption per shard: 24 units, so the kill lands between units


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("phrases-kill")
    with served_crawl(base, crawl_images=ROWS - 2, dead_urls=2) as crawl:
        config = crawl.ingest_config(number_sample_per_shard=1)
        assert graph.run(Layout(str(base / "ingested")), "ingest", config, progress=False).complete
    return base / "ingested"


@pytest.fixture(scope="module")
def uninterrupted(ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The phrase tables of one uninterrupted run (in this process: the same extractor, the same bytes)."""
    root = tmp_path_factory.mktemp("uninterrupted") / "root"
    shutil.copytree(ingested, root)
    assert graph.run(Layout(str(root)), "phrases", PhraseConfig(), in_process=True, progress=False).complete
    return _tables(root)


def _tables(root: Path) -> dict[str, bytes]:
    folder = root / "phrases"
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _entries(root: Path) -> int:
    folder = root / "ledger" / "phrases"
    return sum(1 for p in folder.rglob("*.json") if ".tmp-" not in p.name) if folder.exists() else 0


def test_phrase_job_killed_part_way_then_rerun_writes_each_table_once(ingested, uninterrupted, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(ingested, root)
    command = [sys.executable, "-m", "jobs.phrases", "--root", str(root), "--quiet"]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    job = subprocess.Popen(command, cwd=REPO, env=environment, start_new_session=True, **quiet)
    try:
        deadline = time.monotonic() + 300
        while _entries(root) == 0 and time.monotonic() < deadline:
            assert job.poll() is None, "the job ended before extracting a shard"
            time.sleep(0.005)
        os.killpg(job.pid, signal.SIGKILL)  # the driver and its in-process Ray
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done = Ledger(Layout(str(root)), "phrases").units()
    assert 1 <= len(done) < ROWS, "the kill must land part-way for this test to mean anything"
    # Every committed unit's table is already whole (the ledger entry is written last).
    assert all(_tables(root)[f"{unit}.parquet"] == uninterrupted[f"{unit}.parquet"] for unit in done)
    subprocess.run(command, cwd=REPO, env=environment, check=True, timeout=300, **quiet)
    assert Ledger(Layout(str(root)), "phrases").units() == graph.derived(Layout(str(root)), "phrases")
    assert _tables(root) == uninterrupted  # each shard's table once, the bytes of an uninterrupted run
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]
