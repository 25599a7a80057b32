"""The stage table: every stage of the engine declared once, one rule for what is pending, one ``run``.

| stage     | reads from | its units                                         | worker (does the work)          |
|-----------|------------|---------------------------------------------------|---------------------------------|
| `ingest`  | the crawl  | crawl partitions (+ resumed plans, retries), in   | `IngestWorker` (img2dataset)    |
|           |            | order on the driver: each claims URLs against     |                                 |
|           |            | every earlier one                                 |                                 |
| `phrases` | `ingest`   | the image shards of each ingested partition       | `PhraseWorker` (spaCy), 1 CPU   |
| `label`   | `phrases`  | one per phrased shard; ledger `label-<teacher>`   | `label_worker` (the teacher),     |
|           |            |                                                   | 1 CPU + the GPUs asked for      |

A unit of a stage is pending when the units its upstream finished derive it and it has no ledger entry here:
``pending = derived(finished upstream) - finished here``. Each row says how its units derive (``units``; by
default one per finished upstream unit) and how its ledger is named (``ledger``; by default the stage's
name; the label stage keys it per teacher). ``run`` executes the pending units with ``pipeline.executor``
(Ray actors, or in this process) and the executor commits each: outputs, error table, ledger entry last.

A new stage is one module (a worker class taking the run's config, called as ``worker(layout, unit)``) and
one row here. Rows name their callables as ``"module:attribute"`` and are imported where the stage runs, so
importing this module costs nothing (every Ray actor unpickles its factory; spaCy, torch or img2dataset
would add seconds to actors of other stages).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipeline.executor import UnitResult, failed_units, run_units
from pipeline.layout import Layout
from pipeline.ledger import Ledger

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    Attributes:
        name: the stage's name (and its ledger's, unless ``ledger`` says otherwise).
        upstream: the stage whose finished units this one's derive from; None for a source stage.
        worker: ``"module:callable"``: called with the run's config once per worker, it returns the worker
            ``(layout, unit) -> UnitOutput | stats``.
        units: ``"module:function"`` ``(layout, config, upstream: Ledger | None) -> [unit]``: the units that
            the upstream's finished units derive (fan-out, or a source stage's own inputs); None: one unit
            per finished upstream unit, same name.
        ledger: ``"module:function"`` ``(config) -> ledger stage name``; None: ``name``.
        num_cpus, num_gpus: resources of one worker (``run`` can change them).
        on_driver: units run in order in the driver process (the in-process executor).
        prepare: the worker has a ``prepare(layout)`` step, run once per run before any unit.
        summary: the ledger stats that ``StageRun.table`` shows (dotted keys reach into nested stats).
    """

    name: str
    upstream: str | None
    worker: str
    units: str | None = None
    ledger: str | None = None
    num_cpus: float = 1
    num_gpus: float = 0
    on_driver: bool = False
    prepare: bool = False
    summary: tuple[str, ...] = ()


class StageTable(Mapping[str, Stage]):
    """The rows by name; every upstream must be a row."""

    def __init__(self, *stages: Stage) -> None:
        self._rows = {stage.name: stage for stage in stages}
        if len(self._rows) != len(stages):
            raise ValueError("stage names must be unique")
        for stage in stages:
            if stage.upstream is not None and stage.upstream not in self._rows:
                raise ValueError(f"stage {stage.name!r} reads from {stage.upstream!r}, which is not a stage")

    def __getitem__(self, name: str) -> Stage:
        if name not in self._rows:
            raise KeyError(f"unknown stage {name!r}; stages: {list(self._rows)}")
        return self._rows[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def with_stage(self, stage: Stage) -> StageTable:
        """This table plus (or with a replaced) ``stage``."""
        rows = {**self._rows, stage.name: stage}
        return StageTable(*rows.values())

    def ledger_name(self, name: str, config: Any = None) -> str:
        """The ledger stage of ``name`` for a run with ``config``."""
        stage = self[name]
        return stage.name if stage.ledger is None else resolve(stage.ledger)(config)


STAGES = StageTable(
    Stage(
        "ingest",
        upstream=None,
        worker="pipeline.ingest:IngestWorker",
        units="pipeline.ingest:ingest_units",
        on_driver=True,
        summary=(
            "counts.rows",
            "counts.seen_before",
            "counts.to_download",
            "counts.success",
            "counts.failed",
            "counts.refused",
            "counts.decontaminated",
            "stats.duration_s",
        ),
    ),  # fmt: skip
    Stage(
        "phrases",
        upstream="ingest",
        worker="pipeline.phrases:PhraseWorker",
        units="pipeline.phrases:image_shards",
        summary=("rows", "phrases", "errors"),
    ),
    Stage(
        "label",
        upstream="phrases",
        worker="pipeline.label:label_worker",
        ledger="pipeline.label:ledger_stage",
        prepare=True,
        summary=("images", "boxes", "errors", "seconds"),
    ),
)


def resolve(reference: str) -> Callable[..., Any]:
    """The object named by ``"module:attribute"``, imported now."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def derived(
    layout: Layout, stage: str, config: Any = None, table: StageTable = STAGES, upstream_config: Any = None
) -> list[str]:
    """Every unit of ``stage`` that its upstream's finished units derive (done here or not), in derivation
    order. ``upstream_config`` names the upstream's ledger when that depends on its config."""
    row = table[stage]
    upstream = None
    if row.upstream is not None:
        upstream = Ledger(layout, table.ledger_name(row.upstream, upstream_config))
    if row.units is not None:
        return list(resolve(row.units)(layout, config, upstream))
    if upstream is not None:
        return upstream.units()
    raise ValueError(f"stage {stage!r} has neither an upstream nor a units rule")


def pending(
    layout: Layout, stage: str, config: Any = None, table: StageTable = STAGES, upstream_config: Any = None
) -> list[str]:
    """The units of ``stage`` that ``derived`` lists and that have no ledger entry here, in derivation order."""
    units = derived(layout, stage, config, table, upstream_config)
    return Ledger(layout, table.ledger_name(stage, config)).pending(units)


@dataclass(frozen=True)
class StageRun:
    """What one ``run`` did: its ledger ``stage``, one result per unit it tried (units already in the ledger
    are not tried), and the row's summary columns."""

    stage: str
    results: dict[str, UnitResult]
    summary: tuple[str, ...] = ()

    @property
    def failed(self) -> list[str]:
        return failed_units(self.results)

    @property
    def complete(self) -> bool:
        return not self.failed

    def totals(self, prefix: str = "") -> dict[str, float]:
        """The numbers of the finished units' stats under ``prefix`` (a dotted key, e.g. ``counts``), added."""
        total: dict[str, float] = {}
        for result in self.results.values():
            values = _lookup(result.stats or {}, prefix) if prefix else result.stats
            for key, value in (values or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        return total

    def table(self) -> str:
        """One line per unit tried: status, tries and the summary stats; then each failure's last error."""
        columns = self.summary
        names = [c.rsplit(".", 1)[-1] for c in columns]
        widths = [max(10, len(name) + 2) for name in names]
        width = max([24, *(len(unit) + 2 for unit in self.results)])
        lines = [f"{self.stage}: {len(self.results)} unit(s), {len(self.failed)} failed"]
        header = "".join(f"{name:>{w}}" for name, w in zip(names, widths))
        lines.append(f"  {'unit':<{width}}{'status':>8}{'tries':>6}{header}")
        for unit, result in self.results.items():
            cells = "".join(f"{_cell(_lookup(result.stats or {}, c)):>{w}}" for c, w in zip(columns, widths))
            lines.append(f"  {unit:<{width}}{result.status:>8}{result.attempts:>6}{cells}")
        lines += [f"  failed {unit}: {self.results[unit].error}" for unit in self.failed]
        return "\n".join(lines)


def _lookup(stats: Mapping[str, Any], dotted: str) -> Any:
    value: Any = stats
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return str(sum(v for v in value.values() if isinstance(v, int | float)))
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def run(
    layout: Layout,
    stage: str,
    config: Any = None,
    *,
    table: StageTable = STAGES,
    upstream_config: Any = None,
    workers: int = 1,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    in_process: bool = False,
    **executor_options: Any,
) -> StageRun:
    """Run every pending unit of ``stage`` under ``layout`` with ``config`` (the stage's own config object).

    ``workers`` Ray actors with the row's resources (or ``cpus_per_worker`` / ``gpus_per_worker``); the row's
    ``on_driver``, ``in_process`` or a ``memory://`` root run the units in this process instead. Other options
    go to ``pipeline.executor.run_units`` (``max_attempts``, ``unit_timeout_s``, ``startup_timeout_s``,
    ``progress`` ...). Nothing pending: nothing is built or started.
    """
    row = table[stage]
    ledger = table.ledger_name(stage, config)
    units = pending(layout, stage, config, table, upstream_config)
    logger.info("%s: %d pending unit(s) under %s", ledger, len(units), layout)
    if not units:
        return StageRun(ledger, {}, row.summary)
    factory = partial(resolve(row.worker), config)
    results = run_units(
        layout,
        units,
        factory,
        ledger,
        in_process=in_process or row.on_driver,
        prepare=row.prepare,
        num_workers=workers,
        num_cpus_per_worker=row.num_cpus if cpus_per_worker is None else cpus_per_worker,
        num_gpus_per_worker=row.num_gpus if gpus_per_worker is None else gpus_per_worker,
        **executor_options,
    )
    return StageRun(ledger, results, row.summary)
