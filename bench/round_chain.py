"""Rounds against a human-only chain trained as long: does round k's student beat a baseline with its steps?

    python bench/round_chain.py --root demo-out/root --world demo-out/world     # after make demo DEMO_ARGS="--rounds 2"
    python bench/round_chain.py ... --set train.steps=600                        # the --set items the rounds ran with

Each round's gate is fair to that round: its baseline starts where its student starts (the round's teacher) and
trains as long on the human set alone. From round 1 on, though, that start is round k-1's student, which learnt
from the pseudo-labels: the gate says what round k's pseudo-labels add, not what the rounds add together. Round
k's student has trained (k+1) x ``train.steps`` on top of round 0's teacher (when each round before promoted its
student: the chain stops at the first round that did not); so has the chain: round 0's baseline,
then ``train.steps`` more from it per round on the baseline's own data and options (``rounds/r<k>/baseline-chain``,
resumed when run again, evaluated like the round's models). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glip import checkpoint  # noqa: E402
from jobs._roots import add_root_arguments, layout_from_args  # noqa: E402
from jobs._settings import add_set_argument, apply_sets_or_exit  # noqa: E402
from jobs.round import (  # noqa: E402
    DEFAULT_TRAIN,
    RoundConfig,
    baseline_sources,
    check_root,
    evaluate_model,
    human_sources,
    train_model,
)
from pipeline import storage  # noqa: E402

CHAIN = "baseline-chain"


def _as_json(config: object) -> object:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_root_arguments(parser)
    parser.add_argument("--world", required=True, help="the world folder the rounds ran on")
    add_set_argument(parser, ["round", "train"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    layout = layout_from_args(parser, args)
    check_root(layout)
    if not storage.is_local(layout.fs):
        parser.error(f"{layout.url}: the chain reads the rounds' runs by local path; run it on a local root")
    configs = apply_sets_or_exit(parser, args.sets, {"round": RoundConfig(), "train": DEFAULT_TRAIN})
    config, train_config = configs["round"], configs["train"]
    world = Path(args.world).resolve()
    rounds = 0
    while layout.fs.exists(layout.round(rounds, "metrics.json")):
        lineage = storage.read_json(layout.fs, layout.round(rounds, "lineage.json"))
        if lineage["round_config"] != _as_json(config) or lineage["train"] != _as_json(train_config):
            parser.error(
                f"round {rounds} ran with other options than these: pass the --set items it ran with"
            )
        if rounds and not lineage["teacher"]["chosen"].startswith(f"round {rounds - 1}'s promoted student"):
            break  # its student did not start from the last one's: the steps no longer add up
        rounds += 1
    if rounds < 2:
        parser.error(f"{layout.url} holds {rounds} finished round(s) in a row of promoted students; the chain "
                     f"needs two or more")  # fmt: skip
    human = baseline_sources(human_sources(world, config.human_negatives), config)
    rows = []
    previous = Path(layout.round(0, "baseline")) / "checkpoint"
    for number in range(1, rounds):
        model_config, _ = checkpoint.read_config(previous)
        previous = train_model(layout, number, CHAIN, model_config, previous, human, train_config, config)
        chain = evaluate_model(layout, number, CHAIN, previous, world, config.eval_limit)
        models = storage.read_json(layout.fs, layout.round(number, "metrics.json"))["models"]
        rows.append({"round": number, "steps": (number + 1) * train_config.steps, "chain": chain, **models})
    print("round  steps  model              AP     APr    AP50     R@1")
    for row in rows:
        for name in ("chain", "baseline", "student"):
            label = {"chain": "human-only chain", "baseline": "round's baseline"}.get(name, name)
            m = row[name]
            print(f"{row['round']:<6} {row['steps']:<6} {label:<17} {m['ap']:.3f}  {m['apr']:.3f}  {m['ap50']:.3f}  "
                  f"{m['r1']:.3f}")  # fmt: skip
    last = rows[-1]
    print(json.dumps({
        "rounds": rounds, "steps": last["steps"],
        "chain_ap": last["chain"]["ap"], "chain_apr": last["chain"]["apr"],
        "student_ap": last["student"]["ap"], "student_apr": last["student"]["apr"],
        "gain_ap": last["student"]["ap"] - last["chain"]["ap"],
        "gain_apr": last["student"]["apr"] - last["chain"]["apr"],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
