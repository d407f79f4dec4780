"""leanlm.engine.data: text -> sentencepiece tokens -> packed, resumable, rank-disjoint sequences.

    sources    where documents come from (stdlib, files, HF datasets) and the train/held-out split
    tokenizer  the sentencepiece tokenizer (trained on a sample, or loaded)
    corpus     the token cache, the training streams, file and HF corpora
    shards     `leanlm tokenize`'s shard folders (writer and verified reader)
    token_files  corpora from token files: leanlm shards, nanoGPT, llm.c, Megatron
    select     ``build_corpus``: which reader a data.source goes to

``build_corpus`` and the stream types are re-exported here.
"""

from leanlm.engine.data.corpus import (
    Corpus,
    PackedTokens,
    StreamedTokens,
    TrainStream,
    cache_root,
    token_dtype,
)
from leanlm.engine.data.select import build_corpus

__all__ = ["Corpus", "PackedTokens", "StreamedTokens", "TrainStream", "build_corpus", "cache_root", "token_dtype"]
