"""Routes into other training frameworks that keep parameter names (FRUGAL needs them to leave the
embedding, head and norms state-full).

Hugging Face ``Trainer`` (transformers >= 5: an optimizer factory is instantiated and called with
the model)::

    from leanlm.optim.integrations import TrainerOptimizer
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(TrainerOptimizer, {"lr": 1e-3, "density": 0.25}))

``{"optimizer": "galore", ...}``, ``"badam"``, ``"fira"``, ``"apollo"`` or ``"apollo_mini"`` pick
the presets. Trainer saves the optimizer's ``state_dict`` in each checkpoint and
``resume_from_checkpoint`` loads it (tested bitwise). With an older transformers, whose
``optimizer_cls_and_kwargs`` calls the class with bare parameter groups (names lost),
pass the optimizer itself instead:
``Trainer(..., optimizers=(FRUGAL(model.named_parameters(), lr=1e-3), None))``.

Accelerate needs nothing special: ``accelerator.prepare(model, FRUGAL(model.named_parameters()))``;
``save_state`` / ``load_state`` round-trip the optimizer (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanlm.optim.factory import build_optimizer


class TrainerOptimizer:
    """An optimizer factory in the Hugging Face Trainer protocol: ``TrainerOptimizer()(model, **kwargs)``
    builds FRUGAL (or any registered name: ``optimizer="galore"``, ``"fira"``, ...; see
    ``leanlm.optim.registry``) over ``model.named_parameters()``."""

    def __call__(self, model: nn.Module, optimizer: str = "frugal", **kwargs: Any) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return build_optimizer(optimizer, named, **kwargs)
