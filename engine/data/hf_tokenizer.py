"""A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) as a leanlm tokenizer.

Special tokens: ``tokenizer_config.json``'s ``bos_token`` / ``eos_token`` / ``unk_token`` (a
string or ``{"content": ...}``), else the ids in the folder's ``config.json``. Text is encoded
without the tokenizer's own post-processor (which may or may not add BOS, depending on the model);
the data path adds BOS / EOS itself, so every model is framed the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from leanlm.engine.data.tokenizer import HF_CONFIG, HF_FILE, Tokenizer
from leanlm.engine.errors import DataError

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
    def load(cls, path: Path) -> HFTokenizer:
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
