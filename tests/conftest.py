"""Shared fixtures: a small real corpus (a slice of the stdlib), a fast tiny config, a cache dir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Triton's interpreter must be chosen before anything imports triton (torch.compile and dynamo do,
# and so FRUGAL's first step): without CUDA the kernel tests run the real kernels through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from leanlm.engine.config import load_config
from leanlm.engine.data.sources import stdlib_root

torch.set_num_threads(2)

# A fixed slice of the standard library: real text, present on every machine, ~400 KB.
CORPUS_FILES = [
    "argparse.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "keyword.py",
    "numbers.py",
    "operator.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "this.py",
    "tokenize.py",
    "uuid.py",
    "weakref.py",
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        src = stdlib_root() / name
        if src.is_file():
            shutil.copy(src, root / name)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_base(corpus_dir, cache_dir) -> list[str]:
    """Overrides for a model and run that train in about a second on 2 cores (no run folder)."""
    return [
        f"data.source={corpus_dir}",
        f"data.cache_dir={cache_dir}",
        "data.vocab_size=512",
        "data.val_fraction=0.15",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.ffn_dim=128",
        "train.seq_len=32",
        "train.batch_size=4",
        "train.steps=6",
        "train.threads=2",
        "optim.warmup_steps=2",
        "eval.every=3",
        "eval.tokens=512",
        "eval.batch_size=4",
        "log.every=1",
        "log.progress=false",
        "checkpoint.every=3",
    ]


@pytest.fixture
def tiny_overrides(tiny_base, tmp_path):
    """``tiny_base`` with a fresh run folder."""
    return [*tiny_base, f"train.out_dir={tmp_path / 'run'}"]


@pytest.fixture
def tiny_cfg(tiny_overrides):
    return load_config(None, tiny_overrides)
