"""Throughput cost of int8 weights against bf16: one layer's matmuls and update, and whole training
steps, on the CPU or a GPU.

    python scripts/bench_int8.py --layer                 # 7B MLP shape: forward+backward, update
    python scripts/bench_int8.py --train --config configs/llama_60m.yaml --steps 12

--layer times ``Int8Linear`` against a bf16 ``nn.Linear`` at (tokens x 4096) @ (4096 -> 11008):
forward + backward (dequantizing the weight in each), and the optimizer update (dequantize,
update, stochastic requantization) against the bf16 one (float32 copy, update, stochastic
rounding). Needs only torch and leanlm.optim (runs from scripts/gpu_check.sh). --train runs
``leanlm train`` in this process for each variant (bf16, int8 per row, int8 +
8-bit moments; FRUGAL, step in backward) and reports the median tokens/s after warm-up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from leanlm.optim import PrecisionHooks
from leanlm.optim.quantized import Int8Linear

TRAIN_VARIANTS = {
    "bf16 + SR": ["train.param_dtype=bf16"],
    "int8 row": ["train.param_dtype=int8"],
    "int8 row + 8-bit moments": ["train.param_dtype=int8", "optim.state_dtype=int8"],
}


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_layer(tokens: int, repeat: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dense = nn.Linear(4096, 11008, bias=False, device=device)
    layers = {
        "bf16": dense.to(torch.bfloat16),
        "int8 row": Int8Linear.from_linear(dense.float(), 0).to(device),
        "int8 g128": Int8Linear.from_linear(dense.float(), 128).to(device),
    }
    dense.to(torch.bfloat16)
    x = torch.randn(tokens, 4096, device=device, dtype=torch.bfloat16, requires_grad=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: ({tokens} x 4096) @ (4096 -> 11008), median of {repeat}")
    print("| weights | forward + backward ms | update ms (float32 math, stochastic rounding) |")
    print("|---|---|---|")
    for label, layer in layers.items():
        opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
        PrecisionHooks(opt, rounding="stochastic", seed=0)

        def fwd_bwd(layer=layer) -> None:
            layer(x).float().square().mean().backward()
            layer.weight.grad = None

        layer(x).float().square().mean().backward()
        grad = layer.weight.grad

        def update(layer=layer, opt=opt, grad=grad) -> None:
            layer.weight.grad = grad
            opt.step()

        print(f"| {label} | {timed(fwd_bwd, device, repeat) * 1e3:.1f} | {timed(update, device, repeat) * 1e3:.1f} |")


def bench_train(config: str, steps: int, overrides: list[str], out: str) -> None:
    from leanlm.engine.config import load_config
    from leanlm.engine.trainer import train

    print(f"| variant ({Path(config).stem}, FRUGAL, step in backward) | tokens/s (median, steps 4+) |")
    print("|---|---|")
    for label, extra in TRAIN_VARIANTS.items():
        run = Path(out) / label.replace(" ", "_").replace("+", "p")
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time
        over = [
            f"train.steps={steps}",
            "optim.name=frugal",
            "optim.step_in_backward=true",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "eval.every=0",
            "eval.tokens=256",
            "eval.batch_size=1",
            "checkpoint.every=0",
            "log.every=1",
            "log.progress=false",
            "log.tensorboard=false",
            f"train.out_dir={run}",
            *extra,
            *overrides,
        ]
        train(load_config(config, over))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r and r["step"] >= 4]
        print(f"| {label} | {statistics.median(speeds):,.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", action="store_true")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--config", default="configs/llama_60m.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="/tmp/bench_int8")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.layer or not args.train:
        bench_layer(args.tokens, args.repeat)
    if args.train:
        bench_train(args.config, args.steps, args.overrides, args.out)


if __name__ == "__main__":
    main()
