"""The source checkout is never an import root.

leanlm's packages live in the checkout as ``engine/``, ``optim/`` and ``kernels/`` and install as
``leanlm.engine``, ``leanlm.optim`` and ``leanlm.kernels`` (editable installs map them with an
import hook, not a path entry). When the checkout itself lands on ``sys.path`` (``python -m`` and
``python -c`` put the working directory there), those folders become importable as top-level
``engine``, ``optim`` and ``kernels`` and shadow installed packages of the same names: Hugging
Face's ``kernels``, which transformers >= 5 imports, fails with ``cannot import name ... from
'kernels'``. Nothing imports them by their top-level names, so the checkout is simply taken off
the path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The folder that holds this package's directory: the checkout (editable install) or
# site-packages/leanlm (wheel); neither is meant to be a sys.path entry.
SOURCE_TREE = Path(__file__).resolve().parents[1]


def _is_source_tree(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == SOURCE_TREE
    except OSError:  # a deleted working directory or an unreadable entry: not ours
        return False


def drop_source_tree_from_path() -> list[str]:
    """Remove every ``sys.path`` entry that is the source tree (``""`` when the working directory
    is it); returns what was removed."""
    dropped = [e for e in sys.path if _is_source_tree(e)]
    sys.path[:] = [e for e in sys.path if e not in dropped]
    return dropped
