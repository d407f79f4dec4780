"""Scaling-law fitter: L(N, D) = E + A / N^α + B / D^β.

Two methods:

* ``chinchilla`` (default): Hoffmann et al.'s Approach 3 as replicated by Besiroglu et al. 2024:
  minimise Σ_i Huber_δ(LSE(a − α log N_i, b − β log D_i, e) − log L_i) (δ = 1e-3, summed, not
  averaged) with L-BFGS-B from a grid of starts, A = e^a, B = e^b, E = e^e. The gradient is
  analytic, so the full 4,500-start grid takes seconds.
* ``colpret``: the Hitchhiker's Guide code path (Choshen et al. 2025): ``scipy.optimize.curve_fit``
  on squared error in loss space from Muennighoff et al.'s start, α, β ≥ 0.

Both report the objective, all five parameters, which bounds they hit, and (on request) bootstrap
intervals that resample whole runs when run ids are given (checkpoints of a run are correlated).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from leanlm.engine.errors import DataError

# Bounds on (a, b, e, α, β); a bound that is hit is reported, never silently accepted.
BOUNDS = ((-10.0, 50.0), (-10.0, 50.0), (-5.0, 5.0), (0.0, 3.0), (0.0, 3.0))
NAMES = ("a", "b", "e", "alpha", "beta")
MUENNIGHOFF_P0 = (6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596)  # ColPret's single start


def chinchilla_grid(size: str = "full") -> list[tuple[float, ...]]:
    """Starts (a, b, e, α, β): ``full`` is Hoffmann's 4,500-point grid; ``small`` a 108-point subset."""
    alphas: Sequence[float]
    betas: Sequence[float]
    es: Sequence[float]
    abs_: Sequence[float]
    if size == "full":
        alphas = betas = np.arange(0.0, 2.01, 0.5).tolist()
        es = np.arange(-1.0, 1.01, 0.5).tolist()
        abs_ = np.arange(0.0, 25.1, 5.0).tolist()
    else:
        alphas = betas = (0.5, 1.0)
        es = (-1.0, 0.0, 1.0)
        abs_ = (0.0, 5.0, 10.0)
    return [(a, b, e, al, be) for a, b, e, al, be in itertools.product(abs_, abs_, es, alphas, betas)]


@dataclass
class FitResult:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    n_points: int
    method: str
    bounds_hit: list[str] = field(default_factory=list)
    intervals: dict[str, tuple[float, float]] | None = None

    def predict(self, N, D) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L at C = 6·N·D (Hoffmann et al.'s frontier)."""
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return G * (flops / 6.0) ** (self.beta / s), (flops / 6.0) ** (self.alpha / s) / G

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"method {self.method}, {self.n_points} points, objective {self.objective:.10g}"]
        for k in ("E", "A", "B", "alpha", "beta"):
            ci = f"  95% CI [{self.intervals[k][0]:.6g}, {self.intervals[k][1]:.6g}]" if self.intervals else ""
            lines.append(f"  {k:<6} {getattr(self, k):>14.6g}{ci}")
        lines.append(f"  bounds hit: {', '.join(self.bounds_hit) if self.bounds_hit else 'none'}")
        return "\n".join(lines)


def check_inputs(num_params, tokens, losses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of equal length, finite and positive, with at least 3 distinct model sizes."""
    N, D, L = (np.asarray(x, dtype=float).ravel() for x in (num_params, tokens, losses))
    if not (len(N) == len(D) == len(L)):
        raise DataError(f"num_params, tokens and losses differ in length ({len(N)}, {len(D)}, {len(L)})")
    for name, x in (("num_params", N), ("tokens", D), ("losses", L)):
        if not np.all(np.isfinite(x)):
            raise DataError(f"{name} contains NaN or infinite values; drop those rows")
        if np.any(x <= 0):
            raise DataError(f"{name} must be positive (got min {x.min():g}); are tokens/losses in log units?")
    if len(np.unique(N)) < 3:
        raise DataError(f"a scaling law needs at least 3 distinct model sizes, got {len(np.unique(N))}")
    if np.max(L) > 50:
        raise DataError(f"losses up to {np.max(L):g}: these look like perplexities; pass loss = ln(ppl) in nats")
    return N, D, L


def _huber_objective(x: np.ndarray, logN, logD, logL, delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber of log-space residuals, and its gradient in (a, b, e, α, β)."""
    a, b, e, al, be = x
    t = np.stack([a - al * logN, b - be * logD, np.full_like(logN, e)])  # (3, n)
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - logL  # residual of log L̂
    soft = w / s  # d LSE / d t_k
    small = np.abs(r) <= delta
    h = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    dh = np.where(small, r, delta * np.sign(r))
    grad = np.array(
        [
            np.sum(dh * soft[0]),
            np.sum(dh * soft[1]),
            np.sum(dh * soft[2]),
            np.sum(dh * soft[0] * -logN),
            np.sum(dh * soft[1] * -logD),
        ]
    )
    return float(h.sum()), grad


def _fit_chinchilla(N, D, L, *, delta: float, grid: str) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    best_x, best_f = None, math.inf
    for x0 in chinchilla_grid(grid):  # tight tolerances: the summed objective is ~1e-3
        res = minimize(
            _huber_objective,
            np.array(x0, dtype=float),
            args=(logN, logD, logL, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=BOUNDS,
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise DataError("the fit failed from every start; check the data")
    return best_x, best_f


def _fit_colpret(N, D, L) -> tuple[np.ndarray, float]:
    from scipy.optimize import curve_fit

    def law(X, a, b, e, al, be):
        n, d = X
        return np.exp(e) + np.exp(a) / n**al + np.exp(b) / d**be

    lo, hi = zip(*BOUNDS)
    try:
        x, _ = curve_fit(law, (N, D), L, p0=MUENNIGHOFF_P0, bounds=(lo, hi), maxfev=20000)
    except RuntimeError:
        x, _ = curve_fit(law, (N, D), L, p0=MUENNIGHOFF_P0, bounds=(lo, hi), method="dogbox", maxfev=20000)
    return x, float(np.sum((law((N, D), *x) - L) ** 2))


def _to_result(x: np.ndarray, objective: float, n: int, method: str) -> FitResult:
    hit = [name for name, v, (lo, hi) in zip(NAMES, x, BOUNDS) if min(abs(v - lo), abs(v - hi)) < 1e-6]
    a, b, e, al, be = (float(v) for v in x)
    return FitResult(
        E=math.exp(e),
        A=math.exp(a),
        B=math.exp(b),
        alpha=al,
        beta=be,
        objective=objective,
        n_points=n,
        method=method,
        bounds_hit=hit,
    )


def fit(
    num_params,
    tokens,
    losses,
    method: str = "chinchilla",
    delta: float = 1e-3,
    grid: str = "full",
    bootstrap: int = 0,
    groups=None,
    seed: int = 0,
) -> FitResult:
    """Fit L(N, D) = E + A/N^α + B/D^β to (num_params, tokens, losses in nats).

    ``bootstrap`` > 0 adds 95% intervals from that many refits on resampled data; with ``groups``
    (a run id per point) whole runs are resampled. Bootstrap refits start from the best fit.
    """
    from threadpoolctl import threadpool_limits

    N, D, L = check_inputs(num_params, tokens, losses)
    if method not in ("chinchilla", "colpret"):
        raise ValueError(f"unknown method {method!r}; choose chinchilla or colpret")
    # L-BFGS-B calls BLAS on 5-vectors thousands of times; a multi-threaded OpenBLAS turns each
    # call into a thread hand-off and, on a loaded machine, the fit 50x slower. One thread.
    with threadpool_limits(limits=1, user_api="blas"):
        x, obj = _fit_chinchilla(N, D, L, delta=delta, grid=grid) if method == "chinchilla" else _fit_colpret(N, D, L)
        result = _to_result(x, obj, len(L), method)
        if bootstrap:
            result.intervals = _bootstrap(
                N, D, L, x, method=method, delta=delta, rounds=bootstrap, groups=groups, seed=seed
            )
    return result


def _bootstrap(N, D, L, x_best, *, method, delta, rounds, groups, seed) -> dict[str, tuple[float, float]]:
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    ids = np.asarray(groups) if groups is not None else np.arange(len(L))
    units = np.unique(ids)
    samples = []
    for _ in range(rounds):
        pick = rng.choice(units, size=len(units), replace=True)
        idx = np.concatenate([np.flatnonzero(ids == u) for u in pick])
        if len(np.unique(N[idx])) < 3:
            continue
        if method == "chinchilla":
            res = minimize(
                _huber_objective,
                x_best,
                args=(np.log(N[idx]), np.log(D[idx]), np.log(L[idx]), delta),
                jac=True,
                method="L-BFGS-B",
                bounds=BOUNDS,
                options={"ftol": 1e-15, "gtol": 1e-12},
            )
            x = res.x
        else:
            x, _ = _fit_colpret(N[idx], D[idx], L[idx])
        samples.append([math.exp(x[2]), math.exp(x[0]), math.exp(x[1]), x[3], x[4]])
    arr = np.array(samples)
    return {
        k: (float(np.percentile(arr[:, i], 2.5)), float(np.percentile(arr[:, i], 97.5)))
        for i, k in enumerate(("E", "A", "B", "alpha", "beta"))
    }


def absolute_relative_error(result: FitResult, N, D, L) -> float:
    """Mean |L − L̂| / L over the given points (the Hitchhiker's Guide's ARE)."""
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    return float(np.mean(np.abs(L - result.predict(N, D)) / L))
