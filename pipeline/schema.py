"""Versioned Arrow schemas of the pseudo-label outputs, their validation, and the ODVG record of a label row.

Pseudo-label Parquet (``<root>/labels/<teacher>/<shard>.parquet``, DESIGN.md "Data contracts"), one row per
image, sorted by uid:

    uid, url, sha256, source_shard, width, height, caption,
    phrases: list<struct<text, start: int32, end: int32>>     char spans [start, end) into caption
    boxes:   list<struct<phrase: int32, x0, y0, x1, y1, score: float32>>
             phrase indexes ``phrases``; boxes are continuous xyxy in original-image pixels (x1 > x0)
    teacher, round, config_hash, created_at (ISO 8601, UTC, fixed for a labeling job)

Errors Parquet (``<shard>.errors.parquet``): uid (null when the input had none), stage, reason, detail.

Every file written with these schemas carries ``glip_engine.schema`` and ``glip_engine.schema_version`` in its
Parquet key-value metadata; a reader checks them with ``validate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
SCHEMA_KEY = b"glip_engine.schema"
VERSION_KEY = b"glip_engine.schema_version"

# Same layout as the phrase table's column (pipeline.phrases.PHRASE_TYPE): phrases are copied through.
PHRASE_TYPE = pa.struct([("text", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
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


def _versioned(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_KEY: name.encode(), VERSION_KEY: str(SCHEMA_VERSION).encode()})


LABEL_SCHEMA = _versioned(
    "label",
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("source_shard", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("phrases", pa.list_(PHRASE_TYPE), nullable=False),
        pa.field("boxes", pa.list_(BOX_TYPE), nullable=False),
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ],
)

ERROR_SCHEMA = _versioned(
    "error",
    [
        pa.field("uid", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ],
)


class SchemaError(ValueError):
    """A table does not match its schema; ``problems`` names each bad column."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("table does not match the schema: " + "; ".join(problems))
        self.problems = problems


def validate(table: pa.Table, schema: pa.Schema = LABEL_SCHEMA, check_version: bool = True) -> None:
    """Check ``table`` against ``schema``: every column present once with its type, no extra column, no null
    in a non-nullable column, and (``check_version``) the schema name and version in the table's metadata.

    Raises:
        SchemaError: listing every problem, each naming its column.
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
        raise SchemaError(problems)


def _metadata_problems(found: Mapping[bytes, bytes], expected: Mapping[bytes, bytes]) -> list[str]:
    problems = []
    for key in (SCHEMA_KEY, VERSION_KEY):
        if found.get(key) != expected.get(key):
            problems.append(f"metadata {key.decode()} is {found.get(key)!r}, expected {expected.get(key)!r}")
    return problems


# ------------------------------------------------------------------------------------------ ODVG record

PIXEL_DECIMALS = 2
SCORE_DECIMALS = 4
PROVENANCE_FIELDS = ("uid", "url", "sha256", "source_shard", "teacher", "round", "config_hash", "created_at")


def odvg_record(row: Mapping[str, Any], filename: str) -> dict[str, Any]:
    """The ODVG grounding record of one label row (a ``LABEL_SCHEMA`` row as a Python dict).

    Field names are those of mmdetection's ODVG reader: ``filename, height, width, grounding{caption,
    regions[{bbox [x1, y1, x2, y2], phrase, tokens_positive [[start, end]], score}]}``; one region per box
    (continuous pixels, rounded to 0.01 px; score to 1e-4), plus the provenance fields of the row.
    """
    phrases = row["phrases"]
    regions = []
    for box in row["boxes"]:
        phrase = phrases[box["phrase"]]
        regions.append(
            {
                "bbox": [round(float(box[k]), PIXEL_DECIMALS) for k in ("x0", "y0", "x1", "y1")],
                "phrase": phrase["text"],
                "tokens_positive": [[int(phrase["start"]), int(phrase["end"])]],
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
