"""The tokenizer files of an exported folder: ``tokenizer.json`` (built with the ``tokenizers``
library) and a ``tokenizer_config.json`` that ``AutoTokenizer`` loads with no custom code.

A sentencepiece BPE model becomes a ``tokenizers`` BPE with the same pieces and ids, merges in
the order of the merged piece's score (sentencepiece merges the adjacent pair whose union scores
highest), byte fallback, and sentencepiece's whitespace handling (a "▁" prepended, spaces as "▁").
That reproduces sentencepiece only for models trained the way leanlm trains them (identity
normalisation, dummy prefix); the export therefore checks the ids on a fixed sample and refuses on
any difference instead of writing a tokenizer that silently disagrees.
"""

from __future__ import annotations

import json
from typing import Any

from leanlm.engine.data.tokenizer import HF_CONFIG, HF_FILE, SentencePieceTokenizer, Tokenizer
from leanlm.engine.errors import CheckpointError

# Text a converted tokenizer must encode exactly as the original: code, runs of spaces, tabs,
# newlines, leading spaces, digits, accents, CJK, emoji (byte fallback), the special tokens' text.
PARITY_SAMPLES = (
    "",
    "def main(argv):\n\treturn  0\n",
    "    indented    with   runs of spaces\t\ttabs\n\n\nnewlines ",
    " leading space and trailing  ",
    "numbers 1234567890 3.14159 0x1F",
    "naïve café über Ærø — “quotes” ‘single’ …",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀 and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x07 control",
    "<s> literal specials </s> <unk>",
    "import os\nclass A(object):\n    def f(self, x: int = 3) -> str:\n        return f'{x!r}'\n",
)


def _sentencepiece_to_json(tok: SentencePieceTokenizer) -> str:
    """tokenizer.json of a sentencepiece BPE model (see the module docstring)."""
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    sp = tok.sp
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = [sp.get_score(i) for i in range(n)]
    merges: list[tuple[float, int, int, int, str, str]] = []
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], i, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    model = BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = Backend(model)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if tok.bos_id >= 0:  # AutoTokenizer(text) starts with BOS, as leanlm's training rows and prompts do
        bos = sp.id_to_piece(tok.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)]
        )
    return backend.to_str()


def _token(tok: Tokenizer, tid: int) -> str | None:
    if tid < 0:
        return None
    if isinstance(tok, SentencePieceTokenizer):
        return tok.sp.id_to_piece(tid)
    return tok.backend.id_to_token(tid)  # type: ignore[attr-defined]


def _unk_id(tok: Tokenizer) -> int:
    if isinstance(tok, SentencePieceTokenizer):
        return tok.sp.unk_id()
    text = tok.special.get("unk_token")  # type: ignore[attr-defined]
    tid = tok.backend.token_to_id(text) if text else None  # type: ignore[attr-defined]
    return -1 if tid is None else tid


def check_parity(tok: Tokenizer, tokenizer_json: str, samples: tuple[str, ...] = PARITY_SAMPLES) -> None:
    """Refuse (CheckpointError) when the written tokenizer encodes any sample differently."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer_json)
    # sentencepiece reads "<s>" in text as characters; transformers does too with split_special_tokens
    backend.encode_special_tokens = isinstance(tok, SentencePieceTokenizer)
    for text in samples:
        ours = tok.encode(text)
        theirs = backend.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            raise CheckpointError(
                f"the {tok.kind} tokenizer cannot be written as tokenizer.json with the same ids (sample "
                f"{text[:30]!r}: {ours[:8]} vs {theirs[:8]}); only tokenizers trained by leanlm or loaded from a "
                "tokenizer.json export"
            )


def tokenizer_files(tok: Tokenizer, *, seq_len: int) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json for ``AutoTokenizer``; ids checked against ``tok``."""
    if isinstance(tok, SentencePieceTokenizer):
        text = _sentencepiece_to_json(tok)
        check_parity(tok, text)
    else:
        text = tok.files[HF_FILE].decode()
    unk = _token(tok, _unk_id(tok))
    config: dict[str, Any] = {
        # PreTrainedTokenizerFast: reads tokenizer.json as it is in transformers 4.x and 5.x
        # ("LlamaTokenizer" would make 5.x rebuild its own pipeline; 5.x's "TokenizersBackend" is
        # unknown to 4.x).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(tok, tok.bos_id),
        "eos_token": _token(tok, tok.eos_id),
        "unk_token": unk,
        "pad_token": None,
        "add_bos_token": tok.bos_id >= 0,
        "add_eos_token": False,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
        # sentencepiece encodes the text "<s>" as characters: so does the exported tokenizer
        "split_special_tokens": isinstance(tok, SentencePieceTokenizer),
    }
    return {HF_FILE: text.encode(), HF_CONFIG: (json.dumps(config, indent=2) + "\n").encode()}
