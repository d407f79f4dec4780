"""Tokenizers: a sentencepiece model (trained here, or any ``.model``) or a Hugging Face
``tokenizer.json`` (the ``tokenizers`` library: the format of today's open models), behind one
small interface the data path, ``generate`` and export use.

A tokenizer is the bytes of its files (``files``: what runs and checkpoints keep, so each is
self-contained): ``tokenizer.model`` for sentencepiece; ``tokenizer.json`` plus a
``tokenizer_config.json`` naming the special tokens for the ``tokenizers`` kind.

Training keeps text verbatim (identity normalisation, whitespace kept, whitespace-only pieces
allowed) so code and indentation survive the round trip; byte fallback means no input is ever
unknown. Ids: unk 0, bos 1, eos 2, no pad (packing needs none).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from leanlm.engine.errors import DataError
from leanlm.engine.run_files import write_no_follow

MAX_LINE_CHARS = 2048  # at most 4 bytes each in UTF-8
SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (SPM_FILE, HF_FILE, HF_CONFIG)


class Tokenizer:
    """What every tokenizer offers. ``bos_id`` / ``eos_id`` are -1 when it has no such token."""

    files: dict[str, bytes]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def bos_id(self) -> int:
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        raise NotImplementedError

    def _ids(self, texts: list[str], num_threads: int) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def kind(self) -> str:
        return "sentencepiece" if SPM_FILE in self.files else "tokenizers"

    def sha(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name])
        return digest.hexdigest()[:16]

    def save_to(self, folder: str | Path) -> None:
        """Write the files into ``folder`` (never through a symbolic link: a run folder may be shared)."""
        for name, data in self.files.items():
            write_no_follow(Path(folder) / name, data)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._ids([text], 1)[0]
        return (
            ([self.bos_id] if bos and self.bos_id >= 0 else [])
            + ids
            + ([self.eos_id] if eos and self.eos_id >= 0 else [])
        )

    def encode_documents(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Batch-encode documents, each framed as [bos] + ids + [eos] for packing (a missing
        special token is left out: a model without BOS separates documents by EOS alone)."""
        bos = [self.bos_id] if self.bos_id >= 0 else []
        eos = [self.eos_id] if self.eos_id >= 0 else []
        return [bos + ids + eos for ids in self._ids(texts, num_threads)]

    @staticmethod
    def from_files(files: dict[str, bytes]) -> Tokenizer:
        if SPM_FILE in files:
            return SentencePieceTokenizer(files[SPM_FILE])
        return HFTokenizer(files)

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        """A sentencepiece ``.model``, a ``tokenizer.json``, or a folder holding either (an HF
        model folder, a run or a checkpoint; ``tokenizer.json`` first when both are there)."""
        path = Path(path)
        if path.is_dir():
            if (path / HF_FILE).is_file():
                path = path / HF_FILE
            elif (path / SPM_FILE).is_file():
                path = path / SPM_FILE
            else:
                raise DataError(f"{path}: no {HF_FILE} or {SPM_FILE} in this folder; set data.tokenizer to one")
        if not path.is_file():
            raise DataError(
                f"tokenizer {str(path)!r} not found; give a sentencepiece .model, a tokenizer.json or a folder "
                "holding one, or leave data.tokenizer empty to train one"
            )
        if path.suffix == ".json":
            return HFTokenizer.from_json_file(path)
        try:
            return SentencePieceTokenizer(path.read_bytes())
        except RuntimeError as e:
            raise DataError(f"tokenizer {str(path)!r} is not a sentencepiece model ({e})") from None


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, kept serialized so it can be copied into runs and checkpoints."""

    def __init__(self, proto: bytes) -> None:
        self.files = {SPM_FILE: proto}
        self.sp = spm.SentencePieceProcessor(model_proto=proto)

    @property
    def proto(self) -> bytes:
        return self.files[SPM_FILE]

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def _ids(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads or -1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------- tokenizer.json
# Special tokens: ``tokenizer_config.json``'s ``bos_token`` / ``eos_token`` / ``unk_token`` (a
# string or ``{"content": ...}``), else the ids in the folder's ``config.json``. Text is encoded
# without the tokenizer's own post-processor (which may or may not add BOS, depending on the
# model); the data path adds BOS / EOS itself, so every model is framed the same way.

SPECIALS = ("bos_token", "eos_token", "unk_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """``files``: ``tokenizer.json`` and a ``tokenizer_config.json`` holding the special tokens."""

    def __init__(self, files: dict[str, bytes]) -> None:
        from tokenizers import Tokenizer as Backend

        self.files = dict(files)
        try:
            self.backend = Backend.from_str(files[HF_FILE].decode())
            config = json.loads(files.get(HF_CONFIG, b"{}"))
        except Exception as e:  # tokenizers raises its own Exception for a bad JSON
            raise DataError(f"{HF_FILE} cannot be read by the tokenizers library ({str(e)[:160]})") from None
        self.special = {k: _token_text(config.get(k)) for k in SPECIALS}
        self._bos, self._eos = self._id("bos_token"), self._id("eos_token")

    def _id(self, key: str) -> int:
        text = self.special.get(key)
        tid = self.backend.token_to_id(text) if text else None
        return -1 if tid is None else tid

    @classmethod
    def from_json_file(cls, path: Path) -> HFTokenizer:
        """``path``: a tokenizer.json; the special tokens come from the folder's tokenizer_config.json
        (or, failing that, config.json's token ids)."""
        folder = path.parent
        config: dict[str, Any] = {}
        if (folder / HF_CONFIG).is_file():
            try:
                config = json.loads((folder / HF_CONFIG).read_text())
            except (OSError, ValueError) as e:
                raise DataError(f"{folder / HF_CONFIG}: cannot read it ({e})") from None
        special = {k: _token_text(config.get(k)) for k in SPECIALS}
        tok = cls({HF_FILE: path.read_bytes(), HF_CONFIG: json.dumps(special).encode()})
        if (tok.bos_id < 0 or tok.eos_id < 0) and (folder / "config.json").is_file():
            tok._ids_from_model_config(json.loads((folder / "config.json").read_text()))
        return tok

    def _ids_from_model_config(self, config: dict[str, Any]) -> None:
        """Fill missing special tokens from config.json's ids (some folders name them only there)."""
        for key, id_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
            value = config.get(id_key)
            value = value[0] if isinstance(value, list) and value else value
            if self.special.get(key) is None and isinstance(value, int):
                self.special[key] = self.backend.id_to_token(value)
        self.files[HF_CONFIG] = json.dumps(self.special).encode()
        self._bos, self._eos = self._id("bos_token"), self._id("eos_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    def _ids(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int, num_threads: int = 2) -> SentencePieceTokenizer:
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
    return SentencePieceTokenizer(buf.getvalue())
