"""Kernel tests run the real Triton kernels: on a GPU when there is one, otherwise on CPU tensors
through Triton's interpreter (``TRITON_INTERPRET=1``, set here before any kernel is defined).

Checked with Triton 3.9 and 3.6. Triton 3.6's interpreter fails under numpy 2.4 ("only
0-dimensional arrays can be converted to Python scalars" on loop bounds); numpy 2.2 works."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = True
try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False


@pytest.fixture
def device() -> torch.device:
    if not HAS_TRITON:
        pytest.skip("needs triton")
    return torch.device("cuda" if ON_GPU else "cpu")
