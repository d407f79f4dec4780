"""Run under torchrun (2 ranks, gloo): FRUGAL on FSDP2-sharded parameters against one process.

For every projection, a reference model with plain parameters and an FSDP2 copy train 5 steps on
the same global batch (each rank feeds its half to the sharded copy); the parameters must agree.
Also checks that the ``columns`` subspaces are identical on every rank and that column moments
are sharded like the parameter. Prints ``OK <projection> <state bytes this rank>`` per case.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as tdist
from torch import nn

from leanlm.optim import FRUGAL, state_bytes
from leanlm.optim.sharding import is_dtensor, local

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard


def build() -> nn.Module:
    torch.manual_seed(0)
    # (24, 16), (13, 24): 13 rows split 7 / 6 over two ranks, (8, 13) with a bias.
    return nn.Sequential(
        nn.Linear(16, 24, bias=False),
        nn.Tanh(),
        nn.Linear(24, 13, bias=False),
        nn.Tanh(),
        nn.Linear(13, 8),
    )


def run(spec: str) -> None:
    """``spec``: a projection, or ``projection:rule[:scaling]`` for the fira / apollo rules."""
    parts = spec.split(":")
    projection, rule, scaling = parts[0], (parts[1:2] or ["sign"])[0], (parts[2:3] or ["channel"])[0]
    rank, world = tdist.get_rank(), tdist.get_world_size()
    ref = build()
    sharded = copy.deepcopy(ref)
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    kw = dict(lr=1e-2, density=0.5, projection=projection, update_gap=2, weight_decay=0.1, seed=3)
    kw.update(state_free=rule, scaling=scaling)
    opt_ref, opt = FRUGAL(ref.parameters(), **kw), FRUGAL(sharded.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        # The global batch, identical on every rank; 32 rows keep every gradient full-rank (a
        # rank-deficient G makes the svd residual pure rounding noise, whose sign is arbitrary).
        x = torch.randn(32, 16, generator=gen)
        ref(x).pow(2).mean().backward()
        sharded(x.chunk(world)[rank]).pow(2).mean().backward()  # FSDP2 averages over ranks
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    for (name, a), b in zip(ref.named_parameters(), sharded.parameters(), strict=True):
        full = b.full_tensor()
        err = (full - a).abs().max().item()
        # Adam on near-zero moments amplifies reduction-order noise; a wrong step would be ~lr = 1e-2.
        assert err < 1e-4, f"{projection}: {name} differs from one process by {err}"
    for p in sharded.parameters():
        st = opt.state[p]
        if projection == "columns" and "index" in st:
            seen = [None] * world
            tdist.all_gather_object(seen, st["index"].tolist())
            assert all(s == seen[0] for s in seen), f"column subspaces differ across ranks: {seen}"
            assert is_dtensor(st["exp_avg"]), "column moments must be sharded DTensors"
            assert local(st["exp_avg"]).shape[0] == local(p).shape[0]
    print(f"OK {spec} {rank} {state_bytes(opt)} {state_bytes(opt_ref)}", flush=True)


if __name__ == "__main__":
    tdist.init_process_group("gloo")
    torch.set_num_threads(1)
    for projection in sys.argv[1:] or ["columns", "rows", "randk", "blocks", "svd", "random"]:
        run(projection)
    tdist.barrier()  # nobody tears gloo down while a peer still talks to it
    tdist.destroy_process_group()
    # Every check has passed by now. Skip interpreter teardown: a C++ worker thread left by the
    # DTensor collectives occasionally aborts it ("terminate called without an active exception",
    # about 1 run in 10 here), which would fail a run whose checks all passed.
    sys.stdout.flush()
    os._exit(0)
