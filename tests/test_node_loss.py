"""Node loss: a label run on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head without
CPUs and two one-CPU worker nodes on this machine, as Ray's own tests do) loses a worker node in the middle,
and still ends with every unit in the ledger and every image labelled exactly once, the same rows and bytes
as a run that lost nothing."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from pipeline import graph
from pipeline.label import LabelConfig, LabelSettings, label_worker
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from teacher import TeacherConfig
from tests._crawl import tiny_teacher
from tests.test_label import CAPTIONS, _jpeg, make_shard

pytestmark = pytest.mark.timeout(300)  # a hung run fails with a traceback

SHARDS = [f"part-{i:05d}/00000" for i in range(4)]
IMAGES_PER_SHARD = 2
OBJECT_STORE_BYTES = 80 * 1024**2


def _samples(shard_index: int) -> list[dict]:
    sizes = [(120, 90), (80, 140), (150, 100)]
    return [
        {
            "key": f"{shard_index:04d}{i:05d}",
            "caption": CAPTIONS[(shard_index + i) % len(CAPTIONS)][0],
            "phrases": CAPTIONS[(shard_index + i) % len(CAPTIONS)][1],
            "jpeg": _jpeg(100 * shard_index + i, sizes[i % len(sizes)]),
        }
        for i in range(IMAGES_PER_SHARD)
    ]


@dataclass(frozen=True)
class World:
    root: Path  # ingested + phrased shards, ledger entries included; copied by each run
    settings: LabelSettings
    uids: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("node-loss")
    layout = Layout(str(base / "root"))
    uids = []
    for index, shard in enumerate(SHARDS):
        samples = _samples(index)
        make_shard(layout, samples, shard)
        uids += [s["uid"] for s in samples]
    teacher = TeacherConfig(checkpoint=str(tiny_teacher(base / "teacher")), device="cpu", batch_size=2)
    label = LabelConfig(floor_score=0.0, max_boxes_per_image=4, batch_size=2, prefetch_images=2)
    return World(base / "root", LabelSettings(teacher, label), sorted(uids))


def _labels(root: Path, settings: LabelSettings) -> dict[str, Any]:
    """What a label run leaves: its finished units, its parquet rows and the bytes of its label tars."""
    layout = Layout(str(root))
    folder = root / "labels" / settings.folder
    rows = [row for path in sorted(folder.rglob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    tars = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}
    return {"units": Ledger(layout, graph.STAGES.ledger_name("label", settings)).units(), "rows": rows,
            "tars": tars}  # fmt: skip


@pytest.fixture(scope="module")
def reference(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same run without node loss: in this process, one torch thread as in a one-CPU actor (the same
    float reductions, hence the same scores)."""
    root = tmp_path_factory.mktemp("reference") / "root"
    shutil.copytree(world.root, root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = graph.run(Layout(str(root)), "label", world.settings, in_process=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.complete and sorted(result.results) == SHARDS
    found = _labels(root, world.settings)
    found["job"] = (root / "labels" / world.settings.folder / "_job.json").read_bytes()
    return found


@dataclass
class LocalCluster:
    cluster: Cluster
    workers: list[Any]


@pytest.fixture
def local_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    """A head with no CPUs (the driver's node: nothing of the run lands there) and two worker nodes of one CPU
    each, small object stores. Its temp dir is private (``RAY_TMPDIR``): ``Cluster`` writes the address file
    that a plain ``ray.init()`` joins, which must not be the shared /tmp/ray one."""
    temp = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: Ray's socket paths are long
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Every node on 127.0.0.1: Ray otherwise swaps a loopback address for the host's interface address (in
    # this process, whose Ray constants are already read, and in the nodes' processes, through the env).
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    if ray.is_initialized():
        ray.shutdown()
    node = {"object_store_memory": OBJECT_STORE_BYTES, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False}
    )
    try:
        workers = [cluster.add_node(**node, num_cpus=1) for _ in range(2)]
        ray.init(address=cluster.address, logging_level="WARNING")
        yield LocalCluster(cluster, workers)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


class MarkingLabelWorker:
    """The label stage's own worker, which first leaves a marker naming the node it runs on (next to the
    root, not in it): the test then knows which unit is in flight where. ``prepare`` is the label worker's."""

    def __init__(self, settings: LabelSettings) -> None:
        self._worker = label_worker(settings)

    def prepare(self, layout: Layout) -> dict:
        return self._worker.prepare(layout)

    def __call__(self, layout: Layout, unit: str) -> Any:
        markers = Path(layout.root).parent / "started"
        markers.mkdir(exist_ok=True)
        hidden = (
            markers / f".{unit.replace('/', '_')}"
        )  # written whole, then renamed: never read half-written
        hidden.write_text(ray.get_runtime_context().get_node_id())
        hidden.replace(markers / hidden.name[1:])
        _hold_until_the_node_is_removed(markers.parent)
        return self._worker(layout, unit)


def _hold_until_the_node_is_removed(base: Path, timeout_s: float = 120.0) -> None:
    """The first unit of the run goes ahead; every later one waits for the remover's flag, so the unit whose
    node is removed is surely in flight (not finished in the moment the removal takes). Without a remover
    (no flag ever), a unit goes ahead after ``timeout_s``."""
    try:
        os.close(os.open(base / "first", os.O_CREAT | os.O_EXCL))
        return
    except FileExistsError:
        pass
    raylet = os.getppid()
    deadline = time.monotonic() + timeout_s
    while not (base / "removed").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if os.getppid() != raylet:
        # This node's raylet was killed: Ray's worker would notice within a second and exit; a unit must not
        # finish in that second (actor results travel worker to driver, not through the dead raylet).
        os._exit(1)


MARKED = graph.STAGES.with_stage(
    dataclasses.replace(graph.STAGES["label"], worker="tests.test_node_loss:MarkingLabelWorker")
)


class _RemoveNodeMidRun(threading.Thread):
    """Once the first unit has its ledger entry, removes the worker node that runs a unit without one (held
    in flight by ``_hold_until_the_node_is_removed``), then lets the held units go on."""

    def __init__(self, cluster: LocalCluster, root: Path, ledger: Ledger) -> None:
        super().__init__(daemon=True)
        self.cluster, self.markers, self.ledger = cluster, root.parent / "started", ledger
        self.finished_before_removal: list[str] | None = None
        self.in_flight: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        nodes = {node.node_id: node for node in self.cluster.workers}
        while not self.stop.is_set():
            finished = self.ledger.units()
            found = list(self.markers.iterdir()) if self.markers.exists() else []
            markers = sorted(
                (p for p in found if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime
            )
            running = [p for p in markers if p.name.replace("_", "/", 1) not in finished]
            if finished and running:
                newest = running[-1]  # the unit with the most work left: it is surely still in flight
                self.finished_before_removal, self.in_flight = finished, newest.name.replace("_", "/", 1)
                self.cluster.cluster.remove_node(nodes[newest.read_text()], allow_graceful=False)
                (self.markers.parent / "removed").touch()  # the held units go on (one of them, retried)
                return
            time.sleep(0.02)


def test_label_run_survives_losing_a_worker_node(
    world: World, reference: dict[str, Any], local_cluster: LocalCluster, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(world.root, root)
    job = root / "labels" / world.settings.folder / "_job.json"
    job.parent.mkdir(parents=True)
    job.write_bytes(reference["job"])  # the rows' created_at is the job's: the same job file, the same bytes
    layout = Layout(str(root))
    remover = _RemoveNodeMidRun(
        local_cluster, root, Ledger(layout, MARKED.ledger_name("label", world.settings))
    )
    remover.start()
    try:
        result = graph.run(layout, "label", world.settings, table=MARKED, workers=2, progress=False)
    finally:
        remover.stop.set()
        remover.join(timeout=60)
    assert remover.in_flight is not None, "the node must be removed during the run"
    assert remover.in_flight not in remover.finished_before_removal
    assert 1 <= len(remover.finished_before_removal) < len(SHARDS), "removed at a real mid-run point"
    assert result.complete, result.table()
    assert sorted(result.results) == SHARDS
    assert result.results[remover.in_flight].attempts == 2  # its try on the lost node, then one that finished
    found = _labels(root, world.settings)
    assert found["units"] == SHARDS
    assert (
        sorted(row["uid"] for row in found["rows"]) == world.uids
    )  # every image once: none lost, none twice
    assert found == {key: reference[key] for key in found}  # the same rows and bytes as without the loss
    # A process killed mid-write leaves its temporary file (never its final name, which readers trust); any
    # left belongs to the unit that was in flight.
    for leftover in root.rglob("*.tmp-*"):
        assert remover.in_flight in leftover.relative_to(root).as_posix(), leftover
