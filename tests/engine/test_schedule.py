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


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_cooldown_equals_a_wsd_run_with_its_decay_there(tiny_base, tmp_path, capsys):
    """A cooldown from step 4 of a long WSD run, for 3 steps, reproduces bitwise the WSD run of 7
    steps whose decay starts at 4; its last scaling record is a cooled point the fit uses."""
    from leanlm.engine.cli import main
    from leanlm.engine.scaling import load_records, trajectory_points

    wsd_keys = ["optim.schedule=wsd", "optim.warmup_steps=2", "eval.every=2", "eval.early=0", "checkpoint.keep=0"]
    base = [*tiny_base, *wsd_keys, "checkpoint.every=2"]
    train(load_config(None, [*base, "train.steps=12", "optim.decay_steps=2", f"train.out_dir={tmp_path / 'long'}"]))
    short = train(load_config(None, [*base, "train.steps=7", "optim.decay_steps=3", f"train.out_dir={tmp_path / 's'}"]))
    assert main(["cooldown", str(tmp_path / "long"), "--at", "4", "--steps", "3", "log.scaled_set=branches"]) == 0
    cooled = tmp_path / "long-cooldown-4+3"
    assert "cooldown" in capsys.readouterr().out
    ref = [
        (r["step"], r["train/loss"], r["optim/lr"])
        for r in _rows(tmp_path / "s")
        if r["step"] > 4 and "train/loss" in r
    ]
    got = [(r["step"], r["train/loss"], r["optim/lr"]) for r in _rows(cooled) if "train/loss" in r]
    assert got == ref and len(got) == 3
    records = load_records([str(cooled), str(tmp_path / "long"), str(tmp_path / "s")])
    cooled_rows = [r for r in records if r["phase"] == "cooled"]
    assert {r["model_name"] for r in cooled_rows} == {"long-cooldown-4+3", "long", "s"}
    mine = [r for r in cooled_rows if r["model_name"] == "long-cooldown-4+3"]
    assert [(r["tokens_seen"], r["scaled_set"]) for r in mine] == [(7 * 4 * 32, "branches")]  # override after options
    D = trajectory_points(records, drop_fraction=0.0)[1]
    assert len(D) == 3  # only the cooled points, one per run
    assert len(trajectory_points(records, drop_fraction=0.0, all_points=True)[1]) > 3
    cooled_loss = [r["val_loss"] for r in cooled_rows if r["model_name"] == "long-cooldown-4+3"]
    assert cooled_loss == [short.final.loss]


def test_cooldowns_refuse_steps_outside_the_constant_phase(tiny_base, tmp_path):
    from leanlm.engine.cooldown import cooldown_config

    base = [*tiny_base, "optim.schedule=wsd", "optim.warmup_steps=2", "checkpoint.every=2", "checkpoint.keep=0"]
    train(load_config(None, [*base, "train.steps=10", f"train.out_dir={tmp_path / 'r'}"]))  # decay from 8
    with pytest.raises(ConfigError, match="not in its constant phase"):
        cooldown_config(tmp_path / "r", at=10, steps=2, out=None, overrides=[])
    with pytest.raises(ConfigError, match="no checkpoint at step 5"):
        cooldown_config(tmp_path / "r", at=5, steps=2, out=None, overrides=[])
    with pytest.raises(ConfigError, match="train.steps is set by the cooldown"):
        cooldown_config(tmp_path / "r", at=4, steps=2, out=None, overrides=["train.steps=9"])
    cosine = [*tiny_base, "checkpoint.every=2", f"train.out_dir={tmp_path / 'c'}"]
    train(load_config(None, cosine))
    with pytest.raises(ConfigError, match="cooldowns branch from wsd or constant runs"):
        cooldown_config(tmp_path / "c", at=4, steps=2, out=None, overrides=[])
