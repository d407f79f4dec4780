from pathlib import Path

import pytest

from leanlm.engine.cli import main
from leanlm.engine.config import load_config
from leanlm.engine.memory import memory_report

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_optimizer_state_is_measured_per_optimizer():
    sizes = {}
    for name in ("adamw", "frugal", "galore", "badam"):
        cfg = load_config(CONFIGS / "llama_60m.yaml", [f"optim.name={name}"])
        sizes[name] = memory_report(cfg, 32000).optim_bytes
    assert sizes["adamw"] == pytest.approx(8 * 58_073_600, rel=1e-5)
    assert sizes["frugal"] / sizes["adamw"] == pytest.approx(0.673, abs=0.002)
    assert sizes["badam"] < sizes["adamw"] and sizes["galore"] < sizes["adamw"]


def test_bf16_weights_halve_parameter_and_gradient_memory():
    fp32 = memory_report(load_config(CONFIGS / "llama_60m.yaml"), 32000)
    bf16 = memory_report(load_config(CONFIGS / "llama_60m.yaml", ["train.param_dtype=bf16"]), 32000)
    assert bf16.param_bytes * 2 == fp32.param_bytes and bf16.grad_bytes * 2 == fp32.grad_bytes


def test_activation_checkpointing_shrinks_activations():
    off = memory_report(load_config(CONFIGS / "llama_350m.yaml", ["model.activation_checkpointing=false"]), 32000)
    on = memory_report(load_config(CONFIGS / "llama_350m.yaml", ["model.activation_checkpointing=true"]), 32000)
    assert on.activation_bytes < off.activation_bytes / 3


def test_memory_cli_answers_whether_7b_fits(capsys):
    assert main(["memory", str(CONFIGS / "frugal_7b.yaml"), "train.micro_batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert "6,738.42M" in out and "24 GiB card" in out and "optimizer state (frugal)" in out


def test_memory_accounts_for_lost():
    dense = memory_report(load_config(CONFIGS / "llama_1b.yaml"), 32000)
    lost = memory_report(load_config(CONFIGS / "llama_1b.yaml", ["model.lost.enabled=true"]), 32000)
    assert lost.parameters == 669_520_288 and dense.parameters == 1_339_082_752
    assert lost.optim_bytes == pytest.approx(8 * 669_520_288, rel=1e-5)


def test_per_rank_memory_under_sharded_backends(capsys):
    cfg = load_config(CONFIGS / "frugal_1b.yaml")
    one = memory_report(cfg, 32000)
    fsdp = one.per_rank("fsdp2", 0, 8)
    assert fsdp.optim_bytes == one.optim_bytes // 8 and fsdp.grad_bytes == one.grad_bytes // 8
    assert fsdp.param_bytes == one.param_bytes // 8 + one.block_bytes
    z1, z2 = one.per_rank("deepspeed", 1, 8), one.per_rank("deepspeed", 2, 8)
    assert z1.optim_bytes == one.optim_bytes // 8 and z1.grad_bytes == one.grad_bytes
    assert z2.grad_bytes == one.grad_bytes // 8 and z2.param_bytes == one.param_bytes
    assert one.per_rank("ddp", 0, 8).total_bytes == one.total_bytes
    assert main(["memory", str(CONFIGS / "frugal_1b.yaml"), "distributed.backend=fsdp2", "--world", "8"]) == 0
    assert "FSDP2, per rank of 8" in capsys.readouterr().out


def test_step_in_backward_keeps_only_the_largest_gradients_alive():
    """Exact bytes: the largest tensor (the embedding or head of llama_60m, 32000 x 512, fp32; each is
    stepped and freed as soon as it is complete) plus the engine's step bucket; with gradient
    accumulation every gradient is kept until the last micro-batch."""
    from leanlm.engine.build import IN_BACKWARD_BUCKET

    over = ["optim.name=frugal", "optim.step_in_backward=true", "train.batch_size=4", "train.micro_batch_size=4"]
    report = memory_report(load_config(CONFIGS / "llama_60m.yaml", over), 32000)
    assert report.grad_bytes == 32000 * 512 * 4 + IN_BACKWARD_BUCKET
    accum = memory_report(load_config(CONFIGS / "llama_60m.yaml", [*over, "train.micro_batch_size=2"]), 32000)
    assert accum.grad_bytes == accum.param_bytes


def test_a_model_whose_float32_init_does_not_fit_is_built_tensor_by_tensor(monkeypatch):
    """bf16 weights that fit while their float32 init would not: meta shapes, bf16 storage, each
    weight drawn in float32 and cast (the 7B-on-24-GiB path)."""
    import torch

    import leanlm.engine.build as build

    cfg = load_config(CONFIGS / "tiny.yaml", ["train.param_dtype=bf16"])
    n = 5_300_000
    monkeypatch.setattr(build, "available_memory_bytes", lambda device: 3 * n)  # > 2n bf16, < 4n fp32
    model = build.build_model(cfg, 4096, "cpu")
    weights = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in weights.values())
    emb = weights["embed_tokens.weight"].float()
    assert abs(emb.std().item() - cfg.model.init_std) < 1e-3 and abs(emb.mean().item()) < 1e-3
    assert torch.equal(weights["norm.weight"].float(), torch.ones(cfg.model.d_model))
    assert model.rope_cos.numel() > 0
    tokens = torch.randint(0, 4096, (1, 16))
    assert torch.isfinite(model(tokens).float()).all()


def test_big_elementwise_tensors_step_in_slices_in_the_estimate():
    """frugal_7b: the 32000 x 4096 embedding and head step 4096 rows at a time (64 MiB float32
    slices of weight, gradient and both moments), so the largest whole float32 step is the
    11008 x 4096 projected MLP weight and its gradient."""
    cfg = load_config(CONFIGS / "frugal_7b.yaml", ["train.batch_size=1", "train.micro_batch_size=1"])
    report = memory_report(cfg, 32000)
    d, f = cfg.model.d_model, cfg.model.ffn_dim
    assert report.step_bytes == f * d * 8 + (32 << 20) // 2 * 8 + (1 << 24) * 4 + (d * d + 2 * f * d) * 4
    assert report.total_bytes < 16 * 2**30  # the target for the one-card 7B recipe


def test_cpu_report_counts_runtime_init_residue_and_step_transients():
    """Exact bytes for llama_60m with bf16 weights and FRUGAL in backward (58,073,600 parameters;
    largest tensor 32000 x 512; projectable shapes 512x512, 1376x512, 512x1376)."""
    from leanlm.engine.memory import CPU_RUNTIME_BYTES

    over = ["optim.name=frugal", "optim.step_in_backward=true", "train.param_dtype=bf16"]
    cfg = load_config(CONFIGS / "llama_60m.yaml", over)
    cpu, gpu = memory_report(cfg, 32000, on_gpu=False), memory_report(cfg, 32000, on_gpu=True)
    assert cpu.init_bytes == 0 and gpu.init_bytes == 0  # the float32 init's pages are handed back (malloc_trim)
    lost = memory_report(
        load_config(CONFIGS / "llama_60m.yaml", [*over, "model.lost.enabled=true"]), 32000, on_gpu=False
    )
    # LOST: the converted projections' float32 weights (8 layers, each under glibc's 32 MiB mmap
    # threshold, so their freed pages stay in the heap)
    assert lost.init_bytes == 8 * (4 * 512 * 512 + 3 * 512 * 1376) * 4
    assert cpu.runtime_bytes == CPU_RUNTIME_BYTES and gpu.runtime_bytes == 0
    d, f = cfg.model.d_model, cfg.model.ffn_dim
    # The embedding (under the 64 MiB slice size) steps whole: weight and gradient in float32 (8 B)
    # and its bf16 moments converted to float32 (2 x 2 B more); the 32 MiB in-backward bucket
    # (bf16 gradients) with its float32 weight and gradient copies; the 64 MiB rounding-noise slice;
    # FRUGAL's float32 scratch.
    assert cpu.step_bytes == 32000 * d * 12 + (32 << 20) // 2 * 8 + (1 << 24) * 4 + (d * d + 2 * f * d) * 4


def test_a_lost_model_whose_dense_init_does_not_fit_converts_one_layer_at_a_time(monkeypatch):
    """LOST + bf16 weights whose float32 dense init would not fit: each projection is drawn dense
    in float32, SVD-initialised and cast on its own (the lost_7b-on-24-GiB path); a model built for
    a checkpoint to fill (``restoring``) has the same structure and draws nothing."""
    import torch

    import leanlm.engine.build as build
    from leanlm.optim.lost import LOSTLinear

    cfg = load_config(CONFIGS / "tiny.yaml", ["train.param_dtype=bf16", "model.lost.enabled=true"])
    n = 5_300_000
    monkeypatch.setattr(build, "available_memory_bytes", lambda device: 3 * n)
    model = build.build_model(cfg, 4096, "cpu")
    layers = [m for m in model.modules() if isinstance(m, LOSTLinear)]
    assert len(layers) == 7 * cfg.model.n_layers
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # A B is the best rank-r approximation of a normal(0, init_std) matrix: its spread is set by it
    ab = (layers[0].lowrank_in.float() @ layers[0].lowrank_out.float()).std().item()
    assert 0.3 * cfg.model.init_std < ab < cfg.model.init_std
    empty = build.build_model(cfg, 4096, "cpu", restoring=True)
    assert [(k, v.shape, v.dtype) for k, v in empty.state_dict().items()] == [
        (k, v.shape, v.dtype) for k, v in model.state_dict().items()
    ]
    empty.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 4096, (1, 16))
    assert torch.equal(empty(tokens), model(tokens))


def test_freed_heap_pages_are_handed_back_after_a_build():
    """``build_model`` trims the C heap (glibc ``malloc_trim``) so a float32 init's freed pages do
    not stay resident for the whole run; off glibc it says it could not."""
    import sys

    from leanlm.engine.host import release_free_memory

    assert release_free_memory() is sys.platform.startswith("linux")
