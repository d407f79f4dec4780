"""log.trackers (trackio, W&B offline) and profile.steps (torch.profiler traces)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from leanlm.engine.config import load_config
from leanlm.engine.errors import ConfigError
from leanlm.engine.trainer import train


def test_trackers_log_offline_and_a_resume_continues_the_same_runs(tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import trackio.sqlite_storage
    import trackio.utils

    for module in (trackio.utils, trackio.sqlite_storage):  # read once at import: point both here
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    over = [*tiny_overrides, "log.trackers=[wandb,trackio]", f"log.tracker_project=p{tmp_path.name}"]
    train(load_config(None, over), stop_at=3)
    first = torch.load(next((tmp_path / "run" / "checkpoints").glob("step-*")) / "train.pt", weights_only=True)
    res = train(load_config(None, [*over, "train.resume=auto"]))
    last = torch.load(res.checkpoint / "train.pt", weights_only=True)
    assert first["trackers"] == last["trackers"] and set(first["trackers"]) == {"wandb", "trackio"}
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(first["trackers"]["wandb"]) for r in runs)  # one W&B run
    dbs = list((tmp_path / "trackio").glob("*.db"))
    assert dbs, "trackio wrote no local database"
    with sqlite3.connect(dbs[0]) as db:
        tables = {name for (name,) in db.execute("select name from sqlite_master where type='table'")}
        assert "metrics" in tables
        steps = sorted({s for (s,) in db.execute("select step from metrics")})
    assert steps[-1] == 6 and {1, 2, 3, 4, 5, 6} <= set(steps)  # one run, steps before and after the resume


def test_an_unknown_or_missing_tracker_is_one_line(tiny_overrides, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'wandbb'.*did you mean 'wandb'"):
        load_config(None, [*tiny_overrides, "log.trackers=[wandbb]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="not installed: pip install wandb"):
        train(load_config(None, [*tiny_overrides, "log.trackers=[wandb]"]))


def test_profile_steps_write_a_chrome_trace(tiny_overrides, tmp_path):
    train(load_config(None, [*tiny_overrides, "profile.steps=[2,3]"]))
    (trace,) = (tmp_path / "run" / "profile").glob("trace-steps-2-3-rank0.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::") for n in names) and len(events) > 100


@pytest.mark.parametrize("steps,message", [("[3,2]", "1 <= first <= last"), ("[1,99]", "train.steps=6")])
def test_bad_profile_windows_are_refused(tiny_overrides, steps, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [*tiny_overrides, f"profile.steps={steps}"])
