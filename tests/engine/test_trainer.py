import json
import math
import os
import signal
import threading

import pytest
import torch

from leanlm.engine import checkpoint as ckpt
from leanlm.engine import step as step_mod
from leanlm.engine.config import load_config
from leanlm.engine.errors import CheckpointError, ConfigError, TrainingError
from leanlm.engine.trainer import train


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


def test_run_writes_logs_checkpoints_and_learns(tiny_overrides, tmp_path):
    res = train(load_config(None, [*tiny_overrides, "train.steps=12", "optim.lr=1e-2"]))
    run = res.run_dir
    assert res.step == 12 and res.tokens_seen == 12 * 4 * 32
    assert (run / "config.yaml").is_file() and (run / "tokenizer.model").is_file()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [6, 9, 12]  # every 3, keep 3
    losses = [loss for _, loss in train_losses(run)]
    assert losses[-1] < losses[0] - 0.5
    assert res.final.ppl < res.unigram_ppl * 2 and math.isclose(res.final.ppl, math.exp(res.final.loss))
    tags = set().union(*[set(r) for r in read_metrics(run)])
    assert {
        "train/loss",
        "train/grad_norm",
        "optim/lr",
        "perf/tokens_per_s",
        "mem/peak_gib",
        "val/loss",
        "val/ppl",
    } <= tags
    event_files = list((run / "tb").glob("events.out.tfevents.*"))
    assert event_files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "val/ppl", "optim/lr"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("train/loss")) == 12


def test_resume_is_bitwise_exact(tiny_overrides, tmp_path):
    straight = train(load_config(None, [*tiny_overrides, f"train.out_dir={tmp_path / 'a'}"]))
    first = train(
        load_config(None, [*tiny_overrides, f"train.out_dir={tmp_path / 'b'}", "checkpoint.every=0"]),
        stop_at=3,
    )
    assert first.step == 3 and first.final is None
    second = train(
        load_config(
            None,
            [
                *tiny_overrides,
                f"train.out_dir={tmp_path / 'b'}",
                "train.resume=auto",
                "checkpoint.every=0",
            ],
        )
    )
    assert second.step == 6
    assert first.losses + second.losses == straight.losses  # bitwise: float equality, not closeness
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    assert second.final.loss == straight.final.loss


def test_existing_checkpoints_need_resume_auto(tiny_overrides):
    train(load_config(None, tiny_overrides), stop_at=1)
    with pytest.raises(ConfigError, match="train.resume=auto"):
        train(load_config(None, tiny_overrides))


def test_resume_with_a_different_model_is_refused(tiny_overrides):
    train(load_config(None, tiny_overrides), stop_at=1)
    with pytest.raises(CheckpointError, match="model.d_model"):
        train(load_config(None, [*tiny_overrides, "model.d_model=32", "train.resume=auto"]))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_overrides, monkeypatch):
    import leanlm.engine.model as model_mod

    real = model_mod.row_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # count training forwards only, not evaluation
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(model_mod, "row_losses", poisoned)
    with pytest.raises(
        TrainingError,
        match=r"loss became nan at step 5 \(the update was not applied\); .*step-00000003 is the last",
    ):
        train(load_config(None, tiny_overrides))
    run = load_config(None, tiny_overrides).train.out_dir
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3]


def test_sigterm_saves_a_checkpoint_and_returns(tiny_overrides, monkeypatch):
    real = step_mod.train_step
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr("leanlm.engine.trainer.train_step", step_then_signal)
    assert threading.current_thread() is threading.main_thread()
    res = train(load_config(None, [*tiny_overrides, "checkpoint.every=0"]))
    assert res.interrupted and res.step == 2
    assert res.checkpoint.name == "step-00000002" and ckpt.verify(res.checkpoint)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_gradient_accumulation_matches_one_big_batch(tiny_overrides, tmp_path):
    big = train(load_config(None, [*tiny_overrides, f"train.out_dir={tmp_path / 'big'}", "train.steps=3"]))
    acc = train(
        load_config(
            None,
            [
                *tiny_overrides,
                f"train.out_dir={tmp_path / 'acc'}",
                "train.steps=3",
                "train.micro_batch_size=1",
            ],
        )
    )
    for a, b in zip(big.losses, acc.losses):
        assert a == pytest.approx(b, rel=1e-5)
    sa = torch.load(big.checkpoint / "model.pt", weights_only=True)
    sb = torch.load(acc.checkpoint / "model.pt", weights_only=True)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)


def test_reweighting_starts_after_warmup_and_uniform_changes_nothing(tiny_overrides, tmp_path):
    plain = train(load_config(None, [*tiny_overrides, f"train.out_dir={tmp_path / 'plain'}"]))
    uniform = train(
        load_config(
            None,
            [
                *tiny_overrides,
                f"train.out_dir={tmp_path / 'u'}",
                "train.reweight.strategy=uniform",
                "train.reweight.warmup_steps=0",
            ],
        )
    )
    assert uniform.losses == plain.losses and uniform.final.loss == plain.final.loss
    over = [
        *tiny_overrides,
        f"train.out_dir={tmp_path / 'rw'}",
        "train.reweight.strategy=linupper",
        "train.reweight.r=0.5",
        "train.reweight.warmup_steps=3",
    ]
    rw = train(load_config(None, over))
    # step 4 is the first weighted update; its loss (computed before the update) is still equal
    assert rw.losses[:4] == plain.losses[:4] and rw.losses[4] != plain.losses[4]
    rows = [r for r in read_metrics(tmp_path / "rw") if "train/loss" in r]
    assert [("reweight/ess_frac" in r) for r in rows] == [False] * 3 + [True] * 3
    assert all(0 < r["reweight/ess_frac"] <= 1 and r["reweight/max_wn"] >= 1 >= r["reweight/min_wn"] for r in rows[3:])


def test_lost_model_with_frugal_resumes_bitwise(tiny_overrides, tmp_path):
    over = [
        *tiny_overrides,
        "model.lost.enabled=true",
        "model.lost.rank=8",
        "optim.name=frugal",
        "optim.update_gap=2",
        "checkpoint.every=0",
    ]
    straight = train(load_config(None, [*over, f"train.out_dir={tmp_path / 'a'}"]))
    train(load_config(None, [*over, f"train.out_dir={tmp_path / 'b'}"]), stop_at=3)
    resumed = train(load_config(None, [*over, f"train.out_dir={tmp_path / 'b'}", "train.resume=auto"]))
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    assert resumed.final.loss == straight.final.loss
    state = torch.load(straight.checkpoint / "model.pt", weights_only=True)
    assert "layers.0.self_attn.q_proj.lowrank_in" in state and "layers.0.self_attn.q_proj.index" in state


@pytest.mark.parametrize(
    "extra", [["optim.name=frugal"], ["optim.name=galore", "model.lost.enabled=true", "model.lost.rank=8"]]
)
def test_grouped_query_attention_trains_and_resumes_bitwise(tiny_base, tmp_path, extra):
    """``model.n_kv_heads`` with FRUGAL (rectangular k/v projections split like any matrix) and
    with LOST layers converted from them; a resume continues the uninterrupted run exactly."""
    base = [*tiny_base, "model.n_kv_heads=1", *extra]
    full = train(load_config(None, [*base, f"train.out_dir={tmp_path / 'full'}"]))
    part = [*base, f"train.out_dir={tmp_path / 'part'}"]
    train(load_config(None, part), stop_at=3)
    resumed = train(load_config(None, [*part, "train.resume=auto"]))
    assert full.losses[3:] == resumed.losses
    other = [*base, "model.n_kv_heads=2", f"train.out_dir={tmp_path / 'part'}", "train.resume=auto"]
    with pytest.raises(CheckpointError, match="model.n_kv_heads=2 differs from the checkpoint's 1"):
        train(load_config(None, other))


@pytest.mark.parametrize("extra", [["optim.name=frugal"], ["optim.name=adamw", "train.param_dtype=bf16"]])
def test_tied_embeddings_train_as_one_tensor_and_resume_bitwise(tiny_base, tmp_path, extra):
    """``model.tie_embeddings``: one parameter (one gradient, one optimizer state), still one
    after a resume (which loads the checkpoint's tensors in place), and the resume is exact."""
    from leanlm.engine.trained import load_trained

    base = [*tiny_base, "model.tie_embeddings=true", *extra]
    full = train(load_config(None, [*base, f"train.out_dir={tmp_path / 'full'}"]))
    part = [*base, f"train.out_dir={tmp_path / 'part'}"]
    train(load_config(None, part), stop_at=3)
    resumed = train(load_config(None, [*part, "train.resume=auto"]))
    assert full.losses[3:] == resumed.losses
    model = load_trained(tmp_path / "part", device="cpu", mapped=True).model
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = train(load_config(None, [*tiny_base, *extra, f"train.out_dir={tmp_path / 'untied'}"]))
    assert untied.losses != full.losses
    state = torch.load(full.checkpoint / "optim.pt", weights_only=True)["state"]
    n_params = len(list(load_trained(tmp_path / "full", device="cpu").model.parameters()))
    assert len(state) == n_params  # the tied tensor has one optimizer state
