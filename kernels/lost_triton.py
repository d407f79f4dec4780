"""Triton kernels for the LOST linear layer (forward and backward).

Notation: x (N, n), A (n, r), B (r, m), W_s (m, k), I (k,) sorted unique input channels,
γ a float, φ ∈ {identity, silu, relu2}; H_pre = x A, H = φ(H_pre).

Forward, two launches:
  1. ``H_pre = x A`` (a plain GEMM: cuBLAS through ``torch.mm``; H_pre is all φ' needs later).
  2. ``Y = [H | x[:, I]] · [γ B ; (1 − γ) W_sᵀ]``: one kernel whose inner loop runs over the
     concatenated r + k dimension: φ is applied to the H_pre tiles as they load, and the x[:, I]
     tiles are loaded through the index (no gathered copy of x, no second output to add).
Backward:
  3. ``T = dY · [γ B ; (1 − γ) W_sᵀ]ᵀ``: one launch over r + k output columns; the first r get
     φ'(H_pre) in the epilogue (dH_pre), the last k are the gradient of x[:, I] (T_k).
  4. ``dx = dH_pre Aᵀ`` with T_k added in the epilogue through the inverse index map (each input
     channel receives at most one sparse term: no atomics, deterministic).
  5. ``dW_s = (1 − γ) dYᵀ x[:, I]`` with the x tiles loaded through the index.
  ``dB = γ Hᵀ dY`` and ``dA = xᵀ dH_pre`` are plain GEMMs (cuBLAS).

Accumulation is fp32; fp32 inputs use exact (IEEE) dots unless TF32 matmuls are enabled in torch.
Tails (k = 25, 68, 273, ...) are masked. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors (small blocks, no autotuning), which is how CI tests them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from leanlm.kernels.dispatch import PHIS, apply_phi, inverse_index

PHI_CODE = {name: code for code, name in enumerate(PHIS)}  # the kernels' PHI constexpr
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(big: bool = True) -> list[triton.Config]:
    """A few Hopper/Ampere-friendly tiles (few, to keep first-call autotuning short)."""
    if INTERPRET:  # one small config: the interpreter runs every autotune candidate
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=1)]
    shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4)]
    shapes += [(64, 128, 32, 4, 4), (128, 256, 64, 8, 3)] if big else [(64, 64, 64, 4, 3)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes]


def _prune_for_fp32(configs, named_args, **kwargs):
    """fp32 operands (exact-dot parity runs) double the shared memory of a tile: drop the largest,
    which would not fit (and takes ~40 s to compile)."""
    first = next(v for v in named_args.values() if hasattr(v, "dtype"))
    if first.dtype != torch.float32:
        return configs
    return [c for c in configs if c.kwargs["BN"] * c.kwargs["BK"] <= 128 * 64] or configs


PRUNE = {"early_config_prune": _prune_for_fp32}


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; under the interpreter bf16 tiles are widened first (Triton's interpreter computes
    bf16 dots wrongly: it was measured returning ~1e10 for unit-scale inputs)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _gemm_tiles(
    acc,
    a_ptr,
    s_a_row,
    s_a_k,
    b_ptr,
    s_b_k,
    s_b_col,
    rows,
    row_ok,
    cols,
    col_ok,
    K,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BK: tl.constexpr,
):
    """acc += A[rows, :K] @ B[:K, cols] for strided A and B (transposes are just strides)."""
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kk_ok = kk < K
        a = tl.load(
            a_ptr + rows[:, None] * s_a_row + kk[None, :] * s_a_k,
            mask=row_ok[:, None] & kk_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + kk[:, None] * s_b_k + cols[None, :] * s_b_col,
            mask=kk_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += _dot(a, b, PREC, UPCAST)
    return acc


@triton.jit
def _phi(h, PHI: tl.constexpr):
    if PHI == 1:
        h = h * tl.sigmoid(h)
    elif PHI == 2:
        h = tl.maximum(h, 0.0)
        h = h * h
    return h


@triton.jit
def _dphi(h, PHI: tl.constexpr):
    if PHI == 1:
        s = tl.sigmoid(h)
        return s + h * s * (1.0 - s)
    elif PHI == 2:
        return 2.0 * tl.maximum(h, 0.0)
    else:
        return tl.full(h.shape, 1.0, tl.float32)


# ------------------------------------------------------------------------------------- forward


@triton.autotune(configs=_configs(), key=["N", "M", "R", "K"], prune_configs_by=PRUNE)
@triton.jit
def _lost_out_kernel(
    h_ptr,
    x_ptr,
    b_ptr,
    ws_ptr,
    idx_ptr,
    y_ptr,
    gamma_ptr,
    N,
    M,
    R,
    K,
    s_hn,
    s_hr,
    s_xn,
    s_xc,
    s_br,
    s_bm,
    s_wm,
    s_wk,
    s_yn,
    s_ym,
    PHI: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Y[rows, cols] = γ φ(H_pre) B + (1 − γ) x[:, I] W_sᵀ over the concatenated inner dim."""
    gamma = tl.load(gamma_ptr).to(tl.float32)  # a device scalar: no host sync, compile-friendly
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BM + tl.arange(0, BM)  # tokens
    cols = pid_m * BN + tl.arange(0, BN)  # output features
    row_ok, col_ok = rows < N, cols < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BK):  # the low-rank part: φ applied to H_pre tiles on load
        kk = r0 + tl.arange(0, BK)
        kk_ok = kk < R
        h = tl.load(
            h_ptr + rows[:, None] * s_hn + kk[None, :] * s_hr,
            mask=row_ok[:, None] & kk_ok[None, :],
            other=0.0,
        )
        h = _phi(h.to(tl.float32), PHI).to(h_ptr.dtype.element_ty)
        b = tl.load(
            b_ptr + kk[:, None] * s_br + cols[None, :] * s_bm,
            mask=kk_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += _dot(h, b, PREC, UPCAST)
    acc = acc * gamma
    sp = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):  # the sparse part: x tiles through the channel index
        kk = k0 + tl.arange(0, BK)
        kk_ok = kk < K
        ch = tl.load(idx_ptr + kk, mask=kk_ok, other=0)
        xs = tl.load(
            x_ptr + rows[:, None] * s_xn + ch[None, :] * s_xc,
            mask=row_ok[:, None] & kk_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            ws_ptr + cols[None, :] * s_wm + kk[:, None] * s_wk,
            mask=kk_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        sp += _dot(xs, w, PREC, UPCAST)
    acc += sp * (1.0 - gamma)
    tl.store(
        y_ptr + rows[:, None] * s_yn + cols[None, :] * s_ym,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# ------------------------------------------------------------------------------------ backward


@triton.autotune(configs=_configs(big=False), key=["N", "M", "R", "K"], prune_configs_by=PRUNE)
@triton.jit
def _lost_t_kernel(
    dy_ptr,
    b_ptr,
    ws_ptr,
    hpre_ptr,
    dh_ptr,
    tk_ptr,
    gamma_ptr,
    N,
    M,
    R,
    K,
    s_dn,
    s_dm,
    s_br,
    s_bm,
    s_wm,
    s_wk,
    s_hn,
    s_hr,
    s_tn,
    s_tk,
    PHI: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Column blocks [0, ⌈R/BN⌉): dH_pre = γ (dY Bᵀ) ⊙ φ'(H_pre); the rest: T_k = (1 − γ) dY W_s."""
    gamma = tl.load(gamma_ptr).to(tl.float32)
    pid_n, pid_c = tl.program_id(0), tl.program_id(1)
    r_blocks = tl.cdiv(R, BN)
    rows = pid_n * BM + tl.arange(0, BM)
    row_ok = rows < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if pid_c < r_blocks:
        cols = pid_c * BN + tl.arange(0, BN)
        col_ok = cols < R
        acc = _gemm_tiles(  # dY @ Bᵀ: Bᵀ[mm, cols] = B[cols, mm]
            acc,
            dy_ptr,
            s_dn,
            s_dm,
            b_ptr,
            s_bm,
            s_br,
            rows,
            row_ok,
            cols,
            col_ok,
            M,
            PREC,
            UPCAST,
            BK,
        )
        mask = row_ok[:, None] & col_ok[None, :]
        if PHI != 0:
            hp = tl.load(hpre_ptr + rows[:, None] * s_hn + cols[None, :] * s_hr, mask=mask, other=0.0)
            acc = acc * _dphi(hp.to(tl.float32), PHI)
        acc = acc * gamma
        tl.store(
            dh_ptr + rows[:, None] * s_hn + cols[None, :] * s_hr,
            acc.to(dh_ptr.dtype.element_ty),
            mask=mask,
        )
    else:
        cols = (pid_c - r_blocks) * BN + tl.arange(0, BN)
        col_ok = cols < K
        acc = _gemm_tiles(  # dY @ W_s
            acc,
            dy_ptr,
            s_dn,
            s_dm,
            ws_ptr,
            s_wm,
            s_wk,
            rows,
            row_ok,
            cols,
            col_ok,
            M,
            PREC,
            UPCAST,
            BK,
        )
        acc = acc * (1.0 - gamma)
        tl.store(
            tk_ptr + rows[:, None] * s_tn + cols[None, :] * s_tk,
            acc.to(tk_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


@triton.autotune(configs=_configs(big=False), key=["N", "C", "R"], prune_configs_by=PRUNE)
@triton.jit
def _lost_dx_kernel(
    dh_ptr,
    a_ptr,
    tk_ptr,
    inv_ptr,
    dx_ptr,
    N,
    C,
    R,
    s_hn,
    s_hr,
    s_ac,
    s_ar,
    s_tn,
    s_tk,
    s_xn,
    s_xc,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """dx = dH_pre Aᵀ, plus T_k[:, inv[c]] on every input channel c in I (epilogue)."""
    pid_n, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BM + tl.arange(0, BM)
    cols = pid_c * BN + tl.arange(0, BN)  # input channels
    row_ok, col_ok = rows < N, cols < C
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _gemm_tiles(  # dH_pre @ Aᵀ: Aᵀ[kk, cols] = A[cols, kk]
        acc,
        dh_ptr,
        s_hn,
        s_hr,
        a_ptr,
        s_ar,
        s_ac,
        rows,
        row_ok,
        cols,
        col_ok,
        R,
        PREC,
        UPCAST,
        BK,
    )
    inv = tl.load(inv_ptr + cols, mask=col_ok, other=-1)
    hit = inv >= 0
    sp = tl.load(
        tk_ptr + rows[:, None] * s_tn + tl.maximum(inv, 0)[None, :] * s_tk,
        mask=row_ok[:, None] & hit[None, :],
        other=0.0,
    )
    acc += sp.to(tl.float32)
    tl.store(
        dx_ptr + rows[:, None] * s_xn + cols[None, :] * s_xc,
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.autotune(configs=_configs(big=False), key=["N", "M", "K"], prune_configs_by=PRUNE)
@triton.jit
def _lost_dws_kernel(
    dy_ptr,
    x_ptr,
    idx_ptr,
    part_ptr,
    N,
    M,
    K,
    tokens_per_split,
    s_dn,
    s_dm,
    s_xn,
    s_xc,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Split s of dW_s[m, j] = Σ_t dY[t, m] x[t, I[j]] over its slice of tokens, the x tiles
    loaded through the index; partial sums go to part[s] (fp32), summed afterwards (split-K keeps
    the small (m, k) output spread over many programs, deterministically: no atomics)."""
    pid_m, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    outs = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BN + tl.arange(0, BN)
    out_ok, col_ok = outs < M, cols < K
    ch = tl.load(idx_ptr + cols, mask=col_ok, other=0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t_lo = pid_s * tokens_per_split
    t_hi = tl.minimum(t_lo + tokens_per_split, N)
    for t0 in range(t_lo, t_hi, BK):
        tt = t0 + tl.arange(0, BK)
        tt_ok = tt < t_hi
        dt = tl.load(  # dYᵀ tile: dY[tt, outs]
            dy_ptr + tt[None, :] * s_dn + outs[:, None] * s_dm,
            mask=out_ok[:, None] & tt_ok[None, :],
            other=0.0,
        )
        xs = tl.load(
            x_ptr + tt[:, None] * s_xn + ch[None, :] * s_xc,
            mask=tt_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += _dot(dt, xs, PREC, UPCAST)
    tl.store(
        part_ptr + pid_s * M * K + outs[:, None] * K + cols[None, :],
        acc,
        mask=out_ok[:, None] & col_ok[None, :],
    )


# ------------------------------------------------------------------------------------ launchers


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BM"]), triton.cdiv(cols, meta["BN"]))


def forward(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ws: torch.Tensor,
    index: torch.Tensor,
    gamma: torch.Tensor,
    phi: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, n) -> (Y (N, m), H_pre (N, r)); H_pre is kept for the backward. ``gamma``: a 0-d
    float32 tensor on x's device (LOST keeps γ as a buffer; read on the device, never synced)."""
    n_tok, m, r, k = x.shape[0], b.shape[1], a.shape[1], ws.shape[1]
    hpre = torch.mm(x, a)  # (N, r)
    y = torch.empty((n_tok, m), dtype=x.dtype, device=x.device)
    _lost_out_kernel[_grid(n_tok, m)](
        h_ptr=hpre,
        x_ptr=x,
        b_ptr=b,
        ws_ptr=ws,
        idx_ptr=index,
        y_ptr=y,
        gamma_ptr=gamma,
        N=n_tok,
        M=m,
        R=r,
        K=k,
        s_hn=hpre.stride(0),
        s_hr=hpre.stride(1),
        s_xn=x.stride(0),
        s_xc=x.stride(1),
        s_br=b.stride(0),
        s_bm=b.stride(1),
        s_wm=ws.stride(0),
        s_wk=ws.stride(1),
        s_yn=y.stride(0),
        s_ym=y.stride(1),
        PHI=PHI_CODE[phi],
        PREC=_precision(x.dtype),
        UPCAST=INTERPRET,
    )
    return y, hpre


def _splits(tokens: int, m: int, k: int, device: torch.device) -> int:
    """Token splits for dW_s: enough programs to fill the GPU twice over (128 x 128 tiles), each
    split at least 512 tokens long."""
    if device.type != "cuda":
        return 2 if tokens >= 32 else 1  # the interpreter: exercise the split path, cheaply
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(m, 128) * triton.cdiv(k, 128)
    return max(1, min(triton.cdiv(2 * sms, tiles), tokens // 512, 64))


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ws: torch.Tensor,
    index: torch.Tensor,
    hpre: torch.Tensor,
    gamma: torch.Tensor,
    phi: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dA, dB, dW_s) of Y = forward(...) given dY (N, m)."""
    n_tok, n, m, r, k = x.shape[0], x.shape[1], b.shape[1], a.shape[1], ws.shape[1]
    code, prec = PHI_CODE[phi], _precision(x.dtype)
    dy = dy.contiguous()
    dh = torch.empty_like(hpre)  # (N, r) dH_pre
    tk = torch.empty((n_tok, k), dtype=x.dtype, device=x.device)  # (N, k) grad of x[:, I]

    def t_grid(meta):
        return (
            triton.cdiv(n_tok, meta["BM"]),
            triton.cdiv(r, meta["BN"]) + triton.cdiv(k, meta["BN"]),
        )

    _lost_t_kernel[t_grid](
        dy_ptr=dy,
        b_ptr=b,
        ws_ptr=ws,
        hpre_ptr=hpre,
        dh_ptr=dh,
        tk_ptr=tk,
        gamma_ptr=gamma,
        N=n_tok,
        M=m,
        R=r,
        K=k,
        s_dn=dy.stride(0),
        s_dm=dy.stride(1),
        s_br=b.stride(0),
        s_bm=b.stride(1),
        s_wm=ws.stride(0),
        s_wk=ws.stride(1),
        s_hn=hpre.stride(0),
        s_hr=hpre.stride(1),
        s_tn=tk.stride(0),
        s_tk=tk.stride(1),
        PHI=code,
        PREC=prec,
        UPCAST=INTERPRET,
    )
    dx = torch.empty((n_tok, n), dtype=x.dtype, device=x.device)
    _lost_dx_kernel[_grid(n_tok, n)](
        dh_ptr=dh,
        a_ptr=a,
        tk_ptr=tk,
        inv_ptr=inverse_index(index, n),
        dx_ptr=dx,
        N=n_tok,
        C=n,
        R=r,
        s_hn=dh.stride(0),
        s_hr=dh.stride(1),
        s_ac=a.stride(0),
        s_ar=a.stride(1),
        s_tn=tk.stride(0),
        s_tk=tk.stride(1),
        s_xn=dx.stride(0),
        s_xc=dx.stride(1),
        PREC=prec,
        UPCAST=INTERPRET,
    )
    dws = _grad_sparse(dy, x, index, ws, gamma, prec)  # (m, k)
    h = hpre if code == 0 else _phi_torch(hpre, phi)
    db = torch.mm(h.t(), dy).mul_(gamma.to(dy.dtype))  # (r, m)
    da = torch.mm(x.t(), dh)  # (n, r)
    return dx, da, db, dws


def _grad_sparse(
    dy: torch.Tensor, x: torch.Tensor, index: torch.Tensor, ws: torch.Tensor, gamma: torch.Tensor, prec: str
) -> torch.Tensor:
    """dW_s (m, k) = (1 − γ) · dYᵀ x[:, I], split over tokens into float32 partial sums."""
    n_tok, m, k = x.shape[0], ws.shape[0], ws.shape[1]
    if not k:
        return torch.zeros_like(ws)
    splits = _splits(n_tok, m, k, x.device)
    per = triton.cdiv(n_tok, splits)
    part = torch.empty((splits, m, k), dtype=torch.float32, device=x.device)

    def dws_grid(meta):
        return (triton.cdiv(m, meta["BM"]), triton.cdiv(k, meta["BN"]), splits)

    _lost_dws_kernel[dws_grid](
        dy_ptr=dy,
        x_ptr=x,
        idx_ptr=index,
        part_ptr=part,
        N=n_tok,
        M=m,
        K=k,
        tokens_per_split=per,
        s_dn=dy.stride(0),
        s_dm=dy.stride(1),
        s_xn=x.stride(0),
        s_xc=x.stride(1),
        PREC=prec,
        UPCAST=INTERPRET,
    )
    return part.sum(0).mul_(1.0 - gamma).to(ws.dtype)


def _phi_torch(h: torch.Tensor, phi: str) -> torch.Tensor:
    return apply_phi(h.float(), phi).to(h.dtype)
