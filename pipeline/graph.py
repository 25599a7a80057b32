"""The one place where stages become Ray work: a pool of actors, one whole shard per task.

Every stage is a callable over one unit (``worker(root, unit) -> stats``) whose outputs are atomic and whose
ledger entry is written last (see ``pipeline.ledger``). That makes redoing a unit always safe, so the executor
can be simple and strict:

- ``worker_factory()`` runs once inside each actor (a teacher or a spaCy pipeline is loaded once per actor,
  not once per shard); units are handed out one at a time as actors free up (``ray.wait``), so a slow shard
  never holds a queue of others behind it.
- An actor that dies mid-unit (process killed, OOM, node lost: ``RayActorError`` and friends) is killed for
  good and replaced, and its unit is put back in the queue. Ray's own actor restarts and task retries
  (``max_restarts`` / ``max_task_retries``) come first; the pool steps in once Ray gives up. A dead actor
  never keeps its slot, which is what makes Ray Data's actor pools hang (ray#62746).
- A unit that raises (an application error) is retried on a healthy actor; after ``max_attempts`` tries
  (worker losses count too: a shard that kills every worker that takes it must end) it is reported failed,
  and the other units go on.
- Nothing waits without a timeout: ``ray.wait`` polls, a worker that cannot start within
  ``startup_timeout_s`` (constructor error, resources that never free up) stops the run with an error, and
  ``unit_timeout_s`` bounds a unit whose actor is alive but stuck.

A ``memory://`` root lives in the driver's memory only: Ray workers (other processes) would each see their
own empty filesystem. Such runs use the sequential in-process executor, with the same retry policy.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import fsspec
import ray
from fsspec.implementations.memory import MemoryFileSystem
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from tqdm import tqdm

if TYPE_CHECKING:
    from pipeline.label import LabelConfig, LabelShard
    from pipeline.phrases import PhraseConfig
    from teacher.teacher import TeacherConfig

logger = logging.getLogger(__name__)

Worker = Callable[[str, str], dict[str, Any]]
WorkerFactory = Callable[[], Worker]

_POLL_S = 1.0  # how often the driver wakes up to check deadlines while units run
_GET_TIMEOUT_S = 60.0  # ray.get on a ref that ray.wait already returned: bounded all the same


@dataclass(frozen=True)
class UnitResult:
    """How one unit ended.

    ``status`` is ``"done"`` (``stats`` holds what the worker returned, usually the unit's ledger entry) or
    ``"failed"`` (``error`` holds the last error, one line; ``stats`` is None). ``attempts`` counts every try,
    worker losses included.
    """

    unit: str
    status: str
    stats: dict[str, Any] | None
    error: str | None
    attempts: int


def failed_units(results: dict[str, UnitResult]) -> list[str]:
    """Names of the units that ended failed, in result order."""
    return [unit for unit, result in results.items() if result.status == "failed"]


# ---------------------------------------------------------------------------------------------- ray setup


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets for the job's driver) joins that cluster;
    a cluster with token authentication needs ``RAY_AUTH_MODE=token`` and its token in ``RAY_AUTH_TOKEN`` or
    ``~/.ray/auth_token`` on the client (a client without ``RAY_AUTH_MODE=token`` sends no token). Without
    an address, an in-process local Ray starts with ``num_cpus`` (default: this machine's cores) and no
    dashboard; Ray 2.60 turns token authentication on for it, generating ``~/.ray/auth_token`` if absent.
    Does nothing if Ray is already up.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **quiet)
        return
    cores = num_cpus or os.cpu_count() or 1
    logger.info("starting a local in-process Ray with %d CPUs", cores)
    ray.init(num_cpus=cores, include_dashboard=False, **quiet)


def is_driver_memory(root: str) -> bool:
    """True when ``root`` is on fsspec's in-process memory filesystem (invisible to other processes)."""
    protocol = fsspec.utils.get_protocol(root)
    return issubclass(fsspec.get_filesystem_class(protocol), MemoryFileSystem)


# -------------------------------------------------------------------------------------------- the executor


class _UnitActor:
    """Holds one worker built by the factory; runs one unit per call."""

    def __init__(self, worker_factory: WorkerFactory) -> None:
        self._worker = worker_factory()

    def ready(self) -> int:
        return os.getpid()

    def run(self, root: str, unit: str) -> dict[str, Any]:
        return self._worker(root, unit)


@dataclass(frozen=True)
class PoolOptions:
    """Resources and fault-tolerance knobs of one actor pool (see the module docstring)."""

    num_workers: int = 1
    num_cpus_per_worker: float = 1
    num_gpus_per_worker: float = 0
    max_restarts: int = 2
    max_task_retries: int = 2
    max_attempts: int = 3
    startup_timeout_s: float = 600.0
    unit_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.max_attempts < 1:
            raise ValueError(f"num_workers and max_attempts must be >= 1: {self}")
        if self.num_cpus_per_worker < 0 or self.num_gpus_per_worker < 0:
            raise ValueError(f"resources per worker must be >= 0: {self}")


class WorkerStartError(RuntimeError):
    """No worker of the pool could be built (constructor error) or scheduled (resources) in time."""


@dataclass
class _Busy:
    actor: Any
    unit: str
    started: float


@dataclass
class _Pool:
    """The actors of one run: starting (ready() pending), idle, busy (one unit each)."""

    factory: WorkerFactory
    options: PoolOptions
    starting: dict[Any, Any] = field(default_factory=dict)  # ready ref -> actor
    idle: list[Any] = field(default_factory=list)
    busy: dict[Any, _Busy] = field(default_factory=dict)  # run ref -> what runs there
    start_failures: int = 0
    last_progress: float = field(default_factory=time.monotonic)

    def start(self, count: int) -> None:
        actor_class = ray.remote(_UnitActor).options(
            num_cpus=self.options.num_cpus_per_worker,
            num_gpus=self.options.num_gpus_per_worker,
            max_restarts=self.options.max_restarts,
            max_task_retries=self.options.max_task_retries,
        )
        for _ in range(count):
            actor = actor_class.remote(self.factory)
            self.starting[actor.ready.remote()] = actor

    def submit(self, root: str, unit: str) -> None:
        actor = self.idle.pop()
        self.busy[actor.run.remote(root, unit)] = _Busy(actor, unit, time.monotonic())

    def waiting_refs(self) -> list[Any]:
        return [*self.starting, *self.busy]

    def started(self, ref: Any) -> None:
        """A ready() ref resolved: the actor joins the idle list, or its start failure is counted."""
        actor = self.starting.pop(ref)
        try:
            ray.get(ref, timeout=_GET_TIMEOUT_S)
        except RayError as error:
            self._start_failed(actor, error)
            return
        self.start_failures = 0
        self.last_progress = time.monotonic()
        self.idle.append(actor)

    def _start_failed(self, actor: Any, error: BaseException) -> None:
        _kill(actor)
        self.start_failures += 1
        logger.warning("a worker failed to start (%d in a row): %s", self.start_failures, _one_line(error))
        # Every worker is built by the same factory: when several in a row fail, the next would too.
        if self.start_failures > self.options.num_workers:
            raise WorkerStartError(f"workers keep failing to start; last error: {_one_line(error)}")
        self.start(1)

    def lost(self, actor: Any, error: BaseException) -> None:
        """The actor died or hung: kill it for good (no Ray restart) and start a replacement."""
        _kill(actor)
        if isinstance(error, RayActorError) and error.actor_init_failed:
            self._start_failed(actor, error)
            return
        self.start(1)

    def check_startup(self) -> None:
        if self.idle or self.busy or not self.starting:
            return
        waited = time.monotonic() - self.last_progress
        if waited > self.options.startup_timeout_s:
            raise WorkerStartError(
                f"no worker started within {self.options.startup_timeout_s:.0f} s; each needs "
                f"{self.options.num_cpus_per_worker} CPU and {self.options.num_gpus_per_worker} GPU, the "
                f"cluster has {ray.cluster_resources()}"
            )

    def shutdown(self) -> None:
        for actor in [*self.starting.values(), *self.idle, *(b.actor for b in self.busy.values())]:
            _kill(actor)
        self.starting.clear()
        self.idle.clear()
        self.busy.clear()


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except RayError as error:  # already gone: nothing left to free
        logger.debug("kill: %s", _one_line(error))


def _one_line(error: BaseException) -> str:
    cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


@dataclass
class _Run:
    """Bookkeeping of one ``run_units`` call: the queue, attempts per unit, results."""

    root: str
    units: Sequence[str]
    options: PoolOptions
    queue: deque[str] = field(default_factory=deque)
    attempts: Counter[str] = field(default_factory=Counter)
    results: dict[str, UnitResult] = field(default_factory=dict)

    def done(self, unit: str, stats: dict[str, Any]) -> None:
        self.attempts[unit] += 1
        self.results[unit] = UnitResult(unit, "done", stats, None, self.attempts[unit])

    def attempt_failed(self, unit: str, error: BaseException, kind: str) -> None:
        """Requeue ``unit`` or, after ``max_attempts`` tries, record it failed."""
        self.attempts[unit] += 1
        message = f"{kind}: {_one_line(error)}"
        if self.attempts[unit] < self.options.max_attempts:
            logger.warning("unit %s, try %d: %s; retrying", unit, self.attempts[unit], message)
            self.queue.append(unit)
            return
        logger.error("unit %s failed after %d tries: %s", unit, self.attempts[unit], message)
        self.results[unit] = UnitResult(unit, "failed", None, message, self.attempts[unit])

    def ordered(self) -> dict[str, UnitResult]:
        return {unit: self.results[unit] for unit in self.units}


def run_units(
    root: str,
    units: Sequence[str],
    worker_factory: WorkerFactory,
    num_workers: int,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: float = 1,
    max_restarts: int = 2,
    max_task_retries: int = 2,
    max_attempts: int = 3,
    startup_timeout_s: float = 600.0,
    unit_timeout_s: float | None = None,
    progress: bool = True,
) -> dict[str, UnitResult]:
    """Run ``worker(root, unit)`` for every unit on a pool of ``num_workers`` Ray actors.

    ``worker_factory`` must be picklable (a module-level class or a ``functools.partial`` of one); it is
    called once inside each actor. Units must be distinct. Returns one ``UnitResult`` per unit, in the order
    of ``units``. Raises ``WorkerStartError`` when workers cannot be built or scheduled. A ``memory://`` root
    runs in-process instead (see ``run_units_inprocess``). Starts a local Ray (``init_ray``) if none is up.
    """
    if len(set(units)) != len(units):
        raise ValueError("units must be distinct")
    if is_driver_memory(root):
        logger.info("%s is in the driver's memory: running %d unit(s) in-process", root, len(units))
        return run_units_inprocess(root, units, worker_factory, max_attempts, progress)
    options = PoolOptions(num_workers, num_cpus_per_worker, num_gpus_per_worker, max_restarts,
                          max_task_retries, max_attempts, startup_timeout_s, unit_timeout_s)  # fmt: skip
    if not units:
        return {}
    init_ray()
    run = _Run(root, units, options, deque(units))
    pool = _Pool(worker_factory, options)
    with tqdm(total=len(units), desc="units", unit="unit", disable=not progress) as bar:
        try:
            pool.start(min(num_workers, len(units)))
            _drive(run, pool, bar)
        finally:
            pool.shutdown()
    return run.ordered()


def _drive(run: _Run, pool: _Pool, bar: tqdm) -> None:
    while run.queue or pool.busy:
        while run.queue and pool.idle:
            pool.submit(run.root, run.queue.popleft())
        ready, _ = ray.wait(pool.waiting_refs(), num_returns=1, timeout=_POLL_S)
        for ref in ready:
            if ref in pool.starting:
                pool.started(ref)
            else:
                bar.update(_finished(run, pool, ref))
        _expire_stuck_units(run, pool, bar)
        pool.check_startup()


def _finished(run: _Run, pool: _Pool, ref: Any) -> int:
    """Collect one unit's outcome; returns 1 when the unit reached a final state."""
    busy = pool.busy.pop(ref)
    try:
        stats = ray.get(ref, timeout=_GET_TIMEOUT_S)
    except RayTaskError as error:  # the worker raised: the actor is healthy
        pool.idle.append(busy.actor)
        run.attempt_failed(busy.unit, error, "error")
    except (RayError, GetTimeoutError) as error:  # the actor (or its node) is gone
        pool.lost(busy.actor, error)
        run.attempt_failed(busy.unit, error, "worker lost")
    else:
        pool.idle.append(busy.actor)
        pool.last_progress = time.monotonic()
        run.done(busy.unit, stats)
    return int(busy.unit in run.results)


def _expire_stuck_units(run: _Run, pool: _Pool, bar: tqdm) -> None:
    """An actor alive but stuck on one unit past ``unit_timeout_s`` is treated as lost."""
    limit = run.options.unit_timeout_s
    if limit is None:
        return
    now = time.monotonic()
    for ref, busy in list(pool.busy.items()):
        if now - busy.started > limit:
            del pool.busy[ref]
            error = TimeoutError(f"unit ran longer than {limit:g} s")
            pool.lost(busy.actor, error)
            run.attempt_failed(busy.unit, error, "timeout")
            bar.update(int(busy.unit in run.results))


def run_units_inprocess(
    root: str, units: Sequence[str], worker_factory: WorkerFactory, max_attempts: int = 3,
    progress: bool = True,
) -> dict[str, UnitResult]:  # fmt: skip
    """The sequential executor: one worker in this process, same results and retry policy as ``run_units``.

    Used for ``memory://`` roots and wherever Ray is not wanted (unit tests of a stage). An exception raised
    by the worker fails that try of that unit only (its traceback is logged at DEBUG level).
    """
    run = _Run(root, units, PoolOptions(max_attempts=max_attempts), deque(units))
    if not units:
        return {}
    worker = worker_factory()
    with tqdm(total=len(units), desc="units", unit="unit", disable=not progress) as bar:
        while run.queue:
            unit = run.queue.popleft()
            try:
                stats = worker(root, unit)
            except Exception as error:  # the error policy: this unit's try fails, the run goes on
                logger.debug("unit %s raised", unit, exc_info=True)
                run.attempt_failed(unit, error, "error")
            else:
                run.done(unit, stats)
            bar.update(int(unit in run.results))
    return run.ordered()


# ------------------------------------------------------------------------------------------------- stages


# Stage modules are imported where a stage runs, not at the top: every actor imports this module to unpickle
# its factory, and spaCy or torch would add seconds to the start of actors of other stages.


@dataclass(frozen=True)
class StageRun:
    """What one stage run did: its ledger ``stage`` name, one result per unit it tried (units already in the
    ledger are not tried), and for the label stage the ``teacher`` folder name under ``<root>/labels/``."""

    stage: str
    results: dict[str, UnitResult]
    teacher: str | None = None

    @property
    def failed(self) -> list[str]:
        return failed_units(self.results)


class PhraseWorker:
    """Phrase stage worker: loads the spaCy pipeline once, then extracts one image shard per call."""

    def __init__(
        self, config: PhraseConfig | None = None, storage_options: dict[str, Any] | None = None
    ) -> None:
        from pipeline.phrases import PhraseExtractor

        self.extractor = PhraseExtractor(config)
        self.storage_options = dict(storage_options or {})

    def __call__(self, root: str, shard: str) -> dict[str, Any]:
        from pipeline.phrases import extract_shard

        return extract_shard(root, shard, self.extractor, **self.storage_options)


def run_phrase_stage(
    root: str, config: PhraseConfig | None = None, num_workers: int = 1,
    storage_options: dict[str, Any] | None = None, **run_options: Any,
) -> StageRun:  # fmt: skip
    """Extract phrases of every pending image shard, one CPU actor task per shard.

    ``run_options`` go to ``run_units`` (``max_attempts``, ``unit_timeout_s``, ``progress`` ...).
    """
    from pipeline.phrases import STAGE, pending_shards

    storage_options = dict(storage_options or {})
    shards = pending_shards(root, **storage_options)
    logger.info("phrases: %d pending shard(s) under %s", len(shards), root)
    factory = partial(PhraseWorker, config, storage_options)
    return StageRun(STAGE, run_units(root, shards, factory, num_workers, **run_options))


def build_label_shard(
    teacher_config: TeacherConfig, label_config: LabelConfig | None = None,
    storage_options: dict[str, Any] | None = None,
) -> LabelShard:  # fmt: skip
    """Load the teacher and wrap it in the label stage's per-shard callable (the label worker factory)."""
    from pipeline.label import LabelShard
    from teacher.teacher import Teacher

    return LabelShard(Teacher.from_checkpoint(teacher_config), label_config, storage_options)


def _prepare_label_job(root: str, factory: Callable[[], LabelShard]) -> str:
    """Write the label job file once, before any shard runs; returns the teacher folder name."""
    label_shard = factory()
    label_shard.prepare(root)
    return label_shard.name


def run_label_stage(
    root: str, label_config: LabelConfig | None, teacher_config: TeacherConfig, num_workers: int = 1,
    num_gpus_per_worker: float = 0, storage_options: dict[str, Any] | None = None, **run_options: Any,
) -> StageRun:  # fmt: skip
    """Label every phrased shard that the teacher has not labelled yet, one shard per actor task.

    Each actor loads the teacher once (``num_gpus_per_worker`` GPUs each; 0 runs on CPU). The job file
    (``pipeline.label.prepare_job``) is written first by one task with the actors' resources: the teacher's
    ``config_hash`` depends on where it runs (device, precision), so the driver cannot compute it. That task
    loads the teacher once more. ``run_options`` go to ``run_units``. A teacher that fails to load raises
    ``WorkerStartError`` before any shard is tried.
    """
    from pipeline.label import label_stage, pending_label_shards

    storage_options = dict(storage_options or {})
    factory = partial(build_label_shard, teacher_config, label_config, storage_options)
    if is_driver_memory(root):
        label_shard = factory()  # one teacher serves the job file and every shard
        factory = lambda: label_shard  # noqa: E731
        name = _prepare_label_job(root, factory)
    else:
        name = _prepare_remotely(root, factory, num_gpus_per_worker, run_options.get("startup_timeout_s"))
    shards = pending_label_shards(root, name, **storage_options)
    logger.info("label: %d pending shard(s) for teacher %s under %s", len(shards), name, root)
    results = run_units(root, shards, factory, num_workers, num_gpus_per_worker=num_gpus_per_worker,
                        **run_options)  # fmt: skip
    return StageRun(label_stage(name), results, name)


def _prepare_remotely(
    root: str, factory: Callable[[], LabelShard], num_gpus: float, timeout_s: float | None
) -> str:
    init_ray()
    timeout_s = timeout_s or PoolOptions.startup_timeout_s
    task = ray.remote(_prepare_label_job).options(num_cpus=1, num_gpus=num_gpus, max_retries=2)
    ref = task.remote(root, factory)
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError as error:
        ray.cancel(ref, force=True)
        raise WorkerStartError(f"the label job could not start a teacher within {timeout_s:g} s") from error
    except RayError as error:
        raise WorkerStartError(f"the teacher failed to load: {_one_line(error)}") from error
