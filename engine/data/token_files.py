"""Corpora from token files, memory-mapped, never re-tokenized: leanlm's own shards
(``tokens:DIR``, from ``leanlm tokenize``) and the files other engines write, given the tokenizer
they were made with (``data.tokenizer``):

    nanogpt:PATH    nanoGPT: raw uint16 ``train.bin`` / ``val.bin`` (PATH: the folder or train.bin)
    llmc:PATH       llm.c: shards with a 256 x int32 header (magic 20240520 -> uint16, 20240801 ->
                    uint32; [2] = token count); ``*train*.bin`` / ``*val*.bin`` in the folder PATH
    megatron:PREFIX Megatron-LM: ``PREFIX.bin`` + ``PREFIX.idx`` (``MMIDIDX`` index: dtype code,
                    sequence lengths and byte pointers); documents must lie in file order

Files without a held-out part hold out their last ``data.val_fraction`` of tokens (at a document
boundary when the format has an index). Windows are cut per file and numbered globally
(``PackedTokens``); every rank maps the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leanlm.engine import distributed as dist
from leanlm.engine.config import RunConfig
from leanlm.engine.data.corpus import Corpus, PackedTokens, held_out
from leanlm.engine.data.shards import open_shards
from leanlm.engine.data.tokenizer import Tokenizer
from leanlm.engine.errors import DataError

TOKEN_FORMATS = ("tokens", "nanogpt", "llmc", "megatron")
LLMC_MAGIC: dict[int, np.dtype] = {20240520: np.dtype("<u2"), 20240801: np.dtype("<u4")}
MEGATRON_DTYPES = {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}


def _not_npy(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(6) == b"\x93NUMPY":
            raise DataError(f"{path} is a .npy array (its header would be read as tokens); give a raw token file")


def nanogpt_files(path: Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    folder, train = (path, path / "train.bin") if path.is_dir() else (path.parent, path)
    if not train.is_file():
        raise DataError(f"nanogpt:{path}: no train.bin there")
    _not_npy(train)
    val = folder / "val.bin"
    return [np.memmap(train, dtype="<u2", mode="r")], (np.memmap(val, dtype="<u2", mode="r") if val.is_file() else None)


def _llmc_file(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=256)
    if len(header) < 256 or int(header[0]) not in LLMC_MAGIC:
        raise DataError(f"{path}: not an llm.c token file (magic {int(header[0]) if len(header) else None})")
    dtype, count = LLMC_MAGIC[int(header[0])], int(header[2])
    if path.stat().st_size < 1024 + count * dtype.itemsize:
        raise DataError(f"{path}: truncated (its header says {count} tokens)")
    return np.memmap(path, dtype=dtype, mode="r", offset=1024, shape=(count,))


def llmc_files(path: Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    files = sorted(path.glob("*.bin")) if path.is_dir() else [path]
    train = [f for f in files if "val" not in f.name]
    val = [f for f in files if "val" in f.name]
    if not train:
        raise DataError(f"llmc:{path}: no training .bin files")
    vals = [_llmc_file(f) for f in val]
    return [_llmc_file(f) for f in train], (np.concatenate(vals) if vals else None)


def megatron_files(prefix: Path) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray]:
    """(train arrays, None, document start offsets in tokens) of a Megatron indexed dataset."""
    idx, bin_ = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    if not idx.is_file() or not bin_.is_file():
        raise DataError(f"megatron:{prefix}: needs {idx.name} and {bin_.name}")
    raw = idx.read_bytes()
    if raw[:9] != b"MMIDIDX\x00\x00" or int(np.frombuffer(raw, "<u8", 1, 9)[0]) != 1:
        raise DataError(f"{idx}: not a Megatron MMIDIDX index (version 1)")
    code = raw[17]
    if code not in MEGATRON_DTYPES:
        raise DataError(f"{idx}: token dtype code {code} is not an integer type")
    dtype = np.dtype(MEGATRON_DTYPES[code])
    n_seq = int(np.frombuffer(raw, "<u8", 1, 18)[0])
    sizes = np.frombuffer(raw, "<i4", n_seq, 34).astype(np.int64)
    pointers = np.frombuffer(raw, "<i8", n_seq, 34 + 4 * n_seq)
    if n_seq and np.any(pointers != np.concatenate([[0], np.cumsum(sizes[:-1] * dtype.itemsize)])):
        raise DataError(f"{idx}: its sequences are not stored in file order; re-pack the dataset")
    tokens = np.memmap(bin_, dtype=dtype, mode="r")
    if len(tokens) < sizes.sum():
        raise DataError(f"{bin_}: truncated ({len(tokens)} tokens, the index says {int(sizes.sum())})")
    return [tokens[: int(sizes.sum())]], None, np.concatenate([[0], np.cumsum(sizes)[:-1]])


def _split_tail(arrays: list[np.ndarray], fraction: float, starts: np.ndarray | None) -> tuple[list, np.ndarray]:
    """Hold out the last ``fraction`` of the tokens (at a document start when known)."""
    tokens = arrays[-1]
    cut = int(len(tokens) * (1 - fraction))
    if starts is not None and len(starts):
        cut = int(starts[np.searchsorted(starts, cut)]) if cut <= starts[-1] else int(starts[-1])
    return [*arrays[:-1], tokens[:cut]], np.asarray(tokens[cut:])


def _tokenizer(cfg: RunConfig, kind: str, path: Path, tokenizer_file: Path | None) -> Tokenizer | None:
    """A checkpoint's own, else data.tokenizer; shards may bring theirs (None: use theirs)."""
    if tokenizer_file is not None:
        return Tokenizer.load(tokenizer_file)
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    if kind == "tokens":
        return None
    raise DataError(
        f"data.source={cfg.data.source}: {kind} token files carry no tokenizer; set data.tokenizer to the one "
        "they were made with"
    )


def token_corpus(cfg: RunConfig, tokenizer_file: Path | None) -> Corpus:
    kind, _, where = cfg.data.source.partition(":")
    path, d, t = Path(where).expanduser(), cfg.data, cfg.train
    tok = _tokenizer(cfg, kind, path, tokenizer_file)
    if kind == "tokens":
        # the main rank verifies every checksum; the others check sizes and learn the verdict
        problem = None
        if dist.is_main():
            try:
                open_shards(path, tok, verify=True)
            except DataError as e:
                problem = str(e)
        problem = dist.broadcast_object(problem)
        if problem:
            raise DataError(problem)
        shards = open_shards(path, tok, verify=False)
        tok = tok or Tokenizer.load(path)
        train, val = shards.train, shards.val
        desc = (
            f"tokens:{path}: {len(shards.meta['shards'])} shards, {shards.meta['tokens']['train']:,} / "
            f"{shards.meta['tokens']['val']:,} train / held-out tokens (tokenizer {shards.meta['tokenizer']})"
        )
    else:
        assert tok is not None
        starts = None
        if kind == "nanogpt":
            train, val_or_none = nanogpt_files(path)
        elif kind == "llmc":
            train, val_or_none = llmc_files(path)
        else:
            train, val_or_none, starts = megatron_files(path)
        if val_or_none is None:
            train, val_or_none = _split_tail(train, d.val_fraction, starts)
        val = val_or_none
        _check_ids(train[0], tok, cfg.data.source)
        desc = f"{cfg.data.source}: {len(train)} files, {sum(len(a) for a in train):,} / {len(val):,} tokens"
    world, micro = dist.world_size(), t.micro_batch(dist.world_size())
    stream = PackedTokens(
        train,
        t.seq_len,
        batch_size=t.batch_size,
        micro=micro,
        rank=dist.rank(),
        world=world,
        seed=t.seed,
        shuffle=d.shuffle,
    )
    counts = np.bincount(np.asarray(train[0][:50_000_000]), minlength=tok.vocab_size)[: tok.vocab_size]
    return Corpus(tokenizer=tok, train=stream, val_tokens=held_out(val, cfg), train_counts=counts, description=desc)


def _check_ids(tokens: np.ndarray, tok: Tokenizer, source: str) -> None:
    """Ids past the tokenizer's vocabulary: the files were made with another tokenizer."""
    top = int(np.asarray(tokens[:10_000_000]).max(initial=0))
    if top >= tok.vocab_size:
        raise DataError(
            f"data.source={source}: token id {top} is outside data.tokenizer's vocabulary ({tok.vocab_size}); "
            "set data.tokenizer to the tokenizer the files were made with"
        )
