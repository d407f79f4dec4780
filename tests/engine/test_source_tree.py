"""The checkout's engine/, optim/ and kernels/ folders never shadow installed top-level packages
of those names (Hugging Face's ``kernels``, which transformers >= 5 imports, is one)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from leanlm.engine.source_tree import SOURCE_TREE

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("engine", "optim", "kernels")


def test_source_tree_is_the_checkout():
    assert SOURCE_TREE == ROOT


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_test_session_cannot_import_a_checkout_folder_as_top_level(folder):
    """The test process itself (``make test``) has no checkout entry on sys.path: a top-level
    ``kernels`` is the installed package or nothing, never our folder."""
    spec = importlib.util.find_spec(folder)
    places = [Path(p).resolve() for p in spec.submodule_search_locations or []] if spec else []
    assert ROOT / folder not in places, f"top-level {folder!r} resolves to the checkout's {folder}/"


def _fake_packages(tmp_path: Path) -> Path:
    """Stand-ins for installed top-level packages named like our folders."""
    site = tmp_path / "site"
    for folder in FOLDERS:
        (site / folder).mkdir(parents=True)
        (site / folder / "__init__.py").write_text("INSTALLED = True\n")
    return site


@pytest.mark.parametrize("entry", ["", str(ROOT)], ids=["python -c", "python -m"])
def test_commands_run_from_the_checkout_import_installed_packages(tmp_path, entry):
    """``python -m leanlm.engine.cli`` (and ``torchrun -m``, which runs it) puts the working
    directory on sys.path ahead of site-packages; ``python -c`` puts ``""``. Importing leanlm's
    engine takes the checkout off, so the installed packages win."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {entry!r})
        import leanlm.engine.cli
        import engine, kernels, optim
        assert all(getattr(m, "INSTALLED", False) for m in (engine, kernels, optim)), [
            m.__file__ for m in (engine, kernels, optim)
        ]
        """
    )
    site = _fake_packages(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=_env(site), timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_cli_from_the_checkout_runs_with_shadowable_packages_installed(tmp_path):
    site = _fake_packages(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "leanlm.engine.cli", "keys"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(site),
        timeout=120,
    )
    assert proc.returncode == 0 and "optim.name" in proc.stdout, proc.stderr


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site)}
