"""Weighted mixtures: ``data.mix=[{name, source, weight}, ...]``.

Each source is packed on its own (a row never mixes sources) and shuffled by a seed keyed by its
name, so adding a source reshuffles nothing else. Which source the row at global position p comes
from is a fixed function of p: positions go in blocks of ``BLOCK``; in each block every source gets
its share of the rows (largest remainders of weight x BLOCK), in an order drawn from (seed, block).
A row's place in its source's own order is the number of that source's rows before it, so any
position is computable without history: the same rows for any world size and micro-batch split,
and the stream's state is the global position (plus the mixture, which a resume must keep).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanlm.engine.config import RunConfig
from leanlm.engine.data.corpus import Corpus, PackedTokens
from leanlm.engine.errors import DataError

BLOCK = 4096  # positions per assignment block (proportions exact to 1/BLOCK in every block)
MAX_EPOCHS = 4.0  # repeating a source more than ~4 times stops helping (Muennighoff et al. 2023)


def block_counts(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Rows per source in a block: weight shares rounded by largest remainders (sum = block)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    exact = w * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    return counts


def source_seed(seed: int, name: str) -> int:
    """Each source's own shuffle seed: keyed by its name, not its position in the list."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


class MixedTokens:
    """Rows drawn from several ``PackedTokens`` by the fixed position -> (source, row) map.

    ``stages``: (first global position, weights) of later mixtures; each stage's blocks start at
    its own first position and draw their order from (seed, stage, block). A source's row index
    counts its rows in every earlier stage, so positions stay computable without history."""

    def __init__(
        self,
        sources: list[PackedTokens],
        names: list[str],
        weights: list[float],
        *,
        batch_size: int,
        micro: int,
        rank: int,
        world: int,
        seed: int,
        stages: list[tuple[int, list[float]]] | None = None,
    ) -> None:
        self.sources, self.names, self.weights = sources, names, [float(w) for w in weights]
        self.stages = [(0, self.weights), *[(int(p), [float(w) for w in ws]) for p, ws in stages or []]]
        self.counts = [block_counts(ws) for _, ws in self.stages]  # rows per source per block, each stage
        self.batch_size, self.micro, self.rank, self.world, self.seed = batch_size, micro, rank, world, seed
        self.position = 0
        self._key: tuple[int, int] = (-1, -1)
        self._order, self._before = np.zeros(0, np.int64), np.zeros((0, 0), np.int64)
        self.last_sources: list[torch.Tensor] = []  # this rank's row sources of the last step

    def _load_block(self, stage: int, block: int) -> None:
        if (stage, block) == self._key:
            return
        counts = self.counts[stage]
        order = np.repeat(np.arange(len(counts)), counts)
        np.random.default_rng([self.seed, 7919, stage, block]).shuffle(order)
        onehot = np.eye(len(counts), dtype=np.int64)[order]  # (BLOCK, sources)
        self._order, self._before = order, np.cumsum(onehot, axis=0) - onehot  # rows of each source before i
        self._key = (stage, block)

    def _taken(self, stage: int, length: int) -> np.ndarray:
        """Rows of each source in the first ``length`` positions of ``stage``: (sources,)."""
        block, i = divmod(length, BLOCK)
        done = block * self.counts[stage]
        if i:
            self._load_block(stage, block)
            done = done + self._before[i - 1] + np.eye(len(self.names), dtype=np.int64)[self._order[i - 1]]
        return done

    def _stage_of(self, p: int) -> int:
        return max(k for k, (first, _) in enumerate(self.stages) if first <= p)

    def locate(self, p: int) -> tuple[int, int]:
        """(source, its row index) of global position ``p``."""
        k = self._stage_of(p)
        earlier = sum(
            (self._taken(j, self.stages[j + 1][0] - self.stages[j][0]) for j in range(k)),
            np.zeros(len(self.names), np.int64),
        )
        block, i = divmod(p - self.stages[k][0], BLOCK)
        self._load_block(k, block)
        s = int(self._order[i])
        return s, int(earlier[s] + block * self.counts[k][s] + self._before[i, s])

    def rows(self, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        found = [self.locate(p) for p in positions]
        rows = torch.cat([self.sources[s].rows(range(k, k + 1)) for s, k in found])
        return rows, torch.tensor([s for s, _ in found], dtype=torch.int64)

    def next_step(self) -> list[torch.Tensor]:
        p0, m, W = self.position, self.micro, self.world
        batches, self.last_sources = [], []
        for j in range(self.batch_size // (m * W)):
            rows, src = self.rows(range(p0 + (j * W + self.rank) * m, p0 + (j * W + self.rank + 1) * m))
            batches.append(rows)
            self.last_sources.append(src)
        self.position += self.batch_size
        return batches

    def epochs(self) -> dict[str, float]:
        """How many times each source has been read through so far."""
        k = self._stage_of(self.position)
        done = sum(
            (self._taken(j, self.stages[j + 1][0] - self.stages[j][0]) for j in range(k)),
            np.zeros(len(self.names), np.int64),
        ) + self._taken(k, self.position - self.stages[k][0])
        return {n: float(done[s]) / self.sources[s].n for s, n in enumerate(self.names)}

    def _signature(self, upto: int) -> list:
        """What a resume at global position ``upto`` must find again: the sources and every stage
        that has supplied rows by then (later stages may still be declared or changed)."""
        base = [[n, w, src.n] for n, w, src in zip(self.names, self.weights, self.sources)]
        return [base, [[p, ws] for p, ws in self.stages[1:] if p < upto]]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "mixture",
            "position": self.position,
            "mixture": self._signature(self.position),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = int(state.get("position", -1))
        saved = json.loads(json.dumps(state.get("mixture")))  # tuples and lists alike
        if state.get("kind") != "mixture" or saved != json.loads(json.dumps(self._signature(position))):
            raise DataError(
                f"the checkpoint was trained on another mixture ({state.get('mixture')}, now "
                f"{self._signature(position)}); resume with the same data.mix, or declare a change in "
                "data.mix_stages from a later step"
            )
        self.position = position


def mixture_corpus(cfg: RunConfig, tokenizer_file: Path | None, build_one) -> Corpus:
    """The mixture's stream and held-out sets; ``build_one(cfg, tokenizer_file)`` builds one
    source's corpus (``select.build_corpus`` for a single source)."""
    from leanlm.engine import distributed as dist

    mix, t = cfg.data.mix, cfg.train
    tokenizer = tokenizer_file or (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if tokenizer is None:
        first = next((m["source"] for m in mix if str(m["source"]).startswith("tokens:")), None)
        if first is None:
            raise DataError("a mixture of text sources needs one tokenizer: set data.tokenizer (or mix tokens: shards)")
        tokenizer = Path(first.split(":", 1)[1])
        if not tokenizer.is_dir():
            raise DataError(
                f"data.mix source {first}: no such folder; make it with `leanlm tokenize SOURCE {tokenizer}`"
            )
    parts = []
    for item in mix:
        data = dataclasses.replace(cfg.data, source=item["source"], mix=[])
        train = dataclasses.replace(t, seed=source_seed(t.seed, item["name"]))
        parts.append(build_one(dataclasses.replace(cfg, data=data, train=train), tokenizer))
    shas = {p.tokenizer.sha() for p in parts}
    if len(shas) > 1:
        raise DataError("data.mix: the sources were tokenized with different tokenizers; use one for all")
    streams = [p.train for p in parts]
    if not all(isinstance(s, PackedTokens) for s in streams):
        raise DataError("data.mix takes tokenized sources only (tokens:DIR or files)")
    names, weights = [m["name"] for m in mix], [float(m["weight"]) for m in mix]
    stages = [(int(st["start"]) * t.batch_size, [float(st["weights"][n]) for n in names]) for st in cfg.data.mix_stages]
    world = dist.world_size()
    stream = MixedTokens(
        streams,
        names,
        weights,
        batch_size=t.batch_size,
        micro=t.micro_batch(world),
        rank=dist.rank(),
        world=world,
        seed=t.seed,
        stages=stages,
    )
    total = t.steps * t.batch_size
    for name, w, src in zip(names, weights, streams):
        epochs = total * w / sum(weights) / src.n
        if epochs > MAX_EPOCHS:
            warnings.warn(
                f"data.mix: source {name} would be read {epochs:.1f} times in this run (past ~{MAX_EPOCHS:.0f} "
                "epochs repetition stops helping); lower its weight or add data",
                stacklevel=2,
            )
    desc = "mixture " + ", ".join(
        f"{n} {w / sum(weights):.0%} ({p.description})" for n, w, p in zip(names, weights, parts)
    )
    counts = sum(p.train_counts for p in parts)
    held = {n: p.val_tokens for n, p in zip(names, parts)}
    val = np.concatenate(list(held.values()))
    return Corpus(
        tokenizer=parts[0].tokenizer,
        train=stream,
        val_tokens=val,
        train_counts=counts,
        description=desc,
        val_by_source=held,
        source_weights=dict(zip(names, (w / sum(weights) for w in weights))),
    )
