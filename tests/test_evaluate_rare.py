"""APr (LVIS-style: AP over the rare names' categories of the all-names detections), the rare-prompt AP and
strict metrics, with hand-made detections and a predictor that answers from the ground truth."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glip.postprocess import PhraseDetections
from glip.prompts import Prompt
from jobs import evaluate as evaluate_job
from jobs.world import generate_world
from student.data import load_coco_detection, load_grounding, read_image
from student.evaluate import EvalResult, MissingMetricError, evaluate
from student.metrics import coco_ap, coco_detections

NAMES = ("red circle", "blue star", "green square", "orange cross", "pink star")
RARE = ["red circle", "blue star"]
# image id -> (category id, xywh); category 5 ("pink star") has no box; image 1 holds no rare name.
BOXES = {
    1: [(3, [5, 5, 40, 40]), (4, [60, 10, 20, 30])],
    2: [(1, [10, 10, 20, 20]), (2, [50, 50, 30, 30]), (3, [60, 5, 30, 25])],
    3: [(1, [60, 60, 25, 25]), (4, [5, 50, 30, 30])],
}


@pytest.fixture
def coco_file(tmp_path) -> Path:
    """A COCO detection json of three 100x100 noise images (files beside it) and five categories."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, boxes in BOXES.items():
        Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(
            tmp_path / f"{image_id}.png"
        )
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 100, "height": 100})
        for category, (x, y, w, h) in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
    categories = [{"id": i, "name": name} for i, name in enumerate(NAMES, start=1)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _detections(categories: set[int], as_category: int | None = None, score: float = 0.9) -> list[dict]:
    """The true boxes of ``categories``, labelled ``as_category`` when given (a false positive on them)."""
    records = []
    for image_id, boxes in BOXES.items():
        for category, (x, y, w, h) in boxes:
            if category in categories:
                label = as_category or category
                records += coco_detections(image_id, np.array([[x, y, x + w, y + h]]), [score], [label])
    return records


def test_apr_is_the_ap_over_the_rare_categories_of_the_same_detections(coco_file):
    # Perfect on the rare categories 1 and 2, and category-3 false positives on those very objects.
    detections = _detections({1, 2}) + _detections({1, 2}, as_category=3, score=0.95)
    rare = coco_ap(str(coco_file), detections, category_ids=[1, 2])
    every = coco_ap(str(coco_file), detections)
    assert rare.ap == pytest.approx(1.0) and rare.ap50 == pytest.approx(1.0)
    assert every.ap == pytest.approx(0.5)  # categories 1, 2: 1.0; 3, 4: 0.0; 5 has no box, so no AP
    assert rare.num_detections == 3 and every.num_detections == 6
    with pytest.raises(ValueError, match="no ground-truth box"):
        coco_ap(str(coco_file), detections, category_ids=[5])
    with pytest.raises(ValueError, match="no ground-truth box"):
        coco_ap(str(coco_file), detections, image_ids=[1], category_ids=[1, 2])


def _key(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


class TruthPredictor:
    """Stands in for ``GlipPredictor``: finds, at score 0.9, the true boxes of the names that ``finds`` picks
    from the prompt's names; a grounding prompt gets each phrase's first true box (R@1 1.0)."""

    def __init__(
        self,
        coco_json: Path,
        image_root: Path,
        finds: Callable[[list[str]], set[str]],
        grounding_json: Path | None = None,
    ) -> None:
        records, names = load_coco_detection(coco_json, image_root)
        self.truth = {
            _key(read_image(r.image_path)): [(box, names[label]) for box, label in zip(r.boxes, r.labels)]
            for r in records
        }
        self.finds = finds
        self.phrases = {}
        for record in load_grounding(grounding_json, image_root) if grounding_json else ():
            boxes = {}
            for spans, box in zip(record.box_spans, record.boxes):
                boxes.setdefault(spans, box)
            self.phrases[_key(read_image(record.image_path)), record.caption] = list(boxes.values())

    @staticmethod
    def _detections(boxes: list, phrases: list[int]) -> PhraseDetections:
        return PhraseDetections(
            torch.tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            torch.full((len(phrases),), 0.9),
            torch.tensor(phrases, dtype=torch.int64),
        )

    def predict_vocabulary(
        self, images: Sequence[Image.Image], names: Sequence[str]
    ) -> list[PhraseDetections]:
        found = self.finds(list(names))
        results = []
        for image in images:
            kept = [(box, names.index(name)) for box, name in self.truth[_key(image)] if name in found]
            results.append(self._detections([box for box, _ in kept], [phrase for _, phrase in kept]))
        return results

    def predict(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> list[PhraseDetections]:
        results = []
        for image, prompt in zip(images, prompts):
            boxes = self.phrases[_key(image), prompt.caption]
            results.append(self._detections(boxes, list(range(len(boxes)))))
        return results


def _rare_only(names: list[str]) -> set[str]:
    return set(names) & set(RARE)


def test_a_detector_perfect_on_the_rare_names_only_has_apr_1_and_ap_below_1(coco_file):
    predictor = TruthPredictor(coco_file, coco_file.parent, _rare_only)
    result = evaluate(predictor, coco_file, None, coco_file.parent, rare_names=RARE)
    assert result.ap_rare == pytest.approx(1.0) and result.ap_rare_prompt == pytest.approx(1.0)
    assert result.ap == pytest.approx(0.5) and result.rare_names == tuple(RARE) and result.images == 3
    assert result.as_dict("teacher_") == {
        "teacher_ap": result.ap,
        "teacher_ap50": result.ap50,
        "teacher_apr": result.ap_rare,
        "teacher_apr_prompt": result.ap_rare_prompt,
        "teacher_r1": None,
    }
    with pytest.raises(MissingMetricError, match="r1"):
        result.as_dict(strict=True)


def test_the_rare_prompt_is_a_pass_of_its_own(coco_file):
    # Finds every name, but only when prompted with the whole vocabulary.
    predictor = TruthPredictor(
        coco_file, coco_file.parent, lambda names: set(names) if len(names) == 5 else set()
    )
    result = evaluate(predictor, coco_file, None, coco_file.parent, rare_names=RARE)
    assert result.ap == pytest.approx(1.0) and result.ap_rare == pytest.approx(1.0)
    assert result.ap_rare_prompt == pytest.approx(0.0)
    skipped = evaluate(predictor, coco_file, None, coco_file.parent, rare_names=RARE, rare_prompt=False)
    assert skipped.ap_rare == pytest.approx(1.0) and skipped.ap_rare_prompt is None


def test_apr_is_not_measured_without_rare_names_or_rare_boxes(coco_file):
    predictor = TruthPredictor(coco_file, coco_file.parent, _rare_only)
    plain = evaluate(predictor, coco_file, None, coco_file.parent)
    assert plain.ap_rare is None and plain.ap_rare_prompt is None and plain.rare_names == ()
    first = evaluate(
        predictor, coco_file, None, coco_file.parent, limit=1, rare_names=RARE
    )  # image 1: no rare box
    assert first.ap_rare is None and first.images == 1
    with pytest.raises(MissingMetricError, match="apr"):
        first.as_dict(strict=True)
    with pytest.raises(ValueError, match="unknown"):
        evaluate(predictor, coco_file, None, coco_file.parent, rare_names=["red circle", "mauve blob"])


def test_eval_result_keeps_its_positional_fields():
    result = EvalResult(0.5, 0.7, 0.9, 10, 1.0)
    assert result.as_dict() == {"ap": 0.5, "ap50": 0.7, "apr": None, "apr_prompt": None, "r1": 0.9}


@pytest.fixture(scope="module")
def world(small_world_options) -> Path:
    options = small_world_options()
    generate_world(options)
    return Path(options.out)


def test_evaluate_world_reads_the_rare_names_of_the_world(world):
    manifest = json.loads((world / "world.json").read_text())
    files, rare = manifest["files"], set(manifest["rare_names"])
    predictor = TruthPredictor(
        world / files["eval_coco"],
        world / files["eval_images"],
        lambda names: set(names) & rare,
        world / files["eval_grounding"],
    )
    result = evaluate_job.evaluate_world(predictor, world)
    assert (
        result.rare_names == tuple(manifest["rare_names"])
        and result.images == manifest["counts"]["eval_images"]
    )
    metrics = result.as_dict(strict=True)
    assert metrics["apr"] == pytest.approx(1.0) and metrics["apr_prompt"] == pytest.approx(1.0)
    assert metrics["r1"] == pytest.approx(1.0) and metrics["ap"] < 0.5
    del manifest["rare_names"]
    (world / "old").mkdir()
    (world / "old" / "world.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="rare_names"):
        evaluate_job.world_rare_names(world / "old")


@pytest.mark.smoke
def test_cli_prints_ap_apr_ap50_r1_of_a_checkpoint(world, tmp_path, capsys):
    from glip import checkpoint
    from glip.config import tiny, with_overrides
    from glip.model import build_model

    torch.manual_seed(0)
    settings = ["input.min_size=96", "input.max_size=160", "text.pad_to_max=False",
                "postprocess.score_threshold=0.0", "postprocess.detections_per_image=8"]  # fmt: skip
    config = with_overrides(tiny(), settings)
    teacher = checkpoint.save(
        build_model(config), config, tmp_path / "teacher"
    )  # random weights: any AP in [0, 1]
    argv = ["--checkpoint", str(teacher), "--world", str(world), "--limit", "3", "--fp32"]
    assert evaluate_job.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((world / "world.json").read_text())
    assert printed["rare_names"] == manifest["rare_names"] and printed["images"] == 3
    for key in ("ap", "apr", "apr_prompt", "ap50", "r1"):
        assert 0.0 <= printed[key] <= 1.0, key
    evaluate_job.main([*argv, "--rare-names", "red star, green square", "--no-rare-prompt"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rare_names"] == ["red star", "green square"] and printed["apr_prompt"] is None
    assert 0.0 <= printed["apr"] <= 1.0  # both are in the first 3 held-out images of this world
