"""train.param_dtype=int8 and optim.state_dtype=int8 in the engine: runs that checkpoint and resume
bit for bit, exact memory accounting, export and import, and one-line refusals (issue 26)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from leanlm.engine.build import build_model
from leanlm.engine.checkpoint import store
from leanlm.engine.config import load_config
from leanlm.engine.errors import CheckpointError, ConfigError
from leanlm.engine.memory import memory_report
from leanlm.engine.trainer import train
from leanlm.optim.lost_int8 import Int8LOSTLinear
from leanlm.optim.quantized import Int8Linear, dequantize

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
INT8 = ["train.param_dtype=int8", "train.int8_group=64", "optim.state_dtype=int8"]
GIB = 2**30


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if torch.is_tensor(a[k]):
            if not torch.equal(a[k], b[k]):
                return False
        elif isinstance(a[k], dict) and not same(a[k], b[k]):
            return False
    return True


def resume_copy(run: Path, step: int, dest: Path) -> None:
    """A new run folder holding only ``run``'s checkpoint at ``step`` (what a crash leaves)."""
    name = f"step-{step:08d}"
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / name, dest / "checkpoints" / name)


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.name=adamw"],
        [  # the 7B recipe's shape: FRUGAL, step in backward, activation checkpointing
            "optim.name=frugal",
            "optim.density=0.25",
            "optim.update_gap=2",
            "optim.step_in_backward=true",
            "model.activation_checkpointing=true",
        ],
    ],
    ids=["adamw", "frugal-in-backward"],
)
def test_int8_run_resumes_bit_for_bit(tiny_overrides, tmp_path, extra):
    over = [*tiny_overrides, *INT8, *extra]
    run = train(load_config(None, over)).run_dir
    final = run / "checkpoints" / "step-00000006"
    model = tensors(final / "model.pt")
    q = "layers.0.mlp.up_proj.weight"
    assert model[q + "_codes"].dtype == torch.int8 and model[q + "_scale"].shape == (128, 1)
    assert q not in model and model["embed_tokens.weight"].dtype == torch.bfloat16
    state = tensors(final / "optim.pt")["state"]
    assert any(v.dtype == torch.uint8 for st in state.values() for v in st.values() if torch.is_tensor(v))

    other = tmp_path / "resumed"
    resume_copy(run, 3, other)
    train(load_config(None, [*over, f"train.out_dir={other}", "train.resume=auto"]))
    again = other / "checkpoints" / "step-00000006"
    assert same(model, tensors(again / "model.pt"))
    assert same(tensors(final / "optim.pt"), tensors(again / "optim.pt"))
    start = tensors(run / "checkpoints" / "step-00000003" / "model.pt")
    assert not torch.equal(start[q + "_codes"], model[q + "_codes"])  # the int8 weights learned


def test_memory_counts_codes_scales_and_8bit_moments_exactly():
    # 7B: 6,476,005,376 int8 projection values, a float32 scale per output row, the rest in bf16
    cfg = load_config(CONFIGS / "frugal_7b_int8.yaml", ["train.batch_size=1", "train.micro_batch_size=1"])
    report = memory_report(cfg, 32000)
    rows = 32 * (4 * 4096 + 2 * 11008 + 4096)
    assert report.param_bytes == 6_476_005_376 + rows * 4 + (6_738_415_616 - 6_476_005_376) * 2
    # FRUGAL at density 0: Adam moments for the embedding, head and 65 norms (4096 values each, so
    # 8-bit too), uint8 + an absmax per 256 values; the rest is per-tensor counters (a few KB)
    moments = 2 * 2 * (32000 * 4096 + 32000 * 4096 // 256 * 4) + 65 * 2 * (4096 + 4096 // 256 * 4)
    assert moments <= report.optim_bytes < moments + 8192
    # AdamW, analytic: tensors below 4096 values keep float32 moments
    tiny = load_config(None, ["model.d_model=64", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=128", *INT8])
    adamw = memory_report(tiny, 512)
    sizes = [512 * 64, 64, 64 * 64, 64 * 64, 64 * 64, 64 * 64, 64, 128 * 64, 128 * 64, 64 * 128, 64, 512 * 64]
    expected = sum(2 * (n + -(-n // 256) * 4) if n >= 4096 else 2 * n * 4 for n in sizes) + 4 * len(sizes)
    assert adamw.optim_bytes == expected


@pytest.mark.parametrize(
    ("preset", "seq", "limit"),
    [("frugal_7b_int8", 256, 9.0), ("frugal_7b_int8", 2048, 10.0), ("lost_frugal_7b_int8", 256, 5.0)],
)
def test_int8_presets_fit_their_budgets(preset, seq, limit):
    """Issue 26's budgets for `leanlm memory PRESET train.batch_size=1 train.micro_batch_size=1`."""
    over = ["train.batch_size=1", "train.micro_batch_size=1", f"train.seq_len={seq}"]
    assert memory_report(load_config(CONFIGS / f"{preset}.yaml", over), 32000).total_bytes <= limit * GIB


def test_resuming_an_int8_checkpoint_with_bf16_weights_is_refused_and_changes_nothing(tiny_overrides, tmp_path):
    run = train(load_config(None, [*tiny_overrides, *INT8])).run_dir
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    bf16 = [*tiny_overrides, "train.param_dtype=bf16", "train.resume=auto", "train.steps=9"]
    with pytest.raises(CheckpointError, match="train.param_dtype='bf16' differs from the checkpoint's 'int8'"):
        train(load_config(None, bf16))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (["distributed.backend=ddp"], "train.param_dtype=int8 runs in one process"),
        (["distributed.backend=fsdp2"], "train.param_dtype=int8 runs in one process"),
        (["train.int8_group=48"], "train.int8_group=48 must divide model.d_model=64"),
        (["model.lost.enabled=true"], "needs model.lost.support=channels and model.activation_checkpointing=true"),
    ],
)
def test_int8_configs_that_cannot_work_are_refused_in_one_line(tiny_base, over, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [*tiny_base, "train.param_dtype=int8", *over])
    assert "\n" not in str(e.value)


def test_int8_group_without_int8_weights_is_refused(tiny_base):
    with pytest.raises(ConfigError, match="train.int8_group is set but train.param_dtype is not int8"):
        load_config(None, [*tiny_base, "train.int8_group=64"])


def test_float_and_int8_weights_convert_when_a_run_starts_from_another(tiny_cfg):
    """train.init_from between dtypes: int8 codes load into a bf16 model dequantized (exactly the
    values an export writes); float weights load into an int8 model quantized to nearest."""
    import dataclasses

    int8_cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, param_dtype="int8"))
    bf16_cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, param_dtype="bf16"))
    q = build_model(int8_cfg, 512)
    b = build_model(bf16_cfg, 512)
    store.load_model_state(b, q.state_dict(), "int8 run")
    up = q.layers[0].mlp.up_proj
    assert isinstance(up, Int8Linear)
    assert torch.equal(b.layers[0].mlp.up_proj.weight, dequantize(up.weight_codes, up.weight_scale, torch.bfloat16))
    back = build_model(int8_cfg, 512)
    store.load_model_state(back, b.state_dict(), "bf16 run")
    # nearest of the bf16-rounded values: the same codes up to that rounding
    diff = (back.layers[0].mlp.up_proj.weight_codes.int() - up.weight_codes.int()).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.97


def test_int8_run_exports_bf16_and_trains_again_from_the_export(tiny_overrides, tmp_path):
    pytest.importorskip("transformers")
    from leanlm.engine.hf.export import export_hf

    run = train(load_config(None, [*tiny_overrides, *INT8])).run_dir
    report = export_hf(run, tmp_path / "hf")
    assert report.dtype == "bfloat16" and report.max_logit_diff is not None and report.max_logit_diff <= 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    again = [*tiny_overrides, *INT8, f"train.out_dir={tmp_path / 'again'}", f"train.init_from={tmp_path / 'hf'}"]
    res = train(load_config(None, again))
    assert res.final.loss < 7.0


def test_int8_lost_run_trains_resumes_and_exports(tiny_overrides, tmp_path):
    """LOST with int8 factors (one scale per row), FRUGAL in backward; the export keeps LOST's
    channel index an integer (it used to be cast to bf16, naming wrong channels above 256)."""
    pytest.importorskip("transformers")
    from leanlm.engine.hf.export import export_hf

    over = [
        *tiny_overrides,
        *INT8,
        "model.lost.enabled=true",
        "model.lost.rank=8",
        "model.activation_checkpointing=true",
        "optim.name=frugal",
        "optim.step_in_backward=true",
    ]
    run = train(load_config(None, over)).run_dir
    model = tensors(run / "checkpoints" / "step-00000006" / "model.pt")
    assert model["layers.0.mlp.up_proj.lowrank_in_codes"].dtype == torch.int8
    assert isinstance(build_model(load_config(None, over), 512).layers[0].mlp.up_proj, Int8LOSTLinear)
    other = tmp_path / "resumed"
    resume_copy(run, 3, other)
    train(load_config(None, [*over, f"train.out_dir={other}", "train.resume=auto"]))
    assert same(model, tensors(other / "checkpoints" / "step-00000006" / "model.pt"))
    export_hf(run, tmp_path / "hf")  # validated against transformers inside
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        index = f.get_tensor("model.layers.0.mlp.up_proj.index")
    assert index.dtype == torch.int64


@pytest.mark.parametrize("name", ["adamw", "frugal", "galore", "badam", "fira", "galore_fira", "apollo", "apollo_mini"])
def test_every_optimizer_steps_int8_weights_with_8bit_moments(tiny_cfg, name):
    """Each preset through PrecisionHooks: its own float32 math on the dequantized weight, codes
    rounded back, moments stored in 8 bits where big enough; the loss goes down."""
    import dataclasses

    from leanlm.engine.build import make_optimizer

    optim = dataclasses.replace(tiny_cfg.optim, name=name, state_dtype="int8", lr=3e-3, rank=8, update_gap=2)
    cfg = dataclasses.replace(
        tiny_cfg, optim=optim, train=dataclasses.replace(tiny_cfg.train, param_dtype="int8", int8_group=64)
    )
    model = build_model(cfg, 512)
    opt = make_optimizer(cfg, model.named_parameters())
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    codes = model.layers[0].mlp.up_proj.weight_codes.clone()
    losses = []
    for _ in range(6):
        loss = model(tokens, tokens).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert not torch.equal(codes, model.layers[0].mlp.up_proj.weight_codes)
    assert losses[-1] < losses[0]
    dtypes = {v.dtype for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
    assert torch.uint8 in dtypes  # the embedding's moments at least
