"""``build_corpus``: which reader a ``data.source`` spec goes to.

stdlib | PATH           text files, tokenized once into the cache   (corpus.file_corpus)
hf:NAME[:CONFIG]        a streamed HF dataset                       (corpus.hf_corpus)
tokens:DIR              leanlm shards from `leanlm tokenize`        (token_files)
nanogpt:PATH            nanoGPT's train.bin / val.bin               (token_files)
llmc:PATH               llm.c's headered .bin shards                (token_files)
megatron:PREFIX         Megatron's PREFIX.bin + PREFIX.idx          (token_files)
"""

from __future__ import annotations

from pathlib import Path

from leanlm.engine.config import RunConfig
from leanlm.engine.data.corpus import Corpus, file_corpus, hf_corpus
from leanlm.engine.data.mixture import mixture_corpus
from leanlm.engine.data.sources import path_source, stdlib_source
from leanlm.engine.data.token_files import TOKEN_FORMATS, token_corpus


def build_corpus(cfg: RunConfig, tokenizer_file: Path | None = None) -> Corpus:
    """Source -> tokenizer -> this rank's training stream and the fixed held-out tokens.

    ``tokenizer_file`` forces a tokenizer: a file, or a folder holding one (a checkpoint's own when
    resuming or evaluating, an imported model's folder for ``train.init_from``).
    """
    if cfg.data.mix:
        return mixture_corpus(cfg, tokenizer_file, build_corpus)
    spec = cfg.data.source
    if spec.startswith("hf:"):
        return hf_corpus(cfg, tokenizer_file)
    if spec.split(":", 1)[0] in TOKEN_FORMATS:
        return token_corpus(cfg, tokenizer_file)
    source = stdlib_source() if spec == "stdlib" else path_source(spec, cfg.data.text_field)
    return file_corpus(cfg, source, tokenizer_file)
