"""Kernel parity at real shapes, then timings against the references and the roofline floor.

    python scripts/bench_kernels.py            # on a CUDA machine (scripts/gpu_check.sh runs it)
    python scripts/bench_kernels.py --quick    # smaller shapes, for a first look
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --dry-run   # CPU: every code path, tiny

1. Parity: the Triton LOST layer (fp32, exact dots) against a float64 reference, forward and the
   four gradients, at shapes of a 1B model's projections with fewer tokens; bf16 against fp32.
   The fused FRUGAL update against its reference path on a 2048 x 5461 matrix.
2. Timings (CUDA events, warm-up, median of repeats), bf16, LLaMA-1B shapes: N = 16384 tokens,
   d = 2048, ffn = 5461, r = 512, ρ = 0.05: LOST forward+backward, Triton vs reference vs a dense
   ``nn.Linear`` of the same shape; the FRUGAL step (columns, ρ 0.25, fp32 state) vs
   ``torch.optim.AdamW(fused=True)`` over every projection matrix of LLaMA-1B (1.21B parameters).
3. Roofline floor for each: max(FLOPs / bf16 matrix peak, bytes / memory bandwidth), from the
   card's datasheet numbers (H100 SXM, H200; other cards: pass --peak-tflops and --bandwidth-tbs).
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("LEANLM_KERNELS", "triton")

from leanlm.kernels.frugal_update import frugal_update, frugal_update_reference
from leanlm.kernels.lost_linear import lost_linear, lost_linear_reference

# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s), from NVIDIA's datasheets.
CARDS = {"H100": (989.0, 3.35), "H200": (989.0, 4.8), "A100": (312.0, 2.0)}

D, FFN, R, RHO = 2048, 5461, 512, 0.05
LAYERS_1B = 24
DEVICE = "cuda"
SHAPES = {  # name -> (in, out)
    "attn 2048->2048": (D, D),
    "mlp up 2048->5461": (D, FFN),
    "mlp down 5461->2048": (FFN, D),
}


def card(args) -> tuple[str, float, float]:
    name = torch.cuda.get_device_name()
    for key, (tflops, tbs) in CARDS.items():
        if key in name:
            return name, args.peak_tflops or tflops, args.bandwidth_tbs or tbs
    if not (args.peak_tflops and args.bandwidth_tbs):
        sys.exit(f"unknown card {name!r}: pass --peak-tflops and --bandwidth-tbs")
    return name, args.peak_tflops, args.bandwidth_tbs


def timed(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs, after ``warmup``."""
    if DEVICE == "cpu":  # dry run: wall clock, once
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def lost_tensors(n_in, n_out, tokens, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = int(RHO * n_in)
    x = torch.randn(tokens, n_in, generator=g).to(DEVICE, dtype)
    a = (torch.randn(n_in, R, generator=g) / n_in**0.5).to(DEVICE, dtype)
    b = (torch.randn(R, n_out, generator=g) / R**0.5).to(DEVICE, dtype)
    ws = (torch.randn(n_out, k, generator=g) / k**0.5).to(DEVICE, dtype)
    idx = torch.randperm(n_in, generator=g)[:k].sort().values.to(DEVICE)
    dy = torch.randn(tokens, n_out, generator=g).to(DEVICE, dtype)
    return x, a, b, ws, idx, dy


def fwd_bwd(fn, x, a, b, ws, idx, dy):
    leaves = [t.detach().requires_grad_(True) for t in (x, a, b, ws)]
    y = fn(*leaves, idx, 0.5, "silu")
    grads = torch.autograd.grad(y, leaves, dy)
    return y, grads


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rel_norm(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def parity(tokens: int) -> tuple[list[str], bool]:
    lines, ok = [], True
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 dots for the 1e-5 check
    for name, (n_in, n_out) in SHAPES.items():
        x, a, b, ws, idx, dy = lost_tensors(n_in, n_out, tokens, torch.float64)
        y64, g64 = fwd_bwd(lost_linear_reference, x, a, b, ws, idx, dy)
        y32, g32 = fwd_bwd(lost_linear, *(t.float() for t in (x, a, b, ws)), idx, dy.float())
        e32 = max(rel(p, q) for p, q in zip((y32, *g32), (y64, *g64), strict=True))
        ybf, gbf = fwd_bwd(lost_linear, *(t.bfloat16() for t in (x, a, b, ws)), idx, dy.bfloat16())
        ebf = max(rel_norm(p, q) for p, q in zip((ybf, *gbf), (y64, *g64), strict=True))
        good = e32 < 1e-5 and ebf < 1e-2
        ok &= good
        lines.append(
            f"| LOST {name}, N={tokens} | fp32 max rel err {e32:.2e} (< 1e-5) | "
            f"bf16 norm rel err {ebf:.2e} (< 1e-2) | {'ok' if good else 'FAIL'} |"
        )
    g = torch.Generator(device="cpu").manual_seed(0)
    p = torch.randn(D, FFN, generator=g).to(DEVICE)
    grad = torch.randn(D, FFN, generator=g).to(DEVICE)
    k = int(0.25 * FFN)
    st = {
        "exp_avg": torch.zeros(D, k, device=DEVICE),
        "exp_avg_sq": torch.zeros(D, k, device=DEVICE),
        "step": torch.tensor(0.0),
        "index": torch.randperm(FFN, generator=g)[:k].sort().values.to(DEVICE),
    }
    ref_p, ref_st = p.clone(), {key: v.clone() for key, v in st.items()}
    kw = dict(dim=1, lr=1e-3, lr_free=1e-3, betas=(0.9, 0.999), eps=1e-8, free="sign", decay=0.9999)
    for _ in range(3):
        frugal_update(p, grad, st, **kw)
        frugal_update_reference(ref_p, grad, ref_st, **kw)
    e = max(rel(p, ref_p), rel(st["exp_avg"], ref_st["exp_avg"]))
    ok &= e < 1e-5
    lines.append(
        f"| FRUGAL update {D}x{FFN}, 3 steps | max rel err {e:.2e} (< 1e-5) | | {'ok' if e < 1e-5 else 'FAIL'} |"
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    return lines, ok


def lost_costs(n_in, n_out, tokens) -> tuple[float, float, float, float]:
    """(FLOPs, bytes) of LOST fwd+bwd and of the dense layer's fwd+bwd, bf16 operands."""
    k = int(RHO * n_in)
    fwd = 2 * tokens * (n_in * R + R * n_out + k * n_out)
    bwd = 2 * tokens * (n_out * R + n_out * k + R * n_in + n_out * k + R * n_out + n_in * R)
    # bytes: x, y, dy, dx once each, H_pre written + read twice, dH written + read twice,
    # T_k written + read, weights and their grads (read/written once per pass)
    act = tokens * (n_in + n_out) * 2 + tokens * (n_out + n_in) * 2
    inner = tokens * R * 2 * 3 + tokens * R * 2 * 3 + tokens * k * 2 * 2
    wts = (n_in * R + R * n_out + n_out * k) * 2 * 4
    dense_flops = 6 * tokens * n_in * n_out
    dense_bytes = act + n_in * n_out * 2 * 4
    return fwd + bwd, act + inner + wts, dense_flops, dense_bytes


def time_lost(n_in: int, n_out: int, tokens: int) -> tuple[float, float, float]:
    """Median ms of LOST fwd+bwd (Triton, reference) and of the dense layer's fwd+bwd."""
    x, a, b, ws, idx, dy = lost_tensors(n_in, n_out, tokens, torch.bfloat16)
    leaves = [t.detach().requires_grad_(True) for t in (x, a, b, ws)]

    def run(fn):
        y = fn(*leaves, idx, 0.5, "silu")
        torch.autograd.grad(y, leaves, dy)

    dense = torch.nn.Linear(n_in, n_out, bias=False, device=DEVICE, dtype=torch.bfloat16)
    xd = x.detach().requires_grad_(True)

    def run_dense():
        y = dense(xd)
        torch.autograd.grad(y, (xd, dense.weight), dy)

    return (
        timed(lambda: run(lost_linear)),
        timed(lambda: run(lost_linear_reference)),
        timed(run_dense),
    )


def bench_lost(tokens: int, peak: float, bw: float) -> list[str]:
    lines = []
    for name, (n_in, n_out) in SHAPES.items():
        t_tri, t_ref, t_dense = time_lost(n_in, n_out, tokens)
        flops, nbytes, dflops, dbytes = lost_costs(n_in, n_out, tokens)
        floor = max(flops / (peak * 1e12), nbytes / (bw * 1e12)) * 1e3
        dfloor = max(dflops / (peak * 1e12), dbytes / (bw * 1e12)) * 1e3
        lines.append(
            f"| LOST fwd+bwd {name} | {t_tri:.3f} | {t_ref:.3f} | {t_dense:.3f} | "
            f"{t_ref / t_tri:.2f}x | {t_dense / t_tri:.2f}x | {floor:.3f} (dense {dfloor:.3f}) |"
        )
    return lines


def bench_frugal(layers: int, peak: float, bw: float) -> list[str]:
    from leanlm.optim import FRUGAL

    shapes = [(D, D)] * 4 + [(FFN, D), (FFN, D), (D, FFN)]
    params = [torch.zeros(s, device=DEVICE, requires_grad=True) for _ in range(layers) for s in shapes]
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    frugal = FRUGAL(params, lr=1e-3, density=0.25, projection="columns", update_gap=10**9)
    frugal.step()  # allocate state (and the first subspace) outside the timing
    t_fr = timed(frugal.step)
    del frugal
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    adamw = torch.optim.AdamW(params, lr=1e-3, fused=DEVICE == "cuda")
    adamw.step()
    t_ad = timed(adamw.step)
    fr_floor = n * 16 / (bw * 1e12) * 1e3  # p r/w + g + 25% of (m, v r/w), fp32
    ad_floor = n * 28 / (bw * 1e12) * 1e3
    return [
        f"| FRUGAL step, {n / 1e9:.2f}B params (columns ρ .25, fused) | {t_fr:.2f} | | {t_ad:.2f} (AdamW fused) | | "
        f"{t_fr / t_ad:.2f}x of AdamW | {fr_floor:.2f} (AdamW {ad_floor:.2f}) |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096 tokens and 4 layers")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--bandwidth-tbs", type=float, default=0.0)
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, tiny shapes (TRITON_INTERPRET=1): checks the script",
    )
    args = ap.parse_args()
    global DEVICE, D, FFN, R, SHAPES
    t0 = time.time()
    if args.dry_run:
        DEVICE, D, FFN, R = "cpu", 64, 96, 16
        SHAPES = {"attn": (D, D), "mlp up": (D, FFN), "mlp down": (FFN, D)}
        name, peak, bw = "cpu (dry run: timings meaningless)", 1.0, 0.1
    elif not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device (or --dry-run under TRITON_INTERPRET=1)")
    else:
        name, peak, bw = card(args)
    print(f"# {name}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    print(f"# roofline: {peak:.0f} TFLOP/s bf16, {bw:.2f} TB/s\n")
    lines, ok = parity(40 if args.dry_run else 1024 if args.quick else 2048)
    print("| parity | fp32 | bf16 | |\n|---|---|---|---|")
    print("\n".join(lines), flush=True)
    tokens = 48 if args.dry_run else 4096 if args.quick else 16384
    print(
        f"\n| timing, N={tokens} | Triton (ms) | reference (ms) | dense (ms) | vs reference | vs dense | floor (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for line in bench_lost(tokens, peak, bw):
        print(line, flush=True)
    for line in bench_frugal(1 if args.dry_run else 4 if args.quick else LAYERS_1B, peak, bw):
        print(line, flush=True)
    print(f"\n# done in {time.time() - t0:.0f} s; parity {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
