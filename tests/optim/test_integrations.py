"""FRUGAL inside the training stacks people already use: HF Trainer, DeepSpeed (client optimizer)."""

import pytest
import torch

from leanlm.optim import FRUGAL, frugal_param_groups


def tiny_hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_param_groups_recognise_hf_llama_names():
    model = tiny_hf_llama()
    proj, rest = frugal_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    proj_names = sorted({names[id(p)].split(".")[-2] for p in proj["params"]})
    assert proj_names == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert len(proj["params"]) == 2 * 7
    rest_names = {names[id(p)] for p in rest["params"]}
    assert "model.embed_tokens.weight" in rest_names and "lm_head.weight" in rest_names


def test_hf_trainer_with_frugal_and_a_scheduler(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = tiny_hf_llama()
    opt = FRUGAL(model.named_parameters(), lr=1e-2, density=0.25, update_gap=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids.clone()} for _ in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    out = trainer.train()
    assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
    st = opt.state[model.model.layers[0].self_attn.q_proj.weight]
    assert int(st["refresh"]) == 1 and int(st["age"]) == 2  # refreshed at step 3 (T = 2)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, w0)


DEEPSPEED_STAGE0 = """
import os, socket, torch
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from leanlm.optim import FRUGAL
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = FRUGAL(model.parameters(), lr=1e-2, density=0.25, update_gap=2)
config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0},
          "zero_allow_untested_optimizer": True}
engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
w0 = model[0].weight.detach().clone()
for _ in range(3):
    loss = engine(torch.randn(4, 16)).pow(2).mean()
    engine.backward(loss)
    engine.step()
st = opt.state[model[0].weight]
assert ds_opt is opt or getattr(ds_opt, "optimizer", None) is opt, type(ds_opt)
assert int(st["refresh"]) == 1 and st["index"].numel() == 4, st
assert not torch.equal(model[0].weight, w0)
print("DEEPSPEED_OK")
"""


@pytest.mark.slow
def test_deepspeed_stage0_client_optimizer():
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_STAGE0],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert "DEEPSPEED_OK" in proc.stdout, proc.stderr[-3000:]


def hf_data(n: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids.clone()} for _ in range(n)]


def trainer_run(out, steps: int, resume: bool = False, kwargs=None):
    transformers = pytest.importorskip("transformers")
    from leanlm.optim.integrations import TrainerOptimizer

    model = tiny_hf_llama()
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=3,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",  # the 3-step run then takes the same first steps as the 6-step one
    )
    kw = kwargs or {"lr": 1e-2, "density": 0.25, "update_gap": 2}
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=hf_data(), optimizer_cls_and_kwargs=(TrainerOptimizer, kw)
    )
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3") if resume else None)
    return model, trainer.optimizer


def test_hf_trainer_factory_keeps_names_and_resumes_bitwise(tmp_path):
    """R3 / item 3: ``optimizer_cls_and_kwargs=(TrainerOptimizer, kwargs)`` gives FRUGAL the model's
    names (embedding and head state-full: 14 split tensors, not 16), and Trainer's
    ``resume_from_checkpoint`` continues it bit for bit (across a subspace refresh)."""
    pytest.importorskip("accelerate")
    full, opt = trainer_run(tmp_path / "full", 6)
    inner = getattr(opt, "optimizer", opt)
    assert isinstance(inner, FRUGAL) and len(inner.projectable_names()) == 14
    assert "lm_head.weight" not in inner.projectable_names()
    trainer_run(tmp_path / "part", 3)
    resumed, _ = trainer_run(tmp_path / "part", 6, resume=True)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    _, galore_opt = trainer_run(tmp_path / "galore", 3, kwargs={"optimizer": "galore", "lr": 1e-2})
    assert getattr(galore_opt, "optimizer", galore_opt).param_groups[0]["projection"] == "svd"


def test_accelerate_prepare_save_state_and_load_state(tmp_path):
    """Accelerate: prepare(model, FRUGAL(...)); save_state then load_state continues bitwise."""
    accelerate = pytest.importorskip("accelerate")
    batches = [b["input_ids"].view(1, -1) for b in hf_data(8)]

    def run(steps: range, load: bool):
        acc = accelerate.Accelerator(cpu=True)
        model = tiny_hf_llama()
        model, opt = acc.prepare(model, FRUGAL(model.named_parameters(), lr=1e-2, update_gap=2))
        if load:
            acc.load_state(str(tmp_path / "state"))
        for i in steps:
            acc.backward(model(batches[i], labels=batches[i]).loss)
            opt.step()
            opt.zero_grad()
            if i == 2 and not load:
                acc.save_state(str(tmp_path / "state"))
        return model

    full = run(range(6), load=False)
    resumed = run(range(3, 6), load=True)
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
