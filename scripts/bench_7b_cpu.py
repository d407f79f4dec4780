"""LLaMA-7B pretraining on this CPU machine: FRUGAL, bf16 weights with stochastic rounding, the
optimizer step in backward and activation checkpointing. A few real optimizer steps, a checkpoint,
a resume from it that must match the uninterrupted run bit for bit, and the measured peak RSS and
step time next to ``leanlm memory``'s estimate.

    python scripts/bench_7b_cpu.py --out /tmp/bench_7b            # ~20 min on 2 cores, ~50 GB disk

Each run is its own process (``leanlm train``); its peak RSS is read from its ``metrics.jsonl``
(``mem/peak_gib``, the process's peak resident set). Big checkpoint files are deleted at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def launch(config: str, over: list[str]) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "leanlm.engine.cli", "train", config, *over]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "frugal_7b.yaml"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/bench_7b")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (~13 GB each)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    base = [
        f"train.steps={args.steps}",
        "train.batch_size=1",
        "train.micro_batch_size=1",
        "train.seq_len=256",
        "optim.step_in_backward=true",
        "optim.warmup_steps=1",
        "train.threads=2",
        "eval.every=0",
        "eval.tokens=256",
        "eval.batch_size=1",
        f"checkpoint.every={args.steps - 1}",
        "checkpoint.keep=0",
        "log.every=1",
        "log.progress=false",
        "log.tensorboard=false",
        "data.tokenizer_sample_mb=2",
        *args.overrides,
    ]
    from leanlm.engine.config import load_config
    from leanlm.engine.memory import memory_report

    estimate = memory_report(load_config(args.config, base), 32000, on_gpu=False)
    full, resumed = out / "full", out / "resumed"
    shutil.rmtree(out, ignore_errors=True)
    wall_full = launch(args.config, [*base, f"train.out_dir={full}"])
    # The resumed run starts from the checkpoint before the last step (hard links: no copy).
    ckpt = full / "checkpoints" / f"step-{args.steps - 1:08d}"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name, copy_function=lambda s, d: Path(d).hardlink_to(s))
    wall_resumed = launch(args.config, [*base, f"train.out_dir={resumed}", "train.resume=auto"])

    a, b = rows(full), rows(resumed)
    last = f"step-{args.steps:08d}"
    sha = [
        json.loads((r / "checkpoints" / last / "manifest.json").read_text())["files"]["model.pt"]["sha256"]
        for r in (full, resumed)
    ]
    loss_a = [r["train/loss"] for r in a if "train/loss" in r]
    loss_b = [r["train/loss"] for r in b if "train/loss" in r]
    step_s = [256 / r["perf/tokens_per_s"] for r in a if "perf/tokens_per_s" in r]
    peak = max(r.get("mem/peak_gib", 0) for r in a + b)
    print(
        f"\nestimate (leanlm memory, CPU): {estimate.total_bytes / 2**30:.2f} GiB "
        f"(weights {estimate.param_bytes / 2**30:.2f}, gradients {estimate.grad_bytes / 2**30:.2f}, "
        f"optimizer state {estimate.optim_bytes / 2**30:.2f}, activations {estimate.activation_bytes / 2**30:.2f})"
    )
    print(f"measured peak RSS: {peak:.2f} GiB; step times (s): {', '.join(f'{t:.0f}' for t in step_s)}")
    print(f"wall: uninterrupted {wall_full:.0f} s, resumed {wall_resumed:.0f} s")
    print(f"losses uninterrupted {loss_a}; resumed {loss_b}")
    print(f"resume bitwise: last loss {loss_a[-1] == loss_b[-1]}, final model.pt sha256 equal {sha[0] == sha[1]}")
    if not args.keep:
        for run in (full, resumed):
            shutil.rmtree(run / "checkpoints", ignore_errors=True)


if __name__ == "__main__":
    main()
