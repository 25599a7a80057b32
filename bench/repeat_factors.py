"""Weighing concepts by LVIS repeat factors at scale: the indexed count (``student.data.concept_repeat_factor``)
against the definition (a pass over the reference records per concept), on a synthetic human set.

    python bench/repeat_factors.py                       # 200k reference images, 100k concepts
    python bench/repeat_factors.py --records 1000000 --concepts 200000

The reference is ``--records`` detection images of 1-3 names each, drawn from 20k names of 1-3 words over a
Zipf vocabulary of 3,000 words; the concepts are 1-4 words of the same vocabulary (a crawl's phrases). The
definition is timed on ``--sample`` of the concepts (it takes about a second a concept at a million records)
and checked to give the same factors. A round weighs every pasteable concept of the crawl (``round.paste_repeat``)
and every concept of the human set (``round.repeat``) this way. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student.data import GroundedImage, concept_repeat_factor, record_concepts  # noqa: E402


def synthetic(records: int, concepts: int, seed: int = 0, vocabulary: int = 3000, names: int = 20000):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocabulary)]
    odds = 1 / np.arange(1, vocabulary + 1)
    odds /= odds.sum()

    def phrase(length: int) -> str:
        return " ".join(words[i] for i in rng.choice(vocabulary, size=length, p=odds, replace=False))

    vocab = [phrase(int(rng.integers(1, 4))) for _ in range(names)]
    boxes = np.zeros((3, 4), np.float32)
    human = [
        GroundedImage("unread.jpg", 1, 1, boxes, labels=tuple(int(v) for v in rng.integers(0, names, 3)))
        for _ in range(records)
    ]
    return [(human, vocab)], [phrase(int(rng.integers(1, 5))) for _ in range(concepts)]


def by_definition(reference, threshold: float):
    """The factor as defined: one pass over the reference records per concept."""
    sets = [
        [frozenset(c.split()) for c in record_concepts(r, names)]
        for source, names in reference
        for r in source
    ]

    def factor(concept: str) -> float:
        words = frozenset(concept.split())
        count = sum(any(own <= words for own in image) for image in sets)
        return max(1.0, (threshold / (max(count, 1) / len(sets))) ** 0.5)

    return factor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--concepts", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=50, help="concepts the definition is timed on")
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args(argv)
    reference, concepts = synthetic(args.records, args.concepts)
    started = time.perf_counter()
    factor = concept_repeat_factor(reference, args.threshold)
    index_seconds = time.perf_counter() - started
    started = time.perf_counter()
    indexed = [factor(concept) for concept in concepts]
    query_seconds = time.perf_counter() - started
    sample = concepts[:: max(1, len(concepts) // args.sample)][: args.sample]
    defined = by_definition(reference, args.threshold)
    started = time.perf_counter()
    expected = [defined(concept) for concept in sample]
    definition_seconds = time.perf_counter() - started
    fresh = concept_repeat_factor(reference, args.threshold)  # the sample alone, without the others' caches
    mismatches = sum(abs(fresh(c) - e) > 1e-12 * e for c, e in zip(sample, expected, strict=True))
    per_indexed = query_seconds / len(concepts)
    per_definition = definition_seconds / len(sample)
    rows = [
        ("index the reference (once)", index_seconds, None),
        ("indexed, per concept", per_indexed, len(concepts)),
        ("definition, per concept", per_definition, len(sample)),
    ]
    print(f"{args.records:,} reference images, {len(concepts):,} concepts ({len(set(concepts)):,} distinct)")
    print(f"{'what':<30} {'seconds':>12} {'concepts':>10}")
    for name, seconds, count in rows:
        print(f"{name:<30} {seconds:>12.6f} {'' if count is None else count:>10}")
    print(f"same factors on the {len(sample)} sampled concepts: {mismatches == 0} ({mismatches} differ)")
    figures = {
        "records": args.records,
        "concepts": len(concepts),
        "indexed_us_per_concept": round(per_indexed * 1e6, 1),
        "definition_ms_per_concept": round(per_definition * 1e3, 2),
        "speedup": round(per_definition / per_indexed, 1),
        "index_seconds": round(index_seconds, 2),
        "mismatches": mismatches,
        "share_above_1": round(sum(f > 1 for f in indexed) / len(indexed), 4),
    }
    print(json.dumps(figures))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
