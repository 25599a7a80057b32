"""The labeling benchmark's parts (bench/label.py, bench/_memory.py): its data builder yields roots the label
stage reads, its alternation and ratios are what they claim, one tiny run of each figure works, and the whole
script runs to its table and last-line JSON. No test asserts a measured figure against a target: timings
depend on the machine."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from glip import checkpoint
from glip.config import from_reference_config, with_overrides
from pipeline import graph, storage
from pipeline.label import LabelConfig, LabelSettings
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.phrases import PhraseExtractor
from teacher import Teacher, TeacherConfig
from tests.conftest import REPO, reference_dir


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("label")


@pytest.fixture(scope="module")
def extractor() -> PhraseExtractor:
    return PhraseExtractor()


@pytest.fixture(scope="module")
def root(tmp_path_factory, extractor) -> tuple[str, list, list[str]]:
    """7 images from 5 world samples in shards of 3, phrased: ``(root, samples, shards)``."""
    work = tmp_path_factory.mktemp("bench")
    samples = bench.world_samples(work / "world", 5)
    shards = bench.prepared_root(str(work / "root"), samples, 7, 3, extractor)
    return str(work / "root"), samples, shards


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    """The reference tiny GLIP in our checkpoint format, at small input sizes."""
    config = from_reference_config(json.loads((reference_dir() / "tiny" / "config.json").read_text()))
    model = checkpoint.import_official(reference_dir() / "tiny" / "state_dict.safetensors", config)
    overrides = ["input.min_size=96", "input.max_size=160", "text.pad_to_max=False"]
    return checkpoint.save(model, with_overrides(config, overrides), tmp_path_factory.mktemp("t") / "tiny")


def test_world_samples_are_the_served_crawl(tmp_path):
    samples = bench.world_samples(tmp_path / "world", 4)
    assert len(samples) == 4 and len({s.url for s in samples}) == 4
    for sample in samples:
        assert sample.jpeg[:2] == b"\xff\xd8" and isinstance(sample.caption, str)


def test_prepared_root_is_what_the_label_stage_reads(root):
    root_path, samples, shards = root
    layout = Layout(root_path)
    assert shards == ["part-00000/00000", "part-00000/00001", "part-00000/00002"]
    assert Ledger(layout, "ingest").get("part-00000")["shards"] == shards
    settings = LabelSettings(TeacherConfig(checkpoint="unused"), LabelConfig(teacher="any-teacher"))
    assert graph.pending(layout, "label", settings) == shards
    tables = [storage.read_parquet(layout.fs, layout.image_shard(shard, ".parquet")) for shard in shards]
    rows = [row for table in tables for row in table.to_pylist()]
    assert len(rows) == 7 and len({r["uid"] for r in rows}) == 7, "reused images get distinct uids"
    with tarfile.open(layout.image_shard(shards[1], ".tar")) as tar:
        jpegs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    assert sorted(jpegs) == ["0000100000.jpg", "0000100001.jpg", "0000100002.jpg"]
    assert jpegs["0000100002.jpg"] == samples[5 % len(samples)].jpeg, "image 5 cycles back to sample 0"
    phrased = storage.read_parquet(layout.fs, layout.phrase_table(shards[2])).column("uid").to_pylist()
    assert phrased == [tables[2].column("uid")[0].as_py()]
    assert Ledger(layout, "phrases").units() == shards
    assert layout.fs.exists(layout.errors("phrases", shards[2])), "committed by the executor"


def test_alternated_runs_every_piece_in_both_orders():
    calls = []
    first, second = bench.alternated(
        lambda piece: calls.append(("a", piece)), lambda piece: calls.append(("b", piece)), 2, [1, 2]
    )
    assert calls == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert len(first) == len(second) == 4 and all(t.seconds >= 0 for t in first + second)


def test_ratio_cancels_the_order_within_a_piece_and_a_burst_spoils_one_piece():
    # three pieces, two rounds: steps are pieces (0, 1, 2, 0, 1, 2); `slow` is twice as slow as `fast`, but
    # whichever runs second in a pair gains ~10%, and a burst hits piece 2 in round 1
    # CPU seconds: the burst was another process's (no CPU of ours), and `slow` costs three times the CPU
    slow = [bench.Timed(t, 1.5, None) for t in (2.0, 2.0 * 0.9, 2.0, 2.0 * 0.9, 2.0, 40.0)]
    fast = [bench.Timed(t, 0.5, None) for t in (0.9, 1.0, 0.9, 1.0, 0.9, 1.0)]
    figures = bench.ratio_figures("x", 30, slow, fast, pieces=3)
    assert figures["x"] == pytest.approx(0.5)
    assert figures["x_cpu"] == pytest.approx(1 / 3)
    assert figures["x_of_totals"] == pytest.approx(5.7 / 49.6)
    assert figures["x_pairs"] == pytest.approx([0.45, 0.556, 0.45, 0.556, 0.45, 0.025], abs=1e-3)
    assert figures["x_rates"] == pytest.approx([15 / 5.6, 15 / 2.7]), "items per round over best seconds"


@pytest.mark.smoke
def test_throughput_and_phrase_figures_on_a_tiny_teacher(root, teacher_folder, extractor):
    root_path, samples, shards = root
    teacher = Teacher.from_checkpoint(TeacherConfig(checkpoint=str(teacher_folder), device="cpu"))
    count, groups = bench.model_inputs(root_path, shards[0], teacher)
    assert count == 3 and sum(len(images) for images, _ in groups) <= 3
    figures = bench.label_figures(teacher, root_path, shards[2:], rounds=1)
    assert figures["ratio_images"] == 1
    assert figures["e2e_images_per_s"] > 0 and figures["model_images_per_s"] > 0
    # one round of one shard: the best times are the totals, so the two ways of taking the ratio agree
    assert figures["e2e_over_model_of_totals"] == pytest.approx(
        figures["e2e_images_per_s"] / figures["model_images_per_s"]
    )
    assert figures["model_share_of_e2e"] > 0 and figures["boxes_per_image"] >= 0
    label_stage = f"label-{teacher.teacher_id}"
    assert Ledger(Layout(root_path), label_stage).units() == shards[2:], "end to end commits the shard"
    phrases = bench.phrase_figures(extractor, [s.caption for s in samples] * 4, rounds=1, piece=8)
    assert phrases["captions"] == 20 and phrases["phrases_over_nlp_pipe"] > 0


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s of CPU
def test_memory_child_reports_peak_rss_of_a_fresh_interpreter(tmp_path, root, teacher_folder, extractor):
    _, samples, _ = root
    fresh = str(tmp_path / "fresh")
    bench.prepared_root(fresh, samples, 4, 2, extractor)
    report = bench.child_memory(fresh, str(teacher_folder), 1)
    assert report["images"] == 4 and report["shards"] == 2 and len(report["rss_after_shard_mib"]) == 2
    assert report["peak_rss_mib"] >= report["rss_after_load_mib"] > 0
    [stage] = [path.name for path in Path(fresh, "ledger").iterdir() if path.name.startswith("label-")]
    labelled = Ledger(Layout(fresh), stage).units()
    assert labelled == ["part-00000/00000", "part-00000/00001"], "labelled in the child"


FIGURE_KEYS = {
    "e2e_over_model", "e2e_over_model_cpu", "e2e_images_per_s", "model_images_per_s", "model_share_of_e2e",
    "phrases_over_nlp_pipe", "phrases_over_nlp_pipe_cpu", "phrase_captions_per_s", "nlp_pipe_captions_per_s",
    "peak_rss_small_mib", "peak_rss_large_mib", "memory_large_over_small", "teacher", "threads",
}  # fmt: skip
RATIOS = ("e2e_over_model", "phrases_over_nlp_pipe", "memory_large_over_small")


@pytest.mark.slow  # the whole script: a world, three roots, two fresh interpreters (~1 min of CPU)
def test_quick_run_prints_a_table_and_the_figures_as_json(tmp_path, teacher_folder):
    command = [sys.executable, str(REPO / "bench" / "label.py"), "--quick", "--teacher", str(teacher_folder),
               "--world-images", "6", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert FIGURE_KEYS <= set(figures) and figures["images_small"] == bench.QUICK["images_small"]
    for name in RATIOS:
        assert isinstance(figures[name], float) and math.isfinite(figures[name]) and figures[name] > 0, name
    rows = bench.table_rows(figures)
    table = lines[-1 - len(rows) : -1]
    assert [line[:22].rstrip() for line in table] == [name for name, _, _ in rows]
    assert lines[0].startswith(f"teacher {figures['teacher']}")


def test_decode_bench_prints_a_table_and_finds_both_decoders_agree(capsys):
    decode = _load("decode")
    assert decode.main(["--images", "4", "--large-images", "2", "--rounds", "1", "--size", "320x200"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["decoder"].startswith("simplejpeg ") and (
        figures["world_images"],
        figures["large_images"],
    ) == (4, 2)
    assert figures["world_identical"] is True and figures["large_identical"] is True
    assert all(figures[f"{name}_pil_over_decode_bgr"] > 0 for name in ("world", "large"))
    assert lines[-3].startswith("world crawl (4, ") and lines[-2].startswith("enlarged to 320x200 (2, ")


def test_host_feed_bench_prints_a_table_and_the_busy_fractions(capsys):
    host_feed = _load("host_feed")
    arguments = ["--images", "4", "--shard-size", "2", "--repeat", "1", "--rates", "50,400", "--world-images", "3",
                 "--size", "96x64"]  # fmt: skip
    assert host_feed.main(arguments) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["feed_images"] == 4 and set(figures["feed"]) == {"50", "400"}
    for rate in ("50", "400"):
        assert 0 < figures[f"busy_at_{rate}"] <= 1 and figures[f"images_per_s_at_{rate}"] > 0
    assert lines[-3].startswith("device of 50 img/s") and lines[-2].startswith("device of 400 img/s")
