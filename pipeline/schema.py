"""The data contracts: the uid rule, versioned Arrow schemas of every table the engine writes, their
validation, and the ODVG record of a label row.

A sample's ``uid`` is the first 16 hex digits of sha256(url) (``url_uid``); it names the sample in every output.

Phrase table (``Layout.phrase_table``), one row per successfully ingested image of the shard, in shard order:
``uid, caption, phrases: list<struct<text, start: int32, end: int32>>`` (char spans [start, end) into caption).

Pseudo-label Parquet (``Layout.label_shard(teacher, shard, ".parquet")``, DESIGN.md "Data contracts"), one row
per image, sorted by uid:

    uid, url, sha256, source_shard, width, height, caption,
    phrases: list<struct<text, start: int32, end: int32>>     copied from the phrase table
    boxes:   list<struct<phrase: int32, x0, y0, x1, y1, score: float32>>
             phrase indexes ``phrases``; boxes are continuous xyxy in original-image pixels (x1 > x0)
    teacher, config_hash, created_at (ISO 8601, UTC, fixed for a labeling job)

Label shards are made once per teacher at a floor score and serve every round: the round that uses them is
recorded in that round's lineage, not in the shards (version 1 had a ``round`` column).

Error table (``Layout.errors(stage, unit)``), written for every finished unit of every stage, one row per input
that the stage quarantined: ``uid`` (null when the input had none), ``stage`` (the ledger stage), ``reason`` (a
short code), ``detail`` (free text), and what a retry needs: ``url`` and ``caption`` (ingest fills them).

Every file written with these schemas carries ``glip_engine.schema`` and ``glip_engine.schema_version`` in its
Parquet key-value metadata; a reader checks them with ``validate``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import pyarrow as pa

SCHEMA_KEY = b"glip_engine.schema"
VERSION_KEY = b"glip_engine.schema_version"
# The label schema's version; it is recorded in label job files and exports.
SCHEMA_VERSION = 2
UID_BYTES = 8


def uid_bytes(url: str) -> bytes:
    """The uid rule: the first 8 bytes of sha256 of the URL's UTF-8 bytes."""
    return hashlib.sha256(url.encode("utf-8")).digest()[:UID_BYTES]


def url_uid(url: str) -> str:
    """The sample uid of ``url``: 16 hex digits (``uid_bytes`` in hex)."""
    return uid_bytes(url).hex()


PHRASE_TYPE = pa.struct([("text", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
PHRASES_TYPE = pa.list_(PHRASE_TYPE)
BOX_TYPE = pa.struct(
    [
        ("phrase", pa.int32()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("score", pa.float32()),
    ]
)


def _versioned(name: str, version: int, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_KEY: name.encode(), VERSION_KEY: str(version).encode()})


PHRASE_TABLE_SCHEMA = _versioned(
    "phrases",
    1,
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("phrases", PHRASES_TYPE, nullable=False),
    ],
)

LABEL_SCHEMA = _versioned(
    "label",
    SCHEMA_VERSION,
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("source_shard", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("phrases", PHRASES_TYPE, nullable=False),
        pa.field("boxes", pa.list_(BOX_TYPE), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ],
)

# Version 2: one table for every stage (version 1 was the label stage's alone, without url and caption).
ERROR_SCHEMA = _versioned(
    "error",
    2,
    [
        pa.field("uid", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
    ],
)
ERROR_FIELDS = tuple(ERROR_SCHEMA.names)


class UnitOutput(NamedTuple):
    """What a worker returns for one unit: ``stats`` (the ledger entry) and ``errors``, one dict per input it
    quarantined (``reason`` plus any of ``uid, detail, url, caption``; see ``pipeline.schema.ERROR_SCHEMA``)."""

    stats: dict[str, Any]
    errors: list[dict[str, Any]]


def error_table(rows: Iterable[Mapping[str, Any]], stage: str) -> pa.Table:
    """An ``ERROR_SCHEMA`` table of ``rows`` (dicts with ``reason`` and any of uid, detail, url, caption),
    every row stamped with ``stage``, sorted by (uid, reason, detail) so that a unit's errors are the same
    bytes however its inputs were visited."""
    filled = [{**{name: row.get(name) for name in ERROR_FIELDS}, "stage": stage} for row in rows]
    filled.sort(key=lambda row: (row["uid"] or "", row["reason"], row["detail"] or "", row["url"] or ""))
    return pa.Table.from_pylist(filled, schema=ERROR_SCHEMA)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns of ``schema``, in its order, cast to its types, with its name and version."""
    return table.select(schema.names).cast(schema)


class SchemaError(ValueError):
    """A table does not match its schema; ``problems`` names each bad column, ``where`` the file (if known)."""

    def __init__(self, problems: list[str], where: str | None = None) -> None:
        super().__init__(f"{where or 'table'} does not match the schema: " + "; ".join(problems))
        self.problems = problems
        self.where = where


def validate(
    table: pa.Table, schema: pa.Schema = LABEL_SCHEMA, check_version: bool = True, where: str | None = None
) -> None:
    """Check ``table`` against ``schema``: every column present once with its type, no extra column, no null
    in a non-nullable column, and (``check_version``) the schema name and version in the table's metadata.

    Raises:
        SchemaError: listing every problem, each naming its column; naming ``where`` (the file read) too.
    """
    problems = []
    expected = {field.name: field for field in schema}
    names = table.column_names
    for name in sorted(set(names)):
        if name not in expected:
            problems.append(f"unexpected column {name!r}")
        elif names.count(name) > 1:
            problems.append(f"column {name!r} appears {names.count(name)} times")
    for name, field in expected.items():
        if names.count(name) != 1:
            if name not in names:
                problems.append(f"missing column {name!r}")
            continue
        column = table.column(name)
        if not column.type.equals(field.type):
            problems.append(f"column {name!r} has type {column.type}, expected {field.type}")
        elif not field.nullable and column.null_count:
            problems.append(f"column {name!r} has {column.null_count} null value(s)")
    if check_version:
        problems += _metadata_problems(table.schema.metadata or {}, schema.metadata or {})
    if problems:
        raise SchemaError(problems, where)


def _metadata_problems(found: Mapping[bytes, bytes], expected: Mapping[bytes, bytes]) -> list[str]:
    problems = []
    for key in (SCHEMA_KEY, VERSION_KEY):
        if found.get(key) != expected.get(key):
            problems.append(f"metadata {key.decode()} is {found.get(key)!r}, expected {expected.get(key)!r}")
    return problems


# ------------------------------------------------------------------------------------------ ODVG record

PIXEL_DECIMALS = 2
SCORE_DECIMALS = 4
PROVENANCE_FIELDS = ("uid", "url", "sha256", "source_shard", "teacher", "config_hash", "created_at")


def odvg_record(row: Mapping[str, Any], filename: str) -> dict[str, Any]:
    """The ODVG grounding record of one label row (a ``LABEL_SCHEMA`` row as a Python dict).

    Field names are those of mmdetection's ODVG reader: ``filename, height, width, grounding{caption,
    regions[{bbox [x1, y1, x2, y2], phrase, tokens_positive [[start, end]], score}]}``; one region per box
    (continuous pixels, rounded to 0.01 px; score to 1e-4), plus the provenance fields of the row.
    """
    phrases = [(p["text"], int(p["start"]), int(p["end"])) for p in row["phrases"]]
    regions = []
    for box in row["boxes"]:  # the label stage's thread writes this per box: kept plain (100 boxes ~0.5 ms)
        text, start, end = phrases[box["phrase"]]
        regions.append(
            {
                "bbox": [
                    round(float(box["x0"]), PIXEL_DECIMALS),
                    round(float(box["y0"]), PIXEL_DECIMALS),
                    round(float(box["x1"]), PIXEL_DECIMALS),
                    round(float(box["y1"]), PIXEL_DECIMALS),
                ],
                "phrase": text,
                "tokens_positive": [[start, end]],
                "score": round(float(box["score"]), SCORE_DECIMALS),
            }
        )
    record = {
        "filename": filename,
        "height": int(row["height"]),
        "width": int(row["width"]),
        "grounding": {"caption": row["caption"], "regions": regions},
    }
    record.update({name: row[name] for name in PROVENANCE_FIELDS})
    return record
