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
