"""Pre-training data for supernet training: packed corpora and BERT masking.

No Ray here: a Ray Train adapter shards these Arrow datasets with
:func:`shard_for_worker` inside each worker.
"""

from __future__ import annotations

from raynas.data.corpus import CorpusConfig, build_corpus, builtin_documents, corpus_stats, shard_for_worker
from raynas.data.masking import MaskingSpecials, MLMCollator, mask_tokens

__all__ = [
    "CorpusConfig", "MLMCollator", "MaskingSpecials", "build_corpus", "builtin_documents", "corpus_stats",
    "mask_tokens", "shard_for_worker",
]
