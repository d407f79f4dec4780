"""Loss-based sample reweighting (Sow et al., ICLR 2025, arXiv 2502.06733).

Per micro-batch, with ℓ the per-row losses gathered over every data-parallel rank:

    x = (2ℓ − ℓ_max − ℓ_min) / max(ℓ_max − ℓ_min, 1e-6)      min-max to [−1, 1]; all equal -> 0
    w = softmax(f(x) / r)                                     over the global batch, no gradient

with f = ``linupper`` min(x + 1, 1), ``quadratic`` 1 − x², ``extremes`` |x|, or ``uniform`` (plain
mean). Each rank takes its slice of w by its *global* rank (the reference FMS code slices by local
rank, which is wrong on more than one node) and uses the loss Σ_local w_i ℓ_i · world_size, so after
DDP's gradient averaging the gradient is Σ_global w_i ∇ℓ_i. Weights are normalised per micro-batch
(the reference behaviour): with gradient accumulation each micro-batch's weights sum to 1 and the
micro-batch losses are averaged, exactly as unweighted losses are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")


def normalise(losses: torch.Tensor) -> torch.Tensor:
    """Min-max map to [−1, 1] (ℓ_min -> −1, ℓ_max -> 1); invariant to positive affine maps."""
    lo, hi = losses.min(), losses.max()
    return (2 * losses - hi - lo) / torch.clamp(hi - lo, min=1e-6)


def strategy_values(x: torch.Tensor, strategy: str) -> torch.Tensor:
    """f(x) for x in [−1, 1]; every strategy maps into [0, 1]."""
    if strategy == "linupper":
        return torch.clamp(x + 1, max=1.0)
    if strategy == "quadratic":
        return 1 - x * x
    if strategy == "extremes":
        return x.abs()
    if strategy == "uniform":
        return torch.zeros_like(x)
    raise ValueError(f"unknown reweighting strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


@torch.no_grad()
def sample_weights(losses: torch.Tensor, strategy: str, r: float) -> torch.Tensor:
    """Weights for the (global) per-row ``losses`` (1-D): same shape, sum to 1, no gradient.

    ``uniform`` gives exactly 1/n. Since f ∈ [0, 1], w_max / w_min ≤ e^{1/r}.
    """
    if losses.ndim != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
    if r <= 0:
        raise ValueError(f"r must be > 0, got {r}")
    x = normalise(losses.detach().float())
    if strategy == "uniform":
        return torch.full_like(x, 1.0 / x.numel())
    return torch.softmax(strategy_values(x, strategy) / r, dim=0)


@dataclass
class WeightStats:
    """What gets logged as ``reweight/*`` each step (averaged over micro-batches)."""

    l_min: float
    l_max: float
    mean_loss: float
    ess_frac: float  # effective sample size / n = 1 / (n Σ w²)
    max_wn: float  # max(w)·n: 1 for uniform
    min_wn: float

    @classmethod
    def of(cls, losses: torch.Tensor, weights: torch.Tensor) -> WeightStats:
        n = weights.numel()
        return cls(
            l_min=losses.min().item(),
            l_max=losses.max().item(),
            mean_loss=losses.mean().item(),
            ess_frac=1.0 / (n * weights.double().pow(2).sum().item()),
            max_wn=weights.max().item() * n,
            min_wn=weights.min().item() * n,
        )

    @classmethod
    def mean(cls, stats: list[WeightStats]) -> WeightStats:
        return cls(**{k: math.fsum(getattr(s, k) for s in stats) / len(stats) for k in cls.__dataclass_fields__})

    def scalars(self) -> dict[str, float]:
        return {f"reweight/{k}": v for k, v in vars(self).items()}
