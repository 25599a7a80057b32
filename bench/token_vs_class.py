"""Does the token loss let a from-scratch head tower learn what tells the names apart? Train the demo preset in
phases of chosen losses, then score the names at the ATSS positive anchors of held-out images.

    python bench/token_vs_class.py --world W --phases cls:150,all:150
    python bench/token_vs_class.py --world W --phases clstok:120          # class + token losses together
    python bench/token_vs_class.py --world W --phases cls:200 --name-word -1   # shape alone ('red circle' -> 'circle')
    python bench/token_vs_class.py --world W --phases pyr:2500 --class-targets words --set body=resnet

Phases are ``MODE:STEPS``; modes: ``cls`` (classification loss only), ``tok``, ``clstok``, ``clsbox``
(class + box + centerness), ``nocls`` (the official three), ``all`` (the official three + class), ``align``
(all, with the token loss back-propagated into the alignment only), ``pyr`` (classification loss only with the
head's tower skipped, so the class conv reads the pyramid; a run ending with it is scored that way too). The
classification loss is the legacy class conv trained on category one-hots (``--class-targets words``: the
words of the names). Detection data
only, batch 8, AdamW at a constant ``--lr`` after a 30-step warm-up, bf16 autocast where the CPU has it, text
encoder frozen.
Scored on the first 40 held-out images against a fixed all-names prompt: class-head top-1 (argmax over the
category outputs; with ``--class-targets words``, the name whose words score highest on average) and
token-name top-1 (mean token probability per name). Prints a table, then one JSON line.

This is how session 3 found that the token loss washes category information out of a from-scratch tower
(class top-1 0.96 with the class loss alone, chance with the token loss beside it) and that a class-only phase
first keeps it (0.99 / 0.99 after cls:150,all:150 on a 6-colour world).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glip.config import preset, with_overrides  # noqa: E402
from glip.loss import GroundingTargets, weight_losses  # noqa: E402
from glip.model import build_criterion, build_model  # noqa: E402
from glip.predictor import autocast_supported  # noqa: E402
from glip.prompts import caption_from_phrases, tokenize_prompts  # noqa: E402
from student.data import BatchBuilder, load_coco_detection, make_example  # noqa: E402
from student.train import Source, class_matrices, class_vocabulary  # noqa: E402

MODES = {
    "cls": {"loss_class": 1.0},
    "tok": {"loss_token": 1.0},
    "clstok": {"loss_class": 1.0, "loss_token": 1.0},
    "clsbox": {"loss_class": 1.0, "loss_reg": 2.0, "loss_centerness": 1.0},
    "nocls": {"loss_token": 1.0, "loss_reg": 2.0, "loss_centerness": 1.0},
    "all": {"loss_class": 1.0, "loss_token": 1.0, "loss_reg": 2.0, "loss_centerness": 1.0},
}
MODES["align"] = MODES["all"]
MODES["pyr"] = MODES["cls"]


def targets_of(batch, matrix: torch.Tensor) -> list[GroundingTargets]:
    return [
        GroundingTargets(boxes, maps, size, matrix[labels])
        for boxes, maps, size, labels in zip(
            batch.boxes, batch.positive_maps, batch.image_sizes, batch.labels, strict=True
        )
    ]


def merge_by_word(splits, names: list[str], word: int):
    """Relabel every split's records by one word of their category names (categories sharing it merge)."""
    merged = list(dict.fromkeys(name.split()[word] for name in names))
    index = [merged.index(name.split()[word]) for name in names]
    relabelled = [
        [dataclasses.replace(r, labels=tuple(index[label] for label in r.labels)) for r in records]
        for records in splits
    ]
    return relabelled, merged


def _class_hits(logits, labels, names, vocabulary, matrix) -> int:
    """Category outputs: argmax == category. Word outputs: the category whose words score highest in sum."""
    if len(vocabulary) == len(names) and torch.equal(matrix[:, : len(names)], torch.eye(len(names))):
        return int((logits[:, : len(names)].argmax(1) == labels).sum())
    per_name = logits[:, : matrix.shape[1]].float().sigmoid() @ matrix.T / matrix.sum(1)
    return int((per_name.argmax(1) == labels).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", required=True)
    parser.add_argument("--phases", default="cls:150,all:150")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--class-targets", choices=("category", "words"), default="category")
    parser.add_argument(
        "--name-word",
        type=int,
        help="merge the categories by this word of their names (0: 'red circle' -> 'red'; -1: -> 'circle')",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    world = Path(args.world)
    config = with_overrides(
        preset("demo"), ["loss.weight_class=1.0", f"loss.class_targets={args.class_targets}", *args.overrides]
    )
    model = build_model(config)
    model.text_encoder.requires_grad_(False)
    criterion = build_criterion(config)
    records, names = load_coco_detection(world / "annotations/train_coco.json", world / "images/train")
    held_out, _ = load_coco_detection(world / "annotations/eval_coco.json", world / "images/eval")
    if args.name_word is not None:
        (records, held_out), names = merge_by_word([records, held_out], names, args.name_word)
    tokenizer = model.tokenizer()
    stats = {"pixel_mean": config.input.pixel_mean, "pixel_std": config.input.pixel_std}
    train_builder = BatchBuilder(
        tokenizer, config.input.min_size, config.input.max_size, config.input.train_min_sizes, **stats
    )
    eval_builder = BatchBuilder(tokenizer, config.input.min_size, config.input.max_size, train=False, **stats)
    (matrix,) = class_matrices([Source(records, names)], args.class_targets, config.head.num_legacy_classes)
    vocabulary = class_vocabulary([Source(records, names)], args.class_targets)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    amp = autocast_supported(torch.device("cpu"), torch.bfloat16)
    rng, step, began, rows = random.Random(0), 0, time.perf_counter(), []
    model.train()
    model.text_encoder.eval()
    for phase in args.phases.split(","):
        mode, steps = phase.split(":")
        model.head.align_only = mode == "align"
        model.head.skip_tower = mode == "pyr"
        for _ in range(int(steps)):
            examples = [make_example(rng.choice(records), names, tokenizer, rng, 35) for _ in range(8)]
            batch = train_builder(examples, rng)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(batch.images, batch.input_ids, batch.attention_mask)
            losses = criterion(
                out.token_logits,
                out.box_regression,
                out.centerness,
                out.anchors,
                targets_of(batch, matrix),
                batch.attention_mask,
                out.class_logits,
            )
            loss = sum(weight_losses(losses, MODES[mode]).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / 30)
            optimizer.step()
            step += 1
        rows.append((phase, {k: round(v.item(), 3) for k, v in losses.items() if k.startswith("loss")}))
    model.head.align_only = (
        False  # skip_tower stays as the last phase left it: a pyr phase is scored on the pyramid
    )
    model.eval()
    class_ok = token_ok = count = 0
    prompt = tokenize_prompts(tokenizer, [caption_from_phrases(names)])
    phrase_tokens = [list(tokens) for tokens in prompt.prompts[0].token_indices]
    eval_rng = random.Random(1)
    with torch.no_grad():
        for start in range(0, 40, 8):
            examples = [make_example(r, names, tokenizer, eval_rng, 0) for r in held_out[start : start + 8]]
            batch = eval_builder(examples, eval_rng)
            ids = prompt.input_ids.expand(len(examples), -1)
            mask = prompt.attention_mask.expand(len(examples), -1)
            out = model(batch.images, ids, mask)
            targets = [
                GroundingTargets(b, torch.zeros(len(b), ids.shape[1]), s)
                for b, s in zip(batch.boxes, batch.image_sizes, strict=True)
            ]
            assigned = criterion.prepare_targets(out.anchors, targets, ids.shape[1])
            class_logits = torch.cat([c.flatten(2) for c in out.class_logits], 2).transpose(1, 2)
            probabilities = torch.cat(out.token_logits, 1).float().sigmoid()
            for image, anchors in enumerate(assigned):
                positives = anchors.positive_indices
                labels = batch.labels[image][anchors.matched_gt_index[positives]]
                count += len(positives)
                class_ok += _class_hits(class_logits[image, positives], labels, names, vocabulary, matrix)
                scores = torch.stack(
                    [probabilities[image, positives][:, t].mean(1) for t in phrase_tokens], 1
                )
                token_ok += (scores.argmax(1) == labels).sum().item()
    figures = {
        "phases": args.phases,
        "positive_anchors": count,
        "class_top1": round(class_ok / max(count, 1), 3),
        "token_top1": round(token_ok / max(count, 1), 3),
        "chance": round(1 / len(names), 3),
        "seconds": round(time.perf_counter() - began),
    }
    print(f"{'phase':<12} last losses")
    for phase, last in rows:
        print(f"{phase:<12} {last}")
    print(
        f"class-head top-1 {figures['class_top1']}, token-name top-1 {figures['token_top1']} "
        f"(chance {figures['chance']}) over {count} positive anchors of 40 held-out images"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
