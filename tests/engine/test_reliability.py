"""Reliability, round 2: each finding of the second probe (F1-F10 and the decided behaviours) as
a test that failed before its fix. Bitwise resumes in bf16, no file outside the run touched,
configs and checkpoints that cannot exhaust memory, one-line errors."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest
import torch

from leanlm.engine import trainer as trainer_mod
from leanlm.engine.checkpoint import store
from leanlm.engine.cli import main
from leanlm.engine.config import load_config
from leanlm.engine.errors import CheckpointError, ConfigError
from leanlm.engine.trainer import train
from leanlm.optim import FRUGAL, PrecisionHooks


def rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- F1, F2: bf16 resumes


def _bf16_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).to(torch.bfloat16)


def _optimizer(name: str, model: torch.nn.Module, state_dtype: torch.dtype | None) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    else:
        opt = FRUGAL(params, lr=1e-2, update_gap=4, projection={"frugal": "columns", "galore": "svd"}[name])
    PrecisionHooks(opt, rounding="stochastic", state_dtype=state_dtype, seed=3)
    return opt


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for step in range(start, stop):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        opt.zero_grad()
        model(x).float().pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("name", ["adamw", "frugal", "galore"])
@pytest.mark.parametrize(("state_dtype", "steps"), [(torch.float32, 12), (torch.bfloat16, 12), (None, 262)])
def test_bf16_weights_resume_bitwise_with_their_moment_dtype_and_rounding_count(name, state_dtype, steps, tmp_path):
    """F1: float32 moments beside bf16 weights come back float32 (they were rounded to bf16 on
    load). F2: the stochastic-rounding count survives a resume past 256 updates (it came back as a
    bf16 number, which holds integers exactly only up to 256)."""
    whole = _bf16_model()
    opt = _optimizer(name, whole, state_dtype)
    _steps(whole, opt, 0, steps)

    part = _bf16_model()
    opt = _optimizer(name, part, state_dtype)
    _steps(part, opt, 0, steps - 3)
    torch.save({"model": part.state_dict(), "optim": opt.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed = _bf16_model()
    resumed.load_state_dict(saved["model"])
    opt = _optimizer(name, resumed, state_dtype)
    opt.load_state_dict(saved["optim"])
    weight, bias = resumed[0].weight, resumed[0].bias
    assert opt.state[bias]["exp_avg"].dtype == (state_dtype or torch.float32)  # None: as the step made them
    assert opt.state[weight]["sr_count"].dtype == torch.int64
    assert int(opt.state[weight]["sr_count"]) == steps - 3
    _steps(resumed, opt, steps - 3, steps)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_engine_bf16_with_fp32_moments_resumes_bitwise(tiny_base, tmp_path):
    """F1 through the engine: ``train.param_dtype=bf16 optim.state_dtype=fp32`` (BENCHMARKS'
    recommendation), interrupted and resumed, equals the uninterrupted run."""
    base = [*tiny_base, "train.param_dtype=bf16", "optim.state_dtype=fp32", "optim.name=adamw"]
    full = train(load_config(None, [*base, f"train.out_dir={tmp_path / 'full'}"]))
    part = [*base, f"train.out_dir={tmp_path / 'part'}"]
    train(load_config(None, part), stop_at=3)
    resumed = train(load_config(None, [*part, "train.resume=auto"]))
    a = torch.load(full.checkpoint / "model.pt", weights_only=True)
    b = torch.load(resumed.checkpoint / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    moments = torch.load(resumed.checkpoint / "optim.pt", weights_only=True)["state"][0]
    assert moments["exp_avg"].dtype == torch.float32


# --------------------------------------------------------------------------- F3: no mapping kept


def test_a_resumed_run_keeps_no_mapping_of_its_checkpoint(tiny_base, tmp_path, monkeypatch):
    """F3: once training starts, neither model.pt nor optim.pt of the checkpoint it resumed from
    is mapped (writing into it would crash the run; pruning it would not free its space)."""
    run = tmp_path / "run"
    over = [*tiny_base, f"train.out_dir={run}"]
    train(load_config(None, over), stop_at=3)
    seen: list[str] = []
    real = trainer_mod._loop

    def spy(r, stop_at):
        seen.append(Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else "")
        return real(r, stop_at)

    monkeypatch.setattr(trainer_mod, "_loop", spy)
    train(load_config(None, [*over, "train.resume=auto"]))
    assert "step-00000003" not in seen[0]


# --------------------------------------------------------------------------- F4: no symlink followed


@pytest.mark.parametrize("name", [".lock", "config.yaml", "metrics.jsonl", "tb", "checkpoints"])
def test_a_planted_symlink_in_the_run_folder_is_refused_and_its_target_untouched(tiny_overrides, tmp_path, name):
    run = Path(next(o for o in tiny_overrides if o.startswith("train.out_dir=")).split("=", 1)[1])
    run.mkdir(parents=True)
    victim = tmp_path / "victim"
    if name in ("tb", "checkpoints"):
        victim.mkdir()
    else:
        victim.write_text("precious data\n")
    (run / name).symlink_to(victim)
    with pytest.raises(ConfigError, match=rf"{name} is a symbolic link; leanlm writes nothing through links"):
        train(load_config(None, tiny_overrides))
    assert (victim.read_text() == "precious data\n") if victim.is_file() else not any(victim.iterdir())


# --------------------------------------------------------------------------- F5: YAML bombs


def _bomb() -> str:
    defs = ['  - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    defs += [f"  - &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "zzz:\n" + "\n".join(defs) + "\ntrain: [" + ",".join(["*a8"] * 10) + "]\n"


def test_a_yaml_alias_bomb_is_one_line_within_a_second(tmp_path, capsys):
    """F5: 1 KB of aliases (10^9 strings if expanded) is refused, from a file or a checkpoint."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    started = time.perf_counter()
    with pytest.raises(SystemExit):
        raise SystemExit(main(["memory", str(bomb)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert time.perf_counter() - started < 5 and len(err) == 1
    assert "aliases (*name) are not allowed in leanlm configs" in err[0] and len(err[0]) < 500


def test_error_messages_quote_values_bounded():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.out_dir=" + "x" * 100_000, "train.steps=" + "9" * 50_000 + "z"])
    assert len(str(e.value)) < 1000


# --------------------------------------------------------------------------- F6: extends a preset


def test_extends_a_preset_by_name_from_a_config_in_any_folder(tmp_path, monkeypatch):
    sub = tmp_path / "experiments" / "deep"
    sub.mkdir(parents=True)
    (sub / "my.yaml").write_text("extends: tiny.yaml\ntrain:\n  steps: 3\n")
    (sub / "named.yaml").write_text("extends: frugal_60m\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("experiments/deep/my.yaml").train.steps == 3
    assert load_config("experiments/deep/named.yaml").optim.name == "frugal"
    (sub / "bad.yaml").write_text("extends: nosuch.yaml\n")
    with pytest.raises(ConfigError, match=r"extends 'nosuch.yaml' is neither a file next to it .* nor a preset"):
        load_config("experiments/deep/bad.yaml")


def test_a_local_file_shadowed_by_a_preset_name_is_said(tmp_path, monkeypatch):
    """Decided (3a): a bare name means the shipped preset; a ./tiny.yaml beside it gets a warning."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text("train:\n  steps: 3\n")
    with pytest.warns(UserWarning, match=r"shipped preset tiny.yaml, not ./tiny.yaml; pass ./tiny.yaml"):
        assert load_config("tiny").train.steps != 3
    assert load_config("./tiny.yaml").train.steps == 3


# --------------------------------------------------------------------------- F7: save errors


@pytest.mark.parametrize(
    "error",
    [OSError(errno.EFBIG, "File too large"), RuntimeError("[enforce fail at inline_container.cc] unexpected pos")],
)
def test_a_save_that_fails_for_any_reason_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, error):
    def failing_save(obj, path, *args, **kwargs):
        raise error

    monkeypatch.setattr(store.torch, "save", failing_save)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 40})())
    with pytest.raises(CheckpointError, match=r"cannot save checkpoint step 7 under .*(File too large|ulimit -f)"):
        store.save_checkpoint(tmp_path, 7, {"model": {"w": torch.zeros(2)}}, {})
    assert not list((tmp_path / "checkpoints").iterdir())


def test_an_unwritable_checkpoint_folder_is_said_before_the_first_step(tiny_overrides):
    run = Path(next(o for o in tiny_overrides if o.startswith("train.out_dir=")).split("=", 1)[1])
    run.mkdir(parents=True)
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoints under .*checkpoints"):
        train(load_config(None, tiny_overrides))
    assert not (run / "metrics.jsonl").exists()  # no step ran


# --------------------------------------------------------------------------- F8, F9: bounds


@pytest.mark.parametrize("over", ["train.seed=-1", "train.seed=1e30", f"train.seed={2**63}", "eval.early=1000000"])
def test_seeds_and_early_evaluations_are_bounded(over):
    with pytest.raises(ConfigError, match=over.split("=")[0]):
        load_config(None, [over])


def test_generate_seed_and_length_are_bounded(capsys):
    for argv in (["--seed", "99999999999999999999999"], ["--seed", "-1"], ["--max-new-tokens", "100000000"]):
        with pytest.raises(SystemExit) as e:
            main(["generate", "somewhere", *argv])
        assert e.value.code == 2 and "leanlm: error" in capsys.readouterr().err


def test_early_evaluations_cost_nothing_past_log2_every():
    cfg = load_config(None, ["eval.every=1000", "eval.early=62"])
    started = time.perf_counter()
    steps = [s for s in range(1, 2001) if cfg.eval.is_eval_step(s)]
    assert time.perf_counter() - started < 1.0
    assert steps[:3] == [1, 2, 4] and 1000 in steps and 2000 in steps


# --------------------------------------------------------------------------- F10, 2m: finished runs


def test_resuming_a_finished_run_logs_nothing_again(tiny_overrides, capsys):
    """F10: ``train.resume=auto`` on a run at ``train.steps`` trains nothing, says so, and adds no
    second final evaluation to metrics.jsonl or scaling.jsonl."""
    cfg = load_config(None, tiny_overrides)
    first = train(cfg)
    before = {name: (first.run_dir / name).read_text() for name in ("metrics.jsonl", "scaling.jsonl")}
    for _ in range(2):
        again = train(load_config(None, [*tiny_overrides, "train.resume=auto"]))
        assert again.final is None and again.step == cfg.train.steps
    assert "nothing left to train" in capsys.readouterr().out
    assert {name: (first.run_dir / name).read_text() for name in before} == before


def test_resuming_with_fewer_steps_than_done_is_refused(tiny_overrides):
    """Decided (2m): refused in one line, config.yaml untouched."""
    train(load_config(None, [*tiny_overrides, "train.steps=6"]))
    run = Path(next(o for o in tiny_overrides if o.startswith("train.out_dir=")).split("=", 1)[1])
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train.steps=4 is below the step of the checkpoint it resumes from"):
        train(load_config(None, [*tiny_overrides, "train.steps=4", "train.resume=auto"]))
    assert (run / "config.yaml").read_text() == saved


def test_the_nan_stop_says_what_a_step_in_backward_applied():
    """Decided (6a): with the step in backward, earlier tensors of that backward were updated."""
    res = type("R", (), {"loss": float("nan"), "grad_norm": 1.0})()
    plain = trainer_mod._nan_message(res, 5, None, None)
    inside = trainer_mod._nan_message(res, 5, None, None, in_backward=True)
    assert "(the update was not applied)" in plain
    assert "tensors stepped before it in that backward were updated" in inside
