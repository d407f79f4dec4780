"""The lr schedules, WSD (warmup-stable-decay) in particular."""

from __future__ import annotations

import json
import math

import pytest

from leanlm.engine.config import load_config
from leanlm.engine.errors import ConfigError
from leanlm.engine.schedule import decay_start, lr_factor
from leanlm.engine.trainer import train


def wsd(step, total=100, **kw):
    return lr_factor(step, total, warmup=10, schedule="wsd", min_ratio=0.1, **kw)


def test_wsd_is_warmup_then_constant_then_one_minus_sqrt_over_the_last_fifth():
    assert [wsd(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert decay_start(100, 0.2) == 80
    assert all(wsd(s) == 1.0 for s in range(10, 80))
    for s in range(80, 100):
        assert wsd(s) == pytest.approx(1 - math.sqrt((s - 80) / 20))
    assert wsd(99) < wsd(98) < 1.0 and wsd(99) > 0


def test_wsd_linear_shape_and_floor():
    assert wsd(90, decay_shape="linear") == pytest.approx(0.5)
    assert wsd(90, decay_shape="linear", decay_to=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert wsd(90, decay_fraction=0.0) == 1.0  # no decay phase: constant after warmup


def test_a_wsd_run_logs_the_schedule(tiny_overrides):
    over = [
        *tiny_overrides,
        "optim.schedule=wsd",
        "optim.warmup_steps=2",
        "train.steps=10",
        "optim.decay_fraction=0.3",
        "optim.lr=1e-3",
    ]
    res = train(load_config(None, over))
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["optim/lr"] for r in rows if "optim/lr" in r]
    expected = [1e-3 * lr_factor(s, 10, warmup=2, schedule="wsd", min_ratio=0.1, decay_fraction=0.3) for s in range(10)]
    assert lrs == pytest.approx(expected)
    assert lrs[2:7] == pytest.approx([1e-3] * 5) and lrs[-1] < lrs[-2] < 1e-3


def test_bad_wsd_settings_are_refused(tiny_overrides):
    with pytest.raises(ConfigError, match="optim.decay_shape='cube'"):
        load_config(None, [*tiny_overrides, "optim.schedule=wsd", "optim.decay_shape=cube"])
    with pytest.raises(ConfigError, match="optim.decay_fraction"):
        load_config(None, [*tiny_overrides, "optim.schedule=wsd", "optim.decay_fraction=1.5"])
