"""``leanlm memory`` against measured memory: real training steps per variant, the estimate next to
the measured peak (process peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU).

    python scripts/validate_memory.py --configs configs/llama_60m.yaml --steps 4

Each variant trains in its own process (``leanlm train``, batch 4 x 256, one micro-batch) and its
peak is read from ``metrics.jsonl`` (``mem/peak_gib``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from leanlm.engine.config import load_config
from leanlm.engine.memory import memory_report

VARIANTS = {
    "adamw": ["optim.name=adamw"],
    "frugal": ["optim.name=frugal"],
    "frugal + step in backward": ["optim.name=frugal", "optim.step_in_backward=true"],
    "frugal + step in backward + bf16": [
        "optim.name=frugal",
        "optim.step_in_backward=true",
        "train.param_dtype=bf16",
    ],
    "lost + frugal": ["optim.name=frugal", "model.lost.enabled=true"],
    "adamw + bf16": ["optim.name=adamw", "train.param_dtype=bf16"],  # opt-in (--variants): dense baseline in bf16
    # opt-in (--variants): int8 weights and 8-bit moments (issue 26)
    "frugal + step in backward + int8": [
        "optim.name=frugal",
        "optim.step_in_backward=true",
        "train.param_dtype=int8",
        "optim.state_dtype=int8",
    ],
    "lost + frugal + step in backward + int8": [
        "optim.name=frugal",
        "optim.step_in_backward=true",
        "model.lost.enabled=true",
        "model.activation_checkpointing=true",
        "train.param_dtype=int8",
        "optim.state_dtype=int8",
    ],
}
DEFAULT_VARIANTS = list(VARIANTS)[:5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["configs/llama_60m.yaml"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="/tmp/validate_memory")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS, metavar="NAME")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [
        f"train.steps={args.steps}",
        "train.batch_size=4",
        "train.micro_batch_size=4",
        "eval.every=0",
        "eval.tokens=256",
        "eval.batch_size=1",
        "checkpoint.every=0",
        "log.every=1",
        "log.progress=false",
        "log.tensorboard=false",
        *args.overrides,
    ]
    print("| config | variant | estimate GiB | measured peak GiB | measured / estimate |")
    print("|---|---|---|---|---|")
    peaks: dict[tuple[str, str], float] = {}
    for config in args.configs:
        for label, extra in ((k, VARIANTS[k]) for k in args.variants):
            over = [*base, *extra]
            vocab = load_config(config, over).data.vocab_size
            estimate = memory_report(load_config(config, over), vocab, on_gpu=False).total_bytes / 2**30
            run = Path(args.out) / f"{Path(config).stem}-{label.replace(' ', '_').replace('+', '')}"
            cmd = [sys.executable, "-m", "leanlm.engine.cli", "train", config, *over, f"train.out_dir={run}"]
            shutil.rmtree(run, ignore_errors=True)  # a fresh run each time
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:  # e.g. killed for want of memory (dense AdamW at 1b on 24 GiB): say so, go on
                why = proc.stderr.strip().splitlines()[-1:] or [
                    f"exit status {proc.returncode} (killed: out of memory?)"
                ]
                print(f"| {Path(config).stem} | {label} | {estimate:.2f} | failed: {why[0][:200]} | |", flush=True)
                continue
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            peak = max(r.get("mem/peak_gib", 0.0) for r in rows)
            peaks[config, label] = peak
            shutil.rmtree(run / "checkpoints", ignore_errors=True)  # a 1b AdamW checkpoint is 16 GB
            print(
                f"| {Path(config).stem} | {label} | {estimate:.2f} | {peak:.2f} | {peak / estimate:.2f} |", flush=True
            )

    pairs = [("frugal + step in backward", "adamw"), ("frugal + step in backward + bf16", "adamw + bf16")]
    for config in args.configs:  # the 1b target: FRUGAL + step in backward <= 50% of AdamW's peak
        for ours, dense in pairs:
            if (config, ours) in peaks and (config, dense) in peaks:
                ratio = peaks[config, ours] / peaks[config, dense]
                print(f"{Path(config).stem}: {ours} / {dense} measured peak = {ratio:.2f}")


if __name__ == "__main__":
    main()
