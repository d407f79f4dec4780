"""leanlm.engine: the LLaMA pretraining engine (model, data, loop, checkpoints, CLI).

Import the pieces you need from their modules, e.g. ``from leanlm.engine.model import LLaMA``;
this package's import stays cheap (no torch import) so ``leanlm --help`` is instant.
"""

__version__ = "0.1.0"
