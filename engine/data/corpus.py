"""Text -> sentencepiece tokens -> packed fixed-length sequences, resumable and rank-disjoint.

Documents are framed ``[bos] text [eos]`` and concatenated; sequences are windows of
``seq_len + 1`` tokens (input = window[:-1], target = window[1:]), so no token is padding.

* File sources (``stdlib``, local files): tokenized once into a memory-mapped ``uint16/uint32``
  array in the cache. The training order is a seeded permutation of windows per epoch; the stream's
  whole state is one integer, the number of sequences consumed globally, so resume continues with
  the next unseen sequence on any world size. Step ``s``, micro-batch ``j``, rank ``r`` reads
  global positions ``p0 + (j * world + r) * micro + [0, micro)``: ranks are disjoint.
* HF sources stream: each rank reads its shard (``split_dataset_by_node``) through a token buffer;
  the state is the dataset's own ``state_dict()`` plus the buffer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from leanlm.engine import distributed as dist
from leanlm.engine.config import RunConfig
from leanlm.engine.data.sources import (
    FileSource,
    Piece,
    check_hub,
    hf_stream,
    is_validation,
)
from leanlm.engine.data.tokenizer import Tokenizer, train_tokenizer
from leanlm.engine.errors import DataError
from leanlm.engine.integrity import sha256_file

ENCODE_BATCH_DOCS = 512


def cache_root(cfg: RunConfig) -> Path:
    root = cfg.data.cache_dir or os.environ.get("LEANLM_CACHE") or Path.home() / ".cache" / "leanlm"
    return Path(root).expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 up to 65,536 pieces, else uint32 (the cache's and the shards' ids)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- training streams


class TrainStream(Protocol):
    """What the trainer needs from a data source: this rank's micro-batches for one step."""

    def next_step(self) -> list[torch.Tensor]: ...  # each (micro, seq_len + 1) int64

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PackedTokens:
    """Shuffled fixed-length windows over a token array, or over shards (windows are cut per
    shard and numbered globally; a shard's tail shorter than a window is left out); state =
    global sequences consumed."""

    def __init__(
        self,
        tokens: np.ndarray | list[np.ndarray],
        seq_len: int,
        *,
        batch_size: int,
        micro: int,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        self.shards = tokens if isinstance(tokens, list) else [tokens]
        self.seq_len = seq_len
        counts = [max(0, (len(t) - 1) // seq_len) for t in self.shards]
        self.first = np.cumsum([0, *counts])  # (shards + 1,): the first window of each shard
        self.n = int(self.first[-1])
        if self.n < 1:
            raise DataError(
                f"training split has {sum(len(t) for t in self.shards)} tokens, fewer than one sequence of "
                f"train.seq_len+1={seq_len + 1} (in any one shard); lower train.seq_len or add data"
            )
        self.batch_size, self.micro, self.rank, self.world = batch_size, micro, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.position = 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    @property
    def tokens(self) -> np.ndarray:
        """The token array of a one-array stream (file sources' cache)."""
        if len(self.shards) != 1:
            raise AttributeError("a sharded stream has no single token array; see .shards")
        return self.shards[0]

    @property
    def epoch(self) -> int:
        return self.position // self.n

    def _window(self, p: int) -> int:
        epoch, i = divmod(p, self.n)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def rows(self, positions: range) -> torch.Tensor:
        """The windows at these global positions: (len(positions), seq_len + 1) int64."""
        T, rows = self.seq_len, []
        for p in positions:
            w = self._window(p)
            s = int(np.searchsorted(self.first, w, side="right")) - 1  # the shard holding window w
            i = w - int(self.first[s])
            rows.append(self.shards[s][i * T : i * T + T + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def next_step(self) -> list[torch.Tensor]:
        p0, m, W = self.position, self.micro, self.world
        accum = self.batch_size // (m * W)
        batches = [
            self.rows(range(p0 + (j * W + self.rank) * m, p0 + (j * W + self.rank + 1) * m)) for j in range(accum)
        ]
        self.position += self.batch_size
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "packed_tokens", "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "packed_tokens" or state.get("n") != self.n:
            raise DataError(
                f"the checkpoint's data position is for a different corpus ({state.get('n')} sequences, "
                f"now {self.n}); resume with the same data.source, tokenizer and train.seq_len"
            )
        self.position = int(state["position"])


class StreamedTokens:
    """Packs a streamed HF dataset into windows through a token buffer (this rank's shard)."""

    def __init__(
        self,
        make_dataset,
        tok: Tokenizer,
        *,
        text_field: str,
        holdout: float,
        seq_len: int,
        batch_size: int,
        micro: int,
        world: int,
    ) -> None:
        self.make_dataset, self.tok, self.text_field, self.holdout = (
            make_dataset,
            tok,
            text_field,
            holdout,
        )
        self.seq_len, self.micro, self.accum = seq_len, micro, batch_size // (micro * world)
        self.epoch, self.buffer = 0, cast(list[int], [])
        self.ds = make_dataset(0)
        self._it: Iterator[str] | None = None

    def _docs(self) -> Iterator[str]:
        while True:
            for rec in self.ds:
                text = rec.get(self.text_field)
                if isinstance(text, str) and text.strip() and not (self.holdout and is_validation(text, self.holdout)):
                    yield text
            self.epoch += 1
            self.ds = self.make_dataset(self.epoch)

    def _take(self, n: int) -> list[int]:
        if self._it is None:
            self._it = self._docs()
        docs = self._it
        while len(self.buffer) < n:
            self.buffer += self.tok.encode(next(docs), bos=True, eos=True)
        out, self.buffer = self.buffer[:n], self.buffer[n - 1 :]  # windows overlap by one token
        return out

    def next_step(self) -> list[torch.Tensor]:
        T = self.seq_len
        return [
            torch.tensor([self._take(T + 1) for _ in range(self.micro)], dtype=torch.int64) for _ in range(self.accum)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "streamed",
            "epoch": self.epoch,
            "hf": self.ds.state_dict(),
            "buffer": list(self.buffer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "streamed":
            raise DataError("the checkpoint's data position is for a file source, not a streamed HF dataset")
        self.epoch, self.buffer = int(state["epoch"]), list(state["buffer"])
        self.ds = self.make_dataset(self.epoch)
        self.ds.load_state_dict(state["hf"])
        self._it = None


# ----------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Everything the trainer needs from the data side."""

    tokenizer: Tokenizer
    train: TrainStream
    val_tokens: np.ndarray  # fixed held-out token set, (n,) int
    train_counts: np.ndarray  # unigram counts over (a sample of) the training split, (vocab,)
    description: str
    val_by_source: dict[str, np.ndarray] = field(default_factory=dict)  # data.mix: each source's held-out set
    source_weights: dict[str, float] = field(default_factory=dict)  # data.mix: normalised weights


def _tokenizer_for(cfg: RunConfig, tokenizer_file: Path | None, fingerprint: str, sample_texts) -> Tokenizer:
    """The run's tokenizer: ``tokenizer_file`` (a resumed or evaluated checkpoint's own), else
    ``data.tokenizer``, else one trained on a sample of the training split, cached by content."""
    if tokenizer_file is not None:
        return Tokenizer.load(tokenizer_file)
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    d = cfg.data
    key = hashlib.sha256(
        f"{fingerprint}|{d.vocab_size}|{d.tokenizer_sample_mb}|{d.val_fraction}|{CACHE_FORMAT}".encode()
    ).hexdigest()[:20]
    cached = cache_root(cfg) / "tokenizers" / f"{key}.model"
    if cached.is_file():
        return Tokenizer.load(cached)
    texts = list(sample_texts())
    if not texts:
        raise DataError(
            f"data.source={d.source!r}: no training text to train a tokenizer on (every document is empty, "
            f"unreadable or held out; for .jsonl/.parquet, check data.text_field={d.text_field!r})"
        )
    trained = train_tokenizer(texts, d.vocab_size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(cached, trained.proto)
    return trained


def file_sample(source: FileSource, fraction: float, budget_bytes: float):
    """A hash-chosen, unbiased sample of about ``budget_bytes`` of training pieces; when the hash
    keeps none (one big document, a tiny budget), the first training pieces up to the budget."""
    total = sum(f.stat().st_size for f in source.files) or 1
    keep = min(1.0, budget_bytes / total)

    def gen():
        sampled = False
        for piece in source.pieces(fraction):
            if not piece.held_out and is_validation("tok:" + piece.key, keep):
                sampled = True
                yield piece.text
        if sampled:
            return
        n = 0
        for piece in source.pieces(fraction):
            if not piece.held_out:
                yield piece.text
                n += len(piece.text.encode("utf-8"))
                if n >= budget_bytes:
                    return

    return gen


CACHE_FORMAT = 2  # 2: pieces split by byte ranges when documents are few; checksums in meta.json


def _tokenize_files(source: FileSource, tok: Tokenizer, fraction: float, folder: Path) -> None:
    """Write train.bin / val.bin (concatenated framed pieces) and meta.json into ``folder``."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
        files = {"train": ftrain, "val": fval}
        batch: list[Piece] = []

        def flush() -> None:
            framed = tok.encode_documents([p.text for p in batch])
            for piece, ids in zip(batch, framed, strict=True):
                split = "val" if piece.held_out else "train"
                if not piece.bos and ids[:1] == [tok.bos_id]:
                    ids = ids[1:]  # continues the previous piece's text
                if not piece.eos and ids[-1:] == [tok.eos_id]:
                    ids = ids[:-1]
                np.asarray(ids, dtype=dtype).tofile(files[split])
                counts[split] += len(ids)
                docs[split] += piece.bos  # a document (or a contiguous stretch of one) starts here
            batch.clear()

        for piece in source.pieces(fraction):
            batch.append(piece)
            if len(batch) >= ENCODE_BATCH_DOCS:
                flush()
        flush()
    source.warn_skipped()
    if counts["train"] == 0:
        hint = (
            f"; is '{source.text_field}' the right data.text_field?"
            if any("field" in why for why in source.skipped)
            else ""
        )
        raise DataError(f"data.source under {source.root}: the corpus is empty (no readable UTF-8 text){hint}")
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "tokens": counts,
        "documents": docs,
        "tokenizer": tok.sha(),
        "skipped": source.skipped,
        "sha256": {name: sha256_file(tmp / f"{name}.bin") for name in ("train", "val")},
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():  # another process won the race; keep theirs
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    else:
        os.replace(tmp, folder)


def _cache_problem(folder: Path) -> str | None:
    """Why the token cache in ``folder`` cannot be trusted (None when it verifies): meta.json
    readable, each .bin file of the size its token count implies and of the recorded sha256."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        for name in ("train", "val"):
            path = folder / f"{name}.bin"
            want = int(meta["tokens"][name]) * dtype.itemsize
            if not path.is_file() or path.stat().st_size != want:
                return f"{name}.bin is missing or has the wrong size"
            if sha256_file(path) != meta["sha256"][name]:
                return f"{name}.bin does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable ({type(e).__name__})"
    return None


def _ensure_token_cache(source: FileSource, tok: Tokenizer, fraction: float, folder: Path) -> None:
    """Tokenize into ``folder`` unless a verified cache is there; a damaged one is rebuilt."""
    if folder.exists():
        problem = _cache_problem(folder)
        if problem is None:
            return
        warnings.warn(f"data: token cache {folder} is damaged ({problem}); rebuilding it", stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _tokenize_files(source, tok, fraction, folder)


def file_corpus(cfg: RunConfig, source: FileSource, tokenizer_file: Path | None) -> Corpus:
    d, t, rank, world = cfg.data, cfg.train, dist.rank(), dist.world_size()
    if dist.is_main():
        fingerprint = source.fingerprint()
        sample = file_sample(source, d.val_fraction, d.tokenizer_sample_mb * 1e6)
        tok = _tokenizer_for(cfg, tokenizer_file, fingerprint, sample)
        ident = f"{fingerprint}|{d.val_fraction}|{tok.sha()}|{CACHE_FORMAT}"
        folder = cache_root(cfg) / "tokens" / hashlib.sha256(ident.encode()).hexdigest()[:20]
        _ensure_token_cache(source, tok, d.val_fraction, folder)
        dist.broadcast_object(str(folder))
        dist.broadcast_object(tok.files)
    else:
        folder = Path(dist.broadcast_object(None))
        tok = Tokenizer.from_files(dist.broadcast_object(None))
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r") if meta["tokens"]["val"] else np.zeros(0, dtype)
    micro = t.micro_batch(world)
    stream = PackedTokens(
        train, t.seq_len, batch_size=t.batch_size, micro=micro, rank=rank, world=world, seed=t.seed, shuffle=d.shuffle
    )
    sample = train[:50_000_000]
    counts = np.bincount(sample, minlength=tok.vocab_size)
    desc = (
        f"{d.source}: {meta['documents']['train']} train / {meta['documents']['val']} held-out segments, "
        f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens (cache {folder})"
    )
    return Corpus(tokenizer=tok, train=stream, val_tokens=held_out(val, cfg), train_counts=counts, description=desc)


def held_out(val: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """The first eval.tokens (+1 for the last target) held-out tokens: a fixed set."""
    want = cfg.eval.tokens + 1
    if len(val) < cfg.train.seq_len + 1:
        raise DataError(
            f"the held-out split has {len(val)} tokens, fewer than one sequence (train.seq_len+1="
            f"{cfg.train.seq_len + 1}); raise data.val_fraction or give an HF validation split"
        )
    if len(val) < want:
        warnings.warn(
            f"data: held-out split has {len(val) - 1} tokens, fewer than eval.tokens={cfg.eval.tokens}; using all",
            stacklevel=2,
        )
    return np.asarray(val[:want]).astype(np.int64)


def hf_corpus(cfg: RunConfig, tokenizer_file: Path | None) -> Corpus:
    from datasets.distributed import split_dataset_by_node

    d, t, rank, world = cfg.data, cfg.train, dist.rank(), dist.world_size()
    holdout = 0.0 if d.hf_val_split else d.val_fraction
    check_hub(d.source, d.hf_timeout_s)

    def make_train(epoch: int):
        ds = hf_stream(d.source, d.hf_split, d.hf_data_files)
        if d.hf_shuffle_buffer:
            ds = ds.shuffle(seed=t.seed, buffer_size=d.hf_shuffle_buffer)
        ds.set_epoch(epoch)
        return split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds

    def texts(split: str, want_val: bool, budget: float):
        def gen():
            n = 0
            for rec in hf_stream(d.source, split, d.hf_data_files):
                text = rec.get(d.text_field)
                if not isinstance(text, str) or not text.strip():
                    continue
                if holdout and is_validation(text, holdout) != want_val:
                    continue
                yield text
                n += len(text.encode("utf-8"))
                if n >= budget:
                    return

        return gen

    budget = d.tokenizer_sample_mb * 1e6
    fingerprint = f"{d.source}|{d.hf_split}|{d.hf_data_files}|{d.text_field}|{holdout}"
    if dist.is_main():  # one rank trains (or loads) the tokenizer; the others receive it
        tok = _tokenizer_for(cfg, tokenizer_file, fingerprint, texts(d.hf_split, False, budget))
        dist.broadcast_object(tok.files)
    else:
        tok = Tokenizer.from_files(dist.broadcast_object(None))
    val_split = d.hf_val_split or d.hf_split
    val: list[int] = []
    for text in texts(val_split, True, float("inf"))():
        val += tok.encode(text, bos=True, eos=True)
        if len(val) > cfg.eval.tokens:
            break
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for text in texts(d.hf_split, False, min(budget, 4e6))():
        counts += np.bincount(tok.encode(text), minlength=tok.vocab_size)
    if counts.sum() == 0:
        raise DataError(f"data.source={d.source!r}: split {d.hf_split!r} has no text in field '{d.text_field}'")
    stream = StreamedTokens(
        make_train,
        tok,
        text_field=d.text_field,
        holdout=holdout,
        seq_len=t.seq_len,
        batch_size=t.batch_size,
        micro=t.micro_batch(world),
        world=world,
    )
    desc = f"{d.source} (streamed; train split {d.hf_split!r}, held-out {val_split!r}{' by hash' if holdout else ''})"
    val_tokens = held_out(np.asarray(val), cfg)
    return Corpus(tokenizer=tok, train=stream, val_tokens=val_tokens, train_counts=counts, description=desc)
