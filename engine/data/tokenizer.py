"""sentencepiece tokenizer: train one (BPE, byte fallback) on a text sample, or load a .model.

Training keeps text verbatim (identity normalisation, whitespace kept, whitespace-only pieces
allowed) so code and indentation survive the round trip; byte fallback means no input is ever
unknown. Ids: unk 0, bos 1, eos 2, no pad (packing needs none).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from leanlm.engine.errors import DataError
from leanlm.engine.run_files import write_no_follow

MAX_LINE_CHARS = 2048  # at most 4 bytes each in UTF-8


class Tokenizer:
    """A thin wrapper that keeps the serialized model so it can be copied into runs and checkpoints."""

    def __init__(self, proto: bytes) -> None:
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer {str(path)!r} not found; give a sentencepiece .model file or leave data.tokenizer "
                "empty to train one"
            )
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise DataError(f"tokenizer {str(path)!r} is not a sentencepiece model ({e})") from None

    def save(self, path: str | Path) -> None:
        """Write the model file (never through a symbolic link: a run folder may be shared)."""
        write_no_follow(path, self.proto)

    def sha(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return (
            ([self.bos_id] if bos and self.bos_id >= 0 else [])
            + ids
            + ([self.eos_id] if eos and self.eos_id >= 0 else [])
        )

    def encode_documents(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Batch-encode documents, each framed as [bos] + ids + [eos] for packing."""
        out = self.sp.encode(texts, num_threads=num_threads or -1)
        bos = [self.bos_id] if self.bos_id >= 0 else []
        eos = [self.eos_id] if self.eos_id >= 0 else []
        return [bos + ids + eos for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def train_tokenizer(texts: Iterable[str], vocab_size: int, num_threads: int = 2) -> Tokenizer:
    """Train a BPE model in memory on ``texts`` (documents; split into lines for sentencepiece)."""
    # sentencepiece trains on lines and drops any longer than max_sentence_length: cut long ones.
    lines = (
        line[i : i + MAX_LINE_CHARS]
        for text in texts
        for line in text.split("\n")
        if line.strip()
        for i in range(0, len(line), MAX_LINE_CHARS)
    )
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=4 * MAX_LINE_CHARS,
            input_sentence_size=4_000_000,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if need:  # byte pieces + specials + every character kept by character_coverage
            raise DataError(
                f"data.vocab_size={vocab_size} is too small for this corpus: sentencepiece needs "
                f"at least {need.group(2)} pieces for its characters; raise data.vocab_size"
            ) from None
        raise DataError(
            f"training a {vocab_size}-piece tokenizer failed ({msg}); lower data.vocab_size or use more text"
        ) from None
    return Tokenizer(buf.getvalue())
