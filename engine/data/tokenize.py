"""``leanlm tokenize SOURCE OUT_DIR``: any source the engine reads (stdlib, a file or folder, a
streamed ``hf:`` dataset) tokenized once into shards (``leanlm.engine.data.shards``), in worker
processes, resumable: run the same command again after an interruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leanlm.engine.data.corpus import file_sample
from leanlm.engine.data.shards import UNIT_BYTES, file_units, stream_units, tokenize_to_shards
from leanlm.engine.data.sources import hf_stream, path_source, stdlib_source
from leanlm.engine.data.tokenizer import Tokenizer, train_tokenizer
from leanlm.engine.errors import DataError


def tokenize_source(
    spec: str,
    out: str | Path,
    *,
    tokenizer: str = "",
    vocab_size: int = 4096,
    workers: int = 1,
    val_fraction: float = 0.02,
    text_field: str = "text",
    hf_split: str = "train",
    hf_data_files: list[str] | None = None,
    unit_bytes: int = UNIT_BYTES,
    sample_mb: float = 8.0,
) -> dict[str, Any]:
    """Tokenize ``spec`` into the shard folder ``out``; returns its meta. ``tokenizer``: a
    sentencepiece ``.model``, a ``tokenizer.json`` or a folder holding one; empty = train a
    sentencepiece BPE of ``vocab_size`` pieces on ``sample_mb`` MB of the source (as ``leanlm
    train`` does), or reuse the one an interrupted run of this command left in ``out``."""
    out = Path(out)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if spec.startswith("hf:"):

        def stream():
            return hf_stream(spec, hf_split, hf_data_files)

        docs = (
            (f"{spec}:{i}", r[text_field])
            for i, r in enumerate(stream())
            if isinstance(r.get(text_field), str) and r[text_field].strip()
        )
        tok = _tokenizer(tokenizer, out, vocab_size, lambda: _prefix_texts(stream(), text_field, sample_mb * 1e6))
        units = stream_units(docs, unit_bytes)
        return tokenize_to_shards(units, out, tok, source=spec, fraction=val_fraction, workers=workers)
    source = stdlib_source() if spec == "stdlib" else path_source(spec, text_field)
    tok = _tokenizer(tokenizer, out, vocab_size, file_sample(source, val_fraction, sample_mb * 1e6))
    return tokenize_to_shards(
        file_units(source, unit_bytes),
        out,
        tok,
        source=spec,
        fraction=val_fraction,
        split_all=source.by_byte_ranges(val_fraction),
        root=str(source.root),
        text_field=text_field,
        workers=workers,
    )


def _prefix_texts(dataset, field: str, budget: float):
    n = 0
    for record in dataset:
        text = record.get(field)
        if isinstance(text, str) and text.strip():
            yield text
            n += len(text)
            if n >= budget:
                return


def _tokenizer(spec: str, out: Path, vocab_size: int, sample) -> Tokenizer:
    if spec:
        return Tokenizer.load(spec)
    if any((out / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        return Tokenizer.load(out)  # an interrupted run's: its finished shards stay valid
    texts = list(sample())
    if not texts:
        raise DataError("the source has no text to train a tokenizer on; give --tokenizer")
    return train_tokenizer(texts, vocab_size)
