"""Optimizer-state bytes per rank under FSDP2 and DeepSpeed ZeRO-2/3, against one process.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node=2 scripts/bench_dist_state.py \
        --config configs/frugal_60m.yaml --set optim.projection=columns

For each backend x optimizer: build the model, shard / wrap it, take one real step on random
tokens, and count the optimizer-state tensors this rank holds (DTensor shards count locally).
The one-process figure is ``leanlm memory``'s measurement on the meta device. Rank 0 prints a
markdown table.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as tdist

from leanlm.engine import distributed as dist
from leanlm.engine.build import build_model, make_optimizer
from leanlm.engine.config import load_config
from leanlm.engine.memory import memory_report
from leanlm.engine.step import StepSpec, train_step
from leanlm.optim import state_bytes


def measure(config: str, backend: str, optim: str, vocab: int, seq: int, over: list[str]) -> tuple[int, int]:
    cfg = load_config(config, [f"optim.name={optim}", f"train.seq_len={seq}", *over])
    single = memory_report(cfg, vocab, on_gpu=False).optim_bytes
    torch.manual_seed(0)
    model = build_model(cfg, vocab, "cpu")
    if backend == "fsdp2":
        dist.shard_fsdp2(model, list(model.layers), bf16=False)
    opt = make_optimizer(cfg, model.named_parameters())
    net = model
    if backend.startswith("zero"):
        stage = int(backend[-1])
        net = dist.wrap_deepspeed(model, opt, dist.deepspeed_config(1, 1, 1.0, stage, bf16=False))
    tokens = torch.randint(0, vocab, (1, seq + 1))
    train_step(net, opt, [tokens], StepSpec(device=torch.device("cpu"), grad_clip=1.0))
    return state_bytes(opt), single


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/frugal_60m.yaml")
    ap.add_argument("--backends", nargs="+", default=["fsdp2", "zero2", "zero3"])
    ap.add_argument("--optims", nargs="+", default=["frugal", "adamw"])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument(
        "--set",
        nargs="*",
        default=["optim.projection=columns"],
        help="config overrides (ZeRO-2 maps columns and randk; the 60m preset uses blocks)",
    )
    args = ap.parse_args()
    dist.init(torch.device("cpu"), backend="fsdp2")
    torch.set_num_threads(1)
    world = dist.world_size()
    rows = []
    for backend in args.backends:
        for optim in args.optims:
            mine, single = measure(args.config, backend, optim, args.vocab, args.seq, args.set)
            every = [None] * world
            tdist.all_gather_object(every, mine)
            rows.append((backend, optim, single, every))
    if dist.is_main():
        print(f"\nconfig {args.config}, world size {world}\n")
        print(
            "| backend | optimizer | 1 process (MiB) | per rank, max (MiB) | ratio x world | sum of ranks / 1 process |"
        )
        print("|---|---|---|---|---|---|")
        for backend, optim, single, every in rows:
            mx = max(every)
            print(
                f"| {backend} | {optim} | {single / 2**20:.1f} | {mx / 2**20:.1f} | "
                f"{mx * world / single:.3f} | {sum(every) / single:.3f} |"
            )
    dist.shutdown()


if __name__ == "__main__":
    main()
