"""Architecture search (pure torch, no Ray): latency data and predictor, evolution, Pareto fronts, reports.

Ray adapters for these live in :mod:`raynas.orchestration` (latency tasks, the
Tune ``Searcher``); import submodules directly, e.g.
``from raynas.search.metrics import kendall_tau``.
"""
