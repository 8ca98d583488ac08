"""Recipes: short top-to-bottom ``main(argv)`` functions over raynas library calls.

Each is a ``raynas`` subcommand and also runs as ``python -m recipes.<name>``.
"""
