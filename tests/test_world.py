"""The embedded demo world (jobs/world.py): determinism, formats, spans, crawl, truth and leaks, the long tail,
the uniform option and the verified sample."""

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

import jobs.world
from jobs.world import WorldOptions, generate_world, main
from pipeline.schema import url_uid as uid_of
from student.data import load_coco_detection

DEFAULT_RARE = ["red circle", "red hexagon", "green star", "blue triangle", "yellow square", "yellow cross",
                "purple circle", "purple hexagon", "orange star"]  # fmt: skip
# sha256 over the annotation, truth and leak files of the small world (seed 7) written by the code of sessions
# 1-6 (commit 4dcd7e9): the uniform option must keep writing it.
SESSION_6_SMALL_WORLD = "a8eb983ee9e786fd36770f910fb73a7a8800c672835a4844b353c01959491179"
DIGESTED = ("annotations/train_coco.json", "annotations/train_grounding.json", "annotations/eval_coco.json",
            "annotations/eval_grounding.json", "crawl_truth.json", "leaks.json")  # fmt: skip


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _count_work(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count jobs.world's calls of ``render_scene`` (images drawn) and ``_encode`` (JPEGs encoded)."""
    work: Counter = Counter()
    for name in ("render_scene", "_encode"):
        original = getattr(jobs.world, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            work[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(jobs.world, name, counted)
    return work


def _assert_each_image_drawn_and_encoded_once(work: Counter, options: dict, leaks: list[dict]) -> None:
    """Train, eval and fresh crawl images are drawn once each; a leak is a copy of an eval image (re-encoded
    unless identical) and a dead URL draws nothing."""
    drawn = options["train_images"] + options["eval_images"] + options["crawl_images"]
    assert work["render_scene"] == drawn
    assert work["_encode"] == drawn + sum(leak["kind"] != "identical" for leak in leaks)


@pytest.fixture(scope="module")
def world(small_world_options) -> tuple[Path, dict, Counter]:
    """The world of ``small_world_options()`` and the work it took to generate (``_count_work``)."""
    options = small_world_options()
    with pytest.MonkeyPatch.context() as monkeypatch:
        work = _count_work(monkeypatch)
        manifest = generate_world(options)
    return Path(options.out), manifest, work


def _load(root: Path, manifest: dict, key: str) -> dict:
    return json.loads((root / manifest["files"][key]).read_text(encoding="utf-8"))


def test_small_world_draws_each_image_once_and_is_counted(world):
    root, manifest, work = world
    options, counts = manifest["options"], manifest["counts"]
    _assert_each_image_drawn_and_encoded_once(work, options, _load(root, manifest, "leaks")["leaks"])
    assert (
        counts["train_images"] == options["train_images"] and counts["eval_images"] == options["eval_images"]
    )
    fresh, leaks, dead = options["crawl_images"], options["leaks"], options["dead_urls"]
    assert counts["crawl_rows"] == fresh + leaks + dead
    assert counts["crawl_images"] == fresh + leaks and counts["dead_urls"] == dead
    assert json.loads((root / "world.json").read_text()) == manifest
    assert len(list((root / "images" / "train").glob("*.jpg"))) == options["train_images"]
    assert (
        len(manifest["vocabulary"]["categories"]) == 36
        and "red circle" in manifest["vocabulary"]["categories"]
    )
    assert counts["verified_images"] == len(manifest["verified_uids"]) == fresh // 2  # at most half the crawl
    assert manifest["rare_names"] == DEFAULT_RARE and options["long_tail"]


def test_same_seed_same_bytes_other_seed_other_world(world, small_world_options, tmp_path):
    root, manifest, _ = world
    generate_world(small_world_options(out=str(tmp_path / "again")))
    assert _hashes(tmp_path / "again") == _hashes(root)
    other_manifest = generate_world(
        small_world_options(out=str(tmp_path / "other"), seed=manifest["seed"] + 1)
    )
    other = _hashes(tmp_path / "other")
    assert other["images/train/train_000000.jpg"] != _hashes(root)["images/train/train_000000.jpg"]
    assert other["crawl/part-00000.parquet"] != _hashes(root)["crawl/part-00000.parquet"]
    assert other_manifest["rare_names"] == manifest["rare_names"]  # fixed by the design, not the seed
    assert other_manifest["verified_uids"] != manifest["verified_uids"]


def test_options_in_world_json_reproduce_the_world(world, tmp_path):
    root, manifest, _ = world
    generate_world(WorldOptions(out=str(tmp_path / "copy"), **manifest["options"]))
    assert _hashes(tmp_path / "copy") == _hashes(root)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_coco_and_grounding_load_in_pycocotools(world, split):
    root, manifest, _ = world
    coco = COCO(str(root / manifest["files"][f"{split}_coco"]))
    grounding = COCO(str(root / manifest["files"][f"{split}_grounding"]))
    assert len(coco.getImgIds()) == manifest["counts"][f"{split}_images"]
    assert len(coco.getAnnIds()) == manifest["counts"][f"{split}_boxes"] == len(grounding.getAnnIds())
    names = {c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert names == set(manifest["vocabulary"]["categories"])
    for image in coco.loadImgs(coco.getImgIds()):
        with Image.open(root / manifest["files"][f"{split}_images"] / image["file_name"]) as decoded:
            assert decoded.mode == "RGB" and decoded.size == (image["width"], image["height"])


@pytest.mark.parametrize("key", ["train_coco", "eval_coco", "train_grounding", "eval_grounding"])
def test_human_boxes_inside_images_and_not_degenerate(world, key):
    root, manifest, _ = world
    data = _load(root, manifest, key)
    images = {image["id"]: image for image in data["images"]}
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        image = images[annotation["image_id"]]
        assert w >= 5 and h >= 5 and annotation["iscrowd"] == 0
        assert x >= 0 and y >= 0 and x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
        assert 0 < annotation["area"] <= w * h + 1e-2


@pytest.fixture(scope="module")
def attribute_world(small_world_options) -> tuple[Path, dict]:
    options = small_world_options(attribute_captions=True)
    return Path(options.out), generate_world(options)


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("attributes", [False, True])
def test_grounding_spans_name_the_shape_of_their_box(world, attribute_world, split, attributes):
    root, manifest = attribute_world if attributes else world[:2]
    data = _load(root, manifest, f"{split}_grounding")
    captions_per_image = 2 if attributes and split == "train" else 1
    assert len(data["images"]) == captions_per_image * manifest["counts"][f"{split}_images"]
    assert len(data["annotations"]) == captions_per_image * manifest["counts"][f"{split}_boxes"]
    shapes = {c["id"]: c["shape"] for c in data["categories"]}
    colours = {c["id"]: c["colour"] for c in data["categories"]}
    captions = {image["id"]: image for image in data["images"]}
    sentences = {image["original_img_id"]: [] for image in data["images"]}
    for image in data["images"]:
        assert image["dataset_name"] == "shapes"
        sentences[image["original_img_id"]].append(image["sentence_id"])
    assert all(ids == list(range(captions_per_image)) for ids in sentences.values())
    kinds = set()
    for annotation in data["annotations"]:
        image = captions[annotation["image_id"]]
        for start, end in annotation["tokens_positive"]:
            span = image["caption"][start:end]
            shape, colour = shapes[annotation["category_id"]], colours[annotation["category_id"]]
            if image["sentence_id"] == 0:  # the full name
                assert shape in span and colour in span
            else:  # one attribute alone: "red shapes" (any shape) or "circles" (any colour)
                assert (colour in span) != (shape in span), span
                kinds.add("colour" if colour in span else "shape")
    assert kinds == ({"colour", "shape"} if captions_per_image == 2 else set())


def test_train_and_eval_images_are_disjoint(world):
    root, manifest, _ = world
    train = {hashlib.sha256(p.read_bytes()).digest() for p in (root / "images" / "train").iterdir()}
    evaluation = {hashlib.sha256(p.read_bytes()).digest() for p in (root / "images" / "eval").iterdir()}
    assert not train & evaluation


def test_crawl_parquet_schema_and_served_files(world):
    root, manifest, _ = world
    partitions = manifest["options"]["crawl_partitions"]
    assert partitions > 1  # the small world splits its crawl, so that the split is tested
    assert manifest["files"]["crawl"] == [f"crawl/part-{number:05d}.parquet" for number in range(partitions)]
    tables = [pq.read_table(root / path) for path in manifest["files"]["crawl"]]
    for table in tables:
        assert table.schema.names == ["url", "caption"]
        assert [str(t) for t in table.schema.types] == ["string", "string"]
    urls = [url for table in tables for url in table["url"].to_pylist()]
    assert len(urls) == len(set(urls)) == manifest["counts"]["crawl_rows"]
    served = {path.name for path in (root / "crawl_images").iterdir()}
    assert len(served) == manifest["counts"]["crawl_images"]
    missing = [url for url in urls if url.rsplit("/", 1)[1] not in served]
    assert len(missing) == manifest["counts"]["dead_urls"]
    assert all(url.startswith("http://127.0.0.1:8765/img/") and url.endswith(".jpg") for url in urls)


def test_crawl_truth_matches_urls_boxes_and_spans(world):
    root, manifest, _ = world
    truth = _load(root, manifest, "crawl_truth")["samples"]
    urls = [
        url for path in manifest["files"]["crawl"] for url in pq.read_table(root / path)["url"].to_pylist()
    ]
    assert sorted(truth) == sorted(uid_of(url) for url in urls)
    for uid, sample in truth.items():
        assert uid == hashlib.sha256(sample["url"].encode()).hexdigest()[:16]
        if sample["dead"]:
            assert not (root / "crawl_images" / sample["name"]).exists() and not sample["boxes"]
            continue
        with Image.open(root / "crawl_images" / sample["name"]) as decoded:
            assert decoded.size == (sample["width"], sample["height"])
        for box in sample["boxes"]:
            x0, y0, x1, y1 = box["bbox"]
            assert 0 <= x0 < x1 <= sample["width"] and 0 <= y0 < y1 <= sample["height"]
        for mention in sample["mentions"]:
            assert sample["caption"][mention["start"] : mention["end"]] == mention["text"]
            assert {sample["boxes"][i]["category"] for i in mention["boxes"]} == {mention["category"]}
            if not sample["typo"]:
                assert mention["category"].split()[-1] in mention["text"]


def test_leaks_are_listed_and_look_like_their_eval_images(world):
    root, manifest, _ = world
    leaks = _load(root, manifest, "leaks")["leaks"]
    truth = _load(root, manifest, "crawl_truth")["samples"]
    assert len(leaks) == manifest["options"]["leaks"]
    assert {leak["kind"] for leak in leaks} == {"identical", "reencoded", "resized"}
    evaluation = COCO(str(root / manifest["files"]["eval_coco"]))
    for leak in leaks:
        crawl_bytes = (root / "crawl_images" / leak["name"]).read_bytes()
        eval_bytes = (root / "images" / "eval" / leak["eval_file_name"]).read_bytes()
        assert (crawl_bytes == eval_bytes) == (leak["kind"] == "identical")
        crawl_image, eval_image = Image.open(io.BytesIO(crawl_bytes)), Image.open(io.BytesIO(eval_bytes))
        assert (crawl_image.size == eval_image.size) == (leak["kind"] != "resized")
        assert imagehash.phash(crawl_image) - imagehash.phash(eval_image) <= 6
        sample = truth[leak["uid"]]
        assert sample["leak"]["eval_file_name"] == leak["eval_file_name"]
        eval_boxes = np.array(
            [a["bbox"] for a in evaluation.loadAnns(evaluation.getAnnIds(leak["eval_image_id"]))]
        )
        crawl_boxes = np.array([box["bbox"] for box in sample["boxes"]])
        factor = np.array(crawl_image.size * 2) / np.array(eval_image.size * 2)
        eval_xyxy = np.concatenate([eval_boxes[:, :2], eval_boxes[:, :2] + eval_boxes[:, 2:]], axis=1)
        np.testing.assert_allclose(crawl_boxes, eval_xyxy * factor, atol=0.01)


@pytest.fixture(scope="module")
def long_tail_world(small_world_options) -> tuple[Path, dict]:
    """A world large enough to show its long tail: 160 train images, rare names in 1-3 of them each."""
    options = small_world_options(train_images=160, eval_images=100, crawl_images=200, rare_images=(1, 3))
    return Path(options.out), generate_world(options)


def _images_per_name(data: dict) -> Counter:
    names = {category["id"]: category["name"] for category in data["categories"]}
    return Counter(
        name for _, name in {(a["image_id"], names[a["category_id"]]) for a in data["annotations"]}
    )


def test_rare_names_are_in_few_train_images_and_the_others_in_more(long_tail_world):
    root, manifest = long_tail_world
    rare, per_name = manifest["rare_names"], manifest["per_name"]
    assert rare == DEFAULT_RARE
    train = _images_per_name(_load(root, manifest, "train_coco"))
    assert {name: counts["train_images"] for name, counts in per_name.items()} == {
        name: train[name] for name in per_name
    }
    low, high = manifest["options"]["rare_images"]
    assert all(low <= train[name] <= high for name in rare), [train[name] for name in rare]
    assert len({train[name] for name in rare}) > 1  # a count per rare name, drawn from the seed
    common = [train[name] for name in per_name if name not in rare]
    assert min(common) > high and sum(common) / len(common) > 3 * high


def test_crawl_mentions_every_name_about_equally_and_eval_covers_every_name(long_tail_world):
    root, manifest = long_tail_world
    rare, per_name = manifest["rare_names"], manifest["per_name"]
    truth = _load(root, manifest, "crawl_truth")["samples"]
    verified = set(manifest["verified_uids"])
    mentions = Counter(
        mention["category"]
        for uid, sample in truth.items()
        if not sample["dead"] and sample["leak"] is None and uid not in verified
        for mention in sample["mentions"]
    )
    assert {name: counts["crawl_mentions"] for name, counts in per_name.items()} == {
        name: mentions[name] for name in per_name
    }
    assert min(mentions[name] for name in per_name) >= 1
    rare_mean = sum(mentions[name] for name in rare) / len(rare)
    assert 0.67 < rare_mean / (sum(mentions.values()) / len(per_name)) < 1.5
    evaluation = _images_per_name(_load(root, manifest, "eval_coco"))
    assert {name: counts["eval_images"] for name, counts in per_name.items()} == dict(evaluation)
    assert min(evaluation[name] for name in per_name) >= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_rare_names_get_1_to_10_train_images_drawn_per_seed(seed):
    plan = jobs.world._rare_plan(WorldOptions(seed=seed))
    counts = Counter(f"{colour} {shape}" for colour, shape in filter(None, plan))
    assert sorted(counts) == sorted(DEFAULT_RARE) and all(1 <= n <= 10 for n in counts.values())
    assert len(plan) == 400 and sum(counts.values()) < 0.25 * len(plan)
    other = Counter(f"{c} {s}" for c, s in filter(None, jobs.world._rare_plan(WorldOptions(seed=seed + 1))))
    assert counts != other


def test_verified_sample_is_fresh_crawl_with_its_true_boxes(world):
    root, manifest, _ = world
    data = _load(root, manifest, "verified_coco")
    truth = _load(root, manifest, "crawl_truth")["samples"]
    leaks = {leak["uid"] for leak in _load(root, manifest, "leaks")["leaks"]}
    assert [image["uid"] for image in data["images"]] == manifest["verified_uids"]
    assert len(set(manifest["verified_uids"])) == manifest["counts"]["verified_images"] > 0
    names = {category["id"]: category["name"] for category in data["categories"]}
    eval_bytes = {hashlib.sha256(p.read_bytes()).digest() for p in (root / "images" / "eval").iterdir()}
    for image in data["images"]:
        sample = truth[image["uid"]]
        assert image["uid"] == uid_of(image["url"]) and image["url"] == sample["url"]
        assert not sample["dead"] and sample["leak"] is None and image["uid"] not in leaks
        path = root / manifest["files"]["verified_images"] / image["file_name"]
        assert (
            image["file_name"] == sample["name"]
            and hashlib.sha256(path.read_bytes()).digest() not in eval_bytes
        )
        assert (image["width"], image["height"]) == (sample["width"], sample["height"])
        boxes = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in boxes)]
        np.testing.assert_allclose(xyxy, [box["bbox"] for box in sample["boxes"]], atol=2e-3)
        assert [names[a["category_id"]] for a in boxes] == [box["category"] for box in sample["boxes"]]
    records, _ = load_coco_detection(root / manifest["files"]["verified_coco"], root / "crawl_images")
    assert len(records) == len(data["images"]) and all(Path(r.image_path).is_file() for r in records)


def test_uniform_world_is_the_world_of_session_6(small_world_options):
    options = small_world_options(long_tail=False)
    manifest = generate_world(options)
    digest = hashlib.sha256()
    for name in DIGESTED:
        digest.update(name.encode())
        digest.update(hashlib.sha256((Path(options.out) / name).read_bytes()).digest())
    assert digest.hexdigest() == SESSION_6_SMALL_WORLD
    assert manifest["rare_names"] == DEFAULT_RARE  # named in a uniform world too, for APr


def test_uniform_and_long_tail_worlds_differ_only_in_the_train_split(world, small_world_options):
    root, manifest, _ = world
    options = small_world_options(long_tail=False)
    uniform = generate_world(options)
    ours, theirs = _hashes(root), _hashes(Path(options.out))
    differ = {name for name in ours if ours[name] != theirs.get(name)}
    assert differ == {"world.json"} | {
        name for name in ours if name.startswith(("images/train", "annotations/train"))
    }
    assert uniform["verified_uids"] == manifest["verified_uids"]
    rare = set(manifest["rare_names"])
    uniform_train = _images_per_name(_load(Path(options.out), uniform, "train_coco"))
    assert set(uniform_train) & rare


def test_counts_default_by_world_kind():
    assert (WorldOptions().train_images, WorldOptions().eval_images, WorldOptions().crawl_images) == (
        400,
        600,
        800,
    )
    uniform = WorldOptions(long_tail=False)
    assert (uniform.train_images, uniform.eval_images, uniform.crawl_images) == (600, 150, 400)
    assert WorldOptions(long_tail=False, train_images=7).train_images == 7
    assert WorldOptions(verified_images=50, crawl_images=30).verified_count() == 15


def test_options_change_counts_and_vocabulary(tmp_path):
    options = WorldOptions(
        out=str(tmp_path / "w"),
        shapes=("ellipse", "diamond"),
        colours=("cyan", "teal=#008080"),
        train_images=5,
        eval_images=2,
        crawl_images=4,
        leaks=1,
        dead_urls=0,
        image_size=(100, 120),
        object_size=(20, 40),
        objects_per_image=(2, 2),
        base_url="http://example.test:9000/",
    )
    manifest = generate_world(options)
    assert manifest["vocabulary"]["categories"] == [
        "cyan ellipse",
        "cyan diamond",
        "teal ellipse",
        "teal diamond",
    ]
    assert manifest["vocabulary"]["colours"]["teal"] == [0, 128, 128]
    assert manifest["counts"]["train_images"] == 5 and manifest["counts"]["crawl_rows"] == 5
    coco = _load(tmp_path / "w", manifest, "train_coco")
    assert all(100 <= image["width"] <= 120 and 100 <= image["height"] <= 120 for image in coco["images"])
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])[1:]
    assert per_image.max() <= 2 and per_image.min() >= 1
    assert all(max(a["bbox"][2:]) <= 40 + 1e-3 for a in coco["annotations"])
    truth = _load(tmp_path / "w", manifest, "crawl_truth")["samples"]
    assert all(s["url"].startswith("http://example.test:9000/img/") for s in truth.values())


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(shapes=("circle", "blob")), "ellipse"),
        (dict(colours=("red", "mauve")), "unknown colour"),
        (dict(leaks=5, eval_images=2), "leaks"),
        (dict(image_size=(300, 200)), "image_size"),
        (dict(crawl_partitions=0), "crawl_partitions"),
        (dict(rare_images=(3, 1)), "rare_images"),
        (dict(verified_images=-1), "verified_images"),
        (dict(colours=("red",), shapes=("circle",)), "common name"),
    ],
)
def test_bad_options_raise_with_the_valid_choices(bad, message):
    with pytest.raises(ValueError, match=message):
        WorldOptions(**bad)


def test_cli_writes_a_world_and_replaces_only_a_world(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "--out",
        str(out),
        "--seed",
        "3",
        "--train-images",
        "4",
        "--eval-images",
        "3",
        "--crawl-images",
        "5",
    ]
    main([*argv, "--leaks", "1", "--dead-urls", "1", "--image-size", "120,140", "--shapes", "star,cross"])
    assert json.loads(capsys.readouterr().out)["train_images"] == 4
    manifest = json.loads((out / "world.json").read_text())
    assert manifest["options"]["image_size"] == [120, 140] and manifest["vocabulary"]["shapes"] == [
        "star",
        "cross",
    ]
    main([*argv[:-1], "2", "--leaks", "0"])  # a smaller world over the old one leaves no stale files
    assert len(list((out / "crawl_images").iterdir())) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a world")
    with pytest.raises(FileExistsError):
        main(["--out", str(foreign), "--train-images", "1"])
    assert (foreign / "keep.txt").exists()


def test_cli_uniform_and_rare_images(tmp_path):
    small = ["--eval-images", "1", "--crawl-images", "2", "--leaks", "0", "--dead-urls", "0"]
    manifest = main(["--out", str(tmp_path / "u"), "--uniform", "--train-images", "3", *small])
    assert manifest["options"]["long_tail"] is False and manifest["counts"]["train_images"] == 3
    manifest = main(["--out", str(tmp_path / "t"), "--rare-images", "2,2", "--train-images", "30", *small])
    assert manifest["options"]["long_tail"] and manifest["options"]["rare_images"] == [2, 2]
    assert all(manifest["per_name"][name]["train_images"] == 2 for name in manifest["rare_names"])


@pytest.mark.slow
def test_default_demo_world_draws_each_image_once(tmp_path, monkeypatch):
    work = _count_work(monkeypatch)
    manifest = generate_world(WorldOptions(out=str(tmp_path / "demo")))
    leaks = _load(tmp_path / "demo", manifest, "leaks")["leaks"]
    _assert_each_image_drawn_and_encoded_once(work, manifest["options"], leaks)
    counts, per_name, rare = manifest["counts"], manifest["per_name"], manifest["rare_names"]
    assert counts["train_images"] == 400 and counts["eval_images"] == 600 and counts["crawl_images"] == 806
    assert counts["verified_images"] == 50
    assert min(counts["caption_kinds"].values()) >= 3 and counts["typo_captions"] > 0
    assert counts["partial_captions"] > 0
    assert rare == DEFAULT_RARE and all(1 <= per_name[name]["train_images"] <= 10 for name in rare)
    assert min(per_name[name]["train_images"] for name in per_name if name not in rare) > 10
    assert min(counts["eval_images"] for counts in per_name.values()) >= 20
    assert min(counts["crawl_mentions"] for counts in per_name.values()) >= 20
