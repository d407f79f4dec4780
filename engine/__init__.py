"""leanlm.engine: the LLaMA pretraining engine (model, data, loop, checkpoints, CLI).

Import the pieces you need from their modules, e.g. ``from leanlm.engine.model import LLaMA``;
this package's import stays cheap (no torch import) so ``leanlm --help`` is instant.
"""

from leanlm.engine.source_tree import drop_source_tree_from_path

__version__ = "0.1.0"

# `python -m leanlm.engine.cli` and `torchrun -m leanlm.engine.cli` run from a checkout put the
# checkout on sys.path, where its engine/, optim/ and kernels/ folders would shadow installed
# top-level packages of those names (transformers imports Hugging Face's `kernels`).
drop_source_tree_from_path()


def __getattr__(name: str):
    """``leanlm.engine.export_hf`` (imported on first use: this package's import stays torch-free)."""
    if name in ("export_hf", "ExportReport"):
        from leanlm.engine import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'leanlm.engine' has no attribute {name!r}")
