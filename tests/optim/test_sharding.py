"""FRUGAL on sharded parameters: FSDP2 DTensor shards (2 gloo ranks) and ZeRO flat partitions."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanlm.optim import FRUGAL, state_bytes
from leanlm.optim.flat import flat_positions
from leanlm.optim.projections import (
    num_selected,
    select_entries,
    select_indices,
    subspace_generator,
)
from leanlm.optim.zero import zero_segments

WORKER = Path(__file__).with_name("sharded_worker.py")


def torchrun(
    *args: str, nproc: int = 2, timeout: int = 300, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_fsdp2_shards_on_the_fused_kernel_path():
    """The same parity with the fused FRUGAL kernel (interpreted on CPU) on local row shards."""
    env = {"LEANLM_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    out = torchrun(str(WORKER), "columns", "rows", extra_env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(re.findall(r"OK (columns|rows) ", out.stdout)) == 4


@pytest.mark.slow
def test_fsdp2_fira_and_apollo_match_one_process():
    """columns shards rows (the channels stay local, tensor norms are summed over ranks); the
    basis kinds gather G and compute redundantly."""
    specs = ["columns:fira", "columns:apollo:tensor", "columns:fira:tensor", "svd:fira", "gaussian:apollo"]
    out = torchrun(str(WORKER), *specs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seen = set(re.findall(r"OK ([\w:]+) (\d+) ", out.stdout))
    assert seen == {(s, r) for s in specs for r in ("0", "1")}


@pytest.mark.slow
def test_fsdp2_shards_match_one_process_for_every_projection():
    out = torchrun(str(WORKER))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # Ranks share stdout, so lines may interleave: match the records, not the lines.
    lines = re.findall(r"OK (\w+) (\d+) (\d+) (\d+)", out.stdout)
    seen = {(proj, int(rank)) for proj, rank, *_ in lines}
    projections = ("columns", "rows", "randk", "blocks", "svd", "random")
    assert seen == {(p, r) for p in projections for r in (0, 1)}
    per_rank = {(proj, int(rank)): (int(mine), int(single)) for proj, rank, mine, single in lines}
    # columns and blocks shard their moments: each rank holds about half of one process's state.
    for proj in ("columns", "blocks"):
        total = sum(per_rank[(proj, r)][0] for r in (0, 1))
        single = per_rank[(proj, 0)][1]
        assert max(per_rank[(proj, r)][0] for r in (0, 1)) < 0.6 * single
        assert total <= 1.1 * single  # + replicated step counters and column indices


# ---------------------------------------------------------------------- ZeRO flat partitions


def _layout(shapes, world, align=4):
    """Offsets of ``shapes`` in one flat group padded to a multiple of ``align``, DeepSpeed style."""
    offsets, acc = [], 0
    for i, s in enumerate(shapes):
        offsets.append(acc)
        acc += torch.Size(s).numel()
        if i < len(shapes) - 1:
            acc += (-acc) % align
    total = acc + (-acc) % (align * world)
    return offsets, total // world


SHAPES = [(24, 16), (13, 24), (8, 13)]


@pytest.mark.parametrize("projection", ["columns", "randk"])
def test_flat_positions_are_the_whole_matrix_subspace(projection):
    params = [torch.zeros(s) for s in SHAPES]
    world = 3
    offsets, part = _layout(SHAPES, world)
    chosen = {i: set() for i in range(len(SHAPES))}
    for rank in range(world):
        segs = zero_segments(
            params,
            offsets,
            part_start=rank * part,
            part_size=part,
            index=lambda p: next(i for i, q in enumerate(params) if q is p),
        )
        pos = flat_positions(segs, projection=projection, density=0.25, seed=5, refresh=2)
        for s in segs:
            inside = pos[(pos >= s.offset) & (pos < s.offset + s.length)]
            chosen[s.index] |= set((inside - s.offset + s.start).tolist())
    for i, (m, n) in enumerate(SHAPES):
        gen = subspace_generator(5, i, 2)
        if projection == "columns":
            cols = select_indices(n, num_selected(0.25, n), gen).tolist()
            expect = {r * n + c for r in range(m) for c in cols}
        else:
            expect = set(select_entries(m * n, num_selected(0.25, m * n), gen).tolist())
        assert chosen[i] == expect


@pytest.mark.parametrize("projection", ["columns", "randk"])
def test_flat_partitions_step_exactly_like_whole_matrices(projection):
    """ZeRO-1/2 without DeepSpeed: each 'rank' owns a slice of the flat group, as DeepSpeed hands
    it to the client optimizer; after 5 steps across a refresh, the slices equal the whole run."""
    torch.manual_seed(0)
    world = 2
    whole = [torch.randn(s, requires_grad=True) for s in SHAPES[:2]]
    grads = [[torch.randn(s) for s in SHAPES[:2]] for _ in range(5)]
    kw = dict(lr=1e-2, density=0.3, projection=projection, update_gap=3, weight_decay=0.1)
    ref = FRUGAL(whole, **kw)
    offsets, part = _layout(SHAPES[:2], world)
    ranks = []
    for rank in range(world):
        originals = [w.detach().clone().requires_grad_(True) for w in whole]
        opt = FRUGAL(originals, **kw)
        flat = torch.zeros(part * world)
        for p, off in zip(originals, offsets, strict=True):
            flat[off : off + p.numel()] = p.detach().reshape(-1)
        mine = flat[rank * part : (rank + 1) * part].clone().requires_grad_(True)
        opt.param_groups[0]["params"] = [mine]  # what DeepSpeed does to the client optimizer
        segs = zero_segments(originals, offsets, part_start=rank * part, part_size=part, index=opt.param_index)
        opt.attach_flat_layout(mine, segs)
        ranks.append((opt, mine))
    for step_grads in grads:
        for w, g in zip(whole, step_grads, strict=True):
            w.grad = g
        ref.step()
        flat_grad = torch.zeros(part * world)
        for g, off in zip(step_grads, offsets, strict=True):
            flat_grad[off : off + g.numel()] = g.reshape(-1)
        for rank, (opt, mine) in enumerate(ranks):
            mine.grad = flat_grad[rank * part : (rank + 1) * part].clone()
            opt.step()
    flat = torch.cat([mine.detach() for _, mine in ranks])
    for w, off in zip(whole, offsets, strict=True):
        torch.testing.assert_close(flat[off : off + w.numel()], w.detach().reshape(-1))
    # Same moment memory as whole matrices, minus the index tensors (recomputed, never stored).
    moments = sum(st["exp_avg"].numel() for opt, _ in ranks for st in opt.state.values() if st)
    assert moments == sum(st["exp_avg"].numel() for st in ref.state.values())
    assert sum(state_bytes(opt) for opt, _ in ranks) < state_bytes(ref)


def test_flat_layout_rejects_what_has_no_flat_form():
    p = torch.zeros(4, 4, requires_grad=True)
    opt = FRUGAL([p], projection="svd")
    flat = torch.zeros(16, requires_grad=True)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match="columns or randk"):
        opt.attach_flat_layout(flat, [])
    b = torch.zeros(4, requires_grad=True)
    opt = FRUGAL([{"params": [p, b], "projectable": True}])
    flat = torch.zeros(20, requires_grad=True)
    opt.param_groups[0]["params"] = [flat]
    segs = zero_segments([p, b], [0, 16], part_start=0, part_size=20, index=opt.param_index)
    with pytest.raises(ValueError, match="only matrices"):
        opt.attach_flat_layout(flat, segs)
