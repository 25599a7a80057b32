"""The executor: runs a stage's units on a pool of Ray actors, or one after another in this process, with one
retry policy; commits each finished unit (its error table, then its ledger entry, last).

A worker is a callable ``worker(layout, unit) -> UnitOutput`` (or a plain stats dict, for a stage without an
error table) built by a picklable ``worker_factory()`` once per actor (a teacher or a spaCy pipeline is loaded
once per actor, not once per unit). Its outputs are atomic and the commit comes last, so redoing a unit is
always safe, and the executor can be simple and strict:

- units are handed out one at a time as actors free up (``ray.wait``), so a slow unit never holds a queue of
  others behind it;
- an actor that dies mid-unit (process killed, OOM, node lost: ``RayActorError`` and friends) is killed for
  good and replaced, and its unit is put back in the queue. Ray's own actor restarts and task retries
  (``max_restarts`` / ``max_task_retries``) come first; the pool steps in once Ray gives up. A dead actor
  never keeps its slot, which is what makes Ray Data's actor pools hang (ray#62746);
- a unit that raises (an application error) is retried on a healthy actor; after ``max_attempts`` tries
  (worker losses count too: a unit that kills every worker that takes it must end) it is reported failed,
  and the other units go on;
- actors are named ``<stage>-<8 hex digits>`` (in the driver's namespace), so that an operator, or the chaos
  runner (``bench/chaos.py``), can find one (``ray.util.list_named_actors(all_namespaces=True)``) and kill it;
- nothing waits without a timeout: ``ray.wait`` polls, a worker that cannot start within
  ``startup_timeout_s`` (constructor error, resources that never free up) stops the run with an error, and
  ``unit_timeout_s`` bounds a unit whose actor is alive but stuck.

The in-process executor (``in_process=True``, and always for a ``memory://`` root, which Ray workers, other
processes, cannot see) builds one worker and runs the units in the given order with the same retry policy.

Committing (``stage`` given): the unit's ``UnitOutput.errors`` become ``Layout.errors(stage, unit)`` in the one
error schema, then the ledger entry (the stats) is written, then the worker's optional ``after_commit(layout,
unit)`` runs (cleanup that the entry makes safe). A worker with a ``prepare(layout)`` method (``prepare=True``)
has it run once per run before any unit, where the workers run (with their resources).
"""

from __future__ import annotations

import gc
import logging
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from tqdm import tqdm

from pipeline import storage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import UnitOutput, error_table

logger = logging.getLogger(__name__)


Worker = Callable[[Layout, str], "UnitOutput | dict[str, Any]"]
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


# -------------------------------------------------------------------------------------------- the executor


def run_and_commit(worker: Worker, layout: Layout, unit: str, stage: str | None) -> dict[str, Any]:
    """Run one unit and, for a ``stage``, commit it: error table, ledger entry (last), ``after_commit``.
    Returns the stats (the stamped ledger entry when committed)."""
    output = worker(layout, unit)
    stats, errors = (output.stats, output.errors) if isinstance(output, UnitOutput) else (output, None)
    if stage is None:
        return stats
    if errors is not None:
        storage.write_parquet(layout.fs, layout.errors(stage, unit), error_table(errors, stage))
    entry = Ledger(layout, stage).record(unit, stats)
    after_commit = getattr(worker, "after_commit", None)
    if after_commit is not None:
        after_commit(layout, unit)
    return entry


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's sight (``gc.freeze``, after one full
    collection): an actor's process lives for its worker, so the libraries, the model and Ray's own state
    live as long, and the collector's full passes need not scan them again and again. In a label actor they
    are ~460k objects, and a full pass over them took 248 ms on the stage's thread, a GPU idle meanwhile;
    frozen, no pause took over 11 ms (``python bench/label_gpu.py feed``, bench/RESULTS.md, session 18).
    Objects frozen still go when their last reference does; only cycles among them would stay."""
    gc.collect()
    gc.freeze()


class _UnitActor:
    """Holds one worker built by the factory (the process's heap frozen after it: ``freeze_heap``); runs one
    unit per call."""

    def __init__(self, worker_factory: WorkerFactory) -> None:
        self._worker = worker_factory()
        freeze_heap()

    def ready(self) -> int:
        return os.getpid()

    def run(self, layout: Layout, unit: str, stage: str | None) -> dict[str, Any]:
        return run_and_commit(self._worker, layout, unit, stage)


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
    name: str = "units"  # actors are named ``<name>-<8 hex>`` (``ray list actors``, ``ray.get_actor``)
    starting: dict[Any, Any] = field(default_factory=dict)  # ready ref -> actor
    idle: list[Any] = field(default_factory=list)
    busy: dict[Any, _Busy] = field(default_factory=dict)  # run ref -> what runs there
    start_failures: int = 0
    last_progress: float = field(default_factory=time.monotonic)

    def start(self, count: int) -> None:
        actor_class = ray.remote(_UnitActor)
        options = {
            "num_cpus": self.options.num_cpus_per_worker,
            "num_gpus": self.options.num_gpus_per_worker,
            "max_restarts": self.options.max_restarts,
            "max_task_retries": self.options.max_task_retries,
        }
        for _ in range(count):
            name = f"{self.name}-{uuid.uuid4().hex[:8]}"
            actor = actor_class.options(name=name, **options).remote(self.factory)
            self.starting[actor.ready.remote()] = actor

    def submit(self, layout: Layout, unit: str, stage: str | None) -> None:
        actor = self.idle.pop()
        self.busy[actor.run.remote(layout, unit, stage)] = _Busy(actor, unit, time.monotonic())

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

    layout: Layout
    stage: str | None
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
    layout: Layout,
    units: Sequence[str],
    worker_factory: WorkerFactory,
    stage: str | None = None,
    *,
    in_process: bool = False,
    prepare: bool = False,
    num_workers: int = 1,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: float = 1,
    max_restarts: int = 2,
    max_task_retries: int = 2,
    max_attempts: int = 3,
    startup_timeout_s: float = 600.0,
    unit_timeout_s: float | None = None,
    progress: bool = True,
) -> dict[str, UnitResult]:
    """Run ``worker(layout, unit)`` for every unit, committing each into ``stage`` (see the module docstring).

    ``worker_factory`` must be picklable (a module-level class or a ``functools.partial`` of one); it is
    called once inside each of ``num_workers`` Ray actors, or once in this process (``in_process``, or a
    ``memory://`` layout). Units must be distinct. Returns one ``UnitResult`` per unit, in the order of
    ``units``. Raises ``WorkerStartError`` when workers cannot be built or scheduled (or ``prepare`` fails).
    Starts a local Ray (``init_ray``) if none is up and the run needs one.
    """
    if len(set(units)) != len(units):
        raise ValueError("units must be distinct")
    options = PoolOptions(num_workers, num_cpus_per_worker, num_gpus_per_worker, max_restarts,
                          max_task_retries, max_attempts, startup_timeout_s, unit_timeout_s)  # fmt: skip
    if not units:
        return {}
    run = _Run(layout, stage, units, options, deque(units))
    if in_process or layout.in_driver_memory:
        if not in_process:
            logger.info("%s is in the driver's memory: running %d unit(s) in-process", layout, len(units))
        return _run_inprocess(run, worker_factory, prepare, progress)
    init_ray()
    if prepare:
        _prepare_remotely(layout, worker_factory, options)
    pool = _Pool(worker_factory, options, stage or "units")
    with tqdm(total=len(units), desc=stage or "units", unit="unit", disable=not progress) as bar:
        try:
            pool.start(min(num_workers, len(units)))
            _drive(run, pool, bar)
        finally:
            pool.shutdown()
    return run.ordered()


def _drive(run: _Run, pool: _Pool, bar: tqdm) -> None:
    while run.queue or pool.busy:
        while run.queue and pool.idle:
            pool.submit(run.layout, run.queue.popleft(), run.stage)
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


def _run_inprocess(
    run: _Run, worker_factory: WorkerFactory, prepare: bool, progress: bool
) -> dict[str, UnitResult]:
    """The sequential executor: one worker in this process, the pool's results and retry policy. An exception
    raised by the worker fails that try of that unit only (its traceback is logged at DEBUG level)."""
    worker = worker_factory()
    if prepare:
        worker.prepare(run.layout)
    with tqdm(total=len(run.units), desc=run.stage or "units", unit="unit", disable=not progress) as bar:
        while run.queue:
            unit = run.queue.popleft()
            try:
                stats = run_and_commit(worker, run.layout, unit, run.stage)
            except Exception as error:  # the error policy: this unit's try fails, the run goes on
                logger.debug("unit %s raised", unit, exc_info=True)
                run.attempt_failed(unit, error, "error")
            else:
                run.done(unit, stats)
            bar.update(int(unit in run.results))
    return run.ordered()


def _prepare(layout: Layout, worker_factory: WorkerFactory) -> None:
    worker_factory().prepare(layout)


def _prepare_remotely(layout: Layout, worker_factory: WorkerFactory, options: PoolOptions) -> None:
    """``prepare`` in one Ray task with a worker's resources (what it prepares may depend on where it runs)."""
    task = ray.remote(_prepare).options(
        num_cpus=options.num_cpus_per_worker, num_gpus=options.num_gpus_per_worker, max_retries=2
    )
    ref = task.remote(layout, worker_factory)
    try:
        ray.get(ref, timeout=options.startup_timeout_s)
    except GetTimeoutError as error:
        ray.cancel(ref, force=True)
        raise WorkerStartError(
            f"no worker could prepare the run within {options.startup_timeout_s:g} s"
        ) from error
    except RayError as error:
        raise WorkerStartError(f"preparing the run failed: {_one_line(error)}") from error
