"""Benchmarks of the detect pipeline against the reference recipe and the bare model.

Run with ``make bench`` (or ``python -m benchmarks.run --help``); never part of ``make test``.
"""
