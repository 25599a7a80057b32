"""Model forward throughput: images/s of the tiny and demo presets at batch 1 and 4 on CPU (eval, fp32), and,
when CUDA is available, GLIP-T at 800x1333 in bf16 (batch 1, 2, 4).

    python bench/model_forward.py [--repeats 5] [--threads 2]

Prints a table, then as its last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from glip.config import demo, glip_t, tiny
from glip.model import build_model


def _prompt(batch: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 5000, (batch, tokens), device=device)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids, torch.ones(batch, tokens, dtype=torch.long, device=device)


def images_per_second(
    config,
    batch: int,
    size: tuple[int, int],
    tokens: int,
    repeats: int,
    device: str,
    dtype: torch.dtype | None = None,
) -> float:
    model = build_model(config, load_pretrained_text=False).to(device).eval()
    images = torch.randn(batch, 3, *size, device=device)
    ids, mask = _prompt(batch, tokens, device)
    timings = []
    with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        for index in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            model(images, ids, mask)
            if device == "cuda":
                torch.cuda.synchronize()
            if index:  # the first call warms up kernels and allocators
                timings.append(time.perf_counter() - began)
    timings.sort()
    return batch / timings[len(timings) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, config, size, tokens in (("tiny", tiny(), (256, 320), 256), ("demo", demo(), (224, 288), 32)):
        for batch in (1, 4):
            value = images_per_second(config, batch, size, tokens, args.repeats, "cpu")
            rows.append((f"{name}_cpu_fp32_b{batch}", f"{size[0]}x{size[1]}", tokens, value))
    if torch.cuda.is_available():
        for batch in (1, 2, 4):
            value = images_per_second(glip_t(), batch, (800, 1344), 256, args.repeats, "cuda", torch.bfloat16)
            rows.append((f"glip_t_cuda_bf16_b{batch}", "800x1344", 256, value))
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )
    print(f"{'run':28} {'input':>10} {'tokens':>7} {'images/s':>10}")
    for name, size, tokens, value in rows:
        print(f"{name:28} {size:>10} {tokens:>7} {value:>10.2f}")
    print(json.dumps({name: round(value, 3) for name, _, _, value in rows}))


if __name__ == "__main__":
    main()
