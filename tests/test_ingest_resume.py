"""Re-runs and crashes of whole ingestion runs (real img2dataset, real loopback server, real SIGKILL).

Acceptance of issue [3/7]: (2) re-runs do only new work and --retry-failed picks up failures; (3) a run
SIGKILLed part-way and started again ends with every uid exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline import ingest
from pipeline.ingest import planned_units
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import url_uid
from tests.hostile_server import HostileServer, encode, smooth_image
from tests.test_ingest_e2e import _config, _counts, _ingest, _rows, _samples, _write_partition

pytestmark = pytest.mark.smoke
REPO = Path(__file__).resolve().parents[1]


def test_reruns_do_only_new_work_and_retry_failed_recovers(tmp_path, monkeypatch):
    crawl, out = tmp_path / "crawl", tmp_path / "out"
    downloads = []  # the unit of every img2dataset run started

    def counted_download(layout, plan, config):
        downloads.append(plan.unit)
        return download(layout, plan, config)

    download = ingest._download
    monkeypatch.setattr(ingest, "_download", counted_download)
    with HostileServer() as server:
        day1 = [server.add(f"a{i}.jpg", encode(smooth_image(100 + i))) for i in range(8)]
        for i in range(2):
            server.add(f"f{i}.jpg", encode(smooth_image(200 + i)))
        flaky = [server.url(f"flaky/f{i}.jpg") for i in range(2)]
        dead = server.url("404")
        _write_partition(crawl, "day1", day1 + flaky + [dead])
        first = _ingest(out, _config(server, crawl))
        assert _counts(first, "day1")["success"] == 8 and _counts(first, "day1")["failed"] == 3
        assert downloads == ["day1"]

        # A re-run with nothing new does no work: no unit, no plan, no img2dataset run, no request.
        requests_before = len(server.requests)
        noop = _ingest(out, _config(server, crawl))
        assert noop.results == {} and noop.complete
        assert len(server.requests) == requests_before and downloads == ["day1"]
        assert planned_units(Layout(str(out))) == []

        new = [server.add(f"b{i}.jpg", encode(smooth_image(300 + i))) for i in range(4)]
        _write_partition(crawl, "day2", day1[:4] + new)
        second = _ingest(out, _config(server, crawl))
        assert list(second.results) == ["day2"] and downloads == ["day1", "day2"]
        assert _counts(second, "day2")["seen_before"] == 4 and _counts(second, "day2")["success"] == 4
        fetched = server.requests[requests_before:]
        assert sorted(fetched) == sorted(f"/img/b{i}.jpg" for i in range(4))

        server.heal()
        retry = _ingest(out, _config(server, crawl, retry_failed=True))
        assert list(retry.results) == ["day1.retry-1"]
        counts = _counts(retry, "day1.retry-1")
        assert (counts["rows"], counts["success"], counts["failed"]) == (3, 2, 1)
        again = _ingest(out, _config(server, crawl, retry_failed=True))
        assert list(again.results) == ["day1.retry-2"]
        counts = _counts(again, "day1.retry-2")
        assert (counts["rows"], counts["success"], counts["failed"]) == (1, 0, 1)
        assert downloads == ["day1", "day2", "day1.retry-1", "day1.retry-2"]

    samples = _samples(out)
    uids = Counter(s["uid"] for s in samples)
    assert set(uids) == {url_uid(u) for u in day1 + new + flaky}
    assert max(uids.values()) == 1
    assert Ledger(Layout(str(out)), "ingest").units() == ["day1", "day1.retry-1", "day1.retry-2", "day2"]


def _job(crawl: Path, out: Path, server: HostileServer) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.ingest",
        "--crawl",
        str(crawl),
        "--root",
        str(out),
        "--allow-hosts",
        f"127.0.0.1:{server.port}",
        "--set",
        "ingest.processes_count=1",
        "--set",
        "ingest.thread_count=2",
        "--set",
        "ingest.number_sample_per_shard=4",
        "--set",
        "ingest.timeout=5",
        "--set",
        "ingest.retries=0",
        "--quiet",
    ]


def _wait_for(predicate, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert process.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "the job never finished a shard"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_part_way_then_rerun_gives_every_uid_exactly_once(tmp_path):
    crawl, out = tmp_path / "crawl", tmp_path / "out"
    layout = Layout(str(out))
    folder = Path(layout.image_folder("day1"))
    with HostileServer(slow_seconds=1.0) as server:
        # Shard 0 (4 URLs) is fast; shards 1 and 2 take about 2 s each (1 s a URL, 2 threads).
        urls = [server.add(f"s{i}.jpg", encode(smooth_image(400 + i))) for i in range(12)]
        urls = urls[:4] + [u.replace("/img/", "/slow/img/") for u in urls[4:]]
        _write_partition(crawl, "day1", urls)
        environment = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen(
            _job(crawl, out, server),
            cwd=REPO,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda: any(folder.glob("*_stats.json")), 120, process)
        workers = _children(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at = time.monotonic()
        # The download workers die with the driver, instead of writing on into a shard the next run redoes.
        while any(_alive(pid) for pid in workers) and time.monotonic() - killed_at < 10:
            time.sleep(0.02)
        assert workers and not any(_alive(pid) for pid in workers)
        assert not Ledger(layout, "ingest").is_done("day1")
        assert planned_units(layout) == ["day1"]  # the killed run's plan, which the re-run resumes
        assert len(list(folder.glob("*_stats.json"))) < 3
        result = _ingest(out, _config(server, crawl, number_sample_per_shard=4, timeout=5))
    assert result.complete and list(result.results) == ["day1"]
    assert result.results["day1"].attempts == 1
    expected = sorted(url_uid(u) for u in urls)
    assert sorted(s["uid"] for s in _samples(out)) == expected
    assert sorted(r["uid"] for r in _rows(out) if r["status"] == "success") == expected
    assert len(_rows(out)) == len(urls)
