"""The thin ``python -m jobs.ingest`` entry point: arguments to config, summary printing, exit status."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import build_parser, config_from_args, main
from pipeline.layout import Layout
from pipeline.ledger import Ledger


def test_arguments_become_the_config():
    parser = build_parser()
    args = parser.parse_args(
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
            "--set",
            "ingest.processes_count=3",
            "--set",
            "ingest.thread_count=7",
            "--set",
            "ingest.number_sample_per_shard=50",
            "--set",
            "ingest.resize_mode=keep_ratio",
            "--retry-failed",
            "--set",
            "ingest.url_col=URL",
            "--set",
            "ingest.caption_col=TEXT",
        ]
    )
    config = config_from_args(parser, args)
    assert config.crawl == "c"
    assert config.allow_hosts == ("127.0.0.1:8765", "10.0.0.0/8", "localhost")
    assert config.eval_sets == ("a.json", "b/")
    assert (config.processes_count, config.thread_count, config.number_sample_per_shard) == (3, 7, 50)
    assert config.resize_mode == "keep_ratio" and config.retry_failed
    assert (config.url_col, config.caption_col) == ("URL", "TEXT")


def _exits_with_usage_error(argv: list[str], capsys) -> str:
    """Run the job, expect argparse's exit status 2 and return what it wrote to stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_bad_allow_entry_is_rejected_before_any_work(tmp_path, capsys):
    root = tmp_path / "out"
    argv = ["--crawl", str(tmp_path), "--root", str(root), "--allow-hosts", "not/a/cidr"]
    assert "allow-hosts entry 'not/a/cidr'" in _exits_with_usage_error(argv, capsys)
    assert not root.exists()


def test_unknown_or_mistyped_set_keys_exit_2_before_any_work(tmp_path, capsys):
    root = tmp_path / "out"
    base = ["--crawl", str(tmp_path), "--root", str(root)]
    message = _exits_with_usage_error([*base, "--set", "ingest.nope=1"], capsys)
    assert "'nope'" in message
    # The valid keys are listed, so the user can see the right spelling.
    assert all(key in message for key in ("thread_count", "processes_count", "number_sample_per_shard"))
    message = _exits_with_usage_error([*base, "--set", "ingest.thread_count=abc"], capsys)
    assert "thread_count" in message and "'abc'" in message
    message = _exits_with_usage_error([*base, "--set", "ingest.thread_count=0"], capsys)
    assert "must be positive" in message
    assert not root.exists()


def _summary(printed: str) -> dict[str, dict[str, str]]:
    """The summary table's unit rows, as {unit: {column: cell}}, checking its first two lines."""
    lines = printed.splitlines()
    assert lines[0].startswith("ingest: ")
    header = lines[1].split()
    assert header[:5] == ["unit", "status", "tries", "rows", "seen_before"]
    rows = [line.split() for line in lines[2:] if line.startswith("  ") and not line.startswith("  failed")]
    return {cells[0]: dict(zip(header, cells)) for cells in rows}


def test_a_run_with_nothing_new_prints_the_summary_and_succeeds(tmp_path, capsys):
    crawl, root = tmp_path / "crawl", tmp_path / "out"
    crawl.mkdir()
    assert main(["--crawl", str(crawl), "--root", str(root), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to ingest" in printed and _summary(printed) == {}
    # A partition whose every URL is refused commits without downloading anything.
    pq.write_table(
        pa.table({"url": ["ftp://x/a.jpg", "http://10.0.0.1/b.jpg"], "caption": ["a", "b"]}),
        crawl / "day1.parquet",
    )
    assert main(["--crawl", str(crawl), "--root", str(root), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to ingest" not in printed
    row = _summary(printed)["day1"]
    assert (row["status"], row["rows"], row["refused"], row["success"]) == ("done", "2", "2", "0")
    assert Ledger(Layout(str(root)), "ingest").units() == ["day1"]
