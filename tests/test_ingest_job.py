"""The thin ``python -m jobs.ingest`` entry point: arguments to config, summary printing, exit status."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import build_parser, config_from_args, main


def test_arguments_become_the_config():
    args = build_parser().parse_args(
        [
            "--crawl",
            "c",
            "--root",
            "r",
            "--allow-hosts",
            "127.0.0.1:8765,10.0.0.0/8",
            "--allow-hosts",
            "localhost",
            "--eval-set",
            "a.json",
            "--eval-set",
            "b/",
            "--processes",
            "3",
            "--threads",
            "7",
            "--shard-size",
            "50",
            "--resize-mode",
            "keep_ratio",
            "--retry-failed",
            "--url-col",
            "URL",
            "--caption-col",
            "TEXT",
        ]
    )
    config = config_from_args(args)
    assert config.allow_hosts == ("127.0.0.1:8765", "10.0.0.0/8", "localhost")
    assert config.eval_sets == ("a.json", "b/")
    assert (config.processes_count, config.thread_count, config.number_sample_per_shard) == (3, 7, 50)
    assert config.resize_mode == "keep_ratio" and config.retry_failed
    assert (config.url_col, config.caption_col) == ("URL", "TEXT")


def test_bad_allow_entry_is_rejected_before_any_work():
    with pytest.raises(ValueError, match="allow-hosts entry"):
        main(["--crawl", "c", "--root", "r", "--allow-hosts", "not/a/cidr"])


def test_a_run_with_nothing_new_prints_the_summary_and_succeeds(tmp_path, capsys):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    assert main(["--crawl", str(crawl), "--root", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "nothing to ingest" in capsys.readouterr().out
    # A partition whose every URL is refused commits without downloading anything.
    pq.write_table(
        pa.table({"url": ["ftp://x/a.jpg", "http://10.0.0.1/b.jpg"], "caption": ["a", "b"]}),
        crawl / "day1.parquet",
    )
    assert main(["--crawl", str(crawl), "--root", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["unit", "rows", "seen_before"]
    assert printed.splitlines()[1].split()[:2] == ["day1", "2"]
    assert (tmp_path / "out" / "ledger" / "ingest" / "day1.json").is_file()
