"""A resume never loses or silently restarts a run, and honours what may change (reliability
findings F3, F4, F6, F7, F8, F14): tiny runs of a few steps each."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from leanlm.engine import checkpoint as ckpt
from leanlm.engine import step as step_mod
from leanlm.engine.checkpoint import store
from leanlm.engine.config import load_config
from leanlm.engine.errors import CheckpointError, ConfigError
from leanlm.engine.run_lock import RunLock
from leanlm.engine.trainer import train


def records(run: Path, name: str = "metrics.jsonl", key: str = "train/loss") -> list[dict]:
    rows = [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]
    return [r for r in rows if key in r]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def finished(tiny_overrides) -> Path:
    """A 6-step run with checkpoints at 3 and 6."""
    return train(load_config(None, tiny_overrides)).run_dir


def test_auto_resume_with_no_verifiable_checkpoint_refuses_and_changes_nothing(finished, tiny_overrides):
    """F3: every manifest gone -> exit-2 error listing each folder; no folder or log is touched."""
    for _, path in ckpt.list_checkpoints(finished):
        (path / "manifest.json").unlink()
    before = snapshot(finished)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as e:
        train(load_config(None, [*tiny_overrides, "train.resume=auto", "train.steps=12"]))
    assert "step-00000006: no manifest" in str(e.value) and "step-00000003: no manifest" in str(e.value)
    assert snapshot(finished) == before


def test_keep_one_with_a_truncated_checkpoint_is_not_restarted(tiny_overrides):
    over = [*tiny_overrides, "checkpoint.keep=1"]
    run = train(load_config(None, over)).run_dir
    optim_pt = run / "checkpoints" / "step-00000006" / "optim.pt"
    optim_pt.write_bytes(optim_pt.read_bytes()[:1000])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="optim.pt is truncated"):
        train(load_config(None, [*over, "train.resume=auto", "train.steps=9"]))
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [6]
    assert len(records(run)) == 6


def test_a_later_checkpoint_of_an_earlier_attempt_is_moved_aside_not_replaced(finished, tiny_overrides):
    """Resuming an explicit older checkpoint reaches a step an earlier attempt saved: that folder
    is kept under another name, never deleted or overwritten."""
    old6 = snapshot(finished / "checkpoints" / "step-00000006")
    step3 = finished / "checkpoints" / "step-00000003"
    with pytest.warns(UserWarning, match="moved to"):
        train(load_config(None, [*tiny_overrides, f"train.resume={step3}", "checkpoint.keep=0"]))
    aside = list((finished / "checkpoints").glob("step-00000006.superseded-*"))
    assert len(aside) == 1 and snapshot(aside[0]) == old6
    assert ckpt.verify(finished / "checkpoints" / "step-00000006")["step"] == 6


def test_prune_never_touches_checkpoints_newer_than_the_one_just_written(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"train": {"step": step}}, {}, keep=0)
    with pytest.warns(UserWarning, match="moved to"):
        ckpt.save_checkpoint(tmp_path, 2, {"train": {"step": 2}}, {}, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3, 4]


def test_stale_temp_folders_are_removed_at_start(finished, tiny_overrides, capsys):
    """F6: a save killed mid-write leaves .tmp-step-*; the next start (holding the run lock)
    removes it."""
    stale = finished / "checkpoints" / ".tmp-step-00000009-4242"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"partial")
    train(load_config(None, [*tiny_overrides, "train.resume=auto", "train.steps=7"]))
    assert not stale.exists() and "removed .tmp-step-00000009-4242" in capsys.readouterr().out


def test_a_second_process_on_the_same_run_folder_is_refused(tiny_overrides, tmp_path):
    run = Path(load_config(None, tiny_overrides).train.out_dir)
    holder = subprocess.Popen(
        [
            "python3",
            "-c",
            f"import fcntl,os,time; fd=os.open('{run}/.lock', os.O_RDWR|os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid 1 on elsewhere'); print('ok', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    run.mkdir(parents=True, exist_ok=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(ConfigError, match="in use by pid 1 on elsewhere"):
            train(load_config(None, tiny_overrides))
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run):  # released by the kernel when its holder died
        pass


def test_full_disk_during_a_save_is_one_line_and_leaves_no_partial_folder(tiny_overrides, monkeypatch):
    """F6: torch.save's zip writer reports a full disk as "unexpected pos"; the free space decides."""
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (train, model, optim) succeeds
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 383232 vs 383184")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(store.torch, "save", failing_save)
    real_usage = store.shutil.disk_usage
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(CheckpointError, match="no space left on the device .* step 6"):
        train(load_config(None, tiny_overrides))
    run = Path(load_config(None, tiny_overrides).train.out_dir)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert ckpt.verify(run / "checkpoints" / "step-00000003")["step"] == 3


def test_real_full_disk(tiny_base, tmp_path):
    """The same on a 1 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(CheckpointError, match="no space left on the device"):
            train(load_config(None, [*tiny_base, f"train.out_dir={full / 'run'}", "log.tensorboard=false"]))
        assert not list((full / "run" / "checkpoints").glob(".tmp-*"))
    finally:
        if subprocess.run(["umount", str(full)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(full)], check=False)  # never leave a mount behind


BAD_MANIFESTS = [
    b'{"format": 1}',
    b"[]",
    b"\xff\xfe",
    b'{"format": 1, "files": {"../x": {"sha256": "0", "bytes": 1}}}',
    b'{"format": 1, "files": {"model.pt": 5}}',
]


@pytest.mark.parametrize("manifest", BAD_MANIFESTS)
def test_corrupt_manifests_are_skipped_not_crashed_on(tmp_path, manifest):
    """F7: a manifest of the wrong shape or encoding is a skipped checkpoint, like a truncated one."""
    ckpt.save_checkpoint(tmp_path, 1, {"train": {"step": 1}}, {})
    newest = ckpt.save_checkpoint(tmp_path, 2, {"train": {"step": 2}}, {})
    (newest / "manifest.json").write_bytes(manifest)
    with pytest.warns(UserWarning, match="step 2"):
        assert ckpt.resolve_resume(tmp_path, "auto").name == "step-00000001"
    with pytest.raises(CheckpointError, match="manifest.json"):
        ckpt.verify(newest)


def test_resume_with_another_optimizer_is_refused_in_one_line(finished, tiny_overrides):
    """F8."""
    with pytest.raises(CheckpointError, match=r"optim.name='frugal' differs from the checkpoint's 'adamw'"):
        train(load_config(None, [*tiny_overrides, "train.resume=auto", "optim.name=frugal", "train.steps=8"]))


@pytest.mark.parametrize("key", ["optim.density=0.5", "data.vocab_size=600", "train.seq_len=16", "train.seed=3"])
def test_keys_that_define_the_run_cannot_change_on_resume(finished, tiny_overrides, key):
    with pytest.raises(CheckpointError, match=key.split("=")[0]):
        train(load_config(None, [*tiny_overrides, "train.resume=auto", "train.steps=8", key]))


def test_lr_override_on_resume_rescales_the_schedule_and_is_recorded(finished, tiny_overrides):
    """F4: the new peak lr takes effect from the resume step; config.yaml records it."""
    from leanlm.engine.schedule import lr_factor

    changed = ["train.resume=auto", "train.steps=9", "optim.lr=5e-4", "optim.weight_decay=0.3"]
    cfg = load_config(None, [*tiny_overrides, *changed])
    train(cfg)
    o = cfg.optim
    lrs = {r["step"]: r["optim/lr"] for r in records(finished)}
    for step in (7, 8, 9):  # the update of step s uses lr_factor(s - 1)
        factor = lr_factor(step - 1, 9, warmup=o.warmup_steps, schedule=o.schedule, min_ratio=o.min_lr_ratio)
        assert lrs[step] == pytest.approx(5e-4 * factor)
    saved = load_config(finished / "config.yaml")
    assert saved.optim.lr == 5e-4 and saved.optim.weight_decay == 0.3
    groups = ckpt.load_file(finished / "checkpoints" / "step-00000009", "optim")["param_groups"]
    assert {g["weight_decay"] for g in groups if g["weight_decay"]} == {0.3}


def test_unchanged_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny_overrides, tmp_path):
    full = train(load_config(None, [*tiny_overrides[:-1], f"train.out_dir={tmp_path / 'full'}"]))
    part = [*tiny_overrides[:-1], f"train.out_dir={tmp_path / 'part'}"]
    train(load_config(None, part), stop_at=3)
    train(load_config(None, [*part, "train.resume=auto"]))
    for key in ("train/loss", "optim/lr", "train/grad_norm"):
        assert [r[key] for r in records(tmp_path / "part")] == [r[key] for r in records(full.run_dir)]


def test_a_crash_before_the_first_checkpoint_leaves_no_duplicate_records(tiny_overrides, monkeypatch):
    """F14: the crashed attempt logged steps 1-2 and saved nothing; the fresh start drops them."""
    real, calls = step_mod.train_step, {"n": 0}

    def crash_at_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands in for SIGKILL: no checkpoint, logs already written
        return real(*args, **kwargs)

    monkeypatch.setattr("leanlm.engine.trainer.train_step", crash_at_3)
    over = [*tiny_overrides, "eval.every=1", "eval.early=0"]
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, over))
    run = Path(load_config(None, over).train.out_dir)
    assert [r["step"] for r in records(run)] == [1, 2] and not ckpt.list_checkpoints(run)
    monkeypatch.setattr("leanlm.engine.trainer.train_step", real)
    train(load_config(None, [*over, "train.resume=auto"]))
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records(run, "scaling.jsonl", "val_loss")] == [1, 2, 3, 4, 5, 6]


def test_nan_step_is_not_applied(tiny_cfg):
    """F4: the guard runs before the update, so the weights after a NaN step are the ones before."""
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)

    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inputs, targets=None, chunk_tokens=0):
            return self.inner(inputs.float()).squeeze(-1) * float("nan")

    before = [p.detach().clone() for p in model.parameters()]
    spec = step_mod.StepSpec(device=torch.device("cpu"))
    res = step_mod.train_step(NaNModel(), opt, [torch.ones(2, 5, dtype=torch.long)], spec)
    assert not res.finite
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert os.environ.get("LEANLM_FAULT_AT") is None


def test_a_resume_takes_the_checkpoint_weights_without_a_second_copy(finished):
    """A resumed model is built without an init (``restoring``) and takes the checkpoint's
    memory-mapped tensors as its own (``load_state_dict(assign=True)``): a 7B bf16 resume no
    longer holds the weights twice while loading (21.9 GiB peak RSS before, BENCHMARKS.md)."""
    from leanlm.engine.build import build_model
    from leanlm.engine.checkpoint.resume import preload_weights

    path = ckpt.list_checkpoints(finished)[-1][1]
    cfg = load_config(str(finished / "config.yaml"))
    model = build_model(cfg, 512, "cpu", restoring=True)
    assert preload_weights(path, model, "none", torch.device("cpu"))
    saved = store.load_file(path, "model")
    assert all(torch.equal(p, saved[k]) for k, p in model.state_dict().items())
    assert not preload_weights(path, model, "fsdp2", torch.device("cpu"))  # sharded formats load later
