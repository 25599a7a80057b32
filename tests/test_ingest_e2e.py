"""Whole ingestion runs with real img2dataset against a real loopback server serving hostile answers.

Acceptance of issue [3/7]: (1) good images land with caption and uid, bad ones are counted with a reason;
(5) planted evaluation images are dropped. Re-runs and crashes: test_ingest_resume.py.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import graph, storage
from pipeline.graph import StageRun
from pipeline.ingest import IngestConfig, planned_units
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import ERROR_SCHEMA, url_uid, validate
from tests._ray_cluster import local_ray  # noqa: F401 - the fixture
from tests.hostile_server import HostileServer, encode, hostile_bodies, odd_good_bodies, smooth_image

pytestmark = pytest.mark.smoke
REPO = Path(__file__).resolve().parents[1]
SHARD_COLUMNS = {
    "key",
    "uid",
    "url",
    "caption",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
}


def _config(server: HostileServer, crawl: Path, **overrides) -> IngestConfig:
    settings = dict(
        crawl=str(crawl),
        processes_count=1,
        thread_count=4,
        timeout=1,
        retries=0,
        number_sample_per_shard=8,
        allow_hosts=(f"127.0.0.1:{server.port}",),
    )
    return IngestConfig(**{**settings, **overrides})


def _ingest(root: Path, config: IngestConfig) -> StageRun:
    """One run of the ingest stage (every pending partition) into ``root``."""
    return graph.run(Layout(str(root)), "ingest", config, progress=False)


def _counts(result: StageRun, unit: str) -> dict[str, int]:
    return result.results[unit].stats["counts"]


def _write_partition(folder: Path, name: str, urls: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    captions = [_caption(u) for u in urls]
    pq.write_table(pa.table({"url": urls, "caption": captions}), folder / f"{name}.parquet")


def _samples(root: Path) -> list[dict]:
    """Every sample in every tar under <root>/images, with its caption, json metadata and image bytes."""
    samples = []
    for tar_path in sorted((root / "images").rglob("*.tar")):
        members: dict[str, dict] = {}
        with tarfile.open(tar_path) as archive:
            for member in archive.getmembers():
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = archive.extractfile(member).read()
        for key, parts in members.items():
            meta = json.loads(parts["json"])
            samples.append(
                {
                    "unit": tar_path.parent.name,
                    "key": key,
                    "uid": meta["uid"],
                    "meta": meta,
                    "caption": parts["txt"].decode(),
                    "image": parts["jpg"],
                }
            )
    return samples


def _rows(root: Path) -> list[dict]:
    rows = []
    for path in sorted((root / "images").rglob("*.parquet")):
        table = pq.read_table(path)
        assert SHARD_COLUMNS <= set(table.column_names), table.column_names
        rows += table.to_pylist()
    return rows


def _caption(url: str) -> str:
    return f"a photo of item {url_uid(url)[:6]}"


def _failures(root: Path) -> dict[str, dict]:
    """The error rows of every committed ingest unit, by url (each table checked against ERROR_SCHEMA)."""
    layout = Layout(str(root))
    rows = {}
    for unit in Ledger(layout, "ingest").units():
        table = storage.read_parquet(layout.fs, layout.errors("ingest", unit))
        validate(table, ERROR_SCHEMA)
        rows |= {row["url"]: row for row in table.to_pylist()}
    return rows


def test_hostile_crawl_lands_good_images_and_explains_every_failure(tmp_path):
    good = {f"good-{i}.jpg": encode(smooth_image(i), quality=90) for i in range(6)} | odd_good_bodies()
    with HostileServer(hang_seconds=4) as server, HostileServer() as internal:
        internal.add("good", good["good-0.jpg"])
        good_urls = {server.add(name, data): data for name, data in good.items()}
        expected_failures = {
            server.add(name, data): reason
            for name, data in hostile_bodies().items()
            for reason in [
                {
                    "truncated.jpg": "truncated",
                    "page.jpg": "not an image",
                    "empty.jpg": "not an image",
                    "one-pixel.png": "image too small",
                    "huge.png": "image too large",
                }[name]
            ]
        }
        expected_failures |= {
            server.url("404"): "HTTP Error 404",
            server.url("500"): "HTTP Error 500",
            server.url("hang"): "timed out",
            server.url("loop"): "infinite loop",
            server.url(f"redirect/{internal.port}"): "refused loopback address",
            server.url("to-ftp"): "redirect to scheme 'ftp' refused",
            "ftp://127.0.0.1/a.jpg": "scheme not allowed",
            "http://10.0.0.1/a.jpg": "refused private address",
            f"http://127.0.0.1:{internal.port}/img/good": "refused loopback address",
        }
        urls = list(good_urls) + list(expected_failures) + list(good_urls)[:2]  # two repeated rows
        crawl, out = tmp_path / "crawl", tmp_path / "out"
        _write_partition(crawl, "day1", urls)
        result = _ingest(out, _config(server, crawl))
    assert internal.requests == []
    assert result.complete and list(result.results) == ["day1"]
    counts = _counts(result, "day1")
    assert counts["success"] == len(good_urls) and counts["duplicate_in_partition"] == 2
    assert counts["failed"] + counts["refused"] == len(expected_failures)
    assert result.totals("counts")["success"] == len(good_urls)

    samples = _samples(out)
    by_uid = {s["uid"]: s for s in samples}
    assert len(samples) == len(by_uid) == len(good_urls)
    for url, data in good_urls.items():
        sample = by_uid[url_uid(url)]
        assert sample["caption"] == _caption(url)
        assert sample["meta"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert sample["meta"]["width"] == sample["meta"]["original_width"]  # resize_mode "no"
    assert by_uid[url_uid(list(good_urls)[0])]["image"] == good["good-0.jpg"]  # JPEG bytes kept as is

    failures = _failures(out)
    assert set(failures) == set(expected_failures)
    screened = {
        "ftp://127.0.0.1/a.jpg",
        "http://10.0.0.1/a.jpg",
        f"http://127.0.0.1:{internal.port}/img/good",
    }
    for url, fragment in expected_failures.items():
        row = failures[url]
        assert fragment in row["detail"], (url, row)
        assert (row["uid"], row["caption"], row["stage"]) == (url_uid(url), _caption(url), "ingest")
        assert (row["reason"] == "refused") == (url in screened), (url, row)
    assert counts["refused"] == len(screened)
    rows = _rows(out)
    assert Counter(r["status"] for r in rows)["success"] == len(good_urls)
    layout = Layout(str(out))
    entry = Ledger(layout, "ingest").get("day1")
    assert entry["shards"] == [f"day1/{i:05d}" for i in range(len(entry["shards"]))]
    assert entry["counts"] == counts
    assert not layout.fs.exists(storage.join(layout.image_folder("day1"), "_tmp"))
    assert planned_units(layout) == []  # the plan is removed once the ledger entry is written


def test_planted_evaluation_copies_are_all_dropped(tmp_path):
    eval_folder = tmp_path / "eval"
    eval_folder.mkdir()
    planted = {}
    with HostileServer() as server:
        for seed in (700, 701, 702):
            image = smooth_image(seed, (160, 120))
            original = encode(image, quality=92)
            (eval_folder / f"val-{seed}.jpg").write_bytes(original)
            planted[server.add(f"exact-{seed}.jpg", original)] = seed
            planted[server.add(f"reencoded-{seed}.jpg", encode(image, quality=40))] = seed
            planted[server.add(f"small-{seed}.jpg", encode(image.resize((80, 60)), quality=85))] = seed
            planted[server.add(f"large-{seed}.png", encode(image.resize((320, 240)), "PNG"))] = seed
        clean = [server.add(f"clean-{i}.jpg", encode(smooth_image(800 + i, (160, 120)))) for i in range(10)]
        _write_partition(tmp_path / "crawl", "day1", clean[:5] + list(planted) + clean[5:])
        config = _config(server, tmp_path / "crawl", eval_sets=(str(eval_folder),))
        result = _ingest(tmp_path / "out", config)
    assert _counts(result, "day1")["decontaminated"] == len(planted)
    assert _counts(result, "day1")["success"] == len(clean)
    assert sorted(s["uid"] for s in _samples(tmp_path / "out")) == sorted(url_uid(u) for u in clean)
    rows = {r["url"]: r for r in _rows(tmp_path / "out")}
    for url, seed in planted.items():
        assert rows[url]["status"] == "decontaminated"
        assert f"val-{seed}.jpg" in rows[url]["error_message"]


@pytest.mark.usefixtures("local_ray")
def test_ray_distributor_ingests_the_same_way(tmp_path):
    with HostileServer() as server:
        good = [server.add(f"r{i}.jpg", encode(smooth_image(600 + i))) for i in range(6)]
        _write_partition(tmp_path / "crawl", "day1", good + [server.url("404")])
        config = _config(
            server, tmp_path / "crawl", distributor="ray", processes_count=2, number_sample_per_shard=4
        )
        result = _ingest(tmp_path / "out", config)
    assert result.complete and _counts(result, "day1")["success"] == 6
    assert sorted(s["uid"] for s in _samples(tmp_path / "out")) == sorted(url_uid(u) for u in good)
    failure = _failures(tmp_path / "out")[server.url("404")]
    assert (failure["reason"], failure["detail"]) == ("failed_to_download", "HTTP Error 404: Not Found")
