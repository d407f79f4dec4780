"""Write a FRUGAL optimizer state saved by an older leanlm checkout, for the regression test that
such a state resumes (tests/optim/test_contract.py, finding F6).

    git worktree add /tmp/old 33ceed5~1     # before the ``rank`` and ``scaling`` group keys
    python scripts/old_optim_state.py /tmp/old tests/data/optim/frugal_state_before_rank.pt

The old checkout's ``optim/`` and ``kernels/`` are imported as ``leanlm.optim`` / ``leanlm.kernels``
through a symlinked tree (the installed leanlm's import hook is set aside), so the state is what
that version's ``state_dict()`` really wrote. The model is ``Sequential(Linear(6, 4),
LayerNorm(4))`` with bare tensors (every 2-D tensor split), trained 3 steps at ``update_gap=2``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

RUN_OLD = r"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ + repr(f)]
sys.path.insert(0, sys.argv[1])
for name in [m for m in sys.modules if m == "leanlm" or m.startswith("leanlm.")]:
    del sys.modules[name]
import torch
from leanlm.optim.frugal import FRUGAL
import leanlm.optim.frugal as frugal_module
assert frugal_module.__file__.startswith(sys.argv[1]), frugal_module.__file__
out = {}
for projection in ("columns", "svd"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    opt = FRUGAL(model.parameters(), lr=1e-2, update_gap=2, projection=projection)
    for step in range(3):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    out[projection] = {"model": model.state_dict(), "optim": opt.state_dict()}
out["commit"] = sys.argv[3]
torch.save(out, sys.argv[2])
print("saved", sys.argv[2], "from", frugal_module.__file__)
"""


def main() -> int:
    checkout, target = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as farm:
        (Path(farm) / "leanlm").mkdir()
        for pkg in ("optim", "kernels"):
            (Path(farm) / "leanlm" / pkg).symlink_to(checkout / pkg)
        cmd = [sys.executable, "-c", RUN_OLD, farm, str(target), commit]
        return subprocess.run(cmd, cwd=farm, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
