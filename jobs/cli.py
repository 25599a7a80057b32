"""The ``glip-engine`` console script: ``glip-engine <job> [args]`` runs ``python -m jobs.<job> [args]``.

glip-engine --help
glip-engine world --out demo-out/world --seed 0
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

NOT_JOBS = {"cli", "__init__"}


def available_jobs() -> list[str]:
    """Every module of ``jobs/`` with a ``main(argv)`` entry point (private modules excluded)."""
    folder = Path(__file__).parent
    names = []
    for info in pkgutil.iter_modules([str(folder)]):
        if info.name in NOT_JOBS or info.name.startswith("_"):
            continue
        names.append(info.name)
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    jobs = available_jobs()
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: glip-engine <job> [args]\n\njobs:\n" + "\n".join(f"  {name}" for name in jobs))
        return 0
    job, rest = argv[0], argv[1:]
    if job not in jobs:
        print(f"glip-engine: unknown job {job!r}; jobs: {', '.join(jobs)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jobs.{job}")
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
