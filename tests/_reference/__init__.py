"""Test oracles: the exact in-process algorithms the distributed engine is checked against.

The package (``winnow``) never imports these; tests and benchmarks do (from the repo root).
"""
