"""Structured compression of raynas models: pruning gates, their targets and exact physical removal.

Submodules are imported by their users (``raynas.compression.removal``, ...), not here, so
that importing one of them never pulls in the others.
"""
