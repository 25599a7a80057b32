"""The executor on real local Ray and in process: every unit once, dead actors replaced, failures contained,
units committed (error table, then ledger entry, then after_commit)."""

from __future__ import annotations

import os
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import pytest

from pipeline import storage
from pipeline.executor import UnitResult, WorkerStartError, failed_units, run_units
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import ERROR_SCHEMA, UnitOutput, validate
from tests._ray_cluster import local_ray  # noqa: F401 - the fixture

# A hang must fail with a traceback, not stall the suite.
pytestmark = pytest.mark.timeout(180)

UNITS = [f"part/{i:05d}" for i in range(6)]
Units = tuple[str, ...]


class ToyWorker:
    """A stand-in stage: writes ``<root>/out/<unit>.txt`` atomically and logs each completion.

    ``die_on``: units on which the actor process exits (``os._exit``) the first time only (a marker file
    remembers); ``fail_on``: units that always raise; ``hang_on``: units that never return.
    """

    def __init__(
        self, die_on: Units = (), fail_on: Units = (), hang_on: Units = (), broken: bool = False,
        pause_s: float = 0.0,
    ) -> None:  # fmt: skip
        if broken:
            raise RuntimeError("cannot load the model")
        self.die_on, self.fail_on, self.hang_on, self.pause_s = die_on, fail_on, hang_on, pause_s
        self.pid = os.getpid()

    def __call__(self, layout: Layout, unit: str) -> dict[str, Any]:
        base = Path(layout.root)
        name = unit.replace("/", "_")
        time.sleep(self.pause_s)
        if unit in self.fail_on:
            raise ValueError(f"corrupt shard {unit}")
        if unit in self.hang_on:
            time.sleep(3600)
        marker = base / "died" / name
        if unit in self.die_on and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os._exit(1)
        out = base / "out" / f"{name}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_suffix(f".tmp-{uuid.uuid4().hex}")
        temporary.write_text(f"{unit}\n")
        os.replace(temporary, out)
        with open(base / "completions.log", "a") as log:  # one line per finished call: duplicates show
            log.write(f"{unit}\n")
        return {"unit": unit, "pid": self.pid}


def _completions(root: Path) -> list[str]:
    path = root / "completions.log"
    return sorted(path.read_text().split()) if path.exists() else []


def _outputs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "out").iterdir())


def _expected_outputs(units: list[str]) -> list[str]:
    return sorted(f"{u.replace('/', '_')}.txt" for u in units)


@pytest.mark.usefixtures("local_ray")
def test_every_unit_runs_once_across_workers(tmp_path: Path) -> None:
    results = run_units(Layout(str(tmp_path)), UNITS, partial(ToyWorker, pause_s=0.3), num_workers=2,
                        progress=False)  # fmt: skip
    assert list(results) == UNITS
    assert all(r.status == "done" and r.attempts == 1 and r.error is None for r in results.values())
    assert [r.stats["unit"] for r in results.values()] == UNITS
    assert len({r.stats["pid"] for r in results.values()}) == 2  # both actors took units
    assert _completions(tmp_path) == UNITS
    assert _outputs(tmp_path) == _expected_outputs(UNITS)


@pytest.mark.parametrize("ray_retries", [0, 2], ids=["pool-replaces", "ray-restarts"])
@pytest.mark.usefixtures("local_ray")
def test_actor_killed_mid_unit_is_replaced_and_nothing_lost(tmp_path: Path, ray_retries: int) -> None:
    dying = (UNITS[1], UNITS[4])
    results = run_units(
        Layout(str(tmp_path)), UNITS, partial(ToyWorker, die_on=dying), num_workers=2, max_restarts=ray_retries,
        max_task_retries=ray_retries, progress=False,
    )  # fmt: skip
    assert failed_units(results) == []
    assert sorted(p.name for p in (tmp_path / "died").iterdir()) == [u.replace("/", "_") for u in dying]
    # Each unit finished exactly once: the killed tries left neither an output nor a completion.
    assert _completions(tmp_path) == UNITS
    assert _outputs(tmp_path) == _expected_outputs(UNITS)
    assert not list((tmp_path / "out").glob("*.tmp-*"))
    expected_attempts = 1 if ray_retries else 2  # Ray's own retry is invisible to the pool
    assert [results[u].attempts for u in dying] == [expected_attempts] * 2


@pytest.mark.usefixtures("local_ray")
def test_application_error_fails_its_unit_only(tmp_path: Path) -> None:
    bad = UNITS[2]
    results = run_units(Layout(str(tmp_path)), UNITS, partial(ToyWorker, fail_on=(bad,)), num_workers=2,
                        max_attempts=2, progress=False)  # fmt: skip
    assert failed_units(results) == [bad]
    failure = results[bad]
    assert failure.status == "failed" and failure.attempts == 2 and failure.stats is None
    assert "ValueError" in failure.error and f"corrupt shard {bad}" in failure.error
    done = [u for u in UNITS if u != bad]
    assert _completions(tmp_path) == done
    assert all(results[u].status == "done" for u in done)


@pytest.mark.usefixtures("local_ray")
def test_stuck_unit_times_out_and_others_finish(tmp_path: Path) -> None:
    stuck = UNITS[0]
    results = run_units(Layout(str(tmp_path)), UNITS[:3], partial(ToyWorker, hang_on=(stuck,)), num_workers=2,
                        max_attempts=1, unit_timeout_s=4, progress=False)  # fmt: skip
    assert failed_units(results) == [stuck]
    assert results[stuck].error.startswith("timeout: TimeoutError")
    assert _completions(tmp_path) == UNITS[1:3]


@pytest.mark.usefixtures("local_ray")
def test_workers_that_cannot_start_stop_the_run(tmp_path: Path) -> None:
    with pytest.raises(WorkerStartError, match="cannot load the model"):
        run_units(
            Layout(str(tmp_path)), UNITS, partial(ToyWorker, broken=True), num_workers=1, progress=False
        )
    assert _completions(tmp_path) == []


@pytest.mark.usefixtures("local_ray")
def test_unschedulable_workers_time_out(tmp_path: Path) -> None:
    # No GPU on this Ray: the actors stay pending, which must end in an error, not a wait forever.
    with pytest.raises(WorkerStartError, match="no worker started within 3 s"):
        run_units(Layout(str(tmp_path)), UNITS, ToyWorker, num_workers=1, num_gpus_per_worker=1,
                  startup_timeout_s=3, progress=False)  # fmt: skip


def test_memory_root_runs_in_process(tmp_path: Path) -> None:
    """A memory:// root is invisible to Ray workers; the sequential executor runs it with the same policy."""
    root = f"memory://executor-{uuid.uuid4().hex}"
    layout = Layout(root)
    assert layout.in_driver_memory and not Layout(str(tmp_path)).in_driver_memory
    fs = fsspec.filesystem("memory")

    def writer() -> Any:
        def work(layout: Layout, unit: str) -> dict[str, Any]:
            if unit == UNITS[3]:
                raise KeyError("missing column")
            fs.pipe(f"{layout.url}/out/{unit}.txt", unit.encode())
            return {"unit": unit, "pid": os.getpid()}

        return work

    results = run_units(layout, UNITS, writer, num_workers=2, progress=False)
    assert failed_units(results) == [UNITS[3]] and results[UNITS[3]].attempts == 3
    assert {r.stats["pid"] for r in results.values() if r.stats} == {os.getpid()}
    assert sorted(fs.find(f"{root}/out")) == sorted(f"/{root[len('memory://'):]}/out/{u}.txt"
                                                    for u in UNITS if u != UNITS[3])  # fmt: skip
    fs.rm(root, recursive=True)


def test_inprocess_executor_matches_the_pool(tmp_path: Path) -> None:
    results = run_units(Layout(str(tmp_path)), UNITS, partial(ToyWorker, fail_on=(UNITS[0],)), in_process=True,
                        max_attempts=2, progress=False)  # fmt: skip
    assert results[UNITS[0]] == UnitResult(UNITS[0], "failed", None, results[UNITS[0]].error, 2)
    assert _completions(tmp_path) == UNITS[1:]


def test_units_must_be_distinct(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct"):
        run_units(Layout(str(tmp_path)), ["a", "a"], ToyWorker, num_workers=1)


class CommittingWorker:
    """Returns one error row per unit, records what it saw at ``prepare`` and ``after_commit``."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def prepare(self, layout: Layout) -> None:
        self.events.append("prepare")

    def __call__(self, layout: Layout, unit: str) -> UnitOutput:
        assert not Ledger(layout, "toy").is_done(unit)
        return UnitOutput({"rows": 1}, [{"uid": "u1", "reason": "bad_input", "detail": unit}])

    def after_commit(self, layout: Layout, unit: str) -> None:
        # The ledger entry is written before this hook: it may remove what the entry makes redundant.
        assert Ledger(layout, "toy").is_done(unit)
        self.events.append(f"committed {unit}")


def test_units_are_committed_error_table_then_ledger_then_after_commit(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    worker = CommittingWorker()
    results = run_units(
        layout, UNITS[:2], lambda: worker, "toy", in_process=True, prepare=True, progress=False
    )
    assert worker.events == ["prepare", *(f"committed {u}" for u in UNITS[:2])]
    assert Ledger(layout, "toy").units() == UNITS[:2]
    for unit in UNITS[:2]:
        entry = Ledger(layout, "toy").get(unit)
        assert entry["rows"] == 1 and entry["stage"] == "toy" and results[unit].stats == entry
        errors = storage.read_parquet(layout.fs, layout.errors("toy", unit))
        validate(errors, ERROR_SCHEMA)
        assert errors.to_pylist() == [{"uid": "u1", "stage": "toy", "reason": "bad_input", "detail": unit,
                                       "url": None, "caption": None}]  # fmt: skip


@pytest.mark.usefixtures("local_ray")
def test_prepare_runs_once_on_ray_before_the_units(tmp_path: Path) -> None:
    results = run_units(Layout(str(tmp_path)), UNITS[:2], PreparedWorker, "toy", prepare=True, progress=False)
    assert failed_units(results) == []
    assert (tmp_path / "prepared").read_text() == "1"
    with pytest.raises(WorkerStartError, match="preparing the run failed"):
        run_units(Layout(str(tmp_path / "broken")), UNITS[:1], partial(PreparedWorker, fail=True), "toy",
                  prepare=True, progress=False)  # fmt: skip


class PreparedWorker:
    """Counts its ``prepare`` calls in ``<root>/prepared``; units fail unless prepared."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def prepare(self, layout: Layout) -> None:
        if self.fail:
            raise RuntimeError("the job file belongs to another teacher")
        marker = Path(layout.root) / "prepared"
        marker.write_text(str(int(marker.read_text()) + 1 if marker.exists() else 1))

    def __call__(self, layout: Layout, unit: str) -> dict[str, Any]:
        assert (Path(layout.root) / "prepared").exists()
        return {"unit": unit}
