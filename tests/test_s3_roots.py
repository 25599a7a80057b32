"""s3:// roots end to end on moto's S3 server (tests/_s3.py), reached only through ``--storage-option``: the
real ingest job downloading a loopback crawl into an s3 root (the same shards as a local root, then an
incremental re-run with nothing to do), and ``glip-engine export`` of odvg and coco from and to s3."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from jobs import export as export_job
from jobs import ingest as ingest_job
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from tests._crawl import served_crawl
from tests._ray_cluster import free_port
from tests._s3 import S3Endpoint, s3_server  # noqa: F401 - the fixture
from tests.test_exports import TEACHER, _box, _row, _write_shard

pytestmark = pytest.mark.timeout(300)

CRAWL_IMAGES = 6
SHARD_SIZE = 4


@pytest.fixture(autouse=True)
def no_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 reached without ``--storage-option`` would go to a dead local port, never to AWS: every s3 access
    of these tests must carry the root's options."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "none")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "none")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


def _flags(endpoint: S3Endpoint) -> list[str]:
    return [f"--storage-option={key}={value}" for key, value in endpoint.storage_options.items()]


def _shards(layout: Layout) -> dict[str, Any]:
    """Per image shard of an ingested root: its rows (uid, url, caption, status) sorted by uid, and its tar's
    members (name -> bytes)."""
    found: dict[str, Any] = {}
    for unit in Ledger(layout, "ingest").units():
        for name in Ledger(layout, "ingest").get(unit)["shards"]:  # <partition>/<NNNNN>
            with layout.fs.open(layout.image_shard(name, ".parquet"), "rb") as handle:
                table = pq.read_table(handle, columns=["uid", "url", "caption", "status"])
            with tarfile.open(
                fileobj=io.BytesIO(layout.fs.cat_file(layout.image_shard(name, ".tar")))
            ) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            found[name] = (sorted(table.to_pylist(), key=lambda row: row["uid"]), members)
    return found


def test_ingest_job_into_an_s3_root_lands_the_same_shards_as_a_local_root(
    s3_server: S3Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = f"s3://{s3_server.bucket()}/engine"
    with served_crawl(tmp_path, crawl_images=CRAWL_IMAGES, dead_urls=1) as crawl:
        common = ["--crawl", crawl.crawl, "--allow-hosts", crawl.host, "--quiet",
                  "--set", f"ingest.number_sample_per_shard={SHARD_SIZE}", "--set", "ingest.processes_count=1",
                  "--set", "ingest.thread_count=4"]  # fmt: skip
        assert ingest_job.main([*common, "--root", str(tmp_path / "local")]) == 0
        assert ingest_job.main([*common, "--root", root, *_flags(s3_server)]) == 0
        capsys.readouterr()
        assert ingest_job.main([*common, "--root", root, *_flags(s3_server)]) == 0  # incremental: nothing new
        assert "nothing to ingest" in capsys.readouterr().out
    local, remote = (
        _shards(Layout(str(tmp_path / "local"))),
        _shards(Layout(root, **s3_server.storage_options)),
    )
    assert remote == local
    rows = [row for table, _ in remote.values() for row in table]
    assert sum(row["status"] == "success" for row in rows) == CRAWL_IMAGES
    assert len({row["uid"] for row in rows}) == len(rows) == CRAWL_IMAGES + 1
    fs = s3_server.filesystem()
    assert not [path for path in fs.find(root.removeprefix("s3://")) if "_tmp" in path or ".tmp-" in path]


def _labelled_root(url: str, storage_options: dict[str, Any]) -> Layout:
    layout = Layout(url, **storage_options)
    _write_shard(
        layout, "p/00000", [_row("aaaa", [_box(0, 10.5, 20.25, 60.5, 70.25, 0.9)]), _row("bbbb", [])]
    )
    _write_shard(layout, "p/00001", [_row("cccc", [_box(1, 0.0, 0.0, 300.0, 200.0, 0.55)], "p/00001")])
    _write_shard(layout, "p/00002", [_row("dddd", [_box(0, 1, 1, 2, 2, 0.99)], "p/00002")], finished=False)
    return layout


def _export(root: str, out: str, form: str, *flags: str, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    capsys.readouterr()
    argv = [
        "--root",
        root,
        "--teacher",
        TEACHER,
        "--format",
        form,
        "--out",
        out,
        "--threshold",
        "0.5",
        *flags,
    ]
    assert export_job.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_export_job_from_and_to_s3(
    s3_server: S3Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bucket = s3_server.bucket()
    fs = s3_server.filesystem()
    _labelled_root(f"s3://{bucket}/engine", s3_server.storage_options)
    root, flags = f"s3://{bucket}/engine", _flags(s3_server)
    # s3 root -> s3 out, both formats
    printed = _export(root, f"s3://{bucket}/exports/labels.odvg.jsonl", "odvg", *flags, capsys=capsys)
    records = [json.loads(line) for line in fs.cat_file(f"{bucket}/exports/labels.odvg.jsonl").splitlines()]
    assert printed["records"] == 3 and [r["uid"] for r in records] == ["aaaa", "bbbb", "cccc"]
    assert records[0]["grounding"]["regions"][0]["bbox"] == [10.5, 20.25, 60.5, 70.25]
    printed = _export(root, f"s3://{bucket}/exports/labels.coco.json", "coco", *flags, capsys=capsys)
    coco = json.loads(fs.cat_file(f"{bucket}/exports/labels.coco.json"))
    assert (printed["images"], printed["annotations"]) == (3, 2)
    assert [image["uid"] for image in coco["images"]] == ["aaaa", "bbbb", "cccc"]
    assert coco["annotations"][0]["bbox"] == pytest.approx([10.5, 20.25, 50.0, 50.0])
    # s3 root -> local out: the root's options are not the local file's
    local_out = tmp_path / "labels.coco.json"
    _export(root, str(local_out), "coco", *flags, capsys=capsys)
    assert json.loads(local_out.read_text()) == coco


def test_export_job_from_a_local_root_to_s3_with_its_own_options(
    s3_server: S3Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bucket = s3_server.bucket()
    _labelled_root(str(tmp_path / "engine"), {})
    out_flags = [f"--out-storage-option={flag.split('=', 1)[1]}" for flag in _flags(s3_server)]
    printed = _export(
        str(tmp_path / "engine"), f"s3://{bucket}/labels.odvg.jsonl", "odvg", *out_flags, capsys=capsys
    )
    lines = s3_server.filesystem().cat_file(f"{bucket}/labels.odvg.jsonl").splitlines()
    assert printed["records"] == 3 and [json.loads(line)["uid"] for line in lines] == ["aaaa", "bbbb", "cccc"]
    with pytest.raises(SystemExit):  # a malformed option is a usage error, not a traceback
        _export(
            str(tmp_path / "engine"),
            f"s3://{bucket}/x.jsonl",
            "odvg",
            "--out-storage-option=oops",
            capsys=capsys,
        )
