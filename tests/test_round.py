"""Teacher-student rounds on a tiny world: label, calibrate, train student and baseline, evaluate, gate, report;
a second round labels with the first round's promoted model and reuses the phrase tables."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from glip import checkpoint
from jobs.round import DEFAULT_TRAIN, RoundConfig, promote, run_round
from pipeline import graph
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from tests._crawl import served_crawl, tiny_teacher

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]

TRAIN = dataclasses.replace(DEFAULT_TRAIN, steps=2, batch_size=2, freeze_text=False, checkpoint_every=1)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Path, Path]:
    base = tmp_path_factory.mktemp("round")
    with served_crawl(base, crawl_images=16, dead_urls=0, train_images=6, eval_images=12) as crawl:
        layout = Layout(str(base / "root"))
        assert graph.run(
            layout, "ingest", crawl.ingest_config(number_sample_per_shard=8), progress=False
        ).complete
    # Trainable at the teacher's small input size: student and baseline continue it.
    return layout, crawl.world, tiny_teacher(base / "teacher", 0, "input.train_min_sizes=(96,)")


def test_two_rounds_in_a_row(ingested: tuple[Layout, Path, Path]) -> None:
    layout, world, teacher = ingested
    config = RoundConfig(target_precision=0.5)
    first = run_round(layout, world, 0, teacher, config, TRAIN)
    assert set(first["models"]) == {"teacher", "baseline", "student"}
    for metrics in first["models"].values():
        assert set(metrics) == {"ap", "ap50", "apr", "apr_prompt", "r1"} and all(
            0 <= v <= 1 for v in metrics.values()
        )
    lineage = json.loads(Path(layout.round(0, "lineage.json")).read_text())
    assert lineage["teacher"]["checkpoint"] == str(teacher) and lineage["parent_round"] is None
    assert lineage["threshold"]["verified_images"] == len(
        json.loads((world / "world.json").read_text())["verified_uids"]
    )
    assert Path(layout.round(0, "report.html")).is_file()
    promoted = Path(layout.round(0, "promoted"))
    source = layout.round(0, "student/checkpoint") if first["promoted"] else teacher
    assert (promoted / "model.safetensors").read_bytes() == (Path(source) / "model.safetensors").read_bytes()
    checkpoint.load_any(promoted)  # the next round's teacher loads

    # Run again: nothing is redone (labels, training, evaluations are all reused) and the result is the same.
    evaluated = {p: p.stat().st_mtime_ns for p in Path(layout.round(0, "eval")).iterdir()}
    assert run_round(layout, world, 0, teacher, config, TRAIN) == first
    assert {p: p.stat().st_mtime_ns for p in Path(layout.round(0, "eval")).iterdir()} == evaluated

    phrases_before = Ledger(layout, "phrases").units()
    second = run_round(layout, world, 1, None, config, TRAIN)
    lineage = json.loads(Path(layout.round(1, "lineage.json")).read_text())
    assert lineage["teacher"]["checkpoint"] == layout.round(0, "promoted") and lineage["parent_round"] == 0
    assert Ledger(layout, "phrases").units() == phrases_before  # the phrase tables are reused
    if first["promoted"]:  # a new teacher labels everything anew, in its own folder
        assert (
            lineage["labels"]["folder"]
            != json.loads(Path(layout.round(0, "lineage.json")).read_text())["labels"]["folder"]
        )
    assert second["models"]["teacher"] == first["models"]["student" if first["promoted"] else "teacher"]


def test_the_gate_needs_no_loss_and_a_margin() -> None:
    base = {"ap": 0.40, "apr": 0.20}
    assert promote({"baseline": base, "student": {"ap": 0.41, "apr": 0.25}}, 0.01)[0]
    assert not promote({"baseline": base, "student": {"ap": 0.39, "apr": 0.30}}, 0.01)[0]  # worse on AP
    assert not promote({"baseline": base, "student": {"ap": 0.405, "apr": 0.205}}, 0.01)[
        0
    ]  # below the margin
