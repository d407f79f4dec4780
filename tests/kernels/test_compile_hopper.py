"""The kernels go through Triton's real GPU lowering for Hopper (sm_90: H100/H200) ahead of
time, with no GPU (``scripts/compile_kernels.py``, in a subprocess: this folder's tests run the
kernels interpreted, and interpreted kernels cannot be compiled)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compile_kernels.py"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_every_kernel_compiles_for_hopper_at_every_autotune_tile():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "0 failures" in out.stdout
