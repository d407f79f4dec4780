"""``optim.step_in_backward`` in the engine: the same run as the plain step (no clipping), exact
resume, and one-line refusals where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanlm.engine.cli import main
from leanlm.engine.config import load_config
from leanlm.engine.errors import ConfigError
from leanlm.engine.trainer import train

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def scalars(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.parametrize("optim", ["adamw", "frugal"])
def test_step_in_backward_trains_exactly_like_the_plain_step(tiny_base, tmp_path, optim):
    base = [*tiny_base, f"optim.name={optim}", "optim.update_gap=2", "train.grad_clip=0"]
    plain = train(load_config(None, [*base, f"train.out_dir={tmp_path / 'plain'}"])).run_dir
    hooked = train(
        load_config(None, [*base, "optim.step_in_backward=true", f"train.out_dir={tmp_path / 'hb'}"])
    ).run_dir
    for key in ("train/loss", "val/loss"):
        assert scalars(hooked, key) == scalars(plain, key)
    assert scalars(hooked, "train/grad_norm") == pytest.approx(scalars(plain, "train/grad_norm"), rel=1e-6)


def test_step_in_backward_resumes_bitwise(tiny_base, tmp_path):
    base = [*tiny_base, "optim.name=frugal", "optim.update_gap=2", "optim.step_in_backward=true"]
    full = train(load_config(None, [*base, f"train.out_dir={tmp_path / 'full'}"])).run_dir
    part = [*base, f"train.out_dir={tmp_path / 'part'}"]
    train(load_config(None, part), stop_at=3)
    train(load_config(None, [*part, "train.resume=auto"]))
    assert scalars(tmp_path / "part", "train/loss") == scalars(full, "train/loss")


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_distributed_backends_are_refused_in_one_line(capsys, tmp_path, backend):
    code = main(
        ["train", TINY, "optim.step_in_backward=true", f"distributed.backend={backend}", f"train.out_dir={tmp_path}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2
        and len(err) == 1
        and "optim.step_in_backward=true runs in one process or under distributed.backend=fsdp2" in err[0]
    )


def test_several_processes_are_refused():
    from leanlm.engine.runtime_checks import check_world

    with pytest.raises(ConfigError, match="but 2 processes run with distributed.backend=auto"):
        check_world(load_config(None, ["optim.step_in_backward=true", "train.batch_size=4"]), 2)


def test_bf16_weights_with_stochastic_rounding_resume_bitwise(tiny_base, tmp_path):
    """The rounding noise is keyed by a per-parameter count kept in the optimizer state."""
    base = [*tiny_base, "optim.name=frugal", "train.param_dtype=bf16", "optim.step_in_backward=true"]
    full = train(load_config(None, [*base, f"train.out_dir={tmp_path / 'full'}"])).run_dir
    part = [*base, f"train.out_dir={tmp_path / 'part'}"]
    train(load_config(None, part), stop_at=3)
    train(load_config(None, [*part, "train.resume=auto"]))
    assert scalars(tmp_path / "part", "train/loss") == scalars(full, "train/loss")
    nearest = train(load_config(None, [*base, "train.bf16_rounding=nearest", f"train.out_dir={tmp_path / 'rn'}"]))
    assert scalars(nearest.run_dir, "train/loss") != scalars(full, "train/loss")


def test_fsdp2_on_a_torch_without_its_hooks_is_refused(monkeypatch):
    """FSDP2 runs post-accumulate-grad hooks on sharded parameters from torch 2.5; on an older
    torch the hooks would never fire (no update at all), so the run is refused before it starts
    (a rule about the installed torch: a runtime check, not config validation)."""
    from leanlm.engine import runtime_checks

    cfg = load_config(None, ["optim.step_in_backward=true", "distributed.backend=fsdp2"])
    runtime_checks.check_world(cfg, 1)  # this torch runs them
    monkeypatch.setattr(runtime_checks, "fsdp2_calls_hooks", lambda: False)
    with pytest.raises(ConfigError, match=r"under fsdp2 needs torch >= 2.5"):
        runtime_checks.check_world(cfg, 1)


def test_bf16_weights_on_cpu_hand_freed_pages_back_after_each_bucket():
    """With float32 step copies (bf16 weights) the engine trims the C heap after each in-backward
    bucket (2.6 GiB of peak RSS at 7B otherwise); float32 models do not pay for it."""
    import torch

    from leanlm.engine.build import build_model, in_backward_for, make_optimizer
    from leanlm.engine.host import release_free_memory

    for dtype, expect in (("bf16", release_free_memory), ("fp32", None)):
        cfg = load_config(None, ["optim.step_in_backward=true", f"train.param_dtype={dtype}", "optim.name=frugal"])
        model = build_model(cfg, 512, "cpu")
        hooks = in_backward_for(cfg, make_optimizer(cfg, model.named_parameters()))
        assert hooks.on_flush is expect
        calls = []
        if expect is not None:
            hooks.on_flush = lambda c=calls: c.append(1)
            model(torch.randint(0, 512, (1, 16)), targets=torch.randint(0, 512, (1, 16))).mean().backward()
            assert calls  # one per bucket
