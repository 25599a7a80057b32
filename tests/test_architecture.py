"""The rooms of DESIGN.md import only downwards: glip <- teacher <- pipeline <- student <- jobs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "glip": set(),
    "teacher": {"glip"},
    "pipeline": {"glip", "teacher"},
    "student": {"glip", "pipeline"},
    "jobs": {"glip", "teacher", "pipeline", "student"},
}
THIRD_PARTY_FORBIDDEN = {"glip": {"ray"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_downwards(room):
    rooms = set(ALLOWED)
    offenders = []
    for path in sorted((REPO / room).rglob("*.py")):
        imported = _imports(path)
        bad = (imported & rooms) - ALLOWED[room] - {room}
        bad |= imported & THIRD_PARTY_FORBIDDEN.get(room, set())
        if bad:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_library_code_does_not_print():
    offenders = []
    for room in ("glip", "teacher", "pipeline", "student"):
        for path in sorted((REPO / room).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"print() in library code (use logging): {offenders}"
