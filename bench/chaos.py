"""Chaos trials: the engine's jobs killed at random points, run again until they finish, and their outputs
compared with an uninterrupted run of the same inputs.

    make chaos                                         # = python bench/chaos.py (20 trials, seed 0)
    make chaos CHAOS_ARGS="--trials 40 --seed 3 --out chaos-out --keep"

On a small generated world (``jobs.world``; its crawl served on 127.0.0.1 and downloaded by img2dataset) and a
random tiny teacher (fp32), the runner first runs ``jobs.ingest``, ``jobs.phrases``, ``jobs.label`` and
``jobs.round`` (Ray Train, fp32) once each, uninterrupted, keeping a copy of the root after each: the
reference. A trial copies the root as it was before one stage, starts that stage's job as a subprocess (its own
session, so its in-process Ray lives in its process group), injects one fault at a seeded random point, then
runs the same command again until it exits 0. Faults:

- ``driver``: SIGKILL of the job's whole process group (the driver and its in-process Ray);
- ``ray.kill``: ``ray.kill`` of the stage's busy actor, from a second driver attached to the job's Ray (the
  executor names its actors ``<stage>-<hex>``); ``no_restart`` drawn, so Ray's own restart or the executor's
  replacement takes over;
- ``actor-sigkill``: SIGKILL of the actor's worker process (``ray::_UnitActor``, found in the job's session);
- ``train-worker``: SIGKILL of the round's Ray Train worker (``ray::RayTrainWorker``): the training fails,
  the job exits 1, the rerun resumes from the last checkpoint.

Kill points: phrases and label, after ``k`` ledger entries of the stage (``k`` drawn in ``[0, units)``; an
actor fault also waits for the actor) plus a drawn delay; ingest, a drawn fraction of the reference run's
duration; round, a drawn training run (baseline or student) reaching a drawn step, plus a delay.

What is compared (outputs sorted by uid; ``created_at``, ``finished_at`` and ``seconds`` left out): per table
(image shards' parquet rows, their tar members' bytes, phrase tables, label parquet rows, label tar members with
the JSON's ``created_at`` left out, every error table), each uid's record against the reference's: a uid of the
reference missing is ``lost``, one present more often than in the reference ``duplicated``, a different
record (or an extra uid) ``differing``; the finished units of every ledger; the round's training runs (every
tensor of the student's and the baseline's final state dict, equal to within rtol 1e-6, and their last
step), its ``metrics.json``, ``calibration.json``, ``eval/`` and promoted weights. The read log
(``bench/chaos_site/sitecustomize.py``) records every file of a stage output that any process of a job opens
for reading, with whether its ledger entry existed at that moment; a read without it is counted
(``reads_without_entry``), except ingest reading its own partition's image shards (the producer, before it
commits).

Prints one line per trial, a table, then as the last line one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from glip import checkpoint  # noqa: E402
from jobs._loopback import ImageServer  # noqa: E402
from jobs.world import WorldOptions, generate_world  # noqa: E402
from tests._crawl import tiny_teacher  # noqa: E402

SITE = REPO / "bench" / "chaos_site"
PYTHON = sys.executable
FAULTS = {
    "ingest": ("driver",),
    "phrases": ("driver", "ray.kill", "actor-sigkill"),
    "label": ("driver", "ray.kill", "actor-sigkill"),
    "round": ("driver", "train-worker"),
}
STAGES = tuple(FAULTS)
LEFT_OUT = {"created_at", "finished_at", "seconds"}
SHARD_SIZE = 8
TRAIN_STEPS = 6
# The round of tests/test_round.py: fp32 and one loader process, so a resumed run ends on the same weights.
ROUND_SETS = ("train.steps=6", "train.batch_size=2", "train.freeze_text=false", "train.checkpoint_every=1",
              "train.log_every=1", "train.amp=false", "train.num_workers=0", "round.target_precision=0.5",
              "round.gate=always")  # fmt: skip
RUN_TIMEOUT_S = 600
MAX_RERUNS = 3


# ------------------------------------------------------------------------------------------------ the world


@dataclasses.dataclass(frozen=True)
class Setup:
    """The inputs every run shares: the world (crawl served at ``host``), the teacher, the work folder."""

    world: Path
    host: str
    teacher: Path
    work: Path

    def command(self, stage: str, root: Path) -> list[str]:
        """The job's command line for ``stage`` on ``root``."""
        base = [PYTHON, "-m", f"jobs.{stage}", "--root", str(root)]
        if stage == "ingest":
            return [*base, "--crawl", str(self.world / "crawl"), "--allow-hosts", self.host, "--quiet",
                    f"--set=ingest.number_sample_per_shard={SHARD_SIZE}", "--set=ingest.processes_count=1",
                    "--set=ingest.thread_count=4"]  # fmt: skip
        if stage == "phrases":
            return [*base, "--quiet"]
        if stage == "label":
            return [*base, "--teacher", str(self.teacher), "--quiet"]
        return [*base, "--world", str(self.world), "--teacher", str(self.teacher),
                *(f"--set={item}" for item in ROUND_SETS)]  # fmt: skip

    def snapshot(self, stage: str) -> Path:
        """The reference root after ``stage``."""
        return self.work / "reference" / f"after-{stage}"

    def before(self, stage: str) -> Path | None:
        """The reference root a trial of ``stage`` starts from (None: an empty root)."""
        index = STAGES.index(stage)
        return self.snapshot(STAGES[index - 1]) if index else None


@contextmanager
def world(work: Path, crawl_images: int) -> Iterator[Setup]:
    """Generate the world, serve its crawl, build the teacher (a random tiny GLIP, trainable at 96 px). The
    port is kept in the work folder: a second run on it (``--out``) serves the same URLs, hence the same uids,
    and reuses the reference."""
    port_file = work / "port"
    port = int(port_file.read_text()) if port_file.exists() else 0
    with ImageServer(work, port) as server:
        port_file.write_text(str(server.port))
        options = WorldOptions(out=str(work / "world"), train_images=6, eval_images=12, leaks=0, dead_urls=2,
                               crawl_images=crawl_images, image_size=(64, 128), object_size=(16, 40),
                               base_url=server.base_url)  # fmt: skip
        manifest = generate_world(options)
        server.point_at(work / "world" / manifest["files"]["crawl_images"])
        teacher = tiny_teacher(work / "teacher", 0, "input.train_min_sizes=(96,)")
        yield Setup(work / "world", f"127.0.0.1:{server.port}", teacher, work)


# ------------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class Attempt:
    returncode: int
    seconds: float


def job_environment(root: Path, reads: Path, stage: str) -> dict[str, str]:
    """The job's environment: this repository's code, the read log, one torch thread per process off."""
    return {**os.environ, "PYTHONPATH": f"{SITE}{os.pathsep}{REPO}", "GLIP_CHAOS_READS": str(reads),
            "GLIP_CHAOS_ROOT": str(root), "GLIP_CHAOS_JOB": stage, "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}  # fmt: skip


# Process groups of the jobs running now: the runner stopped (SIGTERM, Ctrl-C) takes them down with it, so no
# orphaned job goes on writing into a work folder that a later run reuses.
_LIVE_GROUPS: set[int] = set()


def start(setup: Setup, stage: str, root: Path, log: Path, reads: Path) -> subprocess.Popen:
    """Start the job in a session of its own (its in-process Ray joins its process group)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(setup.command(stage, root), cwd=REPO, env=job_environment(root, reads, stage),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    _LIVE_GROUPS.add(process.pid)
    return process


def _stop_jobs(signum: int, _frame: Any) -> None:
    for group in list(_LIVE_GROUPS):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def end_session(process: subprocess.Popen) -> None:
    """Wait for the job, then SIGKILL what is left of its process group (a SIGKILLed driver's Ray agents
    outlive it). Only this process group: never anything else on the machine."""
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    _LIVE_GROUPS.discard(process.pid)
    deadline = time.monotonic() + 30
    while session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def run_to_end(setup: Setup, stage: str, root: Path, log: Path, reads: Path) -> Attempt:
    began = time.monotonic()
    process = start(setup, stage, root, log, reads)
    end_session(process)
    return Attempt(process.returncode, time.monotonic() - began)


def session_processes(session: int) -> dict[int, str]:
    """pid -> command line of every live process in ``session`` (the job's, as its leader's pid)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != session or fields[0] == "Z":
                continue
            found[int(entry)] = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            )
        except (OSError, ValueError):
            continue
    return found


def find_process(session: int, prefix: str) -> int | None:
    for pid, command in sorted(session_processes(session).items()):
        if command.startswith(prefix):
            return pid
    return None


def gcs_address(session: int) -> str | None:
    """The GCS address of the job's in-process Ray, read off the ``--gcs-address`` of its raylet or workers."""
    for pid in session_processes(session):
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        for argument in arguments:
            if argument.startswith("--gcs-address="):
                return argument.split("=", 1)[1]
    return None


# A second Ray driver attached to the job's Ray: it connects first, then waits for "go" and kills the newest
# actor named after the stage. Prints one JSON line with what it did.
_RAY_KILL = r"""
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", configure_logging=True)
print(json.dumps({"connected": True}), flush=True)
sys.stdin.readline()
named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(sys.argv[2] + "-")]
killed = []
for entry in named[-1:]:
    try:
        ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]), no_restart=sys.argv[3] == "1")
        killed.append(entry["name"])
    except ValueError:
        pass
print(json.dumps({"killed": killed}), flush=True)
"""


# -------------------------------------------------------------------------------------------- kill points


@dataclasses.dataclass
class Trial:
    number: int
    stage: str
    fault: str
    point: dict[str, Any]
    landed: dict[str, Any] = dataclasses.field(default_factory=dict)
    reruns: int = 0
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    compared: dict[str, int] = dataclasses.field(default_factory=dict)
    differences: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def survived(self) -> bool:
        return (
            bool(self.exit_codes)
            and self.exit_codes[-1] == 0
            and not any(
                self.compared.get(k) for k in ("lost", "duplicated", "differing", "reads_without_entry")
            )
        )


def draw_point(rng: random.Random, stage: str, fault: str, units: int, durations: dict[str, float]) -> dict:
    """A seeded kill point for ``stage`` (see the module docstring)."""
    if stage == "ingest":
        return {"after_s": round(rng.uniform(0.3, 0.95) * durations["ingest"], 2)}
    if stage == "round":
        return {"run": rng.choice(["baseline", "student"]), "step": rng.randint(1, TRAIN_STEPS - 1),
                "delay_s": round(rng.uniform(0.0, 1.0), 2)}  # fmt: skip
    # A phrase unit takes milliseconds, a label unit about a second: the delay stays inside the next unit.
    delay = rng.uniform(0.0, 0.05 if stage == "phrases" else 1.0)
    point = {"entries": rng.randint(0, units - 1), "delay_s": round(delay, 3)}
    if fault == "ray.kill":
        point["no_restart"] = rng.random() < 0.5
    return point


def ledger_count(root: Path, stage: str) -> int:
    folders = (
        [p for p in (root / "ledger").glob(f"{stage}*") if p.is_dir()] if (root / "ledger").exists() else []
    )
    return sum(1 for folder in folders for p in folder.rglob("*.json") if ".tmp-" not in p.name)


def train_step(root: Path, run: str) -> int:
    state = root / "rounds" / "r0" / run / "train_state.pt"
    try:
        return int(torch.load(state, weights_only=True)["step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def wait_for_point(trial: Trial, root: Path, process: subprocess.Popen, began: float) -> bool:
    """Poll until the kill point (True) or the job's end (False)."""
    point, stage = trial.point, trial.stage
    actor = {"ray.kill": "ray::_UnitActor", "actor-sigkill": "ray::_UnitActor"}.get(trial.fault)
    while process.poll() is None:
        if stage == "ingest":
            reached = time.monotonic() - began >= point["after_s"]
        elif stage == "round":
            reached = train_step(root, point["run"]) >= point["step"]
        else:
            reached = ledger_count(root, stage) >= point["entries"]
            reached = reached and (actor is None or find_process(process.pid, actor) is not None)
        if reached:
            time.sleep(point.get("delay_s", 0.0))
            return process.poll() is None
        time.sleep(0.005 if stage == "phrases" else 0.02)
    return False


def inject(trial: Trial, root: Path, process: subprocess.Popen, began: float) -> None:
    """Run the job until the kill point, inject the fault, record what was done at that moment."""
    helper = None
    if trial.fault == "ray.kill":
        helper = _attach(process, trial.point["no_restart"])
    try:
        if not wait_for_point(trial, root, process, began):
            trial.landed = {"missed": "the job ended before the kill point"}
            return
        trial.landed = {
            "at_s": round(time.monotonic() - began, 2),
            "entries": ledger_count(root, trial.stage),
        }
        if trial.stage == "round":
            trial.landed["steps"] = {run: train_step(root, run) for run in ("baseline", "student")}
        if trial.fault == "driver":
            os.killpg(process.pid, signal.SIGKILL)
        elif trial.fault == "actor-sigkill":
            _sigkill(trial, process.pid, "ray::_UnitActor")
        elif trial.fault == "train-worker":
            _sigkill(trial, process.pid, "ray::RayTrainWorker")
        elif helper is not None:
            helper.stdin.write("go\n")
            helper.stdin.flush()
            answer = json.loads(helper.stdout.readline() or "{}")
            trial.landed["killed"] = answer.get("killed", [])
            if not trial.landed["killed"]:
                trial.landed["missed"] = "no live actor of the stage"
    finally:
        if helper is not None:
            helper.kill()
            helper.wait()


def _sigkill(trial: Trial, session: int, prefix: str) -> None:
    pid = find_process(session, prefix)
    if pid is None:
        trial.landed["missed"] = f"no {prefix} process"
        return
    os.kill(pid, signal.SIGKILL)
    trial.landed["pid"] = pid


def _attach(process: subprocess.Popen, no_restart: bool) -> subprocess.Popen | None:
    """A second driver attached to the job's Ray, connected and waiting for "go"."""
    deadline = time.monotonic() + 120
    address = None
    while address is None and process.poll() is None and time.monotonic() < deadline:
        address = gcs_address(process.pid)
        time.sleep(0.05)
    if address is None:
        return None
    stage = "phrases" if "jobs.phrases" in process.args else "label-"
    helper = subprocess.Popen(
        [PYTHON, "-c", _RAY_KILL, address, stage.rstrip("-"), str(int(no_restart))], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    if json.loads(helper.stdout.readline() or "{}").get("connected"):
        return helper
    helper.kill()
    helper.wait()
    return None


# --------------------------------------------------------------------------------------------- comparing


def _canonical(value: Any) -> Any:
    """A record with the timestamps left out, in a form that compares exactly."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items()) if k not in LEFT_OUT}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    return value


def _key(row: dict[str, Any]) -> str:
    for name in ("uid", "key", "url"):
        if row.get(name) is not None:
            return str(row[name])
    return json.dumps(_canonical(row), sort_keys=True, default=str)


def records(root: Path) -> dict[str, list[tuple[str, Any]]]:
    """Every output record under ``root``, per table: (uid, canonical record). Tables: ``images.parquet``,
    ``images.tar``, ``phrases``, ``labels.parquet``, ``labels.tar``, ``errors/<stage>``."""
    tables: dict[str, list[tuple[str, Any]]] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        top = relative.split("/", 1)[0]
        if not path.is_file() or ".tmp-" in relative or top not in {"images", "phrases", "labels", "errors"}:
            continue
        table = "errors/" + relative.split("/")[1] if top == "errors" else top
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
            tables.setdefault(f"{table}.parquet" if top != "errors" else table, []).extend(
                (_key(row), _canonical(row)) for row in rows
            )
        elif path.suffix == ".tar":
            tables.setdefault(f"{table}.tar", []).extend(_tar_records(path))
    return tables


def _tar_records(path: Path) -> Iterator[tuple[str, Any]]:
    """One record per sample of a tar: its members' bytes (JSON members parsed, timestamps left out)."""
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            data = archive.extractfile(member).read() if member.isfile() else b""
            stem, _, extension = member.name.rpartition("/")[-1].partition(".")
            if extension == "json":
                content: Any = _canonical(json.loads(data))
            else:
                content = hashlib.sha256(data).hexdigest()
            samples.setdefault(stem, {})[extension] = content
    for stem, members in samples.items():
        yield stem, members


def compare_records(reference: dict, found: dict) -> tuple[Counter, list[str]]:
    counts: Counter = Counter()
    notes = []
    for table in sorted(set(reference) | set(found)):
        expected = Counter(uid for uid, _ in reference.get(table, []))
        got = Counter(uid for uid, _ in found.get(table, []))
        by_uid_expected = {uid: record for uid, record in reference.get(table, [])}
        by_uid_got = {uid: record for uid, record in found.get(table, [])}
        lost = [uid for uid in expected if uid not in got]
        duplicated = sum(max(0, got[uid] - expected.get(uid, 1)) for uid in got)
        differing = [uid for uid in got if uid not in expected or by_uid_got[uid] != by_uid_expected[uid]]
        counts["records"] += sum(expected.values())
        counts["lost"] += len(lost)
        counts["duplicated"] += duplicated
        counts["differing"] += len(differing)
        if lost or duplicated or differing:
            notes.append(f"{table}: lost {lost[:3]}, duplicated {duplicated}, differing {differing[:3]}")
    return counts, notes


def ledger_units(root: Path) -> dict[str, list[str]]:
    folder = root / "ledger"
    if not folder.exists():
        return {}
    return {
        stage.name: sorted(
            p.relative_to(stage).as_posix() for p in stage.rglob("*.json") if ".tmp-" not in p.name
        )
        for stage in sorted(folder.iterdir())
    }


def compare_round(reference: Path, found: Path) -> tuple[Counter, list[str]]:
    """The round's training runs (final weights, last step) and its documents."""
    counts: Counter = Counter()
    notes = []
    rounds = reference / "rounds" / "r0"
    if not rounds.exists():
        return counts, notes
    for run in ("baseline", "student"):
        counts["weights"] += 1
        expected, _ = checkpoint.load(rounds / run / "checkpoint")
        got, _ = checkpoint.load(found / "rounds" / "r0" / run / "checkpoint")
        worst = _worst_difference(expected.state_dict(), got.state_dict())
        step = train_step(found, run)
        if worst is not None or step != TRAIN_STEPS:
            counts["differing"] += 1
            notes.append(f"{run}: weights differ ({worst}) or last step {step} != {TRAIN_STEPS}")
    for name in ("metrics.json", "calibration.json", "eval/teacher.json", "eval/baseline.json",
                 "eval/student.json", "promoted/model.safetensors"):  # fmt: skip
        counts["documents"] += 1
        a, b = rounds / name, found / "rounds" / "r0" / name
        same = b.is_file() and (
            a.read_bytes() == b.read_bytes()
            if a.suffix != ".json"
            else _canonical(json.loads(a.read_text())) == _canonical(json.loads(b.read_text()))
        )
        if not same:
            counts["differing"] += 1
            notes.append(f"rounds/r0/{name} differs")
    return counts, notes


def _worst_difference(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    if expected.keys() != got.keys():
        return "different tensors"
    for name, tensor in expected.items():
        if not torch.allclose(tensor.float(), got[name].float(), rtol=1e-6, atol=0.0):
            return f"{name}: max |diff| {(tensor.float() - got[name].float()).abs().max().item():.3g}"
    return None


def read_violations(reads: Path) -> tuple[int, int, list[str]]:
    """(reads logged, reads without their ledger entry, examples); ingest reading its own image shards is the
    producer, not a reader."""
    if not reads.exists():
        return 0, 0, []
    lines = [json.loads(line) for line in reads.read_text().splitlines() if line.strip()]
    bad = [
        line
        for line in lines
        if not line["entry_existed"] and not (line["job"] == "ingest" and line["path"].startswith("images/"))
    ]
    return len(lines), len(bad), [f"{line['job']} pid {line['pid']} read {line['path']}" for line in bad[:3]]


def compare(setup: Setup, trial: Trial, root: Path, reads: Path) -> None:
    reference = setup.snapshot(trial.stage)
    counts, notes = compare_records(records(reference), records(root))
    if ledger_units(reference) != ledger_units(root):
        counts["differing"] += 1
        notes.append("the ledgers' finished units differ")
    if trial.stage == "round":
        round_counts, round_notes = compare_round(reference, root)
        counts.update(round_counts)
        notes += round_notes
    logged, without, examples = read_violations(reads)
    counts["reads"] = logged
    counts["reads_without_entry"] = without
    trial.compared = dict(counts)
    trial.differences = notes + examples


# ------------------------------------------------------------------------------------------------- trials


def reference_run(setup: Setup) -> dict[str, float]:
    """Each stage's job once, uninterrupted, on one root; a copy of the root after each. Returns the jobs'
    durations."""
    root = setup.work / "reference" / "root"
    saved = setup.work / "reference" / "durations.json"
    if saved.exists():  # --out of an earlier run: its reference is reused
        return json.loads(saved.read_text())
    durations = {}
    for stage in STAGES:
        log = setup.work / "reference" / f"{stage}.log"
        attempt = run_to_end(setup, stage, root, log, setup.work / "reference" / f"{stage}.reads")
        if attempt.returncode != 0:
            raise SystemExit(f"the reference {stage} run failed ({attempt.returncode}); see {log}")
        durations[stage] = attempt.seconds
        shutil.copytree(root, setup.snapshot(stage), symlinks=True)
        print(f"reference {stage}: {attempt.seconds:.1f} s", flush=True)
    saved.write_text(json.dumps(durations))
    return durations


def run_trial(setup: Setup, trial: Trial) -> None:
    folder = setup.work / "trials" / f"{trial.number:03d}-{trial.stage}-{trial.fault}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    root, reads, log = folder / "root", folder / "reads.jsonl", folder / "job.log"
    before = setup.before(trial.stage)
    if before is not None:
        shutil.copytree(before, root, symlinks=True)
    began = time.monotonic()
    process = start(setup, trial.stage, root, log, reads)
    try:
        inject(trial, root, process, began)
    finally:
        end_session(process)
    trial.exit_codes.append(process.returncode)
    while trial.exit_codes[-1] != 0 and trial.reruns < MAX_RERUNS:
        trial.reruns += 1
        trial.exit_codes.append(run_to_end(setup, trial.stage, root, log, reads).returncode)
    compare(setup, trial, root, reads)
    trial.seconds = time.monotonic() - began


def plan(trials: int, seed: int, units: dict[str, int], durations: dict[str, float]) -> list[Trial]:
    """``trials`` trials cycling through every (stage, fault) pair, kill points drawn from ``seed``."""
    rng = random.Random(seed)
    pairs = [(stage, fault) for stage, faults in FAULTS.items() for fault in faults]
    planned = []
    for number in range(trials):
        stage, fault = pairs[number % len(pairs)]
        planned.append(Trial(number, stage, fault, draw_point(rng, stage, fault, units[stage], durations)))
    return planned


def table(trials: list[Trial]) -> str:
    lines = [f"{'trial':>5}  {'stage':<8}{'fault':<14}{'kill point':<44}{'reruns':>7}{'lost':>6}{'dup':>5}"
             f"{'differ':>8}{'reads':>7}{'unlogged':>9}  survived"]  # fmt: skip
    for trial in trials:
        point = ", ".join(f"{k}={v}" for k, v in {**trial.point, **trial.landed}.items())
        c = trial.compared
        lines.append(
            f"{trial.number:>5}  {trial.stage:<8}{trial.fault:<14}{point[:43]:<44}{trial.reruns:>7}"
            f"{c.get('lost', 0):>6}{c.get('duplicated', 0):>5}{c.get('differing', 0):>8}{c.get('reads', 0):>7}"
            f"{c.get('reads_without_entry', 0):>9}  {'yes' if trial.survived else 'NO'}"
        )
        lines += [f"         {note}" for note in trial.differences if not trial.survived]
    return "\n".join(lines)


def summary(trials: list[Trial], seed: int, seconds: float) -> dict[str, Any]:
    total = Counter()
    for trial in trials:
        total.update(trial.compared)
    landed = [t for t in trials if "missed" not in t.landed]
    return {
        "trials": len(trials),
        "survived": sum(t.survived for t in trials),
        "records_lost": total["lost"],
        "records_duplicated": total["duplicated"],
        "outputs_differing": total["differing"],
        "reads_without_entry": total["reads_without_entry"],
        "reads_checked": total["reads"],
        "records_compared": total["records"],
        "weights_compared": total["weights"],
        "faults_landed": len(landed),
        "faults_missed": len(trials) - len(landed),
        "reruns": sum(t.reruns for t in trials),
        "kill_points": {
            stage: [
                {"fault": t.fault, **{k: v for k, v in t.landed.items() if k != "pid"}}
                for t in trials
                if t.stage == stage
            ]
            for stage in STAGES
        },
        "seed": seed,
        "seconds": round(seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crawl-images", type=int, default=46, help="served crawl images (2 dead URLs more)")
    parser.add_argument("--out", help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--stages", default=",".join(STAGES), help="only trials of these stages")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_jobs)
    signal.signal(signal.SIGINT, _stop_jobs)
    began = time.monotonic()
    work = Path(args.out or tempfile.mkdtemp(prefix="chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        with world(work, args.crawl_images) as setup:
            durations = reference_run(setup)
            units = {
                stage: max(1, len(ledger_units(setup.snapshot(stage)).get(stage, []))) for stage in STAGES
            }
            labelled = ledger_units(setup.snapshot("label"))
            units["label"] = max(len(v) for k, v in labelled.items() if k.startswith("label-"))
            wanted = set(args.stages.split(","))
            trials = [t for t in plan(args.trials, args.seed, units, durations) if t.stage in wanted]
            for trial in trials:
                run_trial(setup, trial)
                print(f"trial {trial.number}: {trial.stage} {trial.fault} {trial.landed} reruns {trial.reruns} "
                      f"{trial.compared} {'survived' if trial.survived else 'FAILED'}", flush=True)  # fmt: skip
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(work, ignore_errors=True)
    result = summary(trials, args.seed, time.monotonic() - began)
    print(f"\nchaos: {dt.date.today()}, {os.cpu_count()} CPUs, work folder {work}")
    print(table(trials))
    print(json.dumps(result, sort_keys=True))
    return 0 if result["survived"] == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
