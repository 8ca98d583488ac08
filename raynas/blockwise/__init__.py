"""NAS-BERT's block-wise pieces, pure torch (no Ray): teacher and student blocks, teacher pairs on disk,
the per-block training loop, bin-wise progressive shrinking and performance approximation.

The Ray side (one Tune trial per block stage, the shrinking searcher) is
:mod:`raynas.orchestration.blockwise_tune`; the pipeline is ``raynas nasbert``.
"""
