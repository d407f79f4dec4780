"""leanlm.engine.data: text -> sentencepiece tokens -> packed, resumable, rank-disjoint sequences.

    sources    where documents come from (stdlib, files, HF datasets) and the train/held-out split
    tokenizer  the sentencepiece tokenizer (trained on a sample, or loaded)
    corpus     the token cache, the training streams and ``build_corpus``

``build_corpus`` and the stream types are re-exported here.
"""

from leanlm.engine.data.corpus import (
    Corpus,
    PackedTokens,
    StreamedTokens,
    TrainStream,
    build_corpus,
    cache_root,
    token_dtype,
)

__all__ = ["Corpus", "PackedTokens", "StreamedTokens", "TrainStream", "build_corpus", "cache_root", "token_dtype"]
