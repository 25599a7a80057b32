"""Crawl partitions and unit plans (dedup within a partition and against claimed uids, URL screening), and
how a unit's planned rows become its error rows."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import seen, storage
from pipeline.ingest import (
    IngestConfig,
    _lost_rows,
    _unit_output,
    build_plan,
    find_partitions,
    planned_units,
    read_partition,
    read_plan,
    write_plan,
)
from pipeline.layout import Layout
from pipeline.schema import url_uid


def _rows(urls):
    return pa.table({"uid": [url_uid(u) for u in urls], "url": urls, "caption": [f"c:{u}" for u in urls]})


def test_partitions_in_every_format_with_configured_columns(tmp_path):
    urls = ["http://a/1.jpg", "http://a/2.jpg"]
    pq.write_table(pa.table({"link": urls, "text": ["one", "two"]}), tmp_path / "day1.parquet")
    (tmp_path / "day2.csv").write_text('link,text\nhttp://a/3.jpg,"three, with comma"\nhttp://a/4.jpg,\n')
    lines = [json.dumps({"link": "http://a/5.jpg", "text": "five", "extra": 1})]
    with gzip.open(tmp_path / "day3.jsonl.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    (tmp_path / "notes.txt").write_text("not a partition")
    partitions = find_partitions(str(tmp_path))
    assert [(p.name, p.format) for p in partitions] == [
        ("day1", "parquet"),
        ("day2", "csv"),
        ("day3", "jsonl"),
    ]
    read = [read_partition(p, "link", "text") for p in partitions]
    assert read[0] == (urls, ["one", "two"])
    assert read[1] == (["http://a/3.jpg", "http://a/4.jpg"], ["three, with comma", ""])
    assert read[2] == (["http://a/5.jpg"], ["five"])
    with pytest.raises(ValueError, match="no column"):
        read_partition(partitions[0], "url", "caption")


@pytest.mark.parametrize("names", [("a.csv", "a.parquet"), ("b.retry-1.csv",)])
def test_ambiguous_or_reserved_partition_names_raise(tmp_path, names):
    for name in names:
        (tmp_path / name).write_text("url,caption\n")
    with pytest.raises(ValueError):
        find_partitions(str(tmp_path))


def test_plan_drops_duplicates_claimed_and_refused_in_order(tmp_path):
    urls = [
        "http://8.8.8.8/a.jpg",
        "http://8.8.8.8/b.jpg",
        "http://8.8.8.8/a.jpg",
        "ftp://x/c.jpg",
        "http://8.8.8.8/old.jpg",
        "http://10.0.0.1/d.jpg",
        "http://8.8.4.4/e.jpg",
    ]
    claimed = seen.SeenSet([seen.url_uids(["http://8.8.8.8/old.jpg"])])
    plan = build_plan("p", "src", _rows(urls), claimed, IngestConfig(processes_count=1))
    assert plan.download.column("url").to_pylist() == [
        "http://8.8.8.8/a.jpg",
        "http://8.8.8.8/b.jpg",
        "http://8.8.4.4/e.jpg",
    ]
    assert plan.refused.column_names == ["uid", "url", "caption", "reason", "detail"]
    assert plan.refused.column("url").to_pylist() == ["ftp://x/c.jpg", "http://10.0.0.1/d.jpg"]
    assert plan.refused.column("caption").to_pylist() == ["c:ftp://x/c.jpg", "c:http://10.0.0.1/d.jpg"]
    assert plan.refused.column("reason").to_pylist() == ["refused", "refused"]
    details = plan.refused.column("detail").to_pylist()
    assert "scheme not allowed: ftp" in details[0] and "private" in details[1]
    assert plan.counts == {
        "rows": 7,
        "duplicate_in_partition": 1,
        "seen_before": 1,
        "refused": 2,
        "to_download": 3,
    }
    expected = seen.url_uids([urls[i] for i in (0, 1, 6, 3, 5)])
    np.testing.assert_array_equal(plan.uids(), expected)


def test_every_row_without_a_url_is_refused_with_its_reason(tmp_path):
    urls = [None, "http://8.8.8.8/a.jpg", "", None, "   "]
    rows = _rows([u or "" for u in urls]).set_column(1, "url", pa.array(urls, pa.string()))
    claimed = seen.SeenSet([seen.url_uids([""])])  # an earlier partition had a row without a URL too
    plan = build_plan("p", "src", rows, claimed, IngestConfig(processes_count=1))
    assert plan.download.column("url").to_pylist() == ["http://8.8.8.8/a.jpg"]
    assert plan.refused.column("url").to_pylist() == [None, "", None, "   "]
    assert all(plan.refused.column("detail").to_pylist())
    assert plan.counts["duplicate_in_partition"] == 0 and plan.counts["seen_before"] == 0
    assert plan.counts["refused"] == 4


def test_plan_round_trips_through_storage(tmp_path):
    urls = [f"http://8.8.8.8/{i}.jpg" for i in range(5)] + ["http://127.0.0.1/x.jpg"]
    plan = build_plan("p", "src", _rows(urls), seen.SeenSet(), IngestConfig(processes_count=1))
    layout = Layout(str(tmp_path))
    assert read_plan(layout, "p") is None and planned_units(layout) == []
    write_plan(layout, plan)
    again = read_plan(layout, "p")
    assert again.download.equals(plan.download) and again.refused.equals(plan.refused)
    assert again.counts == plan.counts and again.source == "src"
    assert planned_units(layout) == ["p"]


def test_planned_urls_without_a_shard_row_become_lost_failures(tmp_path):
    urls = [f"http://8.8.8.8/{i}.jpg" for i in range(4)] + ["ftp://x/refused.jpg"]
    plan = build_plan("p", "src", _rows(urls), seen.SeenSet(), IngestConfig(processes_count=1))
    written = pa.table({"uid": [url_uid(u) for u in urls[:3]]})
    lost = _lost_rows(plan, written)
    assert lost.column("url").to_pylist() == [urls[3]]

    # Through the unit's output: a shard parquet that mentions only 3 of the 4 planned URLs.
    layout = Layout(str(tmp_path))
    shard = _rows(urls[:3]).append_column("status", pa.array(["success", "failed_to_download", "success"]))
    shard = shard.append_column(
        "error_message", pa.array([None, "HTTP Error 404: Not Found", None], pa.string())
    )
    storage.write_parquet(layout.fs, layout.image_shard("p/00000", ".parquet"), shard)
    output = _unit_output(layout, plan, ["00000"], IngestConfig(processes_count=1), 1.0)
    errors = {row["url"]: row for row in output.errors}
    assert set(errors) == {urls[1], urls[3], urls[4]}
    assert errors[urls[3]] == {
        "uid": url_uid(urls[3]),
        "url": urls[3],
        "caption": f"c:{urls[3]}",
        "reason": "lost",
        "detail": "img2dataset wrote no row for this URL",
    }
    assert (errors[urls[1]]["reason"], errors[urls[1]]["detail"]) == (
        "failed_to_download",
        "HTTP Error 404: Not Found",
    )
    assert errors[urls[4]]["reason"] == "refused" and "scheme not allowed" in errors[urls[4]]["detail"]
    counts = output.stats["counts"]
    assert (counts["success"], counts["failed"], counts["lost"], counts["refused"]) == (2, 2, 1, 1)
    assert output.stats["shards"] == ["p/00000"]
