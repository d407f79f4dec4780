"""Compile every leanlm Triton kernel ahead of time for a GPU architecture, with no GPU.

    python scripts/compile_kernels.py              # sm_90 (H100/H200) and sm_80 (A100)
    python scripts/compile_kernels.py --arch 90

Each kernel goes through Triton's real lowering (TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas
included) at every autotune tile (with its warps and stages), in bf16 and fp32, and checks the shared memory
each needs against the architecture's limit: the interpreter tests check the math, this checks
that the code compiles for the device it is written for. Must run without
``TRITON_INTERPRET=1`` (the kernels would be interpreted functions). Prints one line per kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


# Largest dynamic shared memory per block (bytes): sm_90 (H100/H200) 227 KiB, sm_80 (A100) 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}


def _compile(fn, arch: int, pointers: dict, constexprs: dict, ints=(), floats=(), warps=4, stages=3) -> int:
    """Compile; return the shared memory the kernel needs (bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "constexpr" for name in constexprs}
    sig.update(pointers)
    sig.update({name: "i32" for name in ints})
    sig.update({name: "fp32" for name in floats})
    sig = {name: sig[name] for name in fn.arg_names}  # the kernel's order; fails if one is missing
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    options = {"num_warps": warps, "num_stages": stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    assert kernel.asm["cubin"], "no cubin"
    shared = int(kernel.metadata.shared)
    limit = SHARED_LIMIT.get(arch)
    assert limit is None or shared <= limit, f"needs {shared} B of shared memory (> {limit})"
    return shared


def strides(fn) -> list[str]:
    return [a for a in fn.arg_names if a.startswith("s_")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import leanlm.kernels.lost_triton as lost_triton
    from leanlm.kernels.frugal_triton import _frugal_kernel

    lost = {
        "_lost_out_kernel": (
            {
                "h_ptr": "T",
                "x_ptr": "T",
                "b_ptr": "T",
                "ws_ptr": "T",
                "idx_ptr": "*i64",
                "y_ptr": "T",
                "gamma_ptr": "*fp32",
            },
            {"PHI": 1},
            ["N", "M", "R", "K"],
        ),
        "_lost_t_kernel": (
            {
                "dy_ptr": "T",
                "b_ptr": "T",
                "ws_ptr": "T",
                "hpre_ptr": "T",
                "dh_ptr": "T",
                "tk_ptr": "T",
                "gamma_ptr": "*fp32",
            },
            {"PHI": 2},
            ["N", "M", "R", "K"],
        ),
        "_lost_dx_kernel": (
            {"dh_ptr": "T", "a_ptr": "T", "tk_ptr": "T", "inv_ptr": "*i32", "dx_ptr": "T"},
            {},
            ["N", "C", "R"],
        ),
        "_lost_dws_kernel": (
            {"dy_ptr": "T", "x_ptr": "T", "idx_ptr": "*i64", "part_ptr": "*fp32"},
            {},
            ["N", "M", "K", "tokens_per_split"],
        ),
    }
    failures = 0
    for arch in args.arch:
        for name, (pointers, const, ints) in lost.items():
            tuner = getattr(lost_triton, name)
            fn = tuner.fn
            for dtype in ("bf16", "fp32"):
                ptrs = {k: f"*{dtype}" if v == "T" else v for k, v in pointers.items()}
                prec = "ieee" if dtype == "fp32" else "tf32"
                for cfg in tuner.configs:
                    if dtype == "fp32" and cfg.kwargs["BN"] * cfg.kwargs["BK"] > 128 * 64:
                        continue  # pruned at run time for fp32 (lost_triton._prune_for_fp32)
                    consts = {**const, "PREC": prec, "UPCAST": False, **cfg.kwargs}
                    t0 = time.perf_counter()
                    try:
                        shared = _compile(
                            fn,
                            arch,
                            ptrs,
                            consts,
                            ints=[*ints, *strides(fn)],
                            warps=cfg.num_warps,
                            stages=cfg.num_stages,
                        )
                        status = f"ok ({shared // 1024} KiB shared, {time.perf_counter() - t0:.1f} s)"
                    except Exception as e:  # report every failure, not just the first
                        failures += 1
                        status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    tile = f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                    print(f"sm_{arch} {name} {dtype} {tile} -> {status}", flush=True)
        for dim in (0, 1):
            for dtype in ("bf16", "fp32"):
                ptrs = {k: f"*{dtype}" for k in ("p_ptr", "g_ptr", "m_ptr", "v_ptr")}
                try:
                    _compile(
                        _frugal_kernel,
                        arch,
                        {**ptrs, "inv_ptr": "*i32"},
                        {"DIM": dim, "FREE": 0, "BLOCK": 1024},
                        ints=["n_cols", "k_sel"],
                        floats=["decay", "step_size", "bc2_sqrt", "b1", "b2", "eps", "lr_free"],
                    )
                    status = "ok"
                except Exception as e:
                    failures += 1
                    status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"sm_{arch} _frugal_kernel DIM={dim} {dtype} -> {status}", flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
