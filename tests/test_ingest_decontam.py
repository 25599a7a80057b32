"""Decontamination: evaluation-set indexes and shard rewriting in img2dataset's webdataset layout."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import decontam
from pipeline.layout import Layout
from tests.hostile_server import encode, smooth_image

EVAL_SEEDS = (500, 501, 502)
SHARD = "day1/00000"


def _eval_images() -> dict[str, bytes]:
    return {f"e{seed}.jpg": encode(smooth_image(seed, (160, 120)), quality=92) for seed in EVAL_SEEDS}


def _copies(images: dict[str, bytes]) -> dict[str, bytes]:
    """Exact, re-encoded, down- and up-scaled copies of each evaluation image."""
    copies = {}
    for name, data in images.items():
        image = smooth_image(int(name[1:4]), (160, 120))
        copies[f"exact-{name}"] = data
        copies[f"reencoded-{name}"] = encode(image, quality=45)
        copies[f"small-{name}"] = encode(image.resize((80, 60)), quality=80)
        copies[f"large-{name}"] = encode(image.resize((400, 300)), "PNG")
    return copies


def _write_folder(root, images: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (root / name).write_bytes(data)


def test_index_from_folder_coco_json_and_tar_agree(tmp_path):
    images = _eval_images()
    _write_folder(tmp_path / "folder" / "nested", images)
    _write_folder(tmp_path / "coco" / "val", images)
    coco = {"images": [{"id": i, "file_name": f"val/{n}"} for i, n in enumerate(images)], "annotations": []}
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "annotations" / "val.json").write_text(json.dumps(coco))
    with tarfile.open(tmp_path / "shard.tar", "w") as archive:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    sources = [tmp_path / "folder", tmp_path / "coco" / "annotations" / "val.json", tmp_path / "shard.tar"]
    indexes = [decontam.build_eval_index([str(s)]) for s in sources]
    for index in indexes:
        assert len(index) == 3
        assert set(index.sha256) == {hashlib.sha256(d).hexdigest() for d in images.values()}
        assert sorted(index.phashes.tolist()) == sorted(indexes[0].phashes.tolist())


def test_missing_coco_image_raises(tmp_path):
    (tmp_path / "val.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "gone.jpg"}]}))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        decontam.build_eval_index([str(tmp_path / "val.json")])


def test_match_finds_every_copy_and_no_unrelated_image(tmp_path):
    _write_folder(tmp_path / "eval", _eval_images())
    index = decontam.build_eval_index([str(tmp_path / "eval")])
    copies = _copies(_eval_images())
    others = {f"other-{seed}.jpg": encode(smooth_image(seed, (160, 120))) for seed in range(200)}
    names = list(copies) + list(others)
    data = [copies.get(n) or others[n] for n in names]
    prints = [decontam.fingerprint(d) for d in data]
    reasons = index.match([hashlib.sha256(d).hexdigest() for d in data], prints, decontam.MatchRule())
    found = {name: reason for name, reason in zip(names, reasons) if reason is not None}
    assert set(found) == set(copies)
    assert "exact sha256" in found["exact-e500.jpg"] and "e500.jpg" in found["exact-e500.jpg"]
    assert "thumbnail correlation" in found["small-e501.jpg"] and "e501.jpg" in found["small-e501.jpg"]


def test_look_alikes_within_the_phash_threshold_are_not_copies():
    """A look-alike (one block of the picture changed) passes any phash threshold but not the thumbnail."""
    base = smooth_image(42, (160, 120))
    look_alike = np.asarray(base).copy()
    look_alike[40:80, 60:120] = 255 - look_alike[40:80, 60:120]  # a big block of the picture changed
    original, other = (
        decontam.fingerprint(encode(base)),
        decontam.fingerprint(encode(Image.fromarray(look_alike))),
    )
    index = decontam.EvalIndex(
        phashes=np.array([original.phash], np.uint64),
        thumbnails=original.thumbnail[None, :],
        names=("base.jpg",),
    )
    anything = decontam.MatchRule(phash_threshold=64, min_correlation=-1.0)
    assert index.match([None], [other], anything)[0] is not None
    assert index.match([None], [other], decontam.MatchRule(phash_threshold=64))[0] is None
    assert "base.jpg" in index.match([None], [original], decontam.MatchRule())[0]


def _write_shard(layout: Layout, samples: list[tuple[str, bytes]]) -> None:
    """Image shard ``SHARD`` as img2dataset writes it: <key>.jpg/.txt/.json in a tar, a parquet row per key,
    stats."""
    fs = layout.fs
    fs.makedirs(layout.image_folder(SHARD.split("/")[0]), exist_ok=True)
    rows = []
    tar_path = layout.image_shard(SHARD, ".tar")
    with fs.open(tar_path, "wb") as handle, tarfile.open(fileobj=handle, mode="w") as archive:
        for index, (name, data) in enumerate(samples):
            key = f"{index:09d}"
            meta = {
                "key": key,
                "uid": f"{index:016x}",
                "url": f"http://h/{name}",
                "caption": name,
                "status": "success",
                "error_message": None,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            rows.append(meta)
            for extension, body in (
                ("jpg", data),
                ("txt", name.encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(body)
                archive.addfile(info, io.BytesIO(body))
    rows.append(
        {
            "key": "000009999",
            "uid": "f" * 16,
            "url": "http://h/404",
            "caption": "x",
            "status": "failed_to_download",
            "error_message": "HTTP Error 404",
            "sha256": None,
        }
    )
    with fs.open(layout.image_shard(SHARD, ".parquet"), "wb") as handle:
        pq.write_table(pa.Table.from_pylist(rows), handle)
    with fs.open(layout.image_shard(SHARD, "_stats.json"), "w") as handle:
        json.dump({"count": len(rows), "successes": len(samples)}, handle)


def _tar_keys(layout: Layout) -> list[str]:
    with (
        layout.fs.open(layout.image_shard(SHARD, ".tar"), "rb") as handle,
        tarfile.open(fileobj=handle) as archive,
    ):
        return sorted({name.split(".")[0] for name in archive.getnames()})


def test_decontaminate_shard_rewrites_tar_parquet_and_stats(tmp_path):
    _write_folder(tmp_path / "eval", _eval_images())
    index = decontam.build_eval_index([str(tmp_path / "eval")])
    copies = _copies(_eval_images())
    samples = [(f"keep-{s}.jpg", encode(smooth_image(s, (160, 120)))) for s in range(5)] + list(
        copies.items()
    )
    layout = Layout(str(tmp_path / "out"))
    _write_shard(layout, samples)
    dropped = decontam.decontaminate_shard(layout, SHARD, index, decontam.MatchRule())
    assert len(dropped) == len(copies)
    assert _tar_keys(layout) == [f"{i:09d}" for i in range(5)]
    table = pq.read_table(layout.image_shard(SHARD, ".parquet")).to_pylist()
    by_caption = {row["caption"]: row for row in table}
    assert all(by_caption[name]["status"] == "decontaminated" for name in copies)
    assert "e502.jpg" in by_caption["large-e502.jpg"]["error_message"]
    assert by_caption["x"]["status"] == "failed_to_download"
    stats = json.loads(layout.fs.cat_file(layout.image_shard(SHARD, "_stats.json")))
    assert stats["successes"] == 5 and stats["decontaminated"] == len(copies)
    # Idempotent: a second pass changes nothing.
    assert decontam.decontaminate_shard(layout, SHARD, index, decontam.MatchRule()) == dropped
    assert _tar_keys(layout) == [f"{i:09d}" for i in range(5)]


def test_crash_between_parquet_and_tar_is_repaired_even_with_another_eval_set(tmp_path):
    layout = Layout(str(tmp_path / "out"))
    samples = [(f"s{i}.jpg", encode(smooth_image(900 + i))) for i in range(4)]
    _write_shard(layout, samples)
    # Simulate a crash after the parquet was marked but before the tar was rewritten.
    parquet_path = layout.image_shard(SHARD, ".parquet")
    table = pq.read_table(parquet_path)
    marked = decontam._mark_decontaminated(table, {"000000001": "matches evaluation image old.jpg"})
    pq.write_table(marked, parquet_path)
    dropped = decontam.decontaminate_shard(layout, SHARD, decontam.EvalIndex(), decontam.MatchRule())
    assert dropped == {"000000001": "matches evaluation image old.jpg"}
    assert _tar_keys(layout) == ["000000000", "000000002", "000000003"]
