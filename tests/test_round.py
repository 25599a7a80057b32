"""Teacher-student rounds on a tiny world: label, calibrate, train student and baseline, evaluate, gate, report;
a round killed mid-training ends with the metrics of an uninterrupted one; a second round labels with the first
round's promoted model and reuses the phrase tables."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glip import checkpoint
from jobs import round as round_job
from jobs.round import DEFAULT_TRAIN, NothingNew, RoundConfig, previous_teacher, promote, run_round
from pipeline import graph, storage, tars
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from student.data import read_image_at
from tests._crawl import served_crawl, tiny_teacher
from tests._s3 import S3Endpoint, s3_server  # noqa: F401 - the fixture

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
# fp32 and one loader process: a resumed run must end on exactly the weights of an uninterrupted one.
TRAIN = dataclasses.replace(DEFAULT_TRAIN, steps=STEPS, batch_size=2, freeze_text=False, checkpoint_every=1,
                            log_every=1, amp=False, num_workers=0)  # fmt: skip
# A random tiny teacher's students score 0 AP: the gate is tested on its own; here every student is promoted so
# that round 1 labels with round 0's student.
CONFIG = RoundConfig(target_precision=0.5, gate="always", ray_train=False)  # Ray Train: test_ray_train.py
SETS = ["train.steps=6", "train.batch_size=2", "train.freeze_text=false", "train.checkpoint_every=1",
        "train.log_every=1", "train.amp=false", "train.num_workers=0", "round.target_precision=0.5",
        "round.gate=always", "round.ray_train=false"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Ingested:
    root: Path
    world: Path
    teacher: Path

    def copy(self, folder: Path) -> Layout:
        shutil.copytree(self.root, folder)
        return Layout(str(folder))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    base = tmp_path_factory.mktemp("round")
    with served_crawl(base, crawl_images=16, dead_urls=0, train_images=6, eval_images=12) as crawl:
        layout = Layout(str(base / "root"))
        assert graph.run(
            layout, "ingest", crawl.ingest_config(number_sample_per_shard=8), progress=False
        ).complete
    # Trainable at the teacher's small input size: student and baseline continue it.
    return Ingested(
        base / "root", crawl.world, tiny_teacher(base / "teacher", 0, "input.train_min_sizes=(96,)")
    )


@pytest.fixture(scope="module")
def reference(ingested: Ingested, tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, dict]:
    """Round 0, uninterrupted."""
    layout = ingested.copy(tmp_path_factory.mktemp("reference") / "root")
    return layout, run_round(layout, ingested.world, 0, ingested.teacher, CONFIG, TRAIN)


def test_a_round_writes_metrics_lineage_report_and_the_promoted_model(ingested, reference) -> None:
    layout, first = reference
    assert set(first["models"]) == {"teacher", "baseline", "student"}
    for metrics in first["models"].values():
        assert set(metrics) == {"ap", "ap50", "apr", "apr_prompt", "r1"} and all(
            0 <= v <= 1 for v in metrics.values()
        )
    lineage = json.loads(Path(layout.round(0, "lineage.json")).read_text())
    assert lineage["teacher"]["checkpoint"] == str(ingested.teacher) and lineage["parent_round"] is None
    verified = json.loads((ingested.world / "world.json").read_text())["verified_uids"]
    assert lineage["threshold"]["verified_images"] == len(verified)
    paste = lineage["labels"]["paste"]  # the default recipe pastes objects, the human set's in both runs
    assert paste["human"] and paste["instances"] >= paste["pseudo_instances"] >= 0 and paste["rate"] == 0.5
    assert Path(layout.round(0, "report.html")).is_file()
    promoted = Path(layout.round(0, "promoted"))
    source = layout.round(0, "student/checkpoint") if first["promoted"] else ingested.teacher
    assert (promoted / "model.safetensors").read_bytes() == (Path(source) / "model.safetensors").read_bytes()
    checkpoint.load_any(promoted)  # the next round's teacher loads
    # Run again: nothing is redone (labels, training, evaluations are all reused) and the result is the same.
    evaluated = {p: p.stat().st_mtime_ns for p in Path(layout.round(0, "eval")).iterdir()}
    assert run_round(layout, ingested.world, 0, ingested.teacher, CONFIG, TRAIN) == first
    assert {p: p.stat().st_mtime_ns for p in Path(layout.round(0, "eval")).iterdir()} == evaluated


def test_a_round_killed_mid_training_ends_with_the_same_metrics(ingested, reference, tmp_path) -> None:
    layout = ingested.copy(tmp_path / "root")
    command = [sys.executable, "-m", "jobs.round", "--root", layout.url, "--world", str(ingested.world),
               "--teacher", str(ingested.teacher), *(f"--set={item}" for item in SETS)]  # fmt: skip
    state = Path(layout.round(0, "student/train_state.pt"))
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command, cwd=REPO, env=environment, start_new_session=True, **quiet)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not state.exists():
            assert process.poll() is None, "the round ended before its student was trained"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its Ray's agents outlive a SIGKILLed driver
        except ProcessLookupError:
            pass
    saved = torch.load(state, weights_only=True)["step"]
    assert 0 < saved < STEPS, "the kill must land strictly inside the student's training"
    log = Path(layout.round(0, "student/metrics.jsonl"))
    logged_before = len(log.read_text().splitlines())
    assert not Path(layout.round(0, "metrics.json")).exists()
    subprocess.run(command, cwd=REPO, env=environment, check=True, **quiet)
    resumed = json.loads(Path(layout.round(0, "metrics.json")).read_text())
    assert resumed == json.loads(Path(reference[0].round(0, "metrics.json")).read_text())
    resumed_steps = [json.loads(line)["step"] for line in log.read_text().splitlines()[logged_before:]]
    assert resumed_steps == list(range(saved + 1, STEPS + 1)), "the resumed run redoes no saved step"


def test_a_second_round_labels_with_the_promoted_model(ingested, reference, capsys) -> None:
    layout, first = reference
    assert first["promoted"] and first["reason"].startswith("round.gate=always")
    phrases_before = Ledger(layout, "phrases").units()
    # A world without the generator's crawl truth, as a real crawl's: the round runs, its labels' quality n/a.
    world = Path(layout.url).parent / "world"
    shutil.copytree(ingested.world, world, ignore=shutil.ignore_patterns("crawl_truth.json"))
    second = run_round(layout, world, 1, None, CONFIG, TRAIN)
    assert second["pseudo"] is None and Path(layout.round(1, "report.html")).is_file()
    lineage = json.loads(Path(layout.round(1, "lineage.json")).read_text())
    assert lineage["teacher"]["checkpoint"] == layout.round(0, "promoted") and lineage["parent_round"] == 0
    assert Ledger(layout, "phrases").units() == phrases_before  # the phrase tables are reused
    first_folder = json.loads(Path(layout.round(0, "lineage.json")).read_text())["labels"]["folder"]
    assert lineage["labels"]["folder"] != first_folder  # the new teacher labels anew
    assert lineage["labels"]["shards"] == graph.derived(layout, "phrases")  # every ingested shard
    assert second["models"]["teacher"] == first["models"]["student"]
    # bench/round_chain.py: round 0's baseline trained on, round 1's steps more, on the human set alone.
    spec = importlib.util.spec_from_file_location("round_chain", REPO / "bench" / "round_chain.py")
    chain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chain)
    with pytest.raises(SystemExit) as refused:  # not the options the rounds ran with
        chain.main(["--root", layout.url, "--world", str(world)])
    assert refused.value.code == 2 and "ran with other options" in capsys.readouterr().err
    assert chain.main(["--root", layout.url, "--world", str(world), *(f"--set={item}" for item in SETS)]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    evaluated = json.loads(Path(layout.round(1, "eval/baseline-chain.json")).read_text())
    assert figures["rounds"] == 2 and figures["steps"] == 2 * STEPS
    assert figures["chain_ap"] == evaluated["ap"]
    assert figures["student_ap"] == second["models"]["student"]["ap"]
    assert torch.load(layout.round(1, "baseline-chain/train_state.pt"), weights_only=True)["step"] == STEPS


def test_a_kept_teacher_is_reused_and_a_round_with_nothing_new_stops(ingested, tmp_path) -> None:
    layout = Layout(str(tmp_path / "root"))
    units = graph.derived(Layout(str(ingested.root)), "phrases")  # the ingested image shards
    shutil.copytree(ingested.root, tmp_path / "root")
    lineage = {"promoted": False, "reason": "the student is worse", "teacher": {"checkpoint": "/models/t"},
               "labels": {"shards": units}}  # fmt: skip
    layout.fs.makedirs(layout.round(0), exist_ok=True)
    Path(layout.round(0, "lineage.json")).write_text(json.dumps(lineage))
    with pytest.raises(NothingNew, match="round 1 would repeat it"):
        previous_teacher(layout, 1)
    lineage["labels"]["shards"] = units[:-1]  # one shard ingested since round 0
    Path(layout.round(0, "lineage.json")).write_text(json.dumps(lineage))
    teacher, why = previous_teacher(layout, 1)
    assert teacher == "/models/t" and "kept" in why and "1 new crawl shards" in why
    with pytest.raises(FileNotFoundError, match="round 1 has not finished"):
        previous_teacher(layout, 2)


def test_the_gate_needs_no_loss_and_a_margin() -> None:
    base = {"ap": 0.40, "apr": 0.20}
    assert promote({"baseline": base, "student": {"ap": 0.41, "apr": 0.25}}, 0.01)[0]
    assert not promote({"baseline": base, "student": {"ap": 0.39, "apr": 0.30}}, 0.01)[0]  # worse on AP
    assert not promote({"baseline": base, "student": {"ap": 0.405, "apr": 0.205}}, 0.01)[
        0
    ]  # below the margin


def test_a_root_only_this_process_sees_is_refused_before_anything_is_labelled(tmp_path, capsys) -> None:
    layout = Layout("memory://round-root")
    with pytest.raises(
        ValueError, match="a round needs a root that its Ray workers see .* not memory://round-root"
    ):
        run_round(layout, tmp_path / "no-world", 0, tmp_path / "no-teacher", CONFIG, TRAIN)
    assert not layout.fs.exists(layout.root)  # nothing written: no label folder, no ledger
    with pytest.raises(SystemExit) as stopped:
        round_job.main(["--root", "memory://round-root", "--world", str(tmp_path)])
    assert (
        stopped.value.code == 2 and "a round needs a root that its Ray workers see" in capsys.readouterr().err
    )


def test_a_round_on_an_s3_root_equals_the_local_round_and_resumes_from_the_mirror(
    ingested, reference, s3_server: S3Endpoint, tmp_path
) -> None:
    """The root on S3 (moto), its options given only to the Layout: labels, the training runs' saves (mirrored
    from a local work folder), evaluations, promoted model and lineage land on S3, with the local round's
    metrics and promoted weights. Run again from an empty work folder (another machine): nothing is retrained."""
    local, first = reference
    options = s3_server.storage_options
    root = f"s3://{s3_server.bucket()}/engine"
    layout = Layout(root, **options)
    for file in sorted(p for p in ingested.root.rglob("*") if p.is_file()):
        storage.write_bytes(layout.fs, storage.join(layout.root, file.relative_to(ingested.root).as_posix()),
                            file.read_bytes())  # fmt: skip
    work = tmp_path / "work"
    assert run_round(layout, ingested.world, 0, ingested.teacher, CONFIG, TRAIN, work) == first
    fs = layout.fs
    promoted = fs.cat_file(layout.round(0, "promoted/model.safetensors"))
    assert promoted == (Path(local.round(0, "promoted")) / "model.safetensors").read_bytes()
    lineage = storage.read_json(fs, layout.round(0, "lineage.json"))
    assert lineage["promoted_checkpoint"] == f"{root}/rounds/r0/promoted"
    for run in ("baseline", "student"):
        assert storage.read_json(fs, layout.round(0, f"{run}/saved.json")) == {
            "step": STEPS, "save": f"saves/{STEPS:08d}"
        }  # fmt: skip
        assert storage.list_names(fs, layout.round(0, f"{run}/saves")) == [
            f"{STEPS:08d}"
        ]  # older ones removed
        assert (
            fs.cat_file(layout.round(0, f"{run}/saves/{STEPS:08d}/checkpoint/model.safetensors"))
            == (Path(local.round(0, run)) / "checkpoint" / "model.safetensors").read_bytes()
        )
    marks = {run: fs.info(layout.round(0, f"{run}/saved.json"))["ETag"] for run in ("baseline", "student")}
    evaluated = {name: fs.info(name)["ETag"] for name in fs.ls(layout.round(0, "eval"), detail=False)}
    shutil.rmtree(work)
    fs.invalidate_cache()
    assert run_round(layout, ingested.world, 0, ingested.teacher, CONFIG, TRAIN, work) == first
    assert {run: fs.info(layout.round(0, f"{run}/saved.json"))["ETag"] for run in marks} == marks
    assert {name: fs.info(name)["ETag"] for name in fs.ls(layout.round(0, "eval"), detail=False)} == evaluated
    for run in ("baseline", "student"):  # brought back from the mirror, not trained again
        assert torch.load(work / "rounds" / "r0" / run / "train_state.pt", weights_only=True)["step"] == STEPS
    # A pseudo-labelled record names its image by URL and byte range; the round remembered the root's options
    # for this process (and hands them to its training workers): a crawl image reads from S3 as from the disk.
    folder = lineage["labels"]["folder"]
    shard = lineage["labels"]["shards"][0]
    tar = layout.label_shard(folder, shard, ".tar")
    key, where = next((k, w) for k, w in tars.member_index(fs, tar).items() if k[1] == "jpg")
    local_tar = local.label_shard(folder, shard, ".tar")
    expected = read_image_at(local_tar, tuple(tars.member_index(local.fs, local_tar)[key]))
    assert read_image_at(layout.url_of(tar), tuple(where)).tobytes() == expected.tobytes()
