"""Where a world teacher loses its names: linear probes of colour and shape along the model, and how much the
token logits at an object depend on the token.

    python bench/teacher_probe.py --checkpoint jobs/assets/teacher --world demo-out/world [--images 100]
    python bench/teacher_probe.py --random --world demo-out/world     # the same probes on an untrained model

For every held-out object of the first ``--images`` images, the feature vector at the object's centre is read
at four places: the input pixels, the FPN level the object's size falls on (P3 below 48 px, else P4), FPN P3,
and the head tower's output at that level (what the token logits are computed from). A linear classifier of
the object's colour and of its shape is fitted on three quarters of the objects and scored on the rest
(chance: 1 / number of colours or shapes). Then, at the anchor nearest each object's centre that scores
highest, the spread of the token logits over the colour words (and over the shape words) of the all-names
prompt: near zero means every name gets the same score there, whatever the object. Prints a table, then as
its last line one JSON object of the figures.

This is how the teacher of issue [2/7] was found to lose colour in its head tower (colour decodable at 0.8
from FPN P3, at chance from the tower output) while an untrained tower keeps it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glip import checkpoint  # noqa: E402
from glip.config import preset  # noqa: E402
from glip.model import build_model  # noqa: E402
from glip.predictor import GlipPredictor  # noqa: E402
from glip.prompts import caption_from_phrases, tokenize_prompts  # noqa: E402
from student.data import load_coco_detection, read_image  # noqa: E402

PLACES = ("pixels", "fpn_level", "fpn_p3", "tower")


def probe_accuracy(features: torch.Tensor, labels: list[str], steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier (every 4th sample held out), features standardised."""
    classes = sorted(set(labels))
    target = torch.tensor([classes.index(label) for label in labels])
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    held = torch.arange(len(target)) % 4 == 0
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(linear(x[~held]), target[~held]).backward()
        optimizer.step()
    with torch.no_grad():
        return (linear(x[held]).argmax(1) == target[held]).float().mean().item()


def collect(model, config, world: Path, images: int) -> dict:
    records, names = load_coco_detection(world / "annotations/eval_coco.json", world / "images/eval")
    predictor = GlipPredictor(model, config, device="cpu")
    tokenizer = model.tokenizer()
    tokenized = tokenize_prompts(tokenizer, [caption_from_phrases(names)], config.text.max_query_len, False)
    phrase_tokens = [list(row) for row in tokenized.prompts[0].token_indices]
    captured = {}
    model.backbone.register_forward_hook(lambda module, inputs, output: captured.__setitem__("fpn", output))
    token_logits = model.head.token_logits

    def keep_tower(visual, text_hidden):
        captured["tower"] = visual
        return token_logits(visual, text_hidden)

    model.head.token_logits = keep_tower
    features = {place: [] for place in PLACES}
    colours, shapes, colour_spread, shape_spread = [], [], [], []
    for record in records[:images]:
        batch = predictor.preprocessor.batch([read_image(record.image_path)])
        with torch.no_grad():
            outputs = model(batch.images, tokenized.input_ids, tokenized.attention_mask)
        logits = torch.cat([level[0] for level in outputs.token_logits]).float()
        anchors = torch.cat(list(outputs.anchors))
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        scale_y, scale_x = batch.scale_factors[0]
        for box, label in zip(record.boxes, record.labels):
            x, y = (box[0] + box[2]) / 2 * scale_x, (box[1] + box[3]) / 2 * scale_y
            level = 0 if max(box[2] - box[0], box[3] - box[1]) * scale_x < 48 else 1
            stride = 8 * 2**level
            features["pixels"].append(batch.images[0][:, int(y), int(x)])
            features["fpn_level"].append(captured["fpn"][level][0][:, int(y // stride), int(x // stride)])
            features["fpn_p3"].append(captured["fpn"][0][0][:, int(y // 8), int(x // 8)])
            features["tower"].append(captured["tower"][level][0][:, int(y // stride), int(x // stride)])
            colour, shape = names[label].split(" ", 1)
            colours.append(colour)
            shapes.append(shape)
            near = torch.nonzero(((centres[:, 0] - x).abs() < 8) & ((centres[:, 1] - y).abs() < 8))[:, 0]
            if len(near):
                row = logits[near[logits[near].max(1).values.argmax()]]
                colour_spread.append(row[[tokens[0] for tokens in phrase_tokens]].std().item())
                shape_spread.append(row[[tokens[-1] for tokens in phrase_tokens]].std().item())
    return {
        "features": {place: torch.stack(rows) for place, rows in features.items()},
        "colours": colours,
        "shapes": shapes,
        "colour_logit_spread": statistics.median(colour_spread),
        "shape_logit_spread": statistics.median(shape_spread),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="teacher checkpoint folder")
    parser.add_argument("--random", action="store_true", help="an untrained demo-preset model instead")
    parser.add_argument("--world", required=True, help="world folder (its held-out split is probed)")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == args.random:
        parser.error("give exactly one of --checkpoint and --random")
    if args.random:
        torch.manual_seed(0)
        config = preset("demo")
        model = build_model(config)
    else:
        model, config = checkpoint.load(args.checkpoint)
    model.eval()
    found = collect(model, config, Path(args.world), args.images)
    figures = {"objects": len(found["colours"])}
    print(f"{'features at object centres':28s} {'colour acc':>10s} {'shape acc':>10s}")
    for place in PLACES:
        colour = probe_accuracy(found["features"][place], found["colours"])
        shape = probe_accuracy(found["features"][place], found["shapes"])
        figures[f"{place}_colour_acc"], figures[f"{place}_shape_acc"] = colour, shape
        print(f"{place:28s} {colour:10.3f} {shape:10.3f}")
    figures["colour_chance"] = 1 / len(set(found["colours"]))
    figures["shape_chance"] = 1 / len(set(found["shapes"]))
    figures["colour_logit_spread"] = found["colour_logit_spread"]
    figures["shape_logit_spread"] = found["shape_logit_spread"]
    print(f"chance: colour {figures['colour_chance']:.3f}, shape {figures['shape_chance']:.3f}")
    print(
        f"token logits at objects, std over names: colour words {figures['colour_logit_spread']:.3f}, "
        f"shape words {figures['shape_logit_spread']:.3f}"
    )
    print(json.dumps({key: round(value, 4) for key, value in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
