"""LOST (Li et al., arXiv 2508.02668): low-rank plus channel-sparse linear layers, SVD-initialised.

A dense ``nn.Linear`` W (out m × in n) becomes::

    y = γ·φ(x A) B + (1 − γ)·x[:, I] W_sᵀ

with A = ``lowrank_in`` (n, r), B = ``lowrank_out`` (r, m), W_s = ``sparse`` (m, k) holding
k = max(1, ⌊ρ·n⌋) whole input channels, I = ``index`` (sorted, unique, fixed at initialisation)
and γ an explicit scale kept as a buffer (folding it into the weights would change what Adam
does). ``from_dense`` initialises from the dense layer: A, B from the top-r singular triplets of
W0 with √Σ split evenly (x A B is the best rank-r approximation of x W0ᵀ), channels scored by the
column norms of the remaining spectrum W_comp = Σ_{i>r} σ_i u_i v_iᵀ, and W_s from W0's (or
W_comp's) selected columns.

With FRUGAL, the three matrices are projectable tensors. FRUGAL's "columns" are a tensor's dim 1:
for ``lowrank_in`` (n, r) they are rank directions, for ``lowrank_out`` (r, m) output features and
for ``sparse`` (m, k) the kept input channels.

Ablation switches: ``init="random"`` (A, B not from the SVD), any γ (γ=1: pure low-rank),
``values_init="wcomp_cols"``, selectors ``random`` / ``w0_colnorm`` / ``svd_rem_l1``, and
``support="unstructured"``: SLTrain's uniformly random fixed support with the same parameter count
(m·k entries), computed by materialising the sparse matrix (as SLTrain does).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlm.kernels.dispatch import PHIS
from leanlm.kernels.lost_linear import lost_linear

SELECTORS = ("svd_rem_l2", "svd_rem_l1", "random", "w0_colnorm")
VALUES_INIT = ("w0_cols", "wcomp_cols")
SUPPORTS = ("channels", "unstructured")
SVD_SOLVERS = ("full", "lowrank")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def num_channels(in_features: int, density: float) -> int:
    """k = max(1, ⌊ρ·n⌋)."""
    return max(1, int(density * in_features + 1e-9))


class LOSTLinear(nn.Module):
    """Low-rank + channel-sparse replacement for ``nn.Linear`` (no bias unless asked)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        channel_density: float = 0.05,
        gamma: float = 0.5,
        phi: str = "silu",
        bias: bool = False,
        support: str = "channels",
        init_std: float = 0.02,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if phi not in PHIS:
            raise ValueError(f"phi={phi!r}: choose one of {', '.join(PHIS)}")
        if support not in SUPPORTS:
            raise ValueError(f"support={support!r}: choose one of {', '.join(SUPPORTS)}")
        if not 0 < rank:
            raise ValueError(f"rank must be >= 1, got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.phi, self.support, self.init_std = phi, support, init_std
        k = num_channels(in_features, channel_density)
        self.lowrank_in = nn.Parameter(torch.empty(in_features, rank, **kw))  # A: (n, r)
        self.lowrank_out = nn.Parameter(torch.empty(rank, out_features, **kw))  # B: (r, m)
        if support == "channels":
            self.sparse = nn.Parameter(torch.empty(out_features, k, **kw))  # W_s: (m, k)
            self.register_buffer("index", torch.arange(k, device=device))  # I: (k,)
        else:  # same parameter count, uniformly random entries of the (m, n) matrix
            self.sparse = nn.Parameter(torch.empty(out_features * k, **kw))  # (m·k,)
            self.register_buffer("index", torch.arange(out_features * k, device=device))  # flat
        self.register_buffer("gamma", torch.tensor(float(gamma), **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random init (the ``init="random"`` ablation): x A B has the spread of a dense layer
        initialised with std ``init_std``; channels drawn at random."""
        std = math.sqrt(self.init_std / math.sqrt(self.rank))
        with torch.no_grad():
            for p, s in (
                (self.lowrank_in, std),
                (self.lowrank_out, std),
                (self.sparse, self.init_std),
            ):
                if p.device.type != "meta":
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * s)
            if self.index.device.type != "meta":
                size = self.in_features if self.support == "channels" else self.in_features * self.out_features
                picks = torch.randperm(size, generator=generator)[: self.index.numel()].sort().values
                self.index.copy_(picks)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, W_s) as the forward uses them (an int8 layer dequantizes them here)."""
        return self.lowrank_in, self.lowrank_out, self.sparse

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (what dtype probes of a linear layer ask for)."""
        return self.lowrank_in.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense (m, n) weight this layer equals, when one exists (``phi="identity"``):
        W = γ·(A B)ᵀ + (1 − γ)·W_s scattered into columns I. Computed from the parameters on each
        read, with gradients flowing to them, so modules that pass ``.weight`` to a functional
        call (``nn.MultiheadAttention``'s ``out_proj``, ``TransformerEncoderLayer``'s fast path)
        compute exactly what this layer does. With a nonlinear φ there is none: AttributeError."""
        if self.phi != "identity":
            raise AttributeError(self._no_weight())
        g = self.gamma.to(self.lowrank_in.dtype)
        dense = g * (self.lowrank_in @ self.lowrank_out).T  # (m, n)
        rest = (1 - g) * self.sparse
        if self.support == "channels":
            return dense.index_add(1, self.index, rest)
        return dense.reshape(-1).index_add(0, self.index, rest).view_as(dense)

    def _no_weight(self) -> str:
        return (
            f"LOSTLinear(phi={self.phi!r}) has no dense weight: y = γ·{self.phi}(x A) B + (1 − γ)·x[:, I] W_sᵀ is "
            "not linear in x. A module that reads .weight (nn.MultiheadAttention's out_proj, "
            "TransformerEncoderLayer's fast path, an attention dtype probe) cannot use it: leave that layer out "
            "of convert's targets, or convert with phi='identity'"
        )

    def __getattr__(self, name: str):
        if name == "weight":  # the property raised: keep its message (nn.Module's would drop it)
            raise AttributeError(self._no_weight())
        return super().__getattr__(name)

    def to_dense(self) -> nn.Linear:
        """The exactly equal ``nn.Linear`` (``phi="identity"`` only; a one-line ValueError otherwise)."""
        if self.phi != "identity":
            raise ValueError(self._no_weight().replace("AttributeError", ""))
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.lowrank_in.device
        ).to(self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., n) -> (..., m)
        if self.support == "channels":
            y = lost_linear(x, *self.factors(), self.index, self.gamma, self.phi)
        else:
            dense = torch.zeros(
                self.out_features * self.in_features,
                dtype=self.sparse.dtype,
                device=self.sparse.device,
            )
            dense = dense.index_add(0, self.index, self.sparse).view(self.out_features, self.in_features)
            empty = self.sparse.new_zeros(self.out_features, 0)
            y = lost_linear(x, self.lowrank_in, self.lowrank_out, empty, self.index[:0], self.gamma, self.phi)
            y = y + (1 - self.gamma) * (x @ dense.T)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"k={self.sparse.shape[-1] if self.support == 'channels' else self.sparse.numel()}, "
            f"gamma={float(self.gamma):g}, phi={self.phi}, support={self.support}"
        )

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        rank: int,
        channel_density: float = 0.05,
        gamma: float = 0.5,
        phi: str = "silu",
        select: str = "svd_rem_l2",
        values_init: str = "w0_cols",
        init: str = "svd",
        support: str = "channels",
        svd_components: int = 0,
        seed: int = 0,
        svd_solver: str = "full",
    ) -> LOSTLinear:
        """A LOST layer initialised from ``linear`` (SVD in float32; see the module docstring).

        ``svd_components`` caps W_comp at that many components after the top r (0 = all of them).
        ``svd_solver="lowrank"``: the top r triplets from ``torch.svd_lowrank`` (randomised, 2 power
        iterations, seeded by ``seed``) and W_comp = W0 - U_r Σ_r V_rᵀ; 3-4x faster on a 4096 x
        11008 matrix than the full SVD, which a 7B conversion does 224 times. No SVD at all when
        nothing needs it (``init="random"`` with a ``random`` or ``w0_colnorm`` selector).
        """
        if (
            select not in SELECTORS
            or values_init not in VALUES_INIT
            or init not in ("svd", "random")
            or svd_solver not in SVD_SOLVERS
        ):
            raise ValueError(
                f"select={select!r} / values_init={values_init!r} / init={init!r} / svd_solver={svd_solver!r}: "
                f"choose select from {SELECTORS}, values_init from {VALUES_INIT}, init from ('svd', 'random'), "
                f"svd_solver from {SVD_SOLVERS}"
            )
        W0 = linear.weight.detach()
        m, n = W0.shape
        rank = min(rank, m, n)
        layer = cls(
            n,
            m,
            rank,
            channel_density,
            gamma,
            phi,
            bias=linear.bias is not None,
            support=support,
            device=W0.device,
            dtype=W0.dtype,
        )
        gen = torch.Generator().manual_seed(seed)
        layer.reset_parameters(gen)
        W = W0.float()
        needs_svd = init == "svd" or select.startswith("svd") or values_init == "wcomp_cols"
        if needs_svd:
            U, S, Vh, W_comp = _svd_split(W, rank, svd_components, svd_solver, seed)
        else:
            W_comp = W
        with torch.no_grad():
            if init == "svd":
                root = S[:rank].sqrt()
                layer.lowrank_in.copy_((Vh[:rank].T * root).to(W0.dtype))  # A = V_r √Σ_r: (n, r)
                layer.lowrank_out.copy_((root[:, None] * U[:, :rank].T).to(W0.dtype))  # B = √Σ_r U_rᵀ: (r, m)
            if support == "channels":
                k = layer.index.numel()
                index = select_channels(W, W_comp, k, select, gen)
                layer.index.copy_(index)
                source = W if values_init == "w0_cols" else W_comp
                layer.sparse.copy_(source[:, index].to(W0.dtype))
            else:
                source = (W if values_init == "w0_cols" else W_comp).reshape(-1)
                layer.sparse.copy_(source[layer.index].to(W0.dtype))
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer


def _svd_split(
    W: torch.Tensor, rank: int, svd_components: int, solver: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh holding at least the top ``rank`` triplets of W (m, n), and W_comp (m, n): the
    spectrum after them (capped at ``svd_components`` components when > 0)."""
    m, n = W.shape
    if solver == "full" or svd_components > 0 or W.device.type == "meta":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # W = U diag(S) Vh
        end = S.numel() if svd_components <= 0 else min(S.numel(), rank + svd_components)
        return U, S, Vh, (U[:, rank:end] * S[rank:end]) @ Vh[rank:end]
    q = min(rank + 16, m, n)  # oversampled, as randomised SVD needs
    cuda = [W.device.index or 0] if W.is_cuda else []
    with torch.random.fork_rng(devices=cuda):  # its random test matrix: seeded, global RNG untouched
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=q, niter=2)
    Vh = V.T
    return U, S, Vh, W - (U[:, :rank] * S[:rank]) @ Vh[:rank]


def select_channels(W: torch.Tensor, W_comp: torch.Tensor, k: int, select: str, gen: torch.Generator) -> torch.Tensor:
    """The k input channels (columns) to keep, sorted: top-k column norms of the remaining
    spectrum (L2 or L1), of W itself, or uniformly random."""
    n = W.shape[1]
    if select == "random":
        return torch.randperm(n, generator=gen)[:k].sort().values.to(W.device)
    scores = W.norm(dim=0) if select == "w0_colnorm" else W_comp.norm(p=2 if select == "svd_rem_l2" else 1, dim=0)
    return torch.topk(scores, k).indices.sort().values


@dataclass
class ConversionReport:
    """Parameters before and after, per target name (``q_proj``, ...), and in total."""

    per_target: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (count, before, after)
    total_before: int = 0
    total_after: int = 0

    def table(self) -> str:
        lines = [
            "| module | layers | dense params | LOST params | ratio |",
            "|---|---|---|---|---|",
        ]
        for name, (count, before, after) in self.per_target.items():
            lines.append(f"| {name} | {count} | {before:,} | {after:,} | {after / before:.3f} |")
        lines.append(
            f"| model total | | {self.total_before:,} | {self.total_after:,} | "
            f"{self.total_after / self.total_before:.3f} |"
        )
        return "\n".join(lines)


def is_lost_target(name: str, module: nn.Module, targets: tuple[str, ...] = LLAMA_TARGETS) -> bool:
    """Whether ``convert`` replaces this module: a dense layer (``nn.Linear`` or GPT-2's
    ``Conv1D``) whose name's last part is one of ``targets``."""
    return _is_dense(module) and name.rpartition(".")[2] in targets


def lost_targets(model: nn.Module, targets: tuple[str, ...] = LLAMA_TARGETS) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer ``convert`` replaces, in module order (layer i's channel draw
    is seeded by ``seed + i``)."""
    return [(name, mod) for name, mod in model.named_modules() if is_lost_target(name, mod, targets)]


# make_layer(dense, seed) -> the LOST layer replacing ``dense`` (an nn.Linear, possibly on the meta
# device); ``seed`` is that layer's own seed.
LayerFactory = Callable[[nn.Linear, int], "LOSTLinear"]


def convert(
    model: nn.Module,
    rank: int,
    channel_density: float = 0.05,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    *,
    make_layer: LayerFactory | None = None,
    **options,
) -> ConversionReport:
    """Replace every ``nn.Linear`` (or GPT-2-style ``Conv1D``, whose weight is stored transposed)
    whose name ends in one of ``targets`` by ``LOSTLinear.from_dense``.

    ``make_layer(dense, seed)``: builds each LOST layer instead of ``from_dense(dense, rank,
    channel_density, seed=seed, **options)``, e.g. to materialise a meta model's layer on a device
    first, one layer at a time (the engine's large-model build); the walk, the per-layer seeds and
    the swap stay here.

    Works on any module tree (ours, a Hugging Face model, an ``nn.Sequential`` with ``targets``
    naming its children). Embeddings, the output head and norms are untouched. ``options`` go to
    ``from_dense`` (gamma, phi, select, values_init, init, support, svd_components, svd_solver,
    seed); each layer's channel draw is seeded by ``seed`` plus its position, so conversion is
    reproducible. A model with a Hugging Face ``config`` records the options in it
    (``config.leanlm_lost``), so ``save_pretrained`` keeps them and ``from_pretrained`` (this
    module's) restores the model in one call.

    LOST with the defaults (γ 0.5, SiLU) is a re-parameterisation for pretraining from a dense
    *init*: the converted model computes another function. ``gamma=1.0, phi="identity"`` and a
    full rank reproduce the dense layer exactly (and ``unconvert`` folds such layers back).
    """
    report = ConversionReport(total_before=sum(p.numel() for p in model.parameters()))
    seed = options.pop("seed", 0)
    found = lost_targets(model, targets)
    if not found:
        done = [n for n, m in model.named_modules() if isinstance(m, LOSTLinear) and n.split(".")[-1] in targets]
        if done:
            raise ValueError(f"this model is already LOST-converted ({len(done)} layers named {', '.join(targets)})")
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if _is_dense(m)})
        raise ValueError(
            f"no nn.Linear or Conv1D named {', '.join(targets)} in this model; its linear layers are named "
            f"{', '.join(names) or '(none)'}: pass targets="
        )
    phi = options.get("phi", "silu")
    for name, _ in found:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if phi != "identity" and isinstance(parent, WEIGHT_READERS):
            raise ValueError(
                f"{name}: {type(parent).__name__} reads its .weight, which a LOST layer with phi={phi!r} does not "
                "have; leave it out of targets or pass phi='identity'"
            )
    if make_layer is None:

        def make_layer(dense: nn.Linear, layer_seed: int) -> LOSTLinear:
            return LOSTLinear.from_dense(dense, rank, channel_density, seed=layer_seed, **options)

    for i, (name, dense) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = _as_linear(dense)
        lost = make_layer(linear, seed + i)
        before, after = linear.weight.numel(), sum(p.numel() for p in lost.parameters())
        if after > before:
            warnings.warn(
                f"LOST rank {lost.rank} makes {name} ({lost.out_features} x {lost.in_features}) larger than dense: "
                f"{after:,} parameters vs {before:,}; ranks below ~m·n/(m + n) save memory",
                stacklevel=2,
            )
        setattr(parent, child, lost)
        count, b, a = report.per_target.get(child, (0, 0, 0))
        report.per_target[child] = (count + 1, b + before, a + after)
    report.total_after = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config.leanlm_lost = {"rank": rank, "channel_density": channel_density, "targets": list(targets), **options}
    return report


# Modules that pass a child's ``.weight`` to a functional call instead of calling the child.
WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _is_dense(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a GPT-2-style ``Conv1D`` (weight (in, out), y = x W + b)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2


def _as_linear(module: nn.Module) -> nn.Linear:
    """The module as an ``nn.Linear`` (a Conv1D's weight transposed into (out, in))."""
    if isinstance(module, nn.Linear):
        return module
    weight, bias = module.weight, getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor to convert")
    n, m = weight.shape
    linear = nn.Linear(n, m, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().T, requires_grad=False)
    if isinstance(bias, torch.Tensor):
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def unconvert(model: nn.Module) -> int:
    """Fold every LOST layer back into the ``nn.Linear`` it equals (``phi="identity"``); refuses
    in one line, before changing anything, when a layer has no dense equivalent. Returns the count."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LOSTLinear)]
    for name, layer in found:
        if layer.phi != "identity":
            raise ValueError(f"{name}: {layer._no_weight()}")
    for name, layer in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.to_dense())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "leanlm_lost"):
        del config.leanlm_lost
    return len(found)


def from_pretrained(model_cls: Any, path: str | Path, **kwargs: Any) -> nn.Module:
    """A Hugging Face model saved after ``convert`` (``save_pretrained``), restored in one call:
    the model is built from its config, converted with the recorded options (no SVD: the weights
    come from the checkpoint) and loaded, tied weights included. ``kwargs`` go to
    ``model_cls.from_pretrained`` when the folder holds no LOST options (a plain model)."""
    config = model_cls.config_class.from_pretrained(path)
    options = dict(getattr(config, "leanlm_lost", None) or {})
    if not options:
        return model_cls.from_pretrained(path, **kwargs)
    model = model_cls(config)
    rank, density, targets = options.pop("rank"), options.pop("channel_density"), tuple(options.pop("targets"))
    options.update(init="random", select="random", values_init="w0_cols")  # no SVD: overwritten below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size warnings were given at the first conversion
        convert(model, rank, density, targets=targets, **options)
    state = _read_state(Path(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the LOST model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.config.leanlm_lost = dict(config.leanlm_lost)
    return model.eval()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a ``save_pretrained`` folder (safetensors, sharded or not; or torch files)."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    state = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state
