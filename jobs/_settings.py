"""``--set SECTION.KEY=VALUE``: the one way a job takes config overrides.

A job names its config sections (``model``, ``train``, ...), each a frozen dataclass built from a preset and
the job's own shortcuts; every ``--set`` item then replaces one dotted key of one section, typed by the
dataclass field's annotation (``glip.config.replace_dotted``):

    parser = argparse.ArgumentParser()
    add_set_argument(parser, ["model", "train"])
    args = parser.parse_args(argv)
    configs = apply_sets_or_exit(parser, args.sets, {"model": preset(args.preset), "train": TrainConfig()})
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from glip.config import replace_dotted


def add_set_argument(parser: argparse.ArgumentParser, sections: Sequence[str]) -> None:
    """Add the repeatable ``--set SECTION.KEY=VALUE`` option (collected in ``args.sets``)."""
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override one config key (repeatable); sections: {', '.join(sections)}",
    )


def apply_sets(items: Sequence[str], configs: Mapping[str, Any]) -> dict[str, Any]:
    """``configs`` with every ``SECTION.KEY=VALUE`` item applied; the keys of one section are applied together,
    so ``__post_init__`` sees the section as a whole.

    Raises ValueError for an item that is not ``SECTION.KEY=VALUE`` or a value that does not fit (or
    contradicts the rest of its section), KeyError for an unknown section or key (listing the valid ones).
    """
    per_section: dict[str, dict[str, str]] = {}
    for item in items:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep:
            raise ValueError(f"--set {item!r} is not of the form SECTION.KEY=VALUE")
        if section not in configs:
            raise KeyError(f"--set {item!r}: unknown section {section!r}; valid sections: {sorted(configs)}")
        if not dot or not key:
            raise ValueError(f"--set {item!r}: give a key below the section, as {section}.KEY=VALUE")
        per_section.setdefault(section, {})[key] = value.strip()
    result = dict(configs)
    for section, overrides in per_section.items():
        try:
            result[section] = replace_dotted(configs[section], overrides)
        except (KeyError, ValueError) as error:  # keys are relative to the section: say which one
            kind = KeyError if isinstance(error, KeyError) else ValueError
            raise kind(f"--set section {section!r}: {_message(error)}") from None
    return result


def apply_sets_or_exit(
    parser: argparse.ArgumentParser, items: Sequence[str], configs: Mapping[str, Any]
) -> dict[str, Any]:
    """``apply_sets``, with a bad item reported by ``parser.error`` (usage, the message, exit status 2)."""
    try:
        return apply_sets(items, configs)
    except (KeyError, ValueError) as error:
        parser.error(_message(error))


def _message(error: Exception) -> str:
    """The error's own text (``str`` of a KeyError is the repr of its message)."""
    return str(error.args[0]) if len(error.args) == 1 else str(error)
