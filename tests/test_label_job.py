"""The label job end to end on real Ray: a crawl ingested from a loopback server, phrases, a tiny random
teacher; re-runs, a driver killed with SIGKILL, memory:// and s3:// (moto) roots, and ``ray job submit`` to
a local head with token authentication. Every run must write the same bytes as the first."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from jobs import label as job
from pipeline import graph, storage
from pipeline.executor import WorkerStartError
from pipeline.label import LabelSettings
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.phrases import PhraseConfig
from teacher.teacher import TeacherConfig
from tests._crawl import served_crawl, tiny_teacher
from tests._ray_cluster import REPO, RayHead, local_ray  # noqa: F401 - the fixture
from tests._s3 import S3Endpoint, s3_server  # noqa: F401 - the fixture

# A hang must fail with a traceback, not stall the suite.
pytestmark = pytest.mark.timeout(600)

SHARD_SIZE = 4
CRAWL_IMAGES = 22  # served; with the dead URLs, 24 crawl rows: 6 shards
DEAD_URLS = 2
SHARDS = [f"part-00000/{i:05d}" for i in range(-(-(CRAWL_IMAGES + DEAD_URLS) // SHARD_SIZE))]


@dataclass(frozen=True)
class World:
    ingested: Path  # an output root after ingest, copied by each test
    truth: Path
    teacher: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A tiny crawl downloaded by the real ingest stage from a loopback HTTP server, and a teacher."""
    base = tmp_path_factory.mktemp("label-job")
    with served_crawl(base, crawl_images=CRAWL_IMAGES, dead_urls=DEAD_URLS) as crawl:
        config = crawl.ingest_config(number_sample_per_shard=SHARD_SIZE)
        result = graph.run(Layout(str(base / "ingested")), "ingest", config, progress=False)
        assert result.complete and result.totals("counts")["success"] == CRAWL_IMAGES
    return World(base / "ingested", crawl.truth, tiny_teacher(base / "teacher"))


def _args(root: str, world: World, *extra: str) -> list[str]:
    return ["--root", root, "--teacher", str(world.teacher), "--set", "label.floor_score=0.0", "--threshold", "0.0",
            "--quiet", *extra]  # fmt: skip


# ------------------------------------------------------------------------------------------ roots, content


def _copy_root(source: Path, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy a local output root to any fsspec URL."""
    fs, path = storage.filesystem(url, **(storage_options or {}))
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        storage.write_bytes(fs, storage.join(path, file.relative_to(source).as_posix()), file.read_bytes())


def content(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run leaves: every byte of phrases/, labels/ and errors/, and the finished units of every stage.

    Ledger entries themselves carry wall-clock times, so only their unit names are compared."""
    layout = Layout(url, **(storage_options or {}))
    fs, path = layout.fs, layout.root
    found: dict[str, Any] = {}
    for folder in ("phrases", "labels", "errors"):
        for file in fs.find(storage.join(path, folder)):
            found[file[len(path) :].lstrip("/")] = fs.cat_file(file)
    stages = [
        name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(storage.join(path, "ledger"), detail=False)
    ]
    found["ledger"] = {stage: Ledger(layout, stage).units() for stage in stages}
    assert not [name for name in found if ".tmp-" in name]
    return found


def _teacher_folder(reference: dict[str, Any]) -> str:
    [folder] = {name.split("/")[1] for name in reference if name.startswith("labels/")}
    return folder


def _share_job_file(
    reference: dict[str, Any], url: str, storage_options: dict[str, Any] | None = None
) -> None:
    """Give another root the reference run's job file: the label rows' ``created_at`` is the job's start time,
    so with the same job file a run must write the same bytes."""
    name = f"labels/{_teacher_folder(reference)}/_job.json"
    fs, path = storage.filesystem(url, **(storage_options or {}))
    storage.write_bytes(fs, storage.join(path, name), reference[name])


@pytest.fixture(scope="module")
def reference(world: World, local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run of the job on a local root, on the in-process Ray, two workers."""
    root = tmp_path_factory.mktemp("reference") / "root"
    shutil.copytree(world.ingested, root)
    assert job.main(_args(str(root), world, "--workers", "2", "--truth", str(world.truth))) == 0
    found = content(str(root))
    found["root"] = str(root)
    return found


def _without_root(found: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in found.items() if k != "root"}


# ----------------------------------------------------------------------------------------------- the tests


def test_job_labels_every_shard_and_a_rerun_changes_nothing(
    reference: dict[str, Any], world: World, capsys: pytest.CaptureFixture
) -> None:
    teacher = _teacher_folder(reference)
    assert reference["ledger"]["phrases"] == SHARDS
    assert reference["ledger"][f"label-{teacher}"] == SHARDS
    for shard in SHARDS:
        for suffix in (".parquet", ".tar"):
            assert f"labels/{teacher}/{shard}{suffix}" in reference
        assert (
            f"errors/label-{teacher}/{shard}.parquet" in reference
            and f"errors/phrases/{shard}.parquet" in reference
        )
    capsys.readouterr()
    assert job.main(_args(reference["root"], world, "--truth", str(world.truth))) == 0
    out = capsys.readouterr().out
    assert "phrases: 0 unit(s), 0 failed" in out and f"label-{teacher}: 0 unit(s), 0 failed" in out
    assert (
        f'"images": {CRAWL_IMAGES}' in out and '"precision": ' in out
    )  # the quality line covers all finished shards
    assert _without_root(content(reference["root"])) == _without_root(reference)


def test_driver_killed_mid_job_then_rerun_writes_the_same_bytes(
    reference: dict[str, Any], world: World, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(world.ingested, root)
    _share_job_file(reference, str(root))
    teacher = _teacher_folder(reference)
    ledger = root / "ledger" / f"label-{teacher}"
    command = [sys.executable, "-m", "jobs.label", *_args(str(root), world, "--workers", "1")]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    try:
        finished = _wait_for_first_entry(ledger, driver, timeout_s=300)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        _end_session(driver)
    total = len(reference["ledger"][f"label-{teacher}"])
    assert 1 <= len(finished) < total, "the driver must die part-way for this test to mean anything"
    assert job.main(_args(str(root), world, "--workers", "2")) == 0
    assert _without_root(content(str(root))) == _without_root(reference)


def _wait_for_first_entry(ledger: Path, driver: subprocess.Popen, timeout_s: float) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = [p for p in ledger.rglob("*.json") if ".tmp-" not in p.name] if ledger.exists() else []
        if entries:
            return entries
        assert driver.poll() is None, "the job ended before labelling anything"
        time.sleep(0.02)
    raise TimeoutError(f"no label ledger entry in {timeout_s} s")


def _end_session(process: subprocess.Popen) -> None:
    """Kill what is left of the process group the job was started in (its Ray's agents outlive a
    SIGKILLed driver)."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def test_memory_root_runs_in_process_with_the_same_bytes(reference: dict[str, Any], world: World) -> None:
    torch.set_num_threads(1)  # as in a Ray actor: the same float reductions, hence the same scores
    root = f"memory://label-job-{uuid.uuid4().hex}"
    _copy_root(world.ingested, root)
    _share_job_file(reference, root)
    try:
        assert job.main(_args(root, world, "--workers", "2")) == 0
        assert _without_root(content(root)) == _without_root(reference)
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_s3_root_end_to_end(
    reference: dict[str, Any], world: World, s3_server: S3Endpoint, tmp_path: Path
) -> None:
    """The root and the teacher on S3 (the teacher read with the root's options, copied into a cache by the
    driver and by each actor): the bytes of a local root labelled with the local teacher."""
    bucket = s3_server.bucket()
    root, teacher = f"s3://{bucket}/engine", f"s3://{bucket}/models/{world.teacher.name}"
    options = s3_server.storage_options
    _copy_root(world.ingested, root, options)
    _copy_root(world.teacher, teacher, options)
    _share_job_file(reference, root, options)
    flags = [f"--storage-option={key}={value}" for key, value in options.items()]
    cache = tmp_path / "cache"
    extra = ["--teacher", teacher, "--set", f"teacher.cache={cache}"]
    assert job.main(_args(root, world, "--workers", "2", *flags, *extra)) == 0
    assert _without_root(content(root, options)) == _without_root(reference)
    [copy] = (cache / "checkpoints").iterdir()  # one copy, shared by the driver and both actors
    assert sorted(p.name for p in (copy / world.teacher.name).iterdir()) == sorted(
        p.name for p in world.teacher.iterdir()
    )


@pytest.mark.usefixtures("local_ray")
def test_teacher_that_cannot_load_stops_the_stage_before_any_shard(world: World, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(world.ingested, root)
    missing = tmp_path / "no-such-teacher"
    missing.mkdir()  # a folder without weights: the teacher's name is known, loading it fails
    (missing / "model.safetensors").write_bytes(b"not a safetensors file")
    settings = LabelSettings(TeacherConfig(checkpoint=str(missing)))
    assert graph.run(Layout(str(root)), "phrases", PhraseConfig(), in_process=True, progress=False).complete
    with pytest.raises(WorkerStartError, match="preparing the run failed"):
        graph.run(Layout(str(root)), "label", settings, progress=False)
    assert not (root / "labels").exists()


@pytest.mark.slow
def test_ray_job_submit_to_a_token_auth_head(reference: dict[str, Any], world: World, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(world.ingested, root)
    _share_job_file(reference, str(root))
    job_id = f"label-{uuid.uuid4().hex[:8]}"
    with RayHead(num_cpus=2) as head:
        denied = head.ray("job", "list", "--address", head.address, timeout_s=60, with_token=False)
        assert denied.returncode != 0 and "Unauthorized" in denied.stdout + denied.stderr
        submitted = head.ray(
            "job", "submit", "--address", head.address, "--working-dir", ".", "--submission-id", job_id,
            "--", "python", "-m", "jobs.label", *_args(str(root), world, "--workers", "2"),
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:] + head.log()
        status = head.ray("job", "status", "--address", head.address, job_id, timeout_s=60)
        assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr
        logs = head.ray("job", "logs", "--address", head.address, job_id, timeout_s=60).stdout
        assert f"label-{_teacher_folder(reference)}: {len(SHARDS)} unit(s), 0 failed" in logs
    assert _without_root(content(str(root))) == _without_root(reference)


def test_export_job_writes_coco_and_odvg_that_readers_accept(
    reference: dict[str, Any], world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pycocotools.coco import COCO

    from jobs import export

    teacher = _teacher_folder(reference)
    root = reference["root"]
    capsys.readouterr()
    coco_json = str(tmp_path / "c.json")
    common = ["--root", root, "--threshold", "0.0"]  # a random teacher scores low: keep every labelled box
    assert export.main([*common, "--teacher", teacher, "--format", "coco", "--out", coco_json]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    coco = COCO(coco_json)
    assert len(coco.getImgIds()) == printed["images"] == CRAWL_IMAGES
    assert len(coco.getAnnIds()) == printed["annotations"] > 0
    for annotation in coco.loadAnns(coco.getAnnIds()):
        x, y, width, height = annotation["bbox"]
        image = coco.loadImgs(annotation["image_id"])[0]
        assert (
            width > 0
            and height > 0
            and x + width <= image["width"] + 1e-3
            and y + height <= image["height"] + 1e-3
        )
        start, end = annotation["tokens_positive"][0]
        assert image["caption"][start:end] == annotation["phrase"]
    # The teacher named by its checkpoint gives the same folder; ODVG is one JSON record per line.
    odvg = tmp_path / "labels.odvg.jsonl"
    assert (
        export.main([*common, "--teacher", str(world.teacher), "--format", "odvg", "--out", str(odvg)]) == 0
    )
    records = [json.loads(line) for line in odvg.read_text().splitlines()]
    assert (
        len(records) == CRAWL_IMAGES
        and sum(len(r["grounding"]["regions"]) for r in records) == printed["annotations"]
    )
    for record in records:
        assert {"filename", "height", "width", "grounding", "uid", "teacher"} <= set(record)
        for region in record["grounding"]["regions"]:
            x0, y0, x1, y1 = region["bbox"]
            assert 0 <= x0 < x1 <= record["width"] and 0 <= y0 < y1 <= record["height"]
            ((start, end),) = region["tokens_positive"]
            assert record["grounding"]["caption"][start:end] == region["phrase"]
    with pytest.raises(SystemExit) as exit_info:
        export.main(
            ["--root", root, "--teacher", "no-such-teacher", "--format", "coco", "--out", str(tmp_path / "x")]
        )
    assert exit_info.value.code == 2 and "no finished labels" in capsys.readouterr().err
