"""Pseudo-label quality of a labelled root against the world's hidden boxes, per keep rule, for all names and
the world's rare names (the verified sample left out, as a round leaves it out).

    python bench/pseudo_quality.py --root demo-out/root --world demo-out/world
    python bench/pseudo_quality.py ... --rules 0.5 0.54 0.54/0.35      # threshold[/phrase_best]

Prints a table, then one JSON line: per rule, precision / recall / boxes overall and for the rare names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa

from pipeline.exports import Keep, read_labels
from pipeline.layout import Layout
from pipeline.quality import phrase_category, quality


def _rule(text: str) -> Keep:
    threshold, _, best = text.partition("/")
    return Keep(float(threshold), float(best) if best else None)


def _label_folder(layout: Layout, root: str) -> str:
    """The labels of round 0's teacher (the shipped one in a demo root)."""
    return json.loads(Path(root, "rounds/r0/lineage.json").read_text())["labels"]["folder"]


def _rare_only(labels: pa.Table, samples: dict, rare: set[str]) -> tuple[pa.Table, dict]:
    """The label boxes whose phrase names a rare category, and the truth of the rare categories alone."""
    rows = []
    for row in labels.to_pylist():
        entry = samples.get(row["uid"])
        if entry is None:
            continue
        categories = sorted({b["category"] for b in entry.get("boxes") or []})
        names = [phrase_category(p, entry.get("mentions") or [], categories) for p in row["phrases"]]
        rows.append({**row, "boxes": [b for b in row["boxes"] if names[b["phrase"]] in rare]})
    truth = {}
    for uid, entry in samples.items():
        boxes = entry.get("boxes") or []
        index = {old: new for new, old in enumerate(i for i, b in enumerate(boxes) if b["category"] in rare)}
        mentions = [{**m, "boxes": [index[i] for i in m.get("boxes", []) if i in index]}
                    for m in entry.get("mentions") or [] if m["category"] in rare]  # fmt: skip
        truth[uid] = {**entry, "boxes": [boxes[i] for i in index], "mentions": mentions}
    return pa.Table.from_pylist(rows, schema=labels.schema), truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True)
    parser.add_argument("--world", required=True)
    parser.add_argument("--teacher", help="label folder (default: round 0's)")
    parser.add_argument("--rules", nargs="+", default=["0.4", "0.44", "0.5", "0.54", "0.6", "0.54/0.35"])
    args = parser.parse_args(argv)
    world = Path(args.world)
    manifest = json.loads((world / "world.json").read_text())
    samples = json.loads((world / "crawl_truth.json").read_text())["samples"]
    samples = {uid: entry for uid, entry in samples.items() if uid not in set(manifest["verified_uids"])}
    rare = set(manifest["rare_names"])
    layout = Layout(args.root)
    folder = args.teacher or _label_folder(layout, args.root)
    figures = {}
    columns = f"{'precision':>9} {'recall':>6} {'boxes':>5}"
    print(f"{'rule':>10} | {columns} | rare: {columns}")
    for text in args.rules:
        labels = read_labels(layout, folder, _rule(text))
        every = quality(labels, samples)
        of_rare = quality(*_rare_only(labels, samples, rare))
        rare_boxes, rare_precision = of_rare.boxes, of_rare.precision
        figures[text] = {"precision": every.precision, "recall": every.recall, "boxes": every.boxes,
                         "rare_precision": rare_precision, "rare_recall": of_rare.recall,
                         "rare_boxes": rare_boxes}  # fmt: skip
        row = figures[text]
        print(f"{text:>10} | {row['precision'] or 0:9.3f} {row['recall'] or 0:6.3f} {row['boxes']:5d} | "
              f"      {rare_precision or 0:9.3f} {of_rare.recall or 0:6.3f} {rare_boxes:5d}")  # fmt: skip
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
