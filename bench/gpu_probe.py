"""Where the labeling GPU's time goes on the host side: a short probe for the last minutes of a device lease
(issue "[8/9] Performance"), beside ``bench/label_gpu.py run``.

    python bench/gpu_probe.py [--data bench/gpu-data] [--device cuda] [--preset glip_t] [--batch 16]
                              [--images 128] [--compile off|head] [--graphs] [--token-bucket N]
                              [--streaming-only] [--override input.min_size=480 ...]

On one teacher of ``--preset`` with random weights (the fused attention, torchvision's deformable conv,
``--compile``, CUDA graphs with ``--graphs``), over the first ``--images`` images of the prepared folder's
first shard, with their prompts:

``--token-bucket``: ``TeacherConfig.token_bucket`` (0: prompts padded to the 256-token limit; default the
teacher's, which applies with the size bucket a compiled or graphed teacher takes). ``--streaming-only``: only
``model_bgr_stream`` and the profiled pass (no comparison), for a second setting in one short lease.

- ``model_pil``: ``Teacher.label_prompts`` in groups of ``LabelConfig.batch_size`` PIL images (today's
  model-only definition: one group, one forward pass, so each batch is collected before the next is submitted);
- ``model_bgr``: the same on the BGR arrays the label stage's decoding threads make (the PIL conversion out of
  the model's thread);
- ``model_bgr_stream``: one ``label_prompts`` call over all the arrays (batches kept in flight, as the label
  stage streams them);
- ``..._tf32``: the same after ``torch.backends.cuda.matmul.allow_tf32 = True`` (torchvision's deformable
  conv runs its im2col GEMM in fp32 even under autocast: without TF32 it is a SIMT GEMM); the teacher's own
  ``tf32`` is off so that the switch decides. With ``--graphs`` the teacher's TF32 is on and these rows are
  left out (a recorded graph keeps the kernels it was recorded with);
- host seconds per batch inside ``GlipPredictor.submit`` and ``collect``, and ``to_bgr_uint8`` of a PIL image;
- one profiled streaming pass (CPU and CUDA activity): the device-busy fraction, and to ``$OUT`` the op tables
  by host time and by device time.

Each figure is one timed pass after an untimed one. Prints a table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import label_gpu  # noqa: E402  (puts the carried wheels on sys.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(label_gpu.DEFAULT_DATA))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="glip_t")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--compile", choices=("off", "head"), default="off")
    parser.add_argument("--graphs", action="store_true", help="TeacherConfig.cuda_graphs (CUDA only)")
    parser.add_argument("--token-bucket", type=int, default=None, help="TeacherConfig.token_bucket")
    parser.add_argument("--streaming-only", action="store_true", help="model_bgr_stream and the profile only")
    parser.add_argument("--override", action="append", default=[], help="inference-only model override")
    args = parser.parse_args(argv)
    for path in label_gpu.carried_paths(Path(args.data)):
        if path not in sys.path:
            sys.path.append(path)
    measure = label_gpu.load_bench_module("_label_gpu_measure")
    from glip.preprocess import to_bgr_uint8
    from pipeline.label import LabelConfig

    manifest = json.loads((Path(args.data) / label_gpu.MANIFEST).read_text())
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    device = torch.device(args.device)
    figures: dict = {
        "env": measure.environment(device),
        "batch": args.batch,
        "compile": args.compile,
        "cuda_graphs": args.graphs,
    }
    buckets = {} if args.token_bucket is None else {"token_bucket": args.token_bucket}
    with tempfile.TemporaryDirectory(prefix="gpu-probe-") as work:
        folder = measure.random_checkpoint(args.preset, Path(work) / "teacher", 0.0)

        def load(**settings):
            return measure.load_teacher(
                folder, args.device, args.batch, args.override, compile=args.compile, **settings
            )

        teacher = load(tf32="on" if args.graphs else "off", cuda_graphs=args.graphs, **buckets)
        figures |= {"size_bucket": teacher.size_bucket, "token_bucket": teacher.token_bucket}
        root = str(Path(args.data) / "root")
        _, groups = measure.model_inputs(root, manifest["shards"][0], teacher)
        twin = None
        if args.graphs and not args.streaming_only:  # the same teacher without graphs, to compare labels with
            twin = load(
                tf32="on",
                cuda_graphs=False,
                size_bucket=teacher.size_bucket,
                token_bucket=teacher.token_bucket,
            )
    pil = [(image, prompts) for images, lists in groups for image, prompts in zip(images, lists)]
    pil = pil[: args.images]
    bgr = [(np.asarray(image.convert("RGB"))[:, :, ::-1].copy(), prompts) for image, prompts in pil]
    count = len(pil)
    group = LabelConfig().batch_size
    host = {"submit": 0.0, "collect": 0.0, "batches": 0}
    predictor = teacher.predictor
    submit, collect = predictor.submit, predictor.collect

    def timed_submit(*a, **k):
        began = time.perf_counter()
        result = submit(*a, **k)
        host["submit"] += time.perf_counter() - began
        host["batches"] += 1
        return result

    def timed_collect(*a, **k):
        began = time.perf_counter()
        result = collect(*a, **k)
        host["collect"] += time.perf_counter() - began
        return result

    predictor.submit, predictor.collect = timed_submit, timed_collect

    def grouped(pairs):
        def run():
            for start in range(0, len(pairs), group):
                chunk = pairs[start : start + group]
                teacher.label_prompts([p[0] for p in chunk], [p[1] for p in chunk])

        return run

    def streamed(pairs):
        return lambda: teacher.label_prompts([p[0] for p in pairs], [p[1] for p in pairs])

    def rate(name, function):
        function()  # untimed: kernels chosen, graphs compiled, allocator grown
        host.update(submit=0.0, collect=0.0, batches=0)
        seconds = measure.timed(function, device).seconds
        figures[name] = count / seconds
        batches = max(host["batches"], 1)
        figures[f"{name}_host_ms_per_batch"] = {
            "submit": 1e3 * host["submit"] / batches,
            "collect": 1e3 * host["collect"] / batches,
        }
        print(f"{name} {figures[name]:.2f} img/s {figures[f'{name}_host_ms_per_batch']}", file=sys.stderr)

    began = time.perf_counter()
    for image, _ in pil[:16]:
        to_bgr_uint8(image)
    figures["pil_to_bgr_ms"] = 1e3 * (time.perf_counter() - began) / min(16, count)
    for suffix in ("",) if args.graphs else ("", "_tf32"):
        if suffix:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if not args.streaming_only:
            rate(f"model_pil{suffix}", grouped(pil))
            rate(f"model_bgr{suffix}", grouped(bgr))
        rate(f"model_bgr_stream{suffix}", streamed(bgr))
    if twin is not None:
        figures["graphs_vs_eager"] = same_labels(teacher, twin, bgr[: 2 * args.batch])
        print(f"graphs against eager {figures['graphs_vs_eager']}", file=sys.stderr)
    if device.type == "cuda":
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities) as profiler:
            took = measure.timed(streamed(bgr), device)
        intervals = measure.device_intervals(profiler.events())
        figures["profiled_stream_busy"] = measure.union_length(intervals) / 1e6 / took.seconds
        figures["profiled_stream_s"] = took.seconds
        figures["idle_gaps_ms"] = [gap / 1e3 for gap in measure.idle_gaps(intervals)[:8]]
        if out is not None:
            averages = profiler.key_averages()
            for key, name in (("self_cpu_time_total", "cpu"), ("self_cuda_time_total", "cuda")):
                table = averages.table(sort_by=key, row_limit=150, max_name_column_width=160)
                (out / f"probe_{name}.txt").write_text(table)
    for name, value in figures.items():
        if isinstance(value, float):
            print(f"{name:<28} {value:10.2f}")
    print(json.dumps(label_gpu.rounded(figures)))
    return 0


def same_labels(teacher, twin, pairs) -> dict:
    """How far ``teacher``'s labels of ``pairs`` (image, prompts) are from ``twin``'s: images with as many
    boxes, the largest score and coordinate differences over those images (boxes in ``box_order``)."""
    images, prompts = [p[0] for p in pairs], [p[1] for p in pairs]
    ours, theirs = teacher.label_prompts(images, prompts), twin.label_prompts(images, prompts)
    same = [(a, b) for a, b in zip(ours, theirs) if len(a) == len(b)]
    scores = [abs(x.score - y.score) for a, b in same for x, y in zip(a, b)]
    coordinates = [abs(u - v) for a, b in same for x, y in zip(a, b) for u, v in zip(x.box, y.box)]
    return {
        "images": len(pairs),
        "boxes": sum(map(len, theirs)),
        "images_with_as_many_boxes": len(same),
        "max_score_difference": max(scores, default=0.0),
        "max_box_difference_px": max(coordinates, default=0.0),
    }


if __name__ == "__main__":
    sys.exit(main())
