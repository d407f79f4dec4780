"""Token shards: ``leanlm tokenize SOURCE OUT_DIR`` writes them once; ``data.source=tokens:DIR``
trains from them, memory-mapped, with no re-tokenization.

Layout of ``OUT_DIR``::

    meta.json                 format, dtype, vocabulary, bos/eos, tokenizer sha, source, held-out
                              fraction, and per shard: tokens, documents, sha256 (train and val)
    tokenizer.model | tokenizer.json + tokenizer_config.json     the tokenizer it was made with
    train/00000.bin           raw little-endian uint16 (vocabulary <= 65,536) or uint32 tokens,
    train/00000.docs.npy      documents framed [bos] doc [eos]; int64 document start offsets
    val/00000.bin, ...        the held-out documents of the same unit
    00000.done.json           written last: the shard is complete (what a resume checks)

Documents go to shards by a fixed rule on the sorted source (consecutive files, or consecutive
streamed documents, of about ``unit_bytes`` of text per shard), never by completion order, so the
output does not depend on the number of worker processes. Held-out: a stable hash per document
(``sources.is_validation``); a document cut into pieces (a big one, or a source of few plain-text
files) holds out an evenly spaced fraction of its own pieces. Each shard is written under a
temporary name and renamed; a rerun skips shards whose ``.done.json`` and files verify.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanlm.engine.data.corpus import token_dtype
from leanlm.engine.data.sources import (
    BIG_DOCUMENT_CHARS,
    FileSource,
    Piece,
    document_parts,
    framed_pieces,
    is_validation,
)
from leanlm.engine.data.tokenizer import Tokenizer
from leanlm.engine.errors import DataError
from leanlm.engine.integrity import sha256_file

FORMAT = "leanlm-shards"
VERSION = 1
UNIT_BYTES = 256 << 20  # text per shard: ~2^26 tokens, 128 MiB of uint16


@dataclass(frozen=True)
class Unit:
    """One shard's share of the source: files (a file source) or documents (a stream)."""

    index: int
    files: tuple[str, ...] = ()
    documents: tuple[tuple[str, str], ...] = ()


def _pieces(key: str, text: str, fraction: float, split_all: bool) -> Iterator[Piece]:
    """One document as split units; a cut document holds out its own evenly spaced pieces (the
    count restarts per document, so a shard's split does not depend on the shards before it)."""
    if not split_all and len(text) <= BIG_DOCUMENT_CHARS:
        yield Piece(key, text, is_validation(key, fraction))
        return
    parts = document_parts(text)
    held = [math.ceil((j + 1) * fraction) > math.ceil(j * fraction) for j in range(len(parts))]
    yield from framed_pieces(key, parts, held)


def _unit_documents(unit: Unit, root: str, text_field: str) -> Iterator[tuple[str, str]]:
    if unit.documents:
        yield from unit.documents
        return
    source = FileSource(root=Path(root), files=[Path(f) for f in unit.files], text_field=text_field)
    yield from source.documents()


def _write_unit(job: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one unit into its train/val shard files (a worker process's task)."""
    unit: Unit = job["unit"]
    out, name = Path(job["out"]), f"{unit.index:05d}"
    tok = Tokenizer.from_files(job["tokenizer"])
    dtype = token_dtype(tok.vocab_size)
    ids: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    starts: dict[str, list[int]] = {"train": [], "val": []}
    size = {"train": 0, "val": 0}
    batch: list[Piece] = []

    def flush() -> None:
        encoded = tok.encode_documents([piece.text for piece in batch], num_threads=job["threads"])
        for piece, framed in zip(batch, encoded, strict=True):
            split = "val" if piece.held_out else "train"
            if not piece.bos and framed[:1] == [tok.bos_id]:
                framed = framed[1:]
            if not piece.eos and framed[-1:] == [tok.eos_id]:
                framed = framed[:-1]
            if piece.bos:
                starts[split].append(size[split])
            ids[split].append(np.asarray(framed, dtype=dtype))
            size[split] += len(framed)
        batch.clear()

    for key, text in _unit_documents(unit, job["root"], job["text_field"]):
        batch.extend(_pieces(key, text, job["fraction"], job["split_all"]))
        if len(batch) >= 512:
            flush()
    flush()
    record: dict[str, Any] = {"index": unit.index}
    for split in ("train", "val"):
        folder = out / split
        tmp = folder / f".{name}.bin.tmp{os.getpid()}"
        tokens = np.concatenate(ids[split]) if ids[split] else np.zeros(0, dtype)
        with open(tmp, "wb") as fh:
            tokens.tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / f"{name}.bin")
        np.save(folder / f"{name}.docs.npy", np.asarray(starts[split], dtype=np.int64))
        record[split] = {
            "tokens": int(size[split]),
            "documents": len(starts[split]),
            "sha256": sha256_file(folder / f"{name}.bin"),
        }
    (out / f"{name}.done.json").write_text(json.dumps(record))
    return record


def _shard_ok(out: Path, index: int, dtype: np.dtype) -> dict[str, Any] | None:
    """The record of a finished shard whose files verify, else None (to be written again)."""
    name = f"{index:05d}"
    try:
        record = json.loads((out / f"{name}.done.json").read_text())
        for split in ("train", "val"):
            path = out / split / f"{name}.bin"
            if path.stat().st_size != record[split]["tokens"] * dtype.itemsize:
                return None
            if sha256_file(path) != record[split]["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def file_units(source: FileSource, unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Consecutive sorted files of about ``unit_bytes`` each."""
    units: list[Unit] = []
    current: list[str] = []
    size = 0
    for f in source.files:
        current.append(str(f))
        size += f.stat().st_size
        if size >= unit_bytes:
            units.append(Unit(len(units), files=tuple(current)))
            current, size = [], 0
    if current:
        units.append(Unit(len(units), files=tuple(current)))
    return units


def stream_units(documents: Iterator[tuple[str, str]], unit_bytes: int = UNIT_BYTES) -> Iterator[Unit]:
    """Consecutive streamed documents of about ``unit_bytes`` of text each."""
    current: list[tuple[str, str]] = []
    size, index = 0, 0
    for key, text in documents:
        current.append((key, text))
        size += len(text)
        if size >= unit_bytes:
            yield Unit(index, documents=tuple(current))
            current, size, index = [], 0, index + 1
    if current:
        yield Unit(index, documents=tuple(current))


def tokenize_to_shards(
    units: Iterator[Unit] | list[Unit],
    out: Path,
    tok: Tokenizer,
    *,
    source: str,
    fraction: float,
    split_all: bool = False,
    root: str = "",
    text_field: str = "text",
    workers: int = 1,
) -> dict[str, Any]:
    """Write every unit's shard (skipping verified ones), then ``meta.json``. Returns the meta."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (out / split).mkdir(exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # complete again only when every shard is
    tok.save_to(out)
    dtype = token_dtype(tok.vocab_size)
    base: dict[str, Any] = {"out": str(out), "tokenizer": tok.files, "root": root, "text_field": text_field}
    # one encoding thread per worker process when there are several (they would contend otherwise)
    base.update(fraction=fraction, split_all=split_all, threads=1 if workers > 1 else 0)
    records: dict[int, dict[str, Any]] = {}
    start = time.perf_counter()
    text_bytes = 0

    def jobs() -> Iterator[dict[str, Any]]:
        nonlocal text_bytes
        for unit in units:
            done = _shard_ok(out, unit.index, dtype)
            if done is not None:
                records[unit.index] = done
                continue
            text_bytes += sum(Path(f).stat().st_size for f in unit.files) + sum(len(t) for _, t in unit.documents)
            yield {**base, "unit": unit}

    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for record in pool.imap_unordered(_write_unit, jobs()):
                records[record["index"]] = record
    else:
        for job in jobs():
            record = _write_unit(job)
            records[record["index"]] = record
    if not records or not any(r["train"]["tokens"] for r in records.values()):
        raise DataError(f"{source}: the corpus is empty (no readable UTF-8 text); nothing to tokenize")
    shards = [records[i] for i in sorted(records)]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.str,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "framing": "[bos] doc [eos]",
        "tokenizer": tok.sha(),
        "source": source,
        "val_fraction": fraction,
        "shards": shards,
        "tokens": {s: sum(r[s]["tokens"] for r in shards) for s in ("train", "val")},
        "documents": {s: sum(r[s]["documents"] for r in shards) for s in ("train", "val")},
        "seconds": time.perf_counter() - start,
        "text_bytes_tokenized": text_bytes,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ----------------------------------------------------------------------------- reading


@dataclass
class Shards:
    """A verified shard folder: its meta, memory-mapped train shards and held-out tokens."""

    folder: Path
    meta: dict[str, Any]
    train: list[np.ndarray]
    val: np.ndarray


def open_shards(folder: Path, tok: Tokenizer | None, *, verify: bool = True) -> Shards:
    """Map the shards of ``folder``; every problem (incomplete folder, wrong size, failed checksum,
    another tokenizer) is one DataError naming the fix, before any step."""
    meta_path = folder / "meta.json"
    if not folder.is_dir():
        raise DataError(f"data.source=tokens:{folder}: no such folder; make it with `leanlm tokenize SOURCE {folder}`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise DataError(
            f"{folder}: no readable meta.json (an unfinished `leanlm tokenize`?); run the same command again to "
            "finish it"
        ) from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{folder}: meta.json is not a leanlm shard folder ({meta.get('format')!r})")
    if tok is not None and tok.sha() != meta["tokenizer"]:
        raise DataError(
            f"{folder}: shards were made with another tokenizer ({meta['tokenizer']}, this run's is {tok.sha()}); "
            "leave data.tokenizer empty to use the shards' own, or tokenize again with this one"
        )
    dtype = np.dtype(meta["dtype"])
    arrays: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for record in meta["shards"]:
        for split in ("train", "val"):
            path = folder / split / f"{record['index']:05d}.bin"
            want = record[split]["tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != want:
                raise DataError(f"{path}: missing or truncated ({want} bytes expected); run `leanlm tokenize` again")
            if verify and sha256_file(path) != record[split]["sha256"]:
                raise DataError(f"{path}: fails its checksum; run `leanlm tokenize` again (it rewrites bad shards)")
            if record[split]["tokens"]:
                arrays[split].append(np.memmap(path, dtype=dtype, mode="r"))
    val = np.concatenate(arrays["val"]) if arrays["val"] else np.zeros(0, dtype)
    return Shards(folder=folder, meta=meta, train=arrays["train"], val=val)


def fingerprint(meta: dict[str, Any]) -> str:
    """What a resume must find again: the shards' checksums."""
    return ",".join(r["train"]["sha256"][:12] for r in meta["shards"])
