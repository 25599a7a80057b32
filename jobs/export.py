"""Export a teacher's finished pseudo-labels for other trainers: ODVG JSON Lines or MDETR-style COCO JSON.

    python -m jobs.export --root demo-out/root --teacher teacher-0a1b2c3d4e --format odvg --out labels.odvg.jsonl \\
        --threshold 0.5
    python -m jobs.export --root demo-out/root --teacher jobs/assets/teacher --format coco --out labels.coco.json
    python -m jobs.export --root s3://bucket/engine --teacher glip_t-6c2b1a0f9e --format coco \\
        --out s3://bucket/exports/round0.json --storage-option endpoint_url=http://127.0.0.1:9000
    python -m jobs.export --root demo-out/root --teacher jobs/assets/teacher --format odvg \\
        --out s3://bucket/round0.jsonl --out-storage-option endpoint_url=http://127.0.0.1:9000

``--teacher`` is the teacher's folder under the root's labels (its ``teacher_id``, as the label job prints
it), or the checkpoint the labels were made with (its ``teacher_id`` is computed from the file; a URL is
fetched first, with the root's storage options when it is on the root's protocol). Only shards
with a ledger entry are exported (``pipeline.exports``), with the boxes scoring above ``--threshold`` (label
shards hold every box above the labeling floor). Image file names are ``<uid>.<extension>``, as in the
label tars. ``--out`` is written with the root's storage options unless ``--out-storage-option`` is given (then
with those alone: a local root exporting to an object store, or one store to another). Prints one JSON object
of the counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jobs._roots import add_root_arguments, layout_from_args, options_for, parse_options
from pipeline.exports import export_coco, export_odvg
from pipeline.label import label_stage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from teacher.fetch import is_remote
from teacher.teacher import TeacherConfig, teacher_id_of

FORMATS = ("odvg", "coco")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_root_arguments(parser)
    parser.add_argument("--teacher", required=True, help="teacher folder name, or its checkpoint")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True, help="output file: a local path or an fsspec URL")
    parser.add_argument(
        "--out-storage-option", dest="out_options", action="append", default=[], metavar="KEY=VALUE",
        help="fsspec option for --out (repeatable; default: the root's --storage-option values)",
    )  # fmt: skip
    parser.add_argument("--threshold", type=float, default=0.5, help="keep boxes scoring above this")
    parser.add_argument("--image-extension", default="jpg", help="extension of the image file names")
    return parser


def teacher_folder(layout: Layout, teacher: str) -> str:
    """The labels folder that ``teacher`` names: a folder with finished shards, else a checkpoint's id."""
    if "/" not in teacher and Ledger(layout, label_stage(teacher)).units():
        return teacher
    if is_remote(teacher):  # fetched into this machine's cache to digest it (FileNotFoundError if missing)
        return teacher_id_of(
            TeacherConfig(checkpoint=teacher, storage_options=options_for(teacher, layout, {}))
        )
    if Path(teacher).exists():
        return teacher_id_of(TeacherConfig(checkpoint=teacher))
    raise FileNotFoundError(
        f"no finished labels of teacher {teacher!r} under {layout.url}, and no checkpoint there"
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layout = layout_from_args(parser, args)
    try:
        teacher = teacher_folder(layout, args.teacher)
    except FileNotFoundError as error:
        parser.error(str(error))
    out_options = parse_options(parser, args.out_options, "--out-storage-option")
    if args.format == "odvg":
        records = export_odvg(layout, teacher, args.out, args.threshold, args.image_extension, **out_options)
        counts = {"records": records}
    else:
        counts = export_coco(layout, teacher, args.out, args.threshold, args.image_extension, **out_options)
    print(json.dumps({"teacher": teacher, "format": args.format, "threshold": args.threshold, "out": args.out,
                      **counts}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
