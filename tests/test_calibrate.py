"""Keep-threshold calibration on a verified sample: the lowest threshold whose precision reaches the target."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.calibrate import calibrate, verified_truth
from pipeline.schema import LABEL_SCHEMA

VERIFIED = {
    "images": [{"id": 1, "uid": "a" * 16, "width": 100, "height": 100},
               {"id": 2, "uid": "b" * 16, "width": 100, "height": 100}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30]},
                    {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40]},
                    {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20]}],
    "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}],
}  # fmt: skip


def _row(uid: str, boxes: list[tuple[int, tuple[float, float, float, float], float]]) -> dict:
    phrases = [
        {"text": "a red circle", "start": 0, "end": 12},
        {"text": "a blue square", "start": 17, "end": 30},
    ]
    return {"uid": uid, "url": None, "sha256": None, "source_shard": "p/0", "width": 100, "height": 100,
            "caption": "a red circle and a blue square", "phrases": phrases,
            "boxes": [{"phrase": p, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "score": s} for p, b, s in boxes],
            "teacher": "t", "config_hash": "c", "created_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip


# Image a: a true red circle (0.8), a true blue square (0.45), a wrong red circle (0.5: no such box there) and a
# box named after nothing true (0.35). Image b: a true red circle (0.6). Image c is not in the sample.
LABELS = pa.Table.from_pylist(
    [
        _row("a" * 16, [(0, (10, 10, 40, 40), 0.8), (1, (50, 50, 90, 90), 0.45), (0, (60, 0, 90, 30), 0.5),
                        (1, (0, 60, 30, 90), 0.35)]),
        _row("b" * 16, [(0, (0, 0, 20, 20), 0.6)]),
        _row("c" * 16, [(0, (0, 0, 5, 5), 0.99)]),
    ],
    schema=LABEL_SCHEMA,
)  # fmt: skip


def test_the_lowest_threshold_reaching_the_target_is_chosen() -> None:
    result = calibrate(LABELS, VERIFIED, target=0.9, thresholds=(0.3, 0.4, 0.46, 0.5, 0.55, 0.7))
    curve = {t: (p, r, n) for t, p, r, n in result.curve}
    assert curve[0.3] == (pytest.approx(3 / 5), 1.0, 5)  # 3 true of 5 boxes; all 3 verified objects found
    assert curve[0.4] == (pytest.approx(3 / 4), 1.0, 4)
    assert curve[0.46] == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert curve[0.5] == (1.0, pytest.approx(2 / 3), 2)  # strict: the 0.5 box is dropped at 0.5
    assert (result.threshold, result.met, result.images) == (0.5, True, 2)
    assert result.uids == ("a" * 16, "b" * 16)  # what must stay out of training and metrics


def test_an_unreachable_target_takes_the_most_precise_threshold_and_says_so() -> None:
    labels = pa.Table.from_pylist([_row("a" * 16, [(0, (60, 0, 90, 30), 0.9), (0, (10, 10, 40, 40), 0.4)])],
                                  schema=LABEL_SCHEMA)  # fmt: skip
    result = calibrate(labels, VERIFIED, target=0.9, thresholds=(0.3, 0.5, 0.95))
    assert not result.met and result.threshold == 0.3 and result.precision == pytest.approx(0.5)
    with pytest.raises(ValueError, match="none of the 2 verified images"):
        calibrate(LABELS.filter(pa.array([False, False, True])), VERIFIED)


def test_verified_truth_converts_coco_boxes() -> None:
    truth = verified_truth(VERIFIED)
    assert truth["a" * 16]["boxes"][1] == {"bbox": [50, 50, 90, 90], "category": "blue square"}
    assert [m["boxes"] for m in truth["a" * 16]["mentions"]] == [[0], [1]]  # every box counts for recall
